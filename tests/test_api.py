"""The HTTP API of a real service process, end to end: real models' answers, batching, metrics, a full queue and
shutdown. Each status, message and header the API documents is tested in process, in tests/test_http.py."""

import asyncio
import signal

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loadtest.probe import scrape, wait_for
from tests.conftest import TINY_MAX_LENGTH, run_service, start_service

pytestmark = pytest.mark.integration  # service processes or external programs (see pyproject's markers)

REVIEWS = [
    "I loved this film",
    "What a waste of two hours",
    "brilliant",
    "The plot was slow, the acting awful, and the ending made no sense at all. Not very funny either.",
    "good music",
    "A long story " + "that goes on and on " * 40,  # longer than the tiny model's 64 tokens: truncated
    "It is a great movie, and the actors are very good in it!",
    "boring",
]


def reference_scores(model_dir, texts: list[str], activation) -> list[list[float]]:
    """Each text run through the model alone, unpadded, in fp32: what batching must not change."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    scores = []
    with torch.inference_mode():
        for text in texts:
            inputs = tokenizer(text, truncation=True, max_length=TINY_MAX_LENGTH, return_tensors="pt")
            scores.append(activation(model(**inputs).logits.float())[0].tolist())
    return scores


def classify(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/classify", json=body, timeout=30)


def test_classify_answers_every_text_in_order_with_labels_scores_and_token_counts(service_url, tiny_model_dir):
    response = classify(service_url, texts=REVIEWS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == str(tiny_model_dir)
    expected = reference_scores(tiny_model_dir, REVIEWS, lambda logits: logits.softmax(-1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text, result, scores in zip(REVIEWS, body["results"], expected):
        by_label = {item["label"]: item["score"] for item in result["labels"]}
        assert by_label == pytest.approx({"NEGATIVE": scores[0], "POSITIVE": scores[1]}, abs=1e-4)
        assert [item["score"] for item in result["labels"]] == sorted(by_label.values(), reverse=True)
        assert (result["label"], result["score"]) == (result["labels"][0]["label"], result["labels"][0]["score"])
        assert sum(by_label.values()) == pytest.approx(1.0, abs=1e-5)
        full_length = len(tokenizer(text)["input_ids"])
        assert result["tokens"] == min(full_length, TINY_MAX_LENGTH)
        assert result["truncated"] == (full_length > TINY_MAX_LENGTH)
    assert [r["truncated"] for r in body["results"]].count(True) == 1


def test_batching_does_not_change_answers(tiny_model_dir):
    """Mixed lengths sent concurrently, alone and in groups, get the scores each text gets alone (fp32, 1e-4)."""
    texts = [f"{REVIEWS[i % len(REVIEWS)]} {'very ' * (i * 3 % 25)}{i}" for i in range(48)]
    expected = reference_scores(tiny_model_dir, texts, lambda logits: logits.softmax(-1))
    # A wide window makes concurrent texts share batches, so the comparison is a real one. fp32 is forced: tuning
    # could pick bf16 wherever it is faster and within its tolerance (see test_tuning_service for that bound).
    with start_service(tiny_model_dir, {"CLASSIFIER_BATCH_WINDOW_MS": "50", "CLASSIFIER_PRECISION": "fp32"}) as url:

        async def send_all() -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                singles = [client.post("/classify", json={"texts": text}) for text in texts[:32]]
                groups = [client.post("/classify", json={"texts": texts[i : i + 4]}) for i in range(32, 48, 4)]
                responses = await asyncio.gather(*singles, *groups)
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            return [result for r in responses for result in r.json()["results"]]

        results = asyncio.run(send_all())
        batch_size_sum, batches = _metric(url, "classifier_batch_size_sum"), _metric(url, "classifier_batch_size_count")
    assert batch_size_sum / batches > 2, "texts were not batched together, so the test would prove nothing"
    for result, scores in zip(results, expected):
        by_label = {item["label"]: item["score"] for item in result["labels"]}
        assert by_label == pytest.approx({"NEGATIVE": scores[0], "POSITIVE": scores[1]}, abs=1e-4)


async def _until(condition, what: str, seconds: float = 30) -> None:
    """Wait, off the event loop, until `condition()` holds; events are ordered by what the service shows."""
    await asyncio.to_thread(wait_for, condition, seconds, what)


def _metric(url: str, name: str, **labels: str) -> float:
    """The value of a sample in the service's /metrics, summed over the series with these labels."""
    return scrape(url).exported(name, **labels)


