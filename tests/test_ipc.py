"""The API-process <-> engine-process transport (service/ipc.py) and the back half built on it (`RemoteBackend`),
standalone: no model, no HTTP.

Both ends run in one event loop over a real `ipc://` socket, except the dead-peer tests, which kill a real engine
process. Every wait is bounded, so a hang fails the test instead of stalling the suite. `serving` is the one harness:
tests/test_boundary.py serves real back halves with it.
"""

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time

import msgspec
import pytest

from service.engine import EngineFacts
from service.errors import EngineUnavailable, Overloaded
from service.ipc import (
    Cancel,
    EngineClient,
    EngineGone,
    EngineServer,
    EngineState,
    Failure,
    FromEngine,
    Hello,
    RemoteBackend,
    ScoreRequest,
    Scores,
    ToEngine,
)
from tests.fakes import FakeScorer

BOUND = 20  # seconds any single wait may take on a loaded machine before the test fails

FACTS = EngineFacts(
    model_id="fake",
    model_path="/models/fake",
    labels=("A", "B"),
    problem_type="single_label_classification",
    max_length=64,
    device="cpu",
    precision="fp32",
    traced=True,
    tuning={"enabled": False, "reason": "CLASSIFIER_TUNE=false"},
)


def ready_state() -> EngineState:
    return EngineState("ready", facts=FACTS, batching={"max_batch_tokens": 2048})


@contextlib.asynccontextmanager
async def serving(address: str, begin, state=ready_state, server: dict | None = None, client: dict | None = None):
    """An EngineServer serving `begin` and an EngineClient connected to it (each with its keyword options), closed
    after; everything in between must end within BOUND."""
    engine = EngineServer(address, begin, state, **(server or {}))
    line = EngineClient(address, **(client or {}))
    try:
        async with asyncio.timeout(BOUND):
            yield engine, line
    finally:
        await line.close()
        await engine.close()


def engine_address(directory) -> str:
    return f"ipc://{directory}/engine.sock"


@pytest.fixture
def address(tmp_path) -> str:
    return engine_address(tmp_path)


def test_messages_round_trip_through_msgpack():
    """A frame is the list of a loop turn's messages to one peer, in order."""
    encoder = msgspec.msgpack.Encoder()
    to_engine = msgspec.msgpack.Decoder(list[ToEngine])
    from_engine = msgspec.msgpack.Decoder(list[FromEngine])
    requests = [ScoreRequest(7, [[101, 2023, 102], [101, 102]], 1234.5), Cancel(7), Hello(42)]
    assert to_engine.decode(encoder.encode(requests)) == requests
    answers = [
        Scores(7, [[0.25, 0.75]]),
        Failure(7, "Overloaded", "the queue is full", {"Retry-After": "2"}),
        Failure(8, "DeadlineExceeded", "too late"),
        EngineState("draining", facts=FACTS, batching={"max_batch_tokens": 2048}),
        EngineState("failed", "FileNotFoundError: model directory /models/x does not exist"),
    ]
    assert from_engine.decode(encoder.encode(answers)) == answers
    with pytest.raises(msgspec.ValidationError):  # a reply where a request belongs is refused, not guessed
        to_engine.decode(encoder.encode([Hello(1), Scores(1, [[1.0]])]))


def test_scores_errors_and_state_travel_both_ways(address):
    asyncio.run(_scores_errors_and_state_travel_both_ways(address))


async def _scores_errors_and_state_travel_both_ways(address):
    scorer = FakeScorer()
    async with serving(address, scorer.begin) as (_, client):
        state = await client.wait_for_state()
        assert state.status == "ready" and state.facts == FACTS and state.batching == {"max_batch_tokens": 2048}
        deadline = time.monotonic() + 5
        scores = await asyncio.gather(*(client.score([[i, 2], [3]], deadline) for i in range(1, 50)))
        assert scores == [[[2.0, i + 2.0], [1.0, 3.0]] for i in range(1, 50)]
        assert scorer.deadlines[0] == deadline  # monotonic seconds cross the boundary unchanged
        with pytest.raises(Overloaded) as refused:  # the engine's error, raised again on this side
            await client.score([[-1]], deadline)
        assert (refused.value.message, refused.value.headers) == ("the queue is full; retry in about 3 s", {"Retry-After": "3"})


