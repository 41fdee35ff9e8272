"""The fakes the tests share: an injected clock, the batcher's model and the engine's back half. Each is defined
here once; tests import them. No torch here: the engine processes that tests spawn import this module too."""

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from service.errors import Overloaded

# What a request to the engine process ends with (`service.ipc.Outcome`, not imported: it would bring in torch).
Outcome = list[list[float]] | BaseException
WAIT = 60  # seconds a fake waits for a test's go-ahead on a loaded machine: a hang fails, a slow machine does not


class FakeClock:
    """A monotonic clock that moves only when the test (or a fake model) moves `now`."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """The batcher's model (`collate`, `run`): scores a text as [its length, its first token id], so every answer
    names its text. It records each batch before running it (`ran`, the texts' lengths in `lengths`, and the
    precision it ran in, set by live tuning's `use_precision`, in `precisions`). With a clock, each batch advances it
    by `batch_seconds`, and with `seconds_per_token` (by precision, which a test may change: a neighbour coming and
    going) by its real tokens' time too, and with `score_offsets` (by precision) its length score is off by that much
    (a precision's rounding). It counts the batches collated (`collated`). While `held`, a batch that starts running
    waits for `release()`; a batch holding the token `poison` raises ValueError."""

    def __init__(
        self,
        clock: FakeClock | None = None,
        batch_seconds: float = 0.0,
        held: bool = False,
        poison: int | None = None,
        seconds_per_token: dict[str, float] | None = None,
        score_offsets: dict[str, float] | None = None,
    ) -> None:
        self.clock, self.batch_seconds = clock, batch_seconds
        self.seconds_per_token = seconds_per_token or {}
        self.score_offsets = score_offsets or {}
        self.precision = "fp32"
        self.precisions: list[str] = []
        self.ran: list[list[list[int]]] = []  # the batches, in the order they ran
        self.collated_batches = 0
        self.lengths: list[int] = []  # the lengths of the texts they held, in the same order
        self.poison = poison
        self._started = threading.Condition()
        self._released = threading.Event()
        if not held:
            self._released.set()

    def collate(self, sequences: list[list[int]], padded_length: int) -> list[list[int]]:
        assert all(len(ids) <= padded_length for ids in sequences)
        with self._started:
            self.collated_batches += 1
            self._started.notify_all()
        return [list(ids) for ids in sequences]

    def run(self, sequences: list[list[int]]) -> list[list[float]]:
        with self._started:
            self.ran.append(sequences)
            self.precisions.append(self.precision)
            self.lengths.extend(len(ids) for ids in sequences)
            self._started.notify_all()
        assert self._released.wait(WAIT)
        if self.clock is not None:
            self.clock.now += self.batch_seconds  # wall time a batch takes, model and everything else on the CPU
            self.clock.now += sum(map(len, sequences)) * self.seconds_per_token.get(self.precision, 0.0)
        if self.poison is not None and any(self.poison in ids for ids in sequences):
            raise ValueError("poisoned batch")
        offset = self.score_offsets.get(self.precision, 0.0)
        return [[len(ids) + offset, float(ids[0])] for ids in sequences]

    def use_precision(self, precision: str) -> None:
        self.precision = precision

    def release(self) -> None:
        self._released.set()

    async def running(self, batches: int) -> None:
        """Returns once `batches` batches have started."""
        await self._until(lambda: len(self.ran) >= batches, f"{batches} batches did not start")

    async def collated(self, batches: int) -> None:
        """Returns once `batches` batches have been taken from the queue and collated."""
        await self._until(lambda: self.collated_batches >= batches, f"{batches} batches were not collated")

    async def _until(self, condition: Callable[[], bool], failure: str) -> None:
        def wait() -> bool:
            with self._started:
                return self._started.wait_for(condition, WAIT)

        assert await asyncio.to_thread(wait), failure


class FakeRunner:
    """A `ModelRunner` stand-in for the start-up tuner: logits [length, first id] per text, like FakeModel; each
    batch advances `clock` by `overhead` seconds plus its padded tokens times `seconds_per_token`, and `set_up` more
    on its first batch (a real runner's first run pays one-time initialisation), all times `slowdown` (a neighbour's
    job slows everything) and the next of `jitter`'s factors in turn (a busy machine's unevenness)."""

    def __init__(
        self,
        clock: FakeClock,
        seconds_per_token: float,
        slowdown: float = 1.0,
        jitter: tuple[float, ...] = (1.0,),
        overhead: float = 0.0,
        set_up: float = 0.0,
    ) -> None:
        self.clock, self.seconds_per_token, self.slowdown = clock, seconds_per_token, slowdown
        self.jitter, self.overhead, self.set_up = jitter, overhead, set_up
        self.batches = 0

    def run(self, sequences: list[list[int]], padded_length: int):
        import torch  # here, not at the top: engine processes that tests spawn import this module without torch

        factor = self.jitter[self.batches % len(self.jitter)] * self.slowdown
        set_up = self.set_up if self.batches == 0 else 0.0
        self.batches += 1
        self.clock.now += (set_up + self.overhead + len(sequences) * padded_length * self.seconds_per_token) * factor
        return torch.tensor([[float(len(ids)), float(ids[0])] for ids in sequences])


def begun_in_a_task(scores: Coroutine[Any, Any, list[list[float]]], on_done: Callable[[Outcome], None]) -> asyncio.Task:
    """An async back half's scoring served as an EngineServer serves a request (`ipc.Begin`): in a task, whose
    outcome goes to `on_done` (nothing when it is cancelled)."""

    def done(task: asyncio.Task) -> None:
        if not task.cancelled():
            on_done(task.exception() or task.result())

    task = asyncio.ensure_future(scores)
    task.add_done_callback(done)
    return task


class FakeScorer:
    """The engine's back half (what `Engine` and the engine process call: `score`, `ready`, `info`, `stop`): its
    logits for each text are [len(ids), sum(ids)].

    A request with a text holding `hold_token` waits in `score` until `release` is set (`started` says it got
    there); if its caller is cancelled meanwhile (its client left), its token ids go to `cancelled`. Each request's
    deadline and caller go to `deadlines` and `callers`. A request with a
    text holding `fail_token` raises `failure` (by default: the queue is full, retry in 3 s). `accepting` is what
    `ready` says; `stop` ends it.
    """

    def __init__(self, failure: Exception | None = None, hold_token: int = 0, fail_token: int = -1) -> None:
        self.failure = failure or Overloaded("queue_full", "the queue is full", 3.0)
        self.hold_token, self.fail_token = hold_token, fail_token
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled: list[list[list[int]]] = []
        self.some_cancelled = asyncio.Event()  # set once `cancelled` has one
        self.deadlines: list[float] = []
        self.callers: list[str] = []  # who sent each request, in order
        self.accepting = True

    @property
    def ready(self) -> bool:
        return self.accepting

    async def score(self, token_ids: list[list[int]], deadline: float, caller: str = "") -> list[list[float]]:
        self.deadlines.append(deadline)
        self.callers.append(caller)
        if any(self.fail_token in ids for ids in token_ids):
            raise self.failure
        if any(self.hold_token in ids for ids in token_ids):
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(token_ids)
                self.some_cancelled.set()
                raise
        return [[float(len(ids)), float(sum(ids))] for ids in token_ids]

    def begin(self, token_ids: list[list[int]], deadline: float, caller: str, on_done: Callable[[Outcome], None]) -> asyncio.Task:
        """`score` as an EngineServer serves it (`ipc.Begin`)."""
        return begun_in_a_task(self.score(token_ids, deadline, caller), on_done)

    def info(self) -> dict:
        """The batching section of /info."""
        return {"max_batch_tokens": 512, "effective_max_batch_tokens": 512, "padding": "dynamic", "batching": "buckets"}

    async def stop(self) -> None:
        self.accepting = False
