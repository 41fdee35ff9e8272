"""The boundary between API processes and the one engine process: typed messages over ZeroMQ.

Each API process holds an `EngineClient` (a DEALER socket); the engine process runs an `EngineServer` (a ROUTER
socket bound to an `ipc://` address) in front of anything with `score(token_ids, deadline)`. Messages are msgspec
Structs encoded with msgpack, tagged by type, so each side decodes exactly the union it expects and a malformed
frame is an error, not a guess. Deadlines are `time.monotonic()` seconds: CLOCK_MONOTONIC is system-wide on Linux,
so a deadline computed in an API process names the same instant in the engine process.

Liveness, so nothing waits forever on a dead peer:
- A client declares the engine gone when its connection drops (the engine process died: the kernel closes the
  socket, and ZeroMQ's monitor says so at once), or when it has heard nothing for `peer_timeout` seconds (a frozen
  engine; the engine sends its state each `heartbeat` seconds). Then every pending request fails with `EngineGone`,
  and so does every new one. A request is also given up `peer_timeout` seconds after its deadline, whatever happens.
- The engine forgets a client it has not heard from for `peer_timeout` seconds (clients say hello each heartbeat),
  or that it can no longer send to, and cancels that client's work, as for callers that left.
"""

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5
PEER_TIMEOUT_SECONDS = 30.0

EngineStatus = Literal["loading", "ready", "draining", "stopped", "failed"]


class ScoreRequest(msgspec.Struct, tag="score", array_like=True):
    """Score these token-id sequences (one per text) before `deadline` (time.monotonic seconds)."""

    request_id: int
    token_ids: list[list[int]]
    deadline: float


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The caller of `request_id` is gone: drop its texts still queued."""

    request_id: int


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """A client announces itself (and repeats it as its heartbeat) so the engine sends it its state."""

    pid: int


class Scores(msgspec.Struct, tag="scores", array_like=True):
    """The fp32 scores of each text of `request_id`, in order."""

    request_id: int
    scores: list[list[float]]


class Failure(msgspec.Struct, tag="failure", array_like=True):
    """`request_id` failed: an error `kind` the API maps to its status, the message for the caller, and when to retry."""

    request_id: int
    kind: str
    message: str
    retry_after: float | None = None


class EngineState(msgspec.Struct, tag="state", array_like=True):
    """The engine's status, what /info shows of it, and its Prometheus metrics (text exposition format)."""

    status: EngineStatus
    info: dict = {}
    metrics: bytes = b""


ToEngine = ScoreRequest | Cancel | Hello
FromEngine = Scores | Failure | EngineState


class EngineGone(Exception):
    """The engine process stopped answering (it died, or its socket closed)."""


