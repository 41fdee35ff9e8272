"""The boundary between API processes and the one engine process: typed messages over ZeroMQ.

Each API process holds an `EngineClient` (a DEALER socket), behind `RemoteBackend`, the engine's back half as
the API process sees it; the engine process runs an `EngineServer` (a ROUTER socket bound to an `ipc://` address) in
front of a back half's `begin(token_ids, deadline, caller, on_done)`. Messages are msgspec Structs encoded with msgpack,
tagged by type, so each side decodes exactly the union it expects and a malformed frame is an error, not a guess. An error
crosses as a `Failure` (`encode_failure`) and is raised again on the other side as the same ClassifierError
(`decode_failure`). Deadlines are `time.monotonic()` seconds: CLOCK_MONOTONIC is system-wide on Linux,
so a deadline computed in an API process names the same instant in the engine process.

Liveness, so nothing waits forever on a dead peer:
- A client declares the engine gone when its connection drops (the engine process died: the kernel closes the
  socket, and ZeroMQ's monitor says so at once), or when it has heard nothing for `peer_timeout` seconds (a frozen
  engine; the engine sends its state each `heartbeat` seconds). Then every pending request fails with `EngineGone`,
  and so does every new one. A request is also given up `peer_timeout` seconds after its deadline, whatever happens.
- The engine forgets a client it has not heard from for `peer_timeout` seconds (clients say hello each heartbeat),
  or that it can no longer send to, and cancels that client's work, as for callers that left.

Cost per request, which caps a replica (loadtest/frontend_benchmark.py): both ends read their sockets from the event
loop's own poller (`add_reader` on ZeroMQ's descriptor) instead of through zmq.asyncio's futures; what either end
has to say to a peer in one turn of its loop crosses as one frame holding the list of those messages (the requests
an API process's callers made in that turn; the answers a batch finished, with the cancellations and states beside
them); and the engine serves each request through its back half's `begin`, with a callback, not a task of its own.
"""

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from service import request_ids
from service.engine import EngineFacts
from service.errors import ClassifierError, EngineUnavailable, internal_error_message
from service.tokenization import PairIds

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5
PEER_TIMEOUT_SECONDS = 30.0

# ZeroMQ's constants as plain ints: its enum types cost a third of a socket check, made several times a request.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

EngineStatus = Literal["loading", "ready", "draining", "stopped", "failed"]


class ScoreRequest(msgspec.Struct, tag="score", array_like=True):
    """Score these token-id sequences (one per text) before `deadline` (time.monotonic seconds). `second_starts`:
    where the second text of each pair starts (`PairIds.second_start`, by the text's index); `http_request_id`: the
    HTTP request's id, for the engine process's log lines about it; `caller`: who sent it (`service.callers`)."""

    request_id: int
    token_ids: list[list[int]]
    deadline: float
    second_starts: dict[int, int] = {}
    http_request_id: str = ""
    caller: str = ""


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
    """`request_id` failed with a ClassifierError: its class's name (`kind`, which says its status), its message for
    the caller, and its headers (Retry-After)."""

    request_id: int
    kind: str
    message: str
    headers: dict[str, str] = {}


class EngineState(msgspec.Struct, tag="state", array_like=True):
    """The engine's status; why it failed to load, if it did; once loaded, its facts and how it batches now (the
    budget in force drops for a while after an out-of-memory)."""

    status: EngineStatus
    failure: str | None = None
    facts: EngineFacts | None = None
    batching: dict[str, Any] | None = None


ToEngine = ScoreRequest | Cancel | Hello
FromEngine = Scores | Failure | EngineState


class EngineGone(Exception):
    """The engine process stopped answering (it died, or its socket closed)."""


