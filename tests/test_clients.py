"""What the clients people already have send, in process (tests/test_http.py's harness: the real front half over the
tiny tokenizer, `FakeScorer` as the back half, whose logits for a text are [its length, the sum of its ids]): text
pairs, raw scores and multi-label thresholds, left truncation, TEI's /predict shapes and errors, request ids, API
keys and CORS. Against a real server process and real models: tests/test_clients_service.py."""

import asyncio
import logging
import math

import pytest

from service import ipc, request_ids
from service.api import create_app
from service.errors import InferenceFailed
from service.postprocess import ProblemType
from service.settings import Settings
from service.tokenization import PairIds
from tests.conftest import TINY_MAX_LENGTH
from tests.fakes import FakeScorer, begun_in_a_task
from tests.test_http import CLS, LABELS, MODEL_ID, TOKENIZER, error_body, fake_engine, serving, settings


def run(scenario, back: FakeScorer | None = None, problem_type: ProblemType = "regression", **overrides):
    async def main():
        app = create_app(settings(**overrides), fake_engine(back or FakeScorer(), problem_type))
        async with serving(app) as client:
            return await scenario(client)

    return asyncio.run(main())


def fake_logits(ids: list[int]) -> list[float]:
    """What FakeScorer answers for a text's ids."""
    return [float(len(ids)), float(sum(ids))]


def ranked(scores: list[float]) -> list[dict]:
    return sorted(({"label": label, "score": score} for label, score in zip(LABELS, scores)), key=lambda item: -item["score"])


def approx(labels: list[dict]) -> list[dict]:
    """Ranked labels whose scores compare with a tolerance."""
    return [{"label": item["label"], "score": pytest.approx(item["score"])} for item in labels]


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(value - max(logits)) for value in logits]
    return [value / sum(exps) for value in exps]


def sigmoid(logits: list[float]) -> list[float]:
    return [1 / (1 + math.exp(-value)) for value in logits]


# Text pairs


class RecordingScorer(FakeScorer):
    """Keeps the token ids the back half was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[int]] = []

    async def score(self, token_ids: list[list[int]], deadline: float, caller: str = "") -> list[list[float]]:
        self.seen += token_ids
        return await super().score(token_ids, deadline, caller)


def test_pairs_are_encoded_with_the_pair_template_and_carry_their_second_texts_start():
    back = RecordingScorer()
    long_pair = ["premise " * 40, "hypothesis " * 40]  # longest_first cuts both

    async def scenario(client):
        texts = ["a film", ["a man eats", "someone is eating"], long_pair]
        return await client.post("/classify", json={"texts": texts})

    response = run(scenario, back)
    assert response.status_code == 200, response.text
    single, pair, cut = response.json()["results"]
    assert back.seen[0] == TOKENIZER("a film")["input_ids"] and type(back.seen[0]) is list
    for seen, result, (text, text_pair) in zip(back.seen[1:], (pair, cut), (("a man eats", "someone is eating"), long_pair)):
        expected = TOKENIZER(text, text_pair, truncation="longest_first", max_length=TINY_MAX_LENGTH)
        assert isinstance(seen, PairIds) and list(seen) == expected["input_ids"]
        assert seen.second_start == expected["token_type_ids"].index(1)
        assert result["labels"] == ranked(fake_logits(expected["input_ids"])) and result["tokens"] == len(seen)
    assert not pair["truncated"] and cut["truncated"] and single["tokens"] == 4


def test_a_malformed_pair_is_a_422_naming_it():
    async def scenario(client):
        return [
            await client.post("/classify", json={"texts": ["ok", ["only one"]]}),
            await client.post("/classify", json={"texts": [["a", " "]]}),
        ]

    wrong_length, blank = run(scenario)
    assert wrong_length.status_code == blank.status_code == 422
    assert "texts[1] must be a string or a [text, text_pair] pair of strings" in error_body(wrong_length)["error"]
    assert "texts[0][1] is empty or blank" in error_body(blank)["error"]


def test_pair_ids_the_caller_and_the_http_request_id_cross_to_the_engine_process(tmp_path, caplog):
    """The engine process gets the pair's second-text start back on its ids and the request's caller, and its log
    lines about the request carry the request's id (here: a failure it logs)."""
    seen: list[list[int]] = []
    callers: list[str] = []

    async def score(token_ids: list[list[int]], deadline: float, caller: str) -> list[list[float]]:
        seen.extend(token_ids)
        callers.append(caller)
        if token_ids[0][0] == -1:
            raise KeyError("a bug")
        return [[1.0] for _ in token_ids]

    async def main():
        address = f"ipc://{tmp_path}/engine.sock"
        server = ipc.EngineServer(
            address, lambda ids, deadline, caller, on_done: begun_in_a_task(score(ids, deadline, caller), on_done), lambda: ipc.EngineState("ready")
        )
        client = ipc.EngineClient(address)
        try:
            await client.wait_for_state()
            request_ids.current.set("req-42")
            await client.score([[1, 2], PairIds([2, 5, 3, 7, 3], 3)], asyncio.get_running_loop().time() + 30, "client_id:batch-7")
            with pytest.raises(Exception, match="internal error"):
                await client.score([[-1]], asyncio.get_running_loop().time() + 30)
        finally:
            await client.close()
            await server.close()

    caplog.handler.addFilter(request_ids.RequestIdFilter())
    with caplog.at_level(logging.ERROR, logger="service.ipc"):
        asyncio.run(main())
    assert type(seen[0]) is list and isinstance(seen[1], PairIds) and seen[1].second_start == 3
    assert list(seen[1]) == [2, 5, 3, 7, 3]
    assert callers == ["client_id:batch-7", ""]
    [failure] = [record for record in caplog.records if record.getMessage() == "scoring failed unexpectedly"]
    assert failure.request_id == "req-42"