class RemoteFailure(Exception):
    """The engine refused or failed a request; `kind` names the error, as `Failure` carried it."""

    def __init__(self, kind: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after


class EngineClient:
    """An API process's line to the engine: `await score(...)`; `state` is the engine's last reported state.

    Born connected: construct it inside the event loop that will use it, then `await wait_for_state()` before the
    first request if the caller needs the engine's info.
    """

    def __init__(
        self, address: str, heartbeat: float = HEARTBEAT_SECONDS, peer_timeout: float = PEER_TIMEOUT_SECONDS
    ) -> None:
        self.address = address
        self.heartbeat, self.peer_timeout = heartbeat, peer_timeout
        self.state: EngineState | None = None
        self.gone: str | None = None  # why the engine is considered gone
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: no send waits on a dead peer
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._socket.connect(address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromEngine)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._heard_at = time.monotonic()
        self._state_changed = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._receive(), name="ipc-receive"),
            asyncio.create_task(self._beat(), name="ipc-heartbeat"),
            asyncio.create_task(self._watch_connection(), name="ipc-monitor"),
        ]

    async def score(self, token_ids: list[list[int]], deadline: float) -> list[list[float]]:
        """Scores per text. Raises RemoteFailure as the engine decided, EngineGone if it stops answering. Cancelling
        the awaiting task tells the engine to drop the texts still queued."""
        if self.gone is not None:
            raise EngineGone(self.gone)
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send(ScoreRequest(request_id, token_ids, deadline))
            try:
                async with asyncio.timeout_at(_loop_time_at(deadline) + self.peer_timeout):
                    return await future
            except TimeoutError:
                await self._cancel(request_id)
                raise EngineGone(f"no answer {self.peer_timeout:g} s after the request's deadline") from None
        except asyncio.CancelledError:
            await self._cancel(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)

    async def wait_for_state(self, accept: Callable[[EngineState], bool] = lambda state: True, timeout: float | None = None) -> EngineState:
        """The engine's state once `accept` holds for it. Raises EngineGone if the engine is gone first."""
        async with asyncio.timeout(timeout):
            while True:
                if self.gone is not None:
                    raise EngineGone(self.gone)
                if self.state is not None and accept(self.state):
                    return self.state
                self._state_changed.clear()
                await self._state_changed.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending("the connection to the engine was closed")
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._context.term()

    async def _cancel(self, request_id: int) -> None:
        """Tell the engine to drop the request's texts still queued (nothing to do if it is gone)."""
        if self.gone is None:
            with contextlib.suppress(zmq.ZMQError, EngineGone):
                await self._send(Cancel(request_id))

    async def _send(self, message: ToEngine) -> None:
        try:
            await self._socket.send(self._encoder.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise EngineGone("not connected to the engine") from None

    async def _receive(self) -> None:
        while True:
            frame = await self._socket.recv()
            self._heard_at = time.monotonic()
            try:
                message = self._decoder.decode(frame)
            except msgspec.DecodeError:
                log.error("dropped a malformed message from the engine (%d bytes)", len(frame))
                continue
            if isinstance(message, EngineState):
                self.state = message
                self._state_changed.set()
                continue
            future = self._pending.get(message.request_id)
            if future is None or future.done():
                continue  # its caller left
            if isinstance(message, Scores):
                future.set_result(message.scores)
            else:
                future.set_exception(RemoteFailure(message.kind, message.message, message.retry_after))

    async def _beat(self) -> None:
        """Say hello each heartbeat; declare the engine gone after `peer_timeout` of silence."""
        hello = Hello(pid=os.getpid())
        while True:
            with contextlib.suppress(zmq.Again):
                await self._socket.send(self._encoder.encode(hello), flags=zmq.NOBLOCK)
            await asyncio.sleep(self.heartbeat)
            silent = time.monotonic() - self._heard_at
            if self.state is not None and silent > self.peer_timeout:  # the clock starts at first contact
                self._declare_gone(f"the engine has not answered for {silent:.1f} s")
                return

    async def _watch_connection(self) -> None:
        """The engine's end of the connection closed: its process has exited."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._declare_gone("the engine closed its connection")
                return

    def _declare_gone(self, reason: str) -> None:
        self.gone = reason
        log.error("%s: failing %d pending requests", reason, len(self._pending))
        self._fail_pending(reason)
        self._state_changed.set()

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineGone(reason))


# What the engine process serves: scores for token ids before a deadline; cancelling the call drops queued texts.
Score = Callable[[list[list[int]], float], Awaitable[list[list[float]]]]
# The engine's error -> (kind, message, retry_after) for the Failure message.
DescribeError = Callable[[Exception], tuple[str, str, float | None]]
# The engine's current state, sent to clients as heartbeat.
CurrentState = Callable[[], EngineState]


class EngineServer:
    """Serves `score` to every connected client until `close`; each request runs as its own task."""

    def __init__(
        self,
        address: str,
        score: Score,
        describe_error: DescribeError,
        current_state: CurrentState,
        heartbeat: float = HEARTBEAT_SECONDS,
        peer_timeout: float = PEER_TIMEOUT_SECONDS,
    ) -> None:
        self.score, self.describe_error, self.current_state = score, describe_error, current_state
        self.heartbeat, self.peer_timeout = heartbeat, peer_timeout
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client raises, not vanishes
        self._socket.bind(address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToEngine)
        self._clients: dict[bytes, float] = {}  # identity -> last heard (monotonic)
        self._work: dict[tuple[bytes, int], asyncio.Task] = {}
        self._tasks = [asyncio.create_task(self._receive(), name="ipc-serve"), asyncio.create_task(self._beat(), name="ipc-state")]

    @property
    def in_progress(self) -> int:
        """Requests received and not yet answered."""
        return len(self._work)

    async def publish_state(self) -> None:
        """Send the current state to every client now (on a change, rather than at the next heartbeat)."""
        frame = self._encoder.encode(self.current_state())
        for identity in list(self._clients):
            await self._send(identity, frame)

    async def close(self) -> None:
        """Stop serving: tell clients the final state, then close (answers still running are cancelled)."""
        with contextlib.suppress(zmq.ZMQError):
            await self.publish_state()
        for task in [*self._tasks, *self._work.values()]:
            task.cancel()
        for task in [*self._tasks, *self._work.values()]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._socket.close(linger=0)
        self._context.term()

    async def _receive(self) -> None:
        while True:
            identity, frame = await self._socket.recv_multipart()
            new_client = identity not in self._clients
            self._clients[identity] = time.monotonic()
            try:
                message = self._decoder.decode(frame)
            except msgspec.DecodeError:
                log.error("dropped a malformed message from an API process (%d bytes)", len(frame))
                continue
            if isinstance(message, ScoreRequest):
                key = (identity, message.request_id)
                self._work[key] = asyncio.create_task(self._answer(identity, message))
            elif isinstance(message, Cancel):
                task = self._work.get((identity, message.request_id))
                if task is not None:
                    task.cancel()
            if new_client:
                await self._send(identity, self._encoder.encode(self.current_state()))

    async def _answer(self, identity: bytes, request: ScoreRequest) -> None:
        try:
            reply: FromEngine = Scores(request.request_id, await self.score(request.token_ids, request.deadline))
        except asyncio.CancelledError:
            return  # the caller left; nobody to answer
        except Exception as error:
            kind, message, retry_after = self.describe_error(error)
            reply = Failure(request.request_id, kind, message, retry_after)
        finally:
            self._work.pop((identity, request.request_id), None)
        await self._send(identity, self._encoder.encode(reply))

    async def _send(self, identity: bytes, frame: bytes) -> None:
        try:
            await self._socket.send_multipart((identity, frame))
        except zmq.ZMQError as error:  # EHOSTUNREACH: that client has gone
            log.debug("could not answer an API process that has gone: %s", error)
            self._forget(identity)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for identity, heard in list(self._clients.items()):
                if now - heard > self.peer_timeout:
                    log.warning("an API process has not been heard from for %.1f s: dropping its work", now - heard)
                    self._forget(identity)
            await self.publish_state()

    def _forget(self, identity: bytes) -> None:
        self._clients.pop(identity, None)
        for (owner, _), task in list(self._work.items()):
            if owner == identity:
                task.cancel()


def _loop_time_at(monotonic: float) -> float:
    """A `time.monotonic()` instant on the running event loop's clock (uvloop's is not time.monotonic)."""
    return asyncio.get_running_loop().time() + (monotonic - time.monotonic())
