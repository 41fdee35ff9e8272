"""The HTTP API in process: every documented status, the middlewares (body limits, concurrency limit, request metrics)
and the /classify fast path, without a server process.

The app is `create_app(settings, load_engine)` with a real `Engine` whose front half is real (the tiny tokenizer's
encoder pool, the labels) and whose back half is `tests.fakes.FakeScorer`. It runs under its own lifespan; requests
go through httpx's ASGI transport, or, where a client must stall or leave (408, 499, stalled uploads), through
ASGI messages driven by hand.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.types import Message
from transformers import PreTrainedTokenizerBase

from service import api
from service.api import create_app
from service.engine import Engine, EngineFacts, Front
from service.errors import DeadlineExceeded, InferenceFailed, NotAccepting, Overloaded, TextTooLargeForDevice
from service.postprocess import ProblemType
from service.settings import Settings
from service.slot import EngineLoader
from service.tokenization import EncoderPool
from tests.conftest import TINY_MAX_LENGTH, build_tiny_tokenizer
from tests.fakes import WAIT, FakeScorer

MODEL_ID = "fake-model"
LABELS = ("NEGATIVE", "POSITIVE")
SHOWN = {"problem_type": "single_label_classification", "max_length": TINY_MAX_LENGTH, "device": "cpu", "precision": "fp32", "traced": True}
FACTS = EngineFacts(model_id=MODEL_ID, model_path=MODEL_ID, labels=LABELS, tuning={"enabled": False, "reason": "CLASSIFIER_TUNE=false"}, **SHOWN)
JSON = {"content-type": "application/json"}
T = TypeVar("T")
TOKENIZER = build_tiny_tokenizer()
CLS = TOKENIZER.cls_token_id  # every encoded text holds it: a FakeScorer holding or failing on it does so for all


def token_ids(text: str, truncate: bool = True) -> list[int]:
    return TOKENIZER(text, truncation=truncate, max_length=TINY_MAX_LENGTH)["input_ids"]


def error_body(response: httpx.Response) -> dict:
    """The error body, less its request id, which must be the one in the response's X-Request-Id header."""
    body = response.json()
    request_id = body.pop("request_id")
    assert request_id and request_id == response.headers["x-request-id"]
    return body


def settings(**overrides) -> Settings:
    return Settings(model=MODEL_ID, tokenizer_workers=1, **overrides)


def fake_engine(back: FakeScorer, problem_type: ProblemType = "regression", tokenizer: PreTrainedTokenizerBase = TOKENIZER) -> EngineLoader:
    """Loads an Engine with the real front half over `tokenizer` (the tiny one) and `back` as its back half. Its front
    activates the back half's logits as `problem_type` says: by default not at all, so each score names its text."""

    async def load(settings: Settings) -> Engine:
        encoders = EncoderPool(tokenizer, TINY_MAX_LENGTH, settings.tokenizer_workers)
        return Engine(Front(encoders, LABELS, problem_type), back, FACTS)

    return load


def _never_well_formed(value, headers) -> None:
    """`_well_formed` that takes no request: every request goes through FastAPI's declared endpoint."""
    return None


def counted(status: int, route: str = "/classify") -> float:
    """classifier_requests_total for the route and status, as the request metrics middleware counts them."""
    return REGISTRY.get_sample_value("classifier_requests_total", {"route": route, "status": str(status)}) or 0.0


async def in_flight() -> float:
    """classifier_requests_in_flight (async, for `until`)."""
    return REGISTRY.get_sample_value("classifier_requests_in_flight") or 0.0