# Activation control


def test_raw_scores_answer_the_logits_and_the_default_the_models_activation():
    async def scenario(client):
        return [
            await client.post("/classify", json={"texts": ["a film"]}),
            await client.post("/classify", json={"texts": ["a film"], "raw_scores": True}),
        ]

    activated, raw = run(scenario, problem_type="single_label_classification")
    logits = fake_logits(TOKENIZER("a film")["input_ids"])
    assert raw.json()["results"][0]["labels"] == ranked(logits)
    assert activated.json()["results"][0]["labels"] == approx(ranked(softmax(logits)))
    assert "above_threshold" not in activated.json()["results"][0]  # single-label: no threshold


def test_a_multi_label_model_lists_the_labels_above_the_threshold():
    ids = TOKENIZER("a")["input_ids"]  # 3 tokens: sigmoid(3) = 0.953 for NEGATIVE, ~1 for POSITIVE

    async def scenario(client):
        return [
            (await client.post("/classify", json={"texts": ["a"], **body})).json()["results"][0]
            for body in ({}, {"threshold": 0.96}, {"threshold": 0.96, "raw_scores": True}, {"threshold": 1})
        ]

    default, higher, raw, none = run(scenario, problem_type="multi_label_classification")
    assert default["labels"] == approx(ranked(sigmoid(fake_logits(ids))))
    assert default["above_threshold"] == ["POSITIVE", "NEGATIVE"]
    assert higher["above_threshold"] == ["POSITIVE"]
    assert raw["labels"] == ranked(fake_logits(ids)) and raw["above_threshold"] == ["POSITIVE"]  # probabilities decide
    assert none["above_threshold"] == []


# Left truncation


def test_left_truncation_keeps_the_end_of_a_long_text():
    back = RecordingScorer()
    text = "start " + "film " * 100 + "the end"

    async def scenario(client):
        for direction in ("left", "Left", "right"):
            await client.post("/classify", json={"texts": [text], "truncation_direction": direction})

    run(scenario, back)
    left, capitalised, right = back.seen
    TOKENIZER.truncation_side = "left"
    try:
        assert left == capitalised == TOKENIZER(text, truncation=True, max_length=TINY_MAX_LENGTH)["input_ids"]
    finally:
        TOKENIZER.truncation_side = "right"
    assert right == TOKENIZER(text, truncation=True, max_length=TINY_MAX_LENGTH)["input_ids"] != left


# TEI's /predict