def test_the_requests_of_one_frame_start_together(address):
    """Requests an API process makes in one turn of its loop cross as one frame, and the engine starts them all within
    one `together` (the queue's lock, taken once for them), however many they are."""
    asyncio.run(_the_requests_of_one_frame_start_together(address))


async def _the_requests_of_one_frame_start_together(address):
    scorer = FakeScorer()
    holding = {"now": False, "times": 0}
    started_within: list[int | None] = []  # for each request begun: which `together` it began in (None: none)

    @contextlib.contextmanager
    def together():
        holding["now"], holding["times"] = True, holding["times"] + 1
        try:
            yield
        finally:
            holding["now"] = False

    def begin(token_ids, deadline, caller, on_done):
        started_within.append(holding["times"] if holding["now"] else None)
        return scorer.begin(token_ids, deadline, caller, on_done)

    async with serving(address, begin, server={"together": together}) as (_, client):
        await client.wait_for_state()
        deadline = time.monotonic() + 5
        scores = await asyncio.gather(*(client.score([[i]], deadline) for i in range(1, 30)))  # one turn: one frame
        assert scores == [[[1.0, float(i)]] for i in range(1, 30)]
        assert len(started_within) == 29 and None not in started_within
        assert len(set(started_within)) == 1


def test_a_cancelled_caller_cancels_its_work_in_the_engine(address):
    asyncio.run(_a_cancelled_caller_cancels_its_work_in_the_engine(address))


async def _a_cancelled_caller_cancels_its_work_in_the_engine(address):
    scorer = FakeScorer()
    async with serving(address, scorer.begin) as (server, client):
        await client.wait_for_state()
        waiting = asyncio.create_task(client.score([[0, 5]], time.monotonic() + 30))
        await scorer.started.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await scorer.some_cancelled.wait()
        await server.all_answered()
        assert scorer.cancelled == [[[0, 5]]]
        assert server.in_progress == 0
        assert await client.score([[4]], time.monotonic() + 5) == [[1.0, 4.0]]  # the line still works


def test_a_request_cancelled_before_its_work_starts_leaves_nothing_in_progress(address):
    asyncio.run(_a_request_cancelled_before_its_work_starts_leaves_nothing_in_progress(address))


async def _a_request_cancelled_before_its_work_starts_leaves_nothing_in_progress(address):
    """The engine may read a request and its cancellation in one go: a drain would otherwise wait for it forever."""
    scorer = FakeScorer()
    async with serving(address, scorer.begin) as (server, client):
        await client.wait_for_state()
        for _ in range(20):
            waiting = asyncio.create_task(client.score([[0, 1]], time.monotonic() + 30))
            await asyncio.sleep(0)  # sent
            waiting.cancel()  # and its cancellation right behind it
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await server.all_answered()
        assert server.in_progress == 0


def test_state_changes_reach_clients(address):
    asyncio.run(_state_changes_reach_clients(address))


async def _state_changes_reach_clients(address):
    status = {"now": "loading"}
    fast = {"heartbeat": 0.05}
    async with serving(address, FakeScorer().begin, lambda: EngineState(status["now"]), server=fast, client=fast) as (server, client):
        assert (await client.wait_for_state()).status == "loading"
        status["now"] = "ready"
        await server.publish_state()
        assert (await client.wait_for_state(lambda s: s.status == "ready")).status == "ready"


def _serve_forever(address: str, started) -> None:
    async def main() -> None:
        scorer = FakeScorer()
        EngineServer(address, scorer.begin, ready_state, heartbeat=0.05)
        started.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def test_a_dead_engine_fails_pending_and_new_requests_at_once(address):
    asyncio.run(_engine_stops_answering(address, signal.SIGKILL, peer_timeout=600))  # seen by the connection


