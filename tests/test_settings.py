"""Settings come from flags and the environment and are checked before anything starts."""

import pytest
from pydantic import ValidationError

from service.__main__ import main, parse_flags
from service.settings import Settings


def test_environment_and_flags(monkeypatch):
    monkeypatch.setenv("MODEL", "/models/mine")
    monkeypatch.setenv("CLASSIFIER_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("CLASSIFIER_BUCKET_BOUNDS", "[32, 128, 512]")
    settings = Settings()
    assert (settings.model, settings.max_batch_tokens, settings.bucket_bounds) == ("/models/mine", 4096, [32, 128, 512])
    flagged = Settings(**parse_flags(["--port", "9000", "--model", "/models/other"]))
    assert (flagged.port, flagged.model, flagged.host) == (9000, "/models/other", "127.0.0.1")


def test_classifier_model_wins_over_plain_model(monkeypatch):
    monkeypatch.setenv("MODEL", "/models/generic")
    monkeypatch.setenv("CLASSIFIER_MODEL", "/models/specific")
    assert Settings().model == "/models/specific"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("bucket_bounds", [64, 32]),
        ("bucket_bounds", []),
        ("precision", "fp8"),
        ("max_batch_size", 0),
        ("merge_min_efficiency", 1.5),
        ("port", 70000),
    ],
)
def test_bad_settings_are_refused(name, value):
    with pytest.raises(ValidationError):
        Settings(**{name: value})


def test_bad_settings_stop_the_command_with_a_message(monkeypatch):
    monkeypatch.setenv("CLASSIFIER_PRECISION", "fp8")
    with pytest.raises(SystemExit, match="invalid settings"):
        main([])


def test_a_drain_delay_must_leave_time_within_the_grace_period():
    with pytest.raises(ValidationError, match="drain_delay_seconds must be shorter"):
        Settings(drain_delay_seconds=30, shutdown_grace_seconds=30)