def encode_failure(request_id: int, error: Exception) -> Failure:
    """The Failure that tells the API process about `error`. Anything but a ClassifierError is a bug: it is logged
    here, with its traceback, and crosses as a plain ClassifierError (500) pointing to this log."""
    if isinstance(error, ClassifierError):
        return Failure(request_id, type(error).__name__, error.message, error.headers)
    log.error("scoring failed unexpectedly", exc_info=error)
    return Failure(request_id, ClassifierError.__name__, internal_error_message(error))


def decode_failure(failure: Failure) -> ClassifierError:
    """The engine's error again: the same ClassifierError subclass (a plain one, 500, if the kind is unknown here),
    with the same message and headers. Its constructor is not called (each takes its own arguments, which did not
    cross): the status, message and headers are all the HTTP answer needs."""
    kind = _error_kinds().get(failure.kind, ClassifierError)
    error = kind.__new__(kind)
    ClassifierError.__init__(error, failure.message, failure.headers)
    return error


def _error_kinds() -> dict[str, type[ClassifierError]]:
    found, pending = {}, [ClassifierError]
    while pending:
        kind = pending.pop()
        found[kind.__name__] = kind
        pending += kind.__subclasses__()
    return found


@dataclass(slots=True)
class _Waiting:
    """A request sent to the engine: the future its answer goes to, and when to give up on it."""

    future: asyncio.Future
    give_up_at: float  # time.monotonic(): the request's deadline plus the peer timeout


class _Readable:
    """Calls `on_message(frames)` for each multipart message that reaches `socket`, from the running event loop.

    ZeroMQ's descriptor is edge-triggered and says only that the socket's events changed, so each wake-up reads
    every message waiting, and `check` must be called after sending on the socket (a send can consume the edge
    that announced a message).
    """

    def __init__(self, socket: zmq.Socket, on_message: Callable[[list[bytes]], None]) -> None:
        self.socket, self.on_message = socket, on_message
        self._loop = asyncio.get_running_loop()
        self._descriptor = socket.fileno()  # ZeroMQ's descriptor (zmq.FD)
        self._loop.add_reader(self._descriptor, self.check)
        self.check()  # the descriptor signals only changes after this; messages may be waiting already

    def check(self) -> None:
        while int(self.socket.getsockopt(_EVENTS)) & _POLLIN:
            self.on_message(self.socket.recv_multipart(_NOBLOCK))

    def stop(self) -> None:
        self._loop.remove_reader(self._descriptor)