def test_predict_answers_in_teis_shapes():
    examples = [
        ({"inputs": "I like you. I love you"}, "single"),
        ({"inputs": ["I like you.", "I love you"]}, "pair"),  # exactly two strings: one pair, as TEI reads them
        ({"inputs": [["I like you."], ["I hate you."]]}, "invalid"),  # TEI has no one-string lists either
        ({"inputs": ["I like you.", "I hate you.", "meh"]}, "batch"),
        ({"inputs": [["I like you.", "I love you"], "meh"]}, "batch"),
        ({"inputs": "I like you.", "raw_scores": True, "truncate": True, "truncation_direction": "left"}, "single"),
        ({"inputs": "I like you.", "parameters": {}}, "batch"),  # the Inference API form: always a list per input
        ({"inputs": "I like you.", "parameters": {"top_k": 1, "function_to_apply": "sigmoid"}}, "batch"),
    ]

    async def scenario(client):
        return [await client.post(path, json=body) for path in ("/predict", "/") for body, _ in examples]

    answers = run(scenario, problem_type="single_label_classification")
    for (body, shape), response in zip(examples * 2, answers):
        if shape == "invalid":
            assert response.status_code == 422 and response.json()["error_type"] == "validation"
            continue
        assert response.status_code == 200, (body, response.text)
        inputs = [body["inputs"]] if isinstance(body["inputs"], str) or shape == "pair" else body["inputs"]
        answered = [response.json()] if shape in ("single", "pair") else response.json()
        assert len(answered) == len(inputs)
        for item, labels in zip(inputs, answered):
            ids = TOKENIZER(*([item] if isinstance(item, str) else item))["input_ids"]
            parameters = body.get("parameters", {})
            activation = {"sigmoid": sigmoid, None: softmax}[parameters.get("function_to_apply")]
            scores = fake_logits(ids) if body.get("raw_scores") else activation(fake_logits(ids))
            assert labels == approx(ranked(scores)[: parameters.get("top_k")])


@pytest.mark.parametrize(
    ("body", "back", "status", "error_type"),
    [
        ({"inputs": "film " * 100}, None, 413, "validation"),  # TEI does not truncate unless asked
        ({"inputs": []}, None, 422, "validation"),
        ({"inputs": "ok"}, FakeScorer(fail_token=CLS), 429, "overloaded"),
        ({"inputs": "ok"}, FakeScorer(InferenceFailed(ValueError("nan")), fail_token=CLS), 424, "backend"),
    ],
)
def test_predict_errors_come_in_teis_shape_and_statuses(body, back, status, error_type):
    async def scenario(client):
        return await client.post("/predict", json=body)

    response = run(scenario, back)
    assert response.status_code == status
    error = error_body(response)
    assert error["error_type"] == error_type and error["error"]


def test_predict_and_classify_give_the_same_scores():
    texts = ["a film", ["a man eats", "someone is eating"], "start " + "film " * 100]

    async def scenario(client):
        classified = await client.post("/classify", json={"texts": texts})
        predicted = await client.post("/predict", json={"inputs": texts, "truncate": True})
        return classified.json(), predicted.json()

    classified, predicted = run(scenario, problem_type="single_label_classification")
    assert [result["labels"] for result in classified["results"]] == predicted
    assert classified["model"] == MODEL_ID


# Request ids


def test_the_request_id_is_echoed_or_made_and_named_in_error_bodies_and_log_lines(caplog):
    back = FakeScorer(InferenceFailed(ValueError("nan")), fail_token=CLS)

    async def scenario(client):
        return [
            await client.post("/classify", json={"texts": ["ok"]}, headers={"X-Request-Id": "client-id-1"}),
            await client.post("/classify", json={"texts": ["ok"]}),
            await client.post("/classify", json={"texts": ["ok"]}),
            await client.post("/classify", json={"texts": ["ok"]}, headers={"X-Request-Id": "not\tprintable"}),
            await client.get("/health", headers={"X-Request-Id": "probe-1"}),
        ]

    caplog.handler.addFilter(request_ids.RequestIdFilter())
    with caplog.at_level(logging.WARNING, logger="service.api"):
        given, made, made_again, refused, probe = run(scenario, back)
    assert given.headers["x-request-id"] == given.json()["request_id"] == "client-id-1"
    assert made.headers["x-request-id"] == made.json()["request_id"] != made_again.headers["x-request-id"]
    assert refused.headers["x-request-id"] not in ("not\tprintable", "")
    assert probe.headers["x-request-id"] == "probe-1"
    logged = [record.request_id for record in caplog.records if "answered 500" in record.getMessage()]
    assert logged == ["client-id-1", made.headers["x-request-id"], made_again.headers["x-request-id"],
                      refused.headers["x-request-id"]]  # fmt: skip