def test_a_frozen_engine_fails_pending_and_new_requests_after_the_peer_timeout(address):
    asyncio.run(_engine_stops_answering(address, signal.SIGSTOP, peer_timeout=1.0))  # seen by its silence


async def _engine_stops_answering(address: str, how: signal.Signals, peer_timeout: float) -> None:
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    engine = context.Process(target=_serve_forever, args=(address, started), daemon=True)
    engine.start()
    client = EngineClient(address, heartbeat=0.05, peer_timeout=peer_timeout)
    try:
        async with asyncio.timeout(BOUND):
            await client.wait_for_state()
            assert await client.score([[1, 1]], time.monotonic() + 5) == [[2.0, 2.0]]
            pending = asyncio.create_task(client.score([[0]], time.monotonic() + 600))  # held by the engine
            await asyncio.sleep(0.1)
            os.kill(engine.pid, how)
            with pytest.raises(EngineGone):
                await pending
            with pytest.raises(EngineGone):
                await client.score([[1]], time.monotonic() + 5)
            with pytest.raises(EngineGone):
                await client.wait_for_state()
    finally:
        await client.close()
        os.kill(engine.pid, signal.SIGKILL)
        engine.join(BOUND)


def test_a_request_is_given_up_after_its_deadline_and_the_peer_timeout(address):
    asyncio.run(_given_up(address))


async def _given_up(address):
    scorer = FakeScorer()
    async with serving(address, scorer.begin, server={"heartbeat": 0.05}, client={"heartbeat": 0.05, "peer_timeout": 0.5}) as (_, client):
        await client.wait_for_state()
        with pytest.raises(EngineGone, match="after the request's deadline"):
            await client.score([[0, 1]], time.monotonic() + 0.2)  # the engine never answers it
        await scorer.some_cancelled.wait()  # and the engine was told to drop it


def test_a_silent_client_has_its_work_dropped(address):
    asyncio.run(_a_silent_client_has_its_work_dropped(address))


async def _a_silent_client_has_its_work_dropped(address):
    scorer = FakeScorer()
    async with serving(address, scorer.begin, server={"heartbeat": 0.05, "peer_timeout": 0.5}, client={"heartbeat": 0.05}) as (server, client):
        await client.wait_for_state()
        abandoned = asyncio.create_task(client.score([[0, 9]], time.monotonic() + 60))
        await scorer.started.wait()
        for task in client._tasks:  # the client process freezes: no more heartbeats
            task.cancel()
        await scorer.some_cancelled.wait()
        await server.all_answered()
        assert scorer.cancelled == [[[0, 9]]] and server.in_progress == 0
        abandoned.cancel()


def test_the_remote_backend_is_the_engine_processes_back_half_until_it_goes(address):
    asyncio.run(_the_remote_backend_is_the_engine_processes_back_half_until_it_goes(address))


async def _the_remote_backend_is_the_engine_processes_back_half_until_it_goes(address):
    scorer = FakeScorer()
    async with serving(address, scorer.begin) as (server, client):
        backend = RemoteBackend(client)
        await client.wait_for_state()
        assert backend.ready and backend.info() == {"max_batch_tokens": 2048}
        assert await backend.score([[1, 2], [5]], time.monotonic() + 5) == [[2.0, 3.0], [1.0, 5.0]]
        with pytest.raises(Overloaded):
            await backend.score([[-1]], time.monotonic() + 5)
        await server.close()  # as if the engine process died
        with pytest.raises(EngineUnavailable) as gone:
            await backend.score([[1]], time.monotonic() + 5)
        assert gone.value.status == 503 and gone.value.headers == {"Retry-After": "1"}
        assert "retry on another replica" in gone.value.message
        with pytest.raises(EngineGone):  # once the client has seen the connection close
            await client.wait_for_state(lambda state: False)
        assert not backend.ready
