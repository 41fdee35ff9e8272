"""The clients people already have, against a real service process: huggingface_hub's InferenceClient (a TEI client
nobody here wrote) on /predict and TEI's root route, text pairs, raw scores, left truncation and multi-label
thresholds against a direct transformers run, API keys and request ids, across the engine process boundary
(--workers 2); and pairs and left truncation with the default model. Every status and shape is tested in process in
tests/test_clients.py."""

import httpx
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.default_model import build_default_model
from service.runner import ModelRunner, load_classifier
from service.tokenization import PairIds, TextEncoder
from tests.conftest import TINY_MAX_LENGTH, start_service

pytestmark = pytest.mark.integration  # service processes (see pyproject's markers)

KEY = "a-test-key"
AUTHORIZED = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["I loved this film", "What a waste of two hours", "A long story " + "that goes on and on " * 40]
PAIRS = [["A man is eating food.", "Someone eats."], ["The film was long", "it was " + "very " * 60 + "boring"]]


def direct_logits(model_dir, inputs: list, side: str = "right") -> list[list[float]]:
    """Each text or pair run through the model alone, unpadded, in fp32."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, truncation_side=side)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    logits = []
    with torch.inference_mode():
        for item in inputs:
            texts = [item] if isinstance(item, str) else item
            encoded = tokenizer(*texts, truncation="longest_first", max_length=TINY_MAX_LENGTH, return_tensors="pt")
            logits.append(model(**encoded).logits[0].tolist())
    return logits


def by_label(labels: list[dict]) -> dict[str, float]:
    return {item["label"]: item["score"] for item in labels}


@pytest.fixture(scope="module")
def keyed_workers_url(tiny_model_dir):
    with start_service(tiny_model_dir, {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_API_KEYS": f"{KEY},another-key"}) as url:
        yield url


def test_huggingface_hubs_client_gets_the_labels_and_scores_classify_answers(keyed_workers_url):
    classified = httpx.post(f"{keyed_workers_url}/classify", json={"texts": TEXTS}, headers=AUTHORIZED, timeout=30)
    assert classified.status_code == 200, classified.text
    for base_url in (f"{keyed_workers_url}/predict", keyed_workers_url):  # /predict and TEI's root route
        client = InferenceClient(base_url=base_url, api_key=KEY)
        for text, result in zip(TEXTS[:2], classified.json()["results"]):
            answer = client.text_classification(text)
            assert [item.label for item in answer] == [item["label"] for item in result["labels"]]
            # the same path, in another batch: padded differently, equal to float error
            assert [item.score for item in answer] == pytest.approx([item["score"] for item in result["labels"]], abs=1e-6)
        best = classified.json()["results"][0]["label"]
        assert [item.label for item in client.text_classification(TEXTS[0], top_k=1)] == [best]
    with pytest.raises(HfHubHTTPError) as refused:
        InferenceClient(base_url=f"{keyed_workers_url}/predict", api_key="wrong").text_classification(TEXTS[0])
    assert refused.value.response.status_code == 401


def test_pairs_raw_scores_and_left_truncation_match_the_model_run_alone(keyed_workers_url, tiny_model_dir):
    def post(path: str, body: dict) -> httpx.Response:
        response = httpx.post(f"{keyed_workers_url}{path}", json=body, headers=AUTHORIZED, timeout=30)
        assert response.status_code == 200, response.text
        return response

    inputs = [TEXTS[0], *PAIRS, TEXTS[2]]
    logits = direct_logits(tiny_model_dir, inputs)
    classified = post("/classify", {"texts": inputs, "raw_scores": True}).json()["results"]
    predicted = post("/predict", {"inputs": inputs, "raw_scores": True, "truncate": True}).json()
    softmaxed = post("/classify", {"texts": inputs}).json()["results"]
    for expected, result, labels, activated in zip(logits, classified, predicted, softmaxed):
        assert by_label(result["labels"]) == pytest.approx({"NEGATIVE": expected[0], "POSITIVE": expected[1]}, abs=1e-4)
        assert by_label(labels) == by_label(result["labels"])
        probabilities = torch.tensor(expected).softmax(-1).tolist()
        assert by_label(activated["labels"]) == pytest.approx({"NEGATIVE": probabilities[0], "POSITIVE": probabilities[1]}, abs=1e-4)
    # TEI's single pair: exactly two strings, answered as one list
    [pair_logits] = direct_logits(tiny_model_dir, [PAIRS[1]])
    one_pair = post("/predict", {"inputs": PAIRS[1], "raw_scores": True, "truncate": True}).json()
    assert by_label(one_pair) == pytest.approx({"NEGATIVE": pair_logits[0], "POSITIVE": pair_logits[1]}, abs=1e-4)

    [kept_end] = direct_logits(tiny_model_dir, [TEXTS[2] + " and the end was good"], side="left")
    left = post("/classify", {"texts": [TEXTS[2] + " and the end was good"], "raw_scores": True, "truncation_direction": "left"})
    result = left.json()["results"][0]
    assert result["truncated"] and by_label(result["labels"]) == pytest.approx({"NEGATIVE": kept_end[0], "POSITIVE": kept_end[1]}, abs=1e-4)


def test_keys_close_classify_and_predict_and_the_request_id_comes_back(keyed_workers_url):
    for path, body in (("/classify", {"texts": ["ok"]}), ("/predict", {"inputs": "ok"})):
        refused = httpx.post(f"{keyed_workers_url}{path}", json=body, headers={"X-Request-Id": "mine-1"}, timeout=30)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.headers["x-request-id"] == refused.json()["request_id"] == "mine-1"
        served = httpx.post(f"{keyed_workers_url}{path}", json=body, headers={**AUTHORIZED, "X-Request-Id": "mine-2"}, timeout=30)
        assert served.status_code == 200 and served.headers["x-request-id"] == "mine-2"
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{keyed_workers_url}{path}", timeout=30).status_code == 200


def test_a_multi_label_model_lists_the_labels_above_the_threshold(multi_label_model_dir):
    texts = TEXTS[:2]
    logits = direct_logits(multi_label_model_dir, texts)
    with start_service(multi_label_model_dir) as url:
        results = httpx.post(f"{url}/classify", json={"texts": texts, "threshold": 0.5}, timeout=30).json()["results"]
    for expected, result in zip(logits, results):
        probabilities = dict(zip(("ACTION", "COMEDY", "DRAMA"), torch.tensor(expected).sigmoid().tolist()))
        assert by_label(result["labels"]) == pytest.approx(probabilities, abs=1e-4)
        above = sorted((label for label, p in probabilities.items() if p > 0.5), key=lambda label: -probabilities[label])
        assert result["above_threshold"] == above


def test_with_the_default_model_pairs_and_left_truncation_match_the_model_run_alone(tmp_path):
    """The embedded default model (a smoke build: MiniLM's WordPiece tokenizer, which gives pairs token type ids)."""
    build_default_model(tmp_path / "default", limit=32, progress=False)
    loaded = load_classifier(str(tmp_path / "default"), torch.device("cpu"))
    tokenizer, model = loaded.tokenizer, loaded.model
    max_length = tokenizer.model_max_length
    review = "The opening was dull. " * 200 + "But the ending was wonderful and moving."
    inputs = [("A man is eating food.", "Someone eats."), review, (review, "Was the ending good?")]
    encoded = TextEncoder(tokenizer, max_length).encode(inputs, truncate=True, side="left")
    assert [type(text.ids) for text in encoded] == [PairIds, list, PairIds] and all(text.truncated for text in encoded[1:])
    runner = ModelRunner(model, torch.device("cpu"), "fp32", tokenizer.pad_token_id)
    sequences = [text.ids for text in encoded]
    batched = runner.forward(runner.collate(sequences, max(map(len, sequences))))
    reference = AutoTokenizer.from_pretrained(tmp_path / "default", truncation_side="left")
    with torch.inference_mode():
        for item, ids, logits in zip(inputs, sequences, batched):
            texts = [item] if isinstance(item, str) else item
            alone = reference(*texts, truncation="longest_first", max_length=max_length, return_tensors="pt")
            assert list(ids) == alone["input_ids"][0].tolist()
            torch.testing.assert_close(logits, model(**alone).logits[0], atol=1e-4, rtol=1e-4)