def test_multi_label_scores_are_independent_sigmoids(multi_label_model_dir):
    texts = REVIEWS[:3]
    expected = reference_scores(multi_label_model_dir, texts, torch.sigmoid)
    with start_service(multi_label_model_dir) as url:
        results = classify(url, texts=texts).json()["results"]
    for result, scores in zip(results, expected):
        by_label = {item["label"]: item["score"] for item in result["labels"]}
        assert by_label == pytest.approx(dict(zip(("ACTION", "COMEDY", "DRAMA"), scores)), abs=1e-4)


def test_regression_returns_the_raw_value(regression_model_dir):
    texts = REVIEWS[:3]
    expected = reference_scores(regression_model_dir, texts, lambda logits: logits)
    with start_service(regression_model_dir) as url:
        results = classify(url, texts=texts).json()["results"]
    for result, [value] in zip(results, expected):
        assert result["label"] == "RATING"
        assert result["score"] == pytest.approx(value, abs=1e-4)


def test_health_ready_info_docs_and_metrics(service_url, tiny_model_dir):
    assert httpx.get(f"{service_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{service_url}/ready").status_code == 200
    info = httpx.get(f"{service_url}/info").json()
    assert info["labels"] == ["NEGATIVE", "POSITIVE"]
    assert (info["device"], info["precision"], info["max_length"]) == ("cpu", "fp32", TINY_MAX_LENGTH)
    assert info["batching"]["bucket_bounds"][-1] == TINY_MAX_LENGTH
    assert info["settings"]["model"] == str(tiny_model_dir)
    assert httpx.get(f"{service_url}/docs").status_code == 200
    assert "/classify" in httpx.get(f"{service_url}/openapi.json").json()["paths"]
    classify(service_url, texts=REVIEWS)
    text = httpx.get(f"{service_url}/metrics").text
    for name in (
        'classifier_requests_total{route="/classify",status="200"}',
        "classifier_request_duration_seconds_bucket",
        "classifier_queue_wait_seconds_bucket",
        "classifier_batch_inference_seconds_bucket",
        "classifier_batch_size_bucket",
        "classifier_batch_padding_efficiency_bucket",
        "classifier_real_tokens_total",
        "classifier_padded_tokens_total",
        "classifier_queue_texts",
        "classifier_queue_tokens",
        "classifier_queue_drain_seconds",
        "classifier_input_tokens_bucket",
        "classifier_truncated_texts_total",
        'classifier_batch_flushes_total{reason="window"}',
        'classifier_model_info{device="cpu"',
    ):
        assert name in text, name
    real, padded = _metric(service_url, "classifier_real_tokens_total"), _metric(service_url, "classifier_padded_tokens_total")
    assert 0 < real <= padded


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir):
    env = {
        "CLASSIFIER_BATCH_WINDOW_MS": "3000",  # texts sit in the queue long enough to fill it
        "CLASSIFIER_MAX_TEXTS_PER_REQUEST": "4",
        "CLASSIFIER_MAX_QUEUE_TOKENS": str(4 * TINY_MAX_LENGTH),
    }
    long_text = "word " * 100
    with start_service(tiny_model_dir, env) as url:

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.create_task(client.post("/classify", json={"texts": [long_text] * 4}))
                await _until(lambda: _metric(url, "classifier_queue_texts") == 4, "the first request queued")
                second = await client.post("/classify", json={"texts": ["short"]})
                return await first, second

        first, second = asyncio.run(scenario())
        rejected = _metric(url, "classifier_rejected_texts_total", reason="queue_full")
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert "queue is full" in second.json()["error"]
    assert first.status_code == 200  # what was accepted is answered
    assert rejected == 1


def test_shutdown_answers_every_accepted_text(tiny_model_dir):
    """SIGTERM while texts wait in the queue: they are still classified before the process exits."""
    with run_service(tiny_model_dir, {"CLASSIFIER_BATCH_WINDOW_MS": "1500"}) as (url, process):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                pending = asyncio.create_task(client.post("/classify", json={"texts": REVIEWS}))
                # Encoded texts are queued in the same step, before the event loop can answer /metrics.
                await _until(lambda: _metric(url, "classifier_input_tokens_count") == len(REVIEWS), "texts queued")
                process.send_signal(signal.SIGTERM)
                return await pending

        response = asyncio.run(scenario())
        # uvicorn re-raises SIGTERM once it has shut down cleanly, so the exit reads as the signal
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert response.status_code == 200
    assert len(response.json()["results"]) == len(REVIEWS)