async def until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Calls `probe` until `done` holds for its result, and returns that result (polled: what the test waits for
    happens inside the app)."""
    async with asyncio.timeout(WAIT):
        while True:
            result = await probe()
            if done(result):
                return result
            await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def serving(app, ready: bool = True, raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app under its lifespan (loading its engine in the background, stopping it at the end) and a client
    calling it in process; with `ready`, once /ready answers 200."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=WAIT) as client:
            if ready:
                await until(lambda: client.get("/ready"), lambda response: response.status_code == 200)
            yield client


def run(scenario: Callable[[httpx.AsyncClient], Awaitable], back: FakeScorer | None = None, **overrides):
    """`scenario(client)` against an app over a fake engine with `back` (a plain FakeScorer by default)."""

    async def main():
        async with serving(create_app(settings(**overrides), fake_engine(back or FakeScorer()))) as client:
            return await scenario(client)

    return asyncio.run(main())


class RawClient:
    """One request driven as ASGI messages: the body's `parts` arrive at once, then (after the last part when
    `finished`, else mid-upload) the client stalls until `leave()`, when the app receives http.disconnect."""

    def __init__(self, parts: list[bytes], finished: bool = True) -> None:
        self.parts, self.finished = list(parts), finished
        self.gone = asyncio.Event()
        self.sent: list[Message] = []

    def scope(self, headers: dict[str, str]) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/classify",
            "raw_path": b"/classify",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test"), *((name.encode(), value.encode()) for name, value in headers.items())],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }

    def call(self, app, headers: dict[str, str] = JSON) -> asyncio.Task:
        return asyncio.create_task(app(self.scope(headers), self.receive, self.send))

    async def receive(self) -> Message:
        if self.parts:
            part = self.parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(self.parts) or not self.finished}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()

    @property
    def answer(self) -> tuple[int, dict[str, str], bytes]:
        start = self.sent[0]
        headers = {name.decode(): value.decode() for name, value in start["headers"]}
        return start["status"], headers, b"".join(message.get("body", b"") for message in self.sent[1:])


# 200


def test_classify_answers_every_text_in_order_with_ranked_labels_and_token_counts():
    texts = ["I loved this film", "What a waste of two hours", "A long story " + "that goes on and on " * 40]

    async def scenario(client):
        return await client.post("/classify", json={"texts": texts})

    response = run(scenario)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL_ID
    for text, result in zip(texts, body["results"]):
        ids = token_ids(text)
        scores = {"NEGATIVE": float(len(ids)), "POSITIVE": float(sum(ids))}  # what FakeScorer answers
        assert result["labels"] == [{"label": label, "score": score} for label, score in sorted(scores.items(), key=lambda item: -item[1])]
        assert (result["label"], result["score"]) == (result["labels"][0]["label"], result["labels"][0]["score"])
        assert result["tokens"] == len(ids) == min(len(token_ids(text, truncate=False)), TINY_MAX_LENGTH)
        assert result["truncated"] == (len(token_ids(text, truncate=False)) > TINY_MAX_LENGTH)
    assert [result["truncated"] for result in body["results"]] == [False, False, True]


def test_a_single_string_and_top_k():
    async def scenario(client):
        return await client.post("/classify", json={"texts": "I loved this film", "top_k": 1})

    response = run(scenario)
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert len(result["labels"]) == 1 and result["labels"][0]["label"] == result["label"]


def test_a_visible_text_with_zero_width_characters_is_still_classified():
    async def scenario(client):
        return await client.post("/classify", content=rb'{"texts": ["good\u200b film", "\ud83d\ude00 great"]}', headers=JSON)

    response = run(scenario)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "declared path"])
def test_the_deadline_is_the_smaller_of_the_body_and_header_timeouts_else_the_default(monkeypatch, fast_path):
    if not fast_path:
        monkeypatch.setattr(api, "_well_formed", _never_well_formed)
    back = FakeScorer()

    async def scenario(client):
        loop = asyncio.get_running_loop()
        sent = []
        for body, headers in (
            ({"texts": ["hi"], "timeout_ms": 1500}, {"x-request-timeout-ms": "800"}),
            ({"texts": ["hi"], "timeout_ms": 700}, {"x-request-timeout-ms": "900"}),
            ({"texts": ["hi"]}, {"x-request-timeout-ms": "600"}),
            ({"texts": ["hi"]}, {}),
        ):
            sent.append(loop.time())  # the event loop's clock is time.monotonic(), as the deadline's
            assert (await client.post("/classify", json=body, headers=headers)).status_code == 200
        return sent

    sent = run(scenario, back, request_timeout_ms=2500)
    allowed = [deadline - at for deadline, at in zip(back.deadlines, sent)]
    for seconds, expected in zip(allowed, (0.8, 0.7, 0.6, 2.5)):
        assert expected <= seconds < expected + 0.5  # counted from the request's arrival, a moment after it was sent


# 400, 422: the request's own faults


def test_a_body_that_is_not_utf8_is_a_400():
    async def scenario(client):
        return await client.post("/classify", content=b'{"texts": ["caf\xe9"]}', headers=JSON)

    response = run(scenario)
    assert response.status_code == 400
    assert error_body(response) == {"error": "the body is not UTF-8 (byte 0xe9 at offset 15); send the JSON encoded as UTF-8"}


BAD_BODIES = [
    ({"texts": []}, "at least one text"),
    ({"texts": ""}, "texts[0] is empty"),
    ({"texts": ["fine", "   "]}, "texts[1] is empty"),
    ({"texts": ["fine", 3]}, "texts[1] must be a string"),
    ({"texts": {"a": 1}}, "string or a list of strings"),
    ({"texts": None}, "string or a list of strings"),
    ({}, "texts: Field required"),
    ({"text": ["typo in the field name"]}, "text: Extra inputs are not permitted"),
    ({"texts": ["ok"], "top_k": 0}, "top_k"),
    ({"texts": ["ok"], "truncate": "maybe"}, "truncate"),
    ({"texts": ["ok"] * 300}, "too many texts: 300 sent, at most 256"),
    ({"texts": ["ok"], "timeout_ms": 0}, "timeout_ms: Input should be greater than or equal to 1"),
    ({"texts": ["ok"], "timeout_ms": 600_001}, "timeout_ms: Input should be less than or equal to 600000"),
]
BAD_RAW_BODIES = [
    # valid JSON, but no valid Unicode: the tokenizer used to raise a TypeError (plain-text 500)
    (rb'{"texts": "\udc80"}', "texts[0] has a lone UTF-16 surrogate"),
    (rb'{"texts": ["fine", "a\ud83d"]}', "texts[1] has a lone UTF-16 surrogate"),
    (rb'{"texts": ["\u200b\u200b\u2060"]}', "texts[0] has only control, zero-width"),
    (rb'{"texts": ["\u0001\u0002 \ufeff"]}', "texts[0] has only control, zero-width"),
    (b'{"texts": ["ok"], "top_k": true}', "top_k: Input should be a valid integer"),
    (b'{"texts": ["ok"], "top_k": "2"}', "top_k: Input should be a valid integer"),
    (b'{"texts": ["ok"], "truncate": 1}', "truncate: Input should be a valid boolean"),
    (b'{"texts": ["ok"], "truncate": "false"}', "truncate: Input should be a valid boolean"),
    (b'{"texts": ["ok"], "timeout_ms": "5"}', "timeout_ms: Input should be a valid integer"),
    (b'{"texts": [', "JSON"),  # malformed JSON
]
BAD_TIMEOUT_HEADERS = [
    ("0", "header.x-request-timeout-ms: Input should be greater than or equal to 1"),
    ("600001", "header.x-request-timeout-ms: Input should be less than or equal to 600000"),
    ("soon", "header.x-request-timeout-ms: Input should be a valid integer"),
    ("1.5", "header.x-request-timeout-ms: Input should be a valid integer"),
]


def test_bad_input_gets_a_422_saying_what_to_fix():
    requests = (
        [(json.dumps(body).encode(), {}, fragment) for body, fragment in BAD_BODIES]
        + [(body, {}, fragment) for body, fragment in BAD_RAW_BODIES]
        + [(b'{"texts": ["ok"]}', {"x-request-timeout-ms": value}, fragment) for value, fragment in BAD_TIMEOUT_HEADERS]
    )

    async def scenario(client):
        return [await client.post("/classify", content=body, headers={**JSON, **headers}) for body, headers, _ in requests]

    back = FakeScorer()
    for (body, headers, fragment), response in zip(requests, run(scenario, back)):
        assert response.status_code == 422, (body, headers, response.text)
        assert fragment in response.json()["error"], (body, headers, response.text)
    assert back.deadlines == []  # none reached the back half


# 404, 405, 500


def test_wrong_method_and_unknown_path_answer_with_the_error_body():
    async def scenario(client):
        return await client.get("/classify"), await client.get("/classfy")

    wrong_method, unknown = run(scenario)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert error_body(wrong_method) == {"error": "GET is not allowed on /classify; use POST"}
    assert unknown.status_code == 404 and "no such endpoint: /classfy" in unknown.json()["error"]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "declared path"])
def test_an_unexpected_exception_is_a_json_500(monkeypatch, fast_path):
    if not fast_path:
        monkeypatch.setattr(api, "_well_formed", _never_well_formed)
    back = FakeScorer(RuntimeError("a bug"), fail_token=CLS)  # fails like a bug would

    async def main():
        app = create_app(settings(), fake_engine(back))
        async with serving(app, raise_app_exceptions=False) as client:
            return await client.post("/classify", json={"texts": ["hi"]})

    before = counted(500)
    response = asyncio.run(main())
    assert response.status_code == 500
    assert error_body(response) == {"error": "internal error (RuntimeError); the server log has the details"}
    assert counted(500) == before + 1


# The back half's refusals: 413, 429, 500, 503, 504


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (Overloaded("queue_full", "the queue is full", 3.0), 429, {"retry-after": "3"}),
        (Overloaded("predicted_wait", "the queue would not reach these texts in time", 1.6), 429, {"retry-after": "2"}),
        (NotAccepting(), 503, {"retry-after": "1"}),
        (DeadlineExceeded(), 504, {}),
        (DeadlineExceeded(DeadlineExceeded.unreachable_message), 504, {}),
        (TextTooLargeForDevice(60), 413, {}),
        (InferenceFailed(ValueError("index out of range")), 500, {}),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "declared path"])
def test_a_refusal_of_the_back_half_is_answered_with_its_status_message_and_headers(monkeypatch, fast_path, error, status, headers):
    if not fast_path:
        monkeypatch.setattr(api, "_well_formed", _never_well_formed)

    async def scenario(client):
        return await client.post("/classify", json={"texts": ["I loved this film"]})

    before = counted(status)
    response = run(scenario, FakeScorer(error, fail_token=CLS))
    assert response.status_code == status
    assert error_body(response) == {"error": error.message}
    assert {name: response.headers[name] for name in headers} == headers
    assert ("retry-after" in response.headers) == bool(headers)  # none where retrying later is no remedy
    assert counted(status) == before + 1


def test_a_too_long_text_without_truncation_is_a_413_before_the_back_half():
    back = FakeScorer()

    async def scenario(client):
        return await client.post("/classify", json={"texts": ["fine", "film " * 200], "truncate": False})

    response = run(scenario, back)
    assert response.status_code == 413
    assert error_body(response) == {"error": "texts[1] has 202 tokens but the model takes at most 64; shorten it or send truncate=true"}
    assert back.deadlines == []


# 413: bodies over max_request_bytes (the body limits middleware)


def test_oversized_bodies_are_413_whether_declared_or_streamed():
    limit = 1024
    big = json.dumps({"texts": ["x" * 100] * 200}).encode()  # over 16 x the limit: refused at its declared length
    medium = json.dumps({"texts": ["x" * 100] * 20}).encode()  # over the limit: read, dropped, then refused

    def chunks(body: bytes):
        async def stream():
            for start in range(0, len(body), 500):
                yield body[start : start + 500]

        return stream()

    async def scenario(client):
        return [
            await client.post("/classify", content=big, headers=JSON),
            await client.post("/classify", content=medium, headers=JSON),
            await client.post("/classify", content=chunks(big), headers=JSON),  # no length declared
            await client.post("/classify", content=chunks(medium), headers=JSON),
        ]

    before = counted(413)
    back = FakeScorer()
    for response in run(scenario, back, max_request_bytes=limit):
        assert response.status_code == 413
        assert error_body(response) == {"error": "request body is larger than 1024 bytes; send fewer or shorter texts per request"}
        assert response.headers["connection"] == "close"
    assert counted(413) == before + 4
    assert back.deadlines == []


# 408: a body that does not arrive in time (the body limits middleware)


def test_a_stalled_upload_gets_a_408_and_its_connection_closed():
    async def main():
        app = create_app(settings(body_timeout_seconds=0.05), fake_engine(FakeScorer()))
        async with serving(app):
            upload = RawClient([b'{"texts": ["part of a body'], finished=False)
            await upload.call(app, {**JSON, "content-length": "1000"})
            return upload.answer

    before = counted(408), REGISTRY.get_sample_value("classifier_client_timeouts_total", {"phase": "body"}) or 0.0
    status, headers, body = asyncio.run(main())
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body) == {
        "error": "the request body did not arrive within 0.05 s; send it without pausing",
        "request_id": headers["x-request-id"],
    }
    assert counted(408) == before[0] + 1
    assert REGISTRY.get_sample_value("classifier_client_timeouts_total", {"phase": "body"}) == before[1] + 1


# 429: the concurrency limit (its middleware); 499: aborted uploads


def test_requests_over_the_concurrency_cap_get_a_429_and_aborted_uploads_count_as_499():
    async def main():
        app = create_app(settings(max_concurrent_requests=2), fake_engine(FakeScorer()))
        async with serving(app) as client:
            before = await in_flight()
            uploads = [RawClient([b'{"texts": ["part of a body'], finished=False) for _ in range(2)]
            calls = [upload.call(app, {**JSON, "content-length": "1000"}) for upload in uploads]
            await until(in_flight, lambda count: count == before + 2)  # stalled uploads count from their headers
            refused = await client.post("/classify", json={"texts": ["hi"]})
            probes = [(await client.get(path)).status_code for path in ("/ready", "/health", "/metrics")]
            for upload in uploads:
                upload.leave()
            await asyncio.gather(*calls)
            after = await in_flight() - before
            accepted = await client.post("/classify", json={"texts": ["hi"]})
            return refused, probes, [upload.sent for upload in uploads], after, accepted

    before = {status: counted(status) for status in (429, 499, 500)}
    refused, probes, sent, after, accepted = asyncio.run(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert error_body(refused) == {"error": "the server is handling 2 requests already; retry shortly"}
    assert probes == [200, 200, 200]  # probes and /metrics are exempt
    assert sent == [[], []]  # nobody is left to answer
    assert after == 0
    assert accepted.status_code == 200
    assert counted(429) == before[429] + 1
    assert counted(499) == before[499] + 2 and counted(500) == before[500]


# 499: the client left while its texts were queued


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "declared path"])
def test_a_caller_that_leaves_while_its_texts_are_queued_gets_nothing_and_its_work_is_cancelled(monkeypatch, fast_path):
    if not fast_path:
        monkeypatch.setattr(api, "_well_formed", _never_well_formed)
    back = FakeScorer(hold_token=CLS)  # every request waits in the back half
    text = "queued, then abandoned"

    async def main():
        app = create_app(settings(), fake_engine(back))
        async with serving(app):
            caller = RawClient([json.dumps({"texts": [text]}).encode()])
            call = caller.call(app)
            await asyncio.wait_for(back.started.wait(), WAIT)
            caller.leave()
            await asyncio.wait_for(call, WAIT)
            return caller.sent

    before = {status: counted(status) for status in (200, 499, 500)}
    sent = asyncio.run(main())
    assert sent == []
    assert back.cancelled == [[token_ids(text)]]  # the back half's wait was cancelled: its texts are dropped
    assert counted(499) == before[499] + 1
    assert (counted(200), counted(500)) == (before[200], before[500])


# 503: loading, failed to load, not accepting, draining


def test_ready_and_classify_are_503_until_the_model_is_loaded():
    loaded = asyncio.Event()

    async def load(settings: Settings) -> Engine:
        await loaded.wait()
        return await fake_engine(FakeScorer())(settings)

    async def main():
        async with serving(create_app(settings(), load), ready=False) as client:
            health, ready, classify = (
                await client.get("/health"),
                await client.get("/ready"),
                await client.post("/classify", json={"texts": ["hi"]}),
            )
            info = (await client.get("/info")).json()
            loaded.set()
            after = await until(lambda: client.get("/ready"), lambda response: response.status_code == 200)
            return health, ready, classify, info, after

    health, ready, classify, info, after = asyncio.run(main())
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    for response in (ready, classify):
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert error_body(response) == {"error": "the model is still loading; retry shortly"}
    assert (info["ready"], info["failure"], info["model"]) == (False, None, MODEL_ID) and "labels" not in info
    assert after.json() == {"status": "ready"}


def test_ready_waits_for_every_api_process_of_the_replica_while_classify_is_served():
    """With --workers the listener hands connections to any API process: /ready is 200 only once all have loaded,
    though a loaded one already answers /classify (a client sent there by a 200 from another must be served)."""
    others_loaded = False

    async def main():
        nonlocal others_loaded
        app = create_app(settings(), fake_engine(FakeScorer()), replica_loaded=lambda: others_loaded)
        async with serving(app, ready=False) as client:
            await until(lambda: client.post("/classify", json={"texts": ["hi"]}), lambda response: response.status_code == 200)
            waiting = await client.get("/ready")
            others_loaded = True
            return waiting, await client.get("/ready")

    waiting, ready = asyncio.run(main())
    assert waiting.status_code == 503 and error_body(waiting) == {"error": "the model is still loading; retry shortly"}
    assert ready.status_code == 200


def test_a_model_that_fails_to_load_reports_why(tmp_path):
    missing = tmp_path / "missing"

    async def main():
        async with serving(create_app(Settings(model=str(missing))), ready=False) as client:  # the real loader
            health = await until(lambda: client.get("/health"), lambda response: response.status_code != 200)
            return health, await client.get("/ready"), await client.post("/classify", json={"texts": ["hi"]})

    expected = {"error": f"model failed to load: FileNotFoundError: model directory {missing} does not exist; retry on another replica"}
    for response in asyncio.run(main()):
        assert response.status_code == 503 and error_body(response) == expected


def test_an_engine_that_no_longer_accepts_answers_503_with_retry_after():
    back = FakeScorer()

    async def scenario(client):
        back.accepting = False  # stopping (or, with --workers, its engine process is gone)
        return await client.post("/classify", json={"texts": ["hi"]}), await client.get("/ready")

    for response in run(scenario, back):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert error_body(response) == {"error": "the service is shutting down; retry on another replica"}
    assert back.deadlines == []


def test_ready_is_503_while_draining_and_requests_are_still_served():
    async def main():
        app = create_app(settings(), fake_engine(FakeScorer()))
        async with serving(app) as client:
            app.state.draining.set()  # what service.server does on SIGTERM
            return await client.get("/ready"), await client.get("/health"), await client.post("/classify", json={"texts": ["hi"]})

    ready, health, classify = asyncio.run(main())
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert error_body(ready) == {"error": "draining: this replica is shutting down; send new requests elsewhere"}
    assert health.status_code == 200
    assert classify.status_code == 200, classify.text


# The other routes


def test_health_ready_info_docs_and_metrics():
    async def scenario(client):
        await client.post("/classify", json={"texts": ["I loved this film"]})
        return [await client.get(path) for path in ("/health", "/ready", "/info", "/docs", "/openapi.json", "/metrics")]

    health, ready, info, docs, openapi, metrics = run(scenario)
    assert health.json() == {"status": "ok"} and ready.json() == {"status": "ready"}
    info = info.json()
    assert (info["model"], info["ready"], info["failure"], info["labels"]) == (MODEL_ID, True, None, list(LABELS))
    assert {key: info[key] for key in SHOWN} == SHOWN
    assert info["batching"] == FakeScorer().info()
    assert info["settings"]["model"] == MODEL_ID
    assert docs.status_code == 200
    assert set(openapi.json()["paths"]) == {"/classify", "/predict", "/", "/health", "/ready", "/info", "/metrics"}
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        'classifier_requests_total{route="/classify",status="200"}',
        'classifier_request_duration_seconds_count{route="/classify"}',
        "classifier_requests_in_flight",
        "classifier_input_tokens_bucket",
        "classifier_classified_texts_total",
    ):
        assert name in metrics.text, name


# The fast path answers what the declared FastAPI path answers


# (body, headers, whether the fast path takes it)
SAME_ANSWERS = [
    (b'{"texts": ["I loved this film", "What a waste of two hours"]}', {}, True),
    (b'{"texts": "brilliant"}', {}, True),
    (b'{"texts": ["good music"], "top_k": 1}', {}, True),
    (b'{"texts": ["good music"], "top_k": 5}', {}, True),
    (b'{"texts": ["good music"], "top_k": null, "truncate": true}', {}, True),
    (b'{"texts": ["A long story that goes on and on' + b" and on" * 40 + b'"]}', {}, True),
    (b'{"texts": ["fine"], "truncate": false, "timeout_ms": 5000}', {}, True),
    (b'{"texts": ["fine", "film ' + b"film " * 200 + b'"], "truncate": false}', {}, True),  # 413
    (b'{"texts": ["fine"]}', {"x-request-timeout-ms": "3000"}, True),
    (b'{"texts": ["fine"], "timeout_ms": 100}', {"x-request-timeout-ms": "600000"}, True),
    (rb'{"texts": ["good\u200b film", "\ud83d\ude00 great", "caf\u00e9"]}', {}, True),
    ('{"texts": ["café ☕"]}'.encode(), {}, True),
    (b'{"texts": ["fine"]}', {"content-type": "application/json; charset=utf-8"}, True),
    (b'{"texts": ["fine"]}', {"content-type": "Application/JSON"}, True),
    (json.dumps({"texts": ["ok"] * 300}).encode(), {}, True),  # 422 from the handler: too many texts
    (b'{"texts": ["fine"]}', {"x-request-timeout-ms": "0"}, False),
    (b'{"texts": ["fine"]}', {"x-request-timeout-ms": "600001"}, False),
    (b'{"texts": ["fine"]}', {"x-request-timeout-ms": "soon"}, False),
    (b'{"texts": ["fine"]}', {"x-request-timeout-ms": "+5"}, False),
    (b'{"texts": ["fine"]}', {"x-request-timeout-ms": "\u0663".encode()}, False),  # an Arabic-Indic digit 3
    (b'{"texts": ["fine"]}', {"content-type": "text/plain"}, False),
    (b'{"texts": ["fine"]}', {"content-type": ""}, False),
    (b'{"texts": []}', {}, False),
    (b'{"texts": ["ok"], "top_k": true}', {}, False),
    (b'{"texts": ["ok"], "top_k": 1.0}', {}, False),
    (b'{"texts": ["ok"], "extra": 1}', {}, False),
    (b'{"texts": [', {}, False),
    (b'{"texts": ["caf\xe9"]}', {}, False),  # not UTF-8: 400
    (b"[]", {}, False),
    (b"", {}, False),
]


def _answers(monkeypatch) -> tuple[list[tuple[int, list, bytes]], list[bool]]:
    """Each SAME_ANSWERS request's status, headers and body bytes, and whether the fast path took it."""
    taken = [False] * len(SAME_ANSWERS)  # a request refused before the fast path's check is not taken
    well_formed = api._well_formed
    index = 0

    def noting(value, headers):
        parsed = well_formed(value, headers)
        taken[index] = parsed is not None
        return parsed

    monkeypatch.setattr(api, "_well_formed", noting)

    async def scenario(client):
        nonlocal index
        answers = []
        for index, (body, headers, _) in enumerate(SAME_ANSWERS):
            same_id = {"x-request-id": f"same-{index}"}  # both paths answer with the id sent
            request = client.build_request("POST", "/classify", content=body, headers={**JSON, **same_id, **headers})
            response = await client.send(request)
            answers.append((response.status_code, response.headers.raw, response.content))
        return answers

    return run(scenario), taken