def _unbounded(socket: zmq.Socket) -> zmq.Socket:
    """No high-water marks: a send never blocks or drops for a full queue. What is queued is bounded by the requests
    in flight, which each API process caps (max_concurrent_requests)."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    return socket


class EngineClient:
    """An API process's line to the engine: `await score(...)`; `state` is the engine's last reported state.

    Born connected: construct it inside the event loop that will use it, then `await wait_for_state()` before the
    first request if the caller needs the engine's info.
    """

    def __init__(self, address: str, heartbeat: float = HEARTBEAT_SECONDS, peer_timeout: float = PEER_TIMEOUT_SECONDS) -> None:
        self.address = address
        self.heartbeat, self.peer_timeout = heartbeat, peer_timeout
        self.state: EngineState | None = None
        self.gone: str | None = None  # why the engine is considered gone
        self._context = zmq.Context()
        self._socket = _unbounded(self._context.socket(zmq.DEALER))
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: no send waits on a dead peer
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._socket.connect(address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[FromEngine])
        self._loop = asyncio.get_running_loop()
        self._outbox: list[ToEngine] = []  # messages for the engine, sent at the end of this loop turn
        self._ids = itertools.count()
        self._pending: dict[int, _Waiting] = {}
        self._heard_at = time.monotonic()
        self._state_changed = asyncio.Event()
        self._readers = [_Readable(self._socket, self._on_message), _Readable(self._monitor, self._on_monitor_event)]
        self._tasks = [asyncio.create_task(self._beat(), name="ipc-heartbeat")]

    async def score(self, token_ids: list[list[int]], deadline: float, caller: str = "") -> list[list[float]]:
        """Scores per text. Raises the engine's ClassifierError, or EngineGone if it stops answering (or has not
        answered `peer_timeout` after the deadline). Cancelling the awaiting task tells the engine to drop the texts
        still queued."""
        if self.gone is not None:
            raise EngineGone(self.gone)
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Waiting(future, deadline + self.peer_timeout)
        try:
            second_starts = {i: ids.second_start for i, ids in enumerate(token_ids) if type(ids) is PairIds}
            self._send(ScoreRequest(request_id, token_ids, deadline, second_starts, request_ids.current.get(), caller))
            return await future
        except asyncio.CancelledError:
            self._cancel(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)

    async def wait_for_state(self, accept: Callable[[EngineState], bool] = lambda state: True) -> EngineState:
        """The engine's state once `accept` holds for it. Raises EngineGone if the engine is gone first."""
        while True:
            if self.gone is not None:
                raise EngineGone(self.gone)
            if self.state is not None and accept(self.state):
                return self.state
            self._state_changed.clear()
            await self._state_changed.wait()

    async def close(self) -> None:
        for reader in self._readers:
            reader.stop()
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

    def _cancel(self, request_id: int) -> None:
        """Tell the engine to drop the request's texts still queued (nothing to do if it is gone)."""
        if self.gone is None:
            self._send(Cancel(request_id))

    def _send(self, message: ToEngine) -> None:
        """Queue a message for the engine; the first queued in this turn of the loop schedules the send."""
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        """Send the queued messages as one frame; when the engine is not connected, their requests fail."""
        outbox, self._outbox = self._outbox, []
        if not outbox or self._socket.closed:
            return
        try:
            self._socket.send(self._encoder.encode(outbox), flags=_NOBLOCK)
        except zmq.Again:  # no live connection (IMMEDIATE): nothing was queued, so nothing will be answered
            for message in outbox:
                waiting = self._pending.get(message.request_id) if isinstance(message, ScoreRequest) else None
                if waiting is not None and not waiting.future.done():
                    waiting.future.set_exception(EngineGone("not connected to the engine"))
        finally:
            self._readers[0].check()

    def _on_message(self, frames: list[bytes]) -> None:
        self._heard_at = time.monotonic()
        for frame in frames:
            try:
                messages = self._decoder.decode(frame)
            except msgspec.DecodeError:
                log.error("dropped a malformed message from the engine (%d bytes)", len(frame))
                continue
            for message in messages:
                if isinstance(message, EngineState):
                    self.state = message
                    self._state_changed.set()
                    continue
                waiting = self._pending.get(message.request_id)
                if waiting is None or waiting.future.done():
                    continue  # its caller left
                if isinstance(message, Scores):
                    waiting.future.set_result(message.scores)
                else:
                    waiting.future.set_exception(decode_failure(message))

    async def _beat(self) -> None:
        """Say hello each heartbeat; give up requests long past their deadline; declare the engine gone after
        `peer_timeout` of silence."""
        hello = Hello(pid=os.getpid())
        while True:
            self._send(hello)
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            self._give_up_overdue(now)
            silent = now - self._heard_at
            if self.state is not None and silent > self.peer_timeout:  # the clock starts at first contact
                self._declare_gone(f"the engine has not answered for {silent:.1f} s")
                return

    def _give_up_overdue(self, now: float) -> None:
        """Fail the requests still unanswered `peer_timeout` after their deadline, and tell the engine to drop them."""
        for request_id, waiting in list(self._pending.items()):
            if now > waiting.give_up_at and not waiting.future.done():
                waiting.future.set_exception(EngineGone(f"no answer {self.peer_timeout:g} s after the request's deadline"))
                self._cancel(request_id)

    def _on_monitor_event(self, frames: list[bytes]) -> None:
        """The engine's end of the connection closed: its process has exited."""
        if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED and self.gone is None:
            self._declare_gone("the engine closed its connection")

    def _declare_gone(self, reason: str) -> None:
        self.gone = reason
        log.error("%s: failing %d pending requests", reason, len(self._pending))
        self._fail_pending(reason)
        self._state_changed.set()

    def _fail_pending(self, reason: str) -> None:
        for waiting in self._pending.values():
            if not waiting.future.done():
                waiting.future.set_exception(EngineGone(reason))


