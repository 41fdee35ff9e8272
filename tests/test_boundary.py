"""The front/back boundary in one process: `make_backend` builds the back half here or reaches it through the engine
process's socket, both give the same answers and facts, and the HTTP layer answers an error of a remote back half as
it answers the same error raised in-process (an EngineServer runs in the app's own event loop: no server process)."""

import asyncio
import time

import msgspec
from fastapi.testclient import TestClient

from service.api import create_app
from service.engine import Engine, EngineFacts
from service.ipc import EngineServer, EngineState, RemoteBackend
from service.loading import build_front, load_engine, make_backend
from service.scorer import Scorer
from service.settings import Settings
from tests.fakes import FakeScorer
from tests.test_errors import ERRORS
from tests.test_ipc import BOUND, FACTS, engine_address


def test_make_backend_builds_the_back_half_here_or_reaches_the_engine_process(tiny_model_dir, tmp_path):
    settings = Settings(model=str(tiny_model_dir), tune=False, torch_threads=1)
    asyncio.run(_make_backend(settings, engine_address(tmp_path)))


async def _make_backend(settings: Settings, address: str) -> None:
    local, facts = await make_backend(settings, None)
    assert isinstance(local, Scorer)
    assert facts == EngineFacts(
        model_id=str(settings.model),
        model_path=str(settings.model),
        labels=("NEGATIVE", "POSITIVE"),
        problem_type="single_label_classification",
        max_length=64,
        device="cpu",
        precision="fp32",
        traced=True,
        tuning={"enabled": False, "reason": "CLASSIFIER_TUNE=false"},
    )
    server = EngineServer(address, local.begin, lambda: EngineState("ready", facts=facts, batching=local.info()))
    try:
        async with asyncio.timeout(BOUND):
            remote, remote_facts = await make_backend(settings, address)
            assert isinstance(remote, RemoteBackend) and remote_facts == facts
            crossed = msgspec.msgpack.decode(msgspec.msgpack.encode(local.info()))  # tuples cross as lists
            assert remote.ready and remote.info() == crossed
            token_ids = [[2, 30, 31, 3], [2, 40, 3]]
            deadline = time.monotonic() + 30
            assert await remote.score(token_ids, deadline) == await local.score(token_ids, deadline)
            await remote.stop()
    finally:
        await server.close()
        await local.stop()


REQUEST_ID = "the-same-request"


def answer(client: TestClient, caller: str) -> tuple[int, dict, dict]:
    """`caller`: a 429 holds its caller back until its Retry-After (`fairness.RetryAfterBook`); each error needs its own."""
    response = client.post("/classify", json={"texts": ["a good film"]}, headers={"X-Request-Id": REQUEST_ID, "X-Client-Id": caller})
    return response.status_code, response.json(), dict(response.headers)


def test_the_http_layer_answers_an_error_of_the_engine_process_as_one_raised_in_process(tiny_model_dir, tmp_path):
    facts = msgspec.structs.replace(FACTS, model_path=str(tiny_model_dir))  # a tokenizer the front can load
    settings = Settings(model=str(tiny_model_dir))
    back = FakeScorer(fail_token=2)  # [CLS]: every text holds it, so every request fails with `back.failure`
    address = engine_address(tmp_path)
    servers: list[EngineServer] = []

    async def in_process(settings: Settings) -> Engine:
        return Engine(await build_front(settings, facts), back, facts)

    async def through_the_engine_process(settings: Settings) -> Engine:
        servers.append(EngineServer(address, back.begin, lambda: EngineState("ready", facts=facts, batching=back.info())))
        return await load_engine(settings, engine_address=address)

    local_app, remote_app = create_app(settings, in_process), create_app(settings, through_the_engine_process)
    with TestClient(local_app, raise_server_exceptions=False) as local, TestClient(remote_app) as remote:
        for slot in (local_app.state.slot, remote_app.state.slot):
            deadline = time.monotonic() + BOUND
            while not slot.ready:
                assert time.monotonic() < deadline, "the engine never became ready"
                time.sleep(0.02)
        assert local.get("/info").json() | {"settings": None} == remote.get("/info").json() | {"settings": None}
        for caller, (error, status, headers) in enumerate([*ERRORS, (KeyError("a bug"), 500, {})]):
            back.failure = error
            local_answer, remote_answer = answer(local, str(caller)), answer(remote, str(caller))
            assert remote_answer == local_answer
            assert local_answer[:2] == (
                status,
                {"error": getattr(error, "message", None) or "internal error (KeyError); the server log has the details", "request_id": REQUEST_ID},
            )
            assert headers.items() <= {name.title(): value for name, value in local_answer[2].items()}.items()
        remote.portal.call(servers[0].close)  # the engine process dies
        status, body, response_headers = answer(remote, "after-the-engine-died")
        assert status == 503 and "retry on another replica" in body["error"]
        assert response_headers["retry-after"] == "1"
