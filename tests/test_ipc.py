"""The API-process <-> engine-process transport (service/ipc.py), standalone: no model, no HTTP.

Both ends run in one event loop over a real `ipc://` socket, except the dead-peer tests, which kill a real engine
process. Every wait is bounded, so a hang fails the test instead of stalling the suite.
"""

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time

import msgspec
import pytest

from service.errors import Overloaded
from service.ipc import (
    Cancel,
    EngineClient,
    EngineGone,
    EngineServer,
    EngineState,
    Failure,
    FromEngine,
    Hello,
    RemoteFailure,
    ScoreRequest,
    Scores,
    ToEngine,
)
from tests.fakes import FakeScorer

BOUND = 20  # seconds any single wait may take on a loaded machine before the test fails


def describe(error: Exception) -> tuple[str, str, float | None]:
    if isinstance(error, Overloaded):
        return "overloaded", str(error), 3.0
    return "inference_failed", f"{type(error).__name__}: {error}", None


def ready_state() -> EngineState:
    return EngineState("ready", {"model": "fake", "labels": ["A", "B"]}, b"# metrics\n")


@contextlib.asynccontextmanager
async def serving(address: str, score, state=ready_state, server: dict | None = None, client: dict | None = None):
    """An EngineServer serving `score` and an EngineClient connected to it (each with its keyword options), closed
    after; everything in between must end within BOUND."""
    engine = EngineServer(address, score, describe, state, **(server or {}))
    line = EngineClient(address, **(client or {}))
    try:
        async with asyncio.timeout(BOUND):
            yield engine, line
    finally:
        await line.close()
        await engine.close()


@pytest.fixture
def address(tmp_path) -> str:
    return f"ipc://{tmp_path}/engine.sock"


def test_messages_round_trip_through_msgpack():
    encoder = msgspec.msgpack.Encoder()
    to_engine = msgspec.msgpack.Decoder(ToEngine)
    from_engine = msgspec.msgpack.Decoder(FromEngine)
    for message in (ScoreRequest(7, [[101, 2023, 102], [101, 102]], 1234.5), Cancel(7), Hello(42)):
        assert to_engine.decode(encoder.encode(message)) == message
    for message in (
        Scores(7, [[0.25, 0.75]]),
        Failure(7, "overloaded", "the queue is full", 2.0),
        Failure(8, "deadline", "too late"),
        EngineState("draining", {"model": "m"}, b"x 1\n"),
    ):
        assert from_engine.decode(encoder.encode(message)) == message
    with pytest.raises(msgspec.ValidationError):  # a reply where a request belongs is refused, not guessed
        to_engine.decode(encoder.encode(Scores(1, [[1.0]])))


def test_scores_errors_and_state_travel_both_ways(address):
    asyncio.run(_scores_errors_and_state_travel_both_ways(address))


async def _scores_errors_and_state_travel_both_ways(address):
    scorer = FakeScorer()
    async with serving(address, scorer.score) as (server, client):
        state = await client.wait_for_state()
        assert state.status == "ready" and state.info["labels"] == ["A", "B"]
        deadline = time.monotonic() + 5
        scores = await asyncio.gather(*(client.score([[i, 2], [3]], deadline) for i in range(1, 50)))
        assert scores == [[[2.0, i + 2.0], [1.0, 3.0]] for i in range(1, 50)]
        assert scorer.deadlines[0] == deadline  # monotonic seconds cross the boundary unchanged
        with pytest.raises(RemoteFailure) as failure:
            await client.score([[-1]], deadline)
        assert (failure.value.kind, failure.value.retry_after) == ("overloaded", 3.0)
        assert "queue is full" in failure.value.message


def test_a_cancelled_caller_cancels_its_work_in_the_engine(address):
    asyncio.run(_a_cancelled_caller_cancels_its_work_in_the_engine(address))


async def _a_cancelled_caller_cancels_its_work_in_the_engine(address):
    scorer = FakeScorer()
    async with serving(address, scorer.score) as (server, client):
        await client.wait_for_state()
        waiting = asyncio.create_task(client.score([[0, 5]], time.monotonic() + 30))
        await scorer.started.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        while not scorer.cancelled:
            await asyncio.sleep(0.01)
        assert scorer.cancelled == [[[0, 5]]]
        assert server.in_progress == 0
        assert await client.score([[4]], time.monotonic() + 5) == [[1.0, 4.0]]  # the line still works


def test_a_request_cancelled_before_its_work_starts_leaves_nothing_in_progress(address):
    asyncio.run(_a_request_cancelled_before_its_work_starts_leaves_nothing_in_progress(address))


async def _a_request_cancelled_before_its_work_starts_leaves_nothing_in_progress(address):
    """The engine may read a request and its cancellation in one go: a drain would otherwise wait for it forever."""
    scorer = FakeScorer()
    async with serving(address, scorer.score) as (server, client):
        await client.wait_for_state()
        for _ in range(20):
            waiting = asyncio.create_task(client.score([[0, 1]], time.monotonic() + 30))
            await asyncio.sleep(0)  # sent
            waiting.cancel()  # and its cancellation right behind it
            with pytest.raises(asyncio.CancelledError):
                await waiting
        while server.in_progress:
            await asyncio.sleep(0.01)


def test_state_changes_reach_clients(address):
    asyncio.run(_state_changes_reach_clients(address))


async def _state_changes_reach_clients(address):
    status = {"now": "loading"}
    async with serving(address, FakeScorer().score, lambda: EngineState(status["now"]), server={"heartbeat": 0.05}, client={"heartbeat": 0.05}) as (server, client):
        assert (await client.wait_for_state()).status == "loading"
        status["now"] = "ready"
        await server.publish_state()
        assert (await client.wait_for_state(lambda s: s.status == "ready")).status == "ready"


def _serve_forever(address: str, started) -> None:
    async def main() -> None:
        scorer = FakeScorer()
        EngineServer(address, scorer.score, describe, ready_state, heartbeat=0.05)
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
    async with serving(address, scorer.score, server={"heartbeat": 0.05}, client={"heartbeat": 0.05, "peer_timeout": 0.5}) as (server, client):
        await client.wait_for_state()
        with pytest.raises(EngineGone, match="after the request's deadline"):
            await client.score([[0, 1]], time.monotonic() + 0.2)  # the engine never answers it
        while not scorer.cancelled:  # and the engine was told to drop it
            await asyncio.sleep(0.02)


def test_a_silent_client_has_its_work_dropped(address):
    asyncio.run(_a_silent_client_has_its_work_dropped(address))


async def _a_silent_client_has_its_work_dropped(address):
    scorer = FakeScorer()
    async with serving(address, scorer.score, server={"heartbeat": 0.05, "peer_timeout": 0.5}, client={"heartbeat": 0.05}) as (server, client):
        await client.wait_for_state()
        asyncio.create_task(client.score([[0, 9]], time.monotonic() + 60))
        await scorer.started.wait()
        for task in client._tasks:  # the client process freezes: no more heartbeats
            task.cancel()
        while not scorer.cancelled:
            await asyncio.sleep(0.02)
        assert scorer.cancelled == [[[0, 9]]] and server.in_progress == 0