class RemoteBackend:
    """The engine's back half as an API process sees it (a `service.engine.Backend`): the engine process, reached
    through an `EngineClient`."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    @property
    def ready(self) -> bool:
        state = self.client.state
        return self.client.gone is None and state is not None and state.status == "ready"

    async def score(self, token_ids: list[list[int]], deadline: float, caller: str = "") -> list[list[float]]:
        """As `Scorer.score`; raises the engine's ClassifierError, or EngineUnavailable once it has gone."""
        try:
            return await self.client.score(token_ids, deadline, caller)
        except EngineGone:
            raise EngineUnavailable() from None

    def info(self) -> dict[str, Any]:
        """How the engine batches, as it last said (each heartbeat)."""
        state = self.client.state
        assert state is not None and state.batching is not None, "built from a ready state, which has its batching"
        return state.batching

    async def stop(self) -> None:
        """Let go of the engine process (it drains on its own signal, once every API process has exited)."""
        await self.client.close()


async def connect_backend(address: str) -> tuple[RemoteBackend, EngineFacts]:
    """The engine process's back half and facts, once it has loaded. Raises when it reports that the model could not
    be loaded (or EngineGone, when it stops answering first)."""
    client = EngineClient(address)
    try:
        state = await client.wait_for_state(lambda s: s.status != "loading")
        if state.status != "ready" or state.facts is None:
            raise RuntimeError(state.failure or f"the engine process is {state.status}")
    except BaseException:
        await client.close()
        raise
    return RemoteBackend(client), state.facts


# What a request to the engine process ends with: each text's scores, or the error that failed it.
Outcome = list[list[float]] | Exception


class Call(Protocol):
    """A request in progress in the back half: `cancel` it when its caller has left (its texts still queued are
    dropped, and its `on_done` is not called)."""

    def cancel(self) -> object: ...


# What the engine process serves: `begin(token_ids, deadline, caller, on_done)` starts scoring for a caller
# (`service.callers`), or raises a refusal at once; `on_done(outcome)` is called once, later from the event loop (never
# from within `begin`), unless cancelled first.
Begin = Callable[[list[list[int]], float, str, Callable[[Outcome], None]], Call]
# The engine's current state, sent to clients as heartbeat.
CurrentState = Callable[[], EngineState]
# Held while the requests and cancellations of one frame are started (`begin`) or dropped, one after the other: the
# back half's lock, taken once for them all instead of once each, as a thread of its own may hold it meanwhile.
Together = Callable[[], contextlib.AbstractContextManager]