# API keys and CORS


def test_without_a_valid_key_classify_and_predict_answer_401_and_probes_stay_open(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\nkey-one\n\nkey-two\n")

    async def scenario(client):
        answers = {}
        for name, headers in {
            "none": {},
            "wrong": {"Authorization": "Bearer key-three"},
            "prefix": {"Authorization": "Bearer key-on"},
            "scheme": {"Authorization": "Basic key-one"},
            "one": {"Authorization": "Bearer key-one"},
            "two": {"Authorization": "bearer key-two"},
        }.items():
            answers[name] = (
                await client.post("/classify", json={"texts": ["ok"]}, headers=headers),
                await client.post("/predict", json={"inputs": "ok"}, headers=headers),
            )
        answers["open"] = tuple([await client.get(path) for path in ("/health", "/ready", "/metrics", "/info")])
        return answers

    answers = run(scenario, api_keys=str(keys))
    for name in ("none", "wrong", "prefix", "scheme"):
        classify, predict = answers[name]
        assert classify.status_code == predict.status_code == 401
        assert classify.headers["www-authenticate"] == predict.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in error_body(classify)["error"]
        assert error_body(predict)["error_type"] == "validation"  # TEI's shape on /predict
    for name in ("one", "two"):
        assert [response.status_code for response in answers[name]] == [200, 200]
    assert [response.status_code for response in answers["open"]] == [200, 200, 200, 200]


def test_metrics_can_require_a_key_too():
    async def scenario(client):
        return await client.get("/metrics"), await client.get("/metrics", headers={"Authorization": "Bearer k1"})

    without, with_key = run(scenario, api_keys="k1,k2", metrics_require_key=True)
    assert (without.status_code, with_key.status_code) == (401, 200)


def test_keys_are_kept_secret_and_an_empty_list_is_refused():
    shown = Settings(api_keys="a-secret-key")
    assert "a-secret-key" not in repr(shown) and "a-secret-key" not in str(shown.model_dump())
    with pytest.raises(ValueError, match="names no key"):
        Settings(api_keys=" , ")


def test_cors_is_off_by_default_and_allows_the_configured_origins():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip

    async def scenario(client):
        return (
            await client.options("/classify", headers=preflight),
            await client.post("/classify", json={"texts": ["ok"]}, headers={"Origin": "https://app.example"}),
        )

    off_preflight, off_post = run(scenario)
    assert "access-control-allow-origin" not in {**off_preflight.headers, **off_post.headers}
    on_preflight, on_post = run(scenario, cors_allow_origins="https://app.example, https://other.example",
                                api_keys="k1")  # fmt: skip
    assert on_preflight.status_code == 200  # a preflight carries no key
    assert on_preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert on_post.status_code == 401 and on_post.headers["access-control-allow-origin"] == "https://app.example"
    assert "X-Request-Id" in on_post.headers["access-control-expose-headers"]


def test_openapi_documents_the_new_routes_fields_and_errors():
    async def scenario(client):
        return (await client.get("/openapi.json")).json()

    openapi = run(scenario)
    predict = openapi["paths"]["/predict"]["post"]
    assert {"401", "413", "422", "424", "429"} <= set(predict["responses"])
    schemas = openapi["components"]["schemas"]
    assert {"inputs", "raw_scores", "truncate", "truncation_direction", "parameters"} <= set(schemas["PredictRequest"]["properties"])
    assert {"raw_scores", "threshold", "truncation_direction"} <= set(schemas["ClassifyRequest"]["properties"])
    assert "error_type" in schemas["TeiErrorResponse"]["properties"]
    assert "401" in openapi["paths"]["/classify"]["post"]["responses"]
