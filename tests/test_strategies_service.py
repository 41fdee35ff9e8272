"""The strategies as modes of the real service: /info and /metrics show them, batches follow them, and latency is
counted by length class."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.settings import Settings
from tests.conftest import TINY_MAX_LENGTH, start_service


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_length_classes_are_a_small_fixed_set():
    assert metrics.LENGTH_CLASSES == ("<=16", "<=32", "<=64", "<=128", "<=256", "<=512", ">512")
    assert [metrics.length_class(n) for n in (1, 16, 17, 64, 65, 512, 513, 100_000)] == [
        "<=16",
        "<=16",
        "<=32",
        "<=64",
        "<=128",
        "<=512",
        ">512",
        ">512",
    ]


def test_settings_take_the_modes_from_the_environment_and_refuse_unknown_ones(monkeypatch):
    assert (Settings().padding, Settings().batching) == ("dynamic", "buckets")
    monkeypatch.setenv("CLASSIFIER_PADDING", "fixed")
    monkeypatch.setenv("CLASSIFIER_BATCHING", "arrival")
    assert (Settings().padding, Settings().batching) == ("fixed", "arrival")
    monkeypatch.setenv("CLASSIFIER_BATCHING", "sorted")
    with pytest.raises(ValueError, match="buckets"):
        Settings()


@pytest.mark.integration
def test_fixed_padding_and_arrival_batching_run_as_modes_of_the_service(tiny_model_dir):
    with start_service(tiny_model_dir, {"CLASSIFIER_PADDING": "fixed", "CLASSIFIER_BATCHING": "arrival", "CLASSIFIER_TUNE": "false"}) as url:
        info = httpx.get(f"{url}/info").json()
        assert (info["settings"]["padding"], info["settings"]["batching"]) == ("fixed", "arrival")
        assert (info["batching"]["padding"], info["batching"]["batching"]) == ("fixed", "arrival")
        before = samples(url)
        texts = ["good", "the film was " + "very " * 20 + "long"]
        response = httpx.post(f"{url}/classify", json={"texts": texts}, timeout=30)
        assert response.status_code == 200
        after = samples(url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert after[("classifier_batching_info", (("batching", "arrival"), ("padding", "fixed")))] == 1
    # Every batch padded to the tiny model's maximum length, whatever its texts.
    padded = delta("classifier_batch_padded_length_sum")
    assert padded > 0 and padded == TINY_MAX_LENGTH * delta("classifier_batch_padded_length_count")
    assert delta("classifier_padded_tokens_total") == TINY_MAX_LENGTH * delta("classifier_batch_size_sum")
    short, long = (result["tokens"] for result in response.json()["results"])
    for tokens in (short, long):
        length = metrics.length_class(tokens)
        assert delta("classifier_text_latency_seconds_count", length=length) >= 1
        assert delta("classifier_text_queue_wait_seconds_count", length=length) >= 1
    assert metrics.length_class(short) != metrics.length_class(long)


@pytest.mark.integration
def test_the_default_service_reports_dynamic_padding_and_buckets(service_url):
    info = httpx.get(f"{service_url}/info").json()
    assert (info["batching"]["padding"], info["batching"]["batching"]) == ("dynamic", "buckets")
    assert samples(service_url)[("classifier_batching_info", (("batching", "buckets"), ("padding", "dynamic")))] == 1