class EngineServer:
    """Serves `begin` to every connected client until `close`."""

    def __init__(
        self,
        address: str,
        begin: Begin,
        current_state: CurrentState,
        heartbeat: float = HEARTBEAT_SECONDS,
        peer_timeout: float = PEER_TIMEOUT_SECONDS,
        together: Together = contextlib.nullcontext,
    ) -> None:
        self.begin, self.current_state, self.together = begin, current_state, together
        self.heartbeat, self.peer_timeout = heartbeat, peer_timeout
        self._loop = asyncio.get_running_loop()
        self._context = zmq.Context()
        self._socket = _unbounded(self._context.socket(zmq.ROUTER))
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client raises, not vanishes
        self._socket.bind(address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[ToEngine])
        self._clients: dict[bytes, float] = {}  # identity -> last heard (monotonic)
        self._work: dict[tuple[bytes, int], Call] = {}
        self._idle = asyncio.Event()  # set while no request is in progress
        self._idle.set()
        self._outbox: dict[bytes, list[FromEngine]] = {}  # messages for each client, sent at the end of this loop turn
        self._reader = _Readable(self._socket, self._on_message)
        self._tasks = [asyncio.create_task(self._beat(), name="ipc-state")]

    @property
    def in_progress(self) -> int:
        """Requests received and not yet answered."""
        return len(self._work)

    async def all_answered(self) -> None:
        """Returns once no request is in progress."""
        await self._idle.wait()

    async def publish_state(self) -> None:
        """Send the current state to every client now (on a change, rather than at the next heartbeat)."""
        state = self.current_state()
        for identity in self._clients:
            self._post(identity, state)
        self._flush()

    async def close(self) -> None:
        """Stop serving: tell clients the final state, then close (answers still running are cancelled). Closing
        again does nothing."""
        if self._socket.closed:
            return
        with contextlib.suppress(zmq.ZMQError):
            await self.publish_state()
        self._reader.stop()
        for identity in list(self._clients):
            self._forget(identity)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._socket.close(linger=0)
        self._context.term()

    def _on_message(self, frames: list[bytes]) -> None:
        identity, frame = frames
        new_client = identity not in self._clients
        self._clients[identity] = time.monotonic()
        if new_client:
            self._post(identity, self.current_state())
        try:
            messages = self._decoder.decode(frame)
        except msgspec.DecodeError:
            log.error("dropped a malformed message from an API process (%d bytes)", len(frame))
            return
        with self.together():
            for message in messages:
                if isinstance(message, ScoreRequest):
                    self._start_request(identity, message)
                elif isinstance(message, Cancel):
                    call = self._work.pop((identity, message.request_id), None)
                    if call is not None:
                        call.cancel()
                        self._check_idle()

    def _start_request(self, identity: bytes, request: ScoreRequest) -> None:
        """Start the request's work, or answer its refusal."""
        token_ids = request.token_ids
        for index, second_start in request.second_starts.items():
            token_ids[index] = PairIds(token_ids[index], second_start)
        context = request_ids.current.set(request.http_request_id)  # log lines about it name the request
        try:
            on_done = functools.partial(self._answer, identity, request.request_id, request.http_request_id)
            self._work[identity, request.request_id] = self.begin(token_ids, request.deadline, request.caller, on_done)
            self._idle.clear()
        except Exception as error:
            self._post(identity, encode_failure(request.request_id, error))
        finally:
            request_ids.current.reset(context)

    def _answer(self, identity: bytes, request_id: int, http_request_id: str, outcome: Outcome) -> None:
        if self._work.pop((identity, request_id), None) is None:
            return  # cancelled, or its client forgotten: nobody to answer
        self._check_idle()
        if isinstance(outcome, Exception):
            context = request_ids.current.set(http_request_id)
            try:
                self._post(identity, encode_failure(request_id, outcome))
            finally:
                request_ids.current.reset(context)
        else:
            self._post(identity, Scores(request_id, outcome))

    def _check_idle(self) -> None:
        if not self._work:
            self._idle.set()

    def _post(self, identity: bytes, message: FromEngine) -> None:
        """Queue a message for a client; the first queued in this turn of the loop schedules the send."""
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.setdefault(identity, []).append(message)

    def _flush(self) -> None:
        """Send each client its queued messages as one frame."""
        outbox, self._outbox = self._outbox, {}
        if not outbox or self._socket.closed:  # sent already (publish_state flushes at once), or closed: nothing to do
            return
        for identity, messages in outbox.items():
            try:
                self._socket.send_multipart((identity, self._encoder.encode(messages)), flags=_NOBLOCK)
            except zmq.ZMQError as error:  # EHOSTUNREACH: that client has gone
                log.debug("could not answer an API process that has gone: %s", error)
                self._forget(identity)
        self._reader.check()

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
        """Drop a client and cancel its work."""
        self._clients.pop(identity, None)
        for key in [key for key in self._work if key[0] == identity]:
            self._work.pop(key).cancel()
        self._check_idle()