def test_the_fast_path_answers_byte_for_byte_what_the_declared_path_answers(monkeypatch):
    fast, taken = _answers(monkeypatch)
    assert taken == [fast_path for _, _, fast_path in SAME_ANSWERS]
    with monkeypatch.context() as declared_only:
        # Every request through FastAPI's declared endpoint, whose results FastAPI serialises with the declared
        # response model (ClassifyResponse), not the fast path's JsonBytesResponse.
        declared_only.setattr(api, "_well_formed", _never_well_formed)
        declared_only.setattr(api, "JsonBytesResponse", lambda content: content)
        declared, _ = _answers(declared_only)
    assert {status for status, _, _ in fast} >= {200, 400, 413, 415, 422}
    for (body, headers, _), fast_answer, declared_answer in zip(SAME_ANSWERS, fast, declared):
        assert fast_answer == declared_answer, (body, headers)


def test_a_body_the_fast_path_does_not_take_is_parsed_once(monkeypatch):
    """The declared route reads the value the fast path parsed instead of parsing the body again (a refused body may
    be megabytes); /predict, which has no fast path, parses its own."""
    parses = []
    parse = api.parse_json_body

    def counting(raw: bytes):
        parses.append(raw)
        return parse(raw)

    monkeypatch.setattr(api, "parse_json_body", counting)

    async def scenario(client):
        refused = await client.post("/classify", content=b'{"texts": []}', headers=JSON)
        predicted = await client.post("/predict", content=b'{"inputs": "fine"}', headers=JSON)
        return refused.status_code, predicted.status_code

    assert run(scenario) == (422, 200)
    assert parses == [b'{"texts": []}', b'{"inputs": "fine"}']
