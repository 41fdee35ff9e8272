"""The engine's back half: queue, scheduler, batcher and model runner, on one inference thread.

`Scorer.score` takes token ids and returns each text's fp32 logits (the front activates them); what crosses it is
plain data and `service.errors`, so the back can run in a process of its own, apart from tokenization and
post-processing. The engine process serves `Scorer.begin`, the same with a callback: no task per request.
"""

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from service import metrics
from service.batcher import Batcher, Submission
from service.drain_rate import DrainRate
from service.errors import DeadlineExceeded
from service.live_tuning import LiveTuning
from service.runner import BatchModelAdapter
from service.scheduler import BatchingPolicy, BatchQueue, deadline_passed


class ScoreCall:
    """One request's texts in the batcher, from `Scorer.begin` until `on_done` has its outcome: the scores once every
    text has run, or the first failure in text order as soon as it comes; at the deadline, the texts still queued are
    dropped and it fails with DeadlineExceeded, while texts already running finish. `cancel` (its caller left) drops
    the texts still queued (reason client_gone) and calls nothing."""

    __slots__ = ("_batcher", "_deadline", "_deadlines", "_finished", "_on_done", "_remaining", "_submission")

    def __init__(
        self,
        batcher: Batcher,
        submission: Submission,
        deadline: float,
        on_done: Callable[[list[list[float]] | Exception], None],
        deadlines: "Deadlines",
    ) -> None:
        self._batcher, self._submission, self._deadline, self._on_done = batcher, submission, deadline, on_done
        self._deadlines = deadlines
        futures = submission.futures
        self._remaining = len(futures)
        self._finished = False
        for future in futures:
            future.add_done_callback(self._text_done)
        if deadline != math.inf:
            deadlines.add(deadline, self)

    @property
    def finished(self) -> bool:
        """Whether `on_done` has been called, or the call cancelled."""
        return self._finished

    def cancel(self) -> None:
        if not self._finished:
            self._finish()
            self._batcher.cancel(self._submission, "client_gone")
            self._discard()

    def _text_done(self, future: asyncio.Future) -> None:
        if self._finished:
            return
        if not future.cancelled() and future.exception() is not None:
            self._fail(next(error for text in self._submission.futures if (error := _failure(text)) is not None))
            return
        self._remaining -= 1
        if self._remaining == 0:
            self._succeed()

    def deadline_reached(self) -> None:
        """Its deadline has passed (`Deadlines` calls it): fail it, unless nothing of it is queued any more (the rest
        is in a running batch, which finishes)."""
        if not self._finished and self._batcher.cancel(self._submission, "deadline"):
            self._fail(DeadlineExceeded())

    def _succeed(self) -> None:
        self._finish()
        scores = [future.result() for future in self._submission.futures]  # only this call cancels them
        if self._batcher.clock() > self._deadline:
            metrics.LATE_ANSWERS.inc()
        self._on_done(scores)

    def _fail(self, error: Exception) -> None:
        self._finish()
        if isinstance(error, DeadlineExceeded):
            # Texts dropped at their batch's start leave the request's others queued: nobody waits for them now.
            self._batcher.cancel(self._submission, "deadline")
            self._discard()
        self._on_done(error)

    def _finish(self) -> None:
        self._finished = True
        if self._deadline != math.inf:
            self._deadlines.finished()

    def _discard(self) -> None:
        """Answers of its texts in a running batch are discarded (and counted) when the batch ends."""
        for future in self._submission.futures:
            future.cancel()


class Deadlines:
    """One event-loop timer for the deadlines of every request in progress: a heap of (deadline, order, call), the
    timer armed for the earliest, each call's `deadline_reached` called once its deadline has passed on `clock`. A
    timer per request (`call_later`) cost the engine's event loop about a twentieth of its time per request. Calls
    that finish early stay in the heap until their deadline, or until more than half of it is finished calls, when
    the heap is rebuilt without them."""

    COMPACT_ABOVE = 64  # entries: a smaller heap is never rebuilt

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, ScoreCall]] = []
        self._order = itertools.count()  # ties in deadline go in arrival order, and calls are never compared
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf
        self._finished = 0  # calls in the heap that have finished, about (those popped since are counted too)

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, call: ScoreCall) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), call))
        if deadline < self._armed_for:
            self._arm()

    def finished(self) -> None:
        """A call in the heap has finished before its deadline."""
        self._finished += 1
        if len(self._heap) > self.COMPACT_ABOVE and 2 * self._finished > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].finished]
            heapq.heapify(self._heap)
            self._finished = 0

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = self._heap[0][0] if self._heap else math.inf
        if self._heap:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, self._armed_for - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer, self._armed_for = None, math.inf
        now = self._clock()
        try:
            # self._heap each time: a call failed here finishes, and that may rebuild the heap (`finished`).
            while self._heap and deadline_passed(self._heap[0][0], now):  # woken early: armed again below
                heapq.heappop(self._heap)[2].deadline_reached()
        finally:  # one call's error must not leave every later deadline without its timer
            self._arm()


def _failure(future: asyncio.Future) -> Exception | None:
    if not future.done() or future.cancelled():
        return None
    error = future.exception()
    assert error is None or isinstance(error, Exception), "the batcher fails texts with Exceptions"
    return error


def _settle(outcome: asyncio.Future, result: list[list[float]] | Exception) -> None:
    if outcome.done():  # its awaiting caller was cancelled
        return
    if isinstance(result, Exception):
        outcome.set_exception(result)
    else:
        outcome.set_result(result)


class Scorer:
    """Scores token ids in batches: `score` from the event loop, `stop` to drain. Built started and warmed up by
    `Scorer.start`."""

    def __init__(self, batcher: Batcher, inference_thread: ThreadPoolExecutor | None) -> None:
        self.batcher = batcher
        self._inference_thread = inference_thread
        self._deadlines = Deadlines(batcher.clock)

    @classmethod
    async def start(
        cls,
        model: BatchModelAdapter,
        policy: BatchingPolicy,
        max_queue_tokens: int,
        inference_thread: ThreadPoolExecutor,
        live: LiveTuning | None = None,
        fair_share_headroom: float = 0.0,
        shared_batch_seconds: float = 0.0,
    ) -> "Scorer":
        """Warm the model up on `inference_thread` (which loaded it), then start batching on it (tuning live when
        `live` is given; callers under their fair share may queue `fair_share_headroom` beyond `max_queue_tokens`;
        while callers share the model a batch runs about `shared_batch_seconds` at most, 0 = no such limit)."""
        rates = DrainRate()
        tokens, seconds = await asyncio.get_running_loop().run_in_executor(inference_thread, model.warm_up, policy)
        rates.model_ran(tokens, seconds)
        batcher = Batcher(
            BatchQueue(policy),
            model,
            max_queue_tokens,
            rates,
            live=live,
            fair_share_headroom=fair_share_headroom,
            shared_batch_seconds=shared_batch_seconds,
        )
        batcher.start(inference_thread)
        return cls(batcher, inference_thread)

    @property
    def ready(self) -> bool:
        """Whether new texts are admitted (false once draining)."""
        return self.batcher.accepting

    @property
    def policy(self) -> BatchingPolicy:
        return self.batcher.queue.policy

    async def score(self, token_ids: list[list[int]], deadline: float, caller: str = "") -> list[list[float]]:
        """Each text's logits, once all have run, by `deadline` (`time.monotonic()` seconds); `caller` (who sent them,
        `service.callers`) gets its fair share of the queue.

        Raises Overloaded or NotAccepting (refused at admission), DeadlineExceeded (texts still queued at the
        deadline, now dropped), TextTooLargeForDevice or InferenceFailed (a text that failed alone). Cancelling the
        caller drops its texts still queued (reason client_gone).
        """
        outcome: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        call = self.begin(token_ids, deadline, caller, functools.partial(_settle, outcome))
        try:
            return await outcome
        except asyncio.CancelledError:
            call.cancel()
            raise

    def begin(
        self,
        token_ids: list[list[int]],
        deadline: float,
        caller: str,
        on_done: Callable[[list[list[float]] | Exception], None],
    ) -> "ScoreCall":
        """As `score`, without a task: `on_done` gets the scores or the error later, from the event loop, unless the
        returned call is cancelled first. A refusal at admission is raised at once."""
        return ScoreCall(self.batcher, self.batcher.submit(token_ids, deadline, caller), deadline, on_done, self._deadlines)

    def together(self) -> contextlib.AbstractContextManager:
        """Held around several `begin` and `cancel` calls in a row, so they take the queue's lock once."""
        return self.batcher.together()

    def info(self) -> dict:
        """How batches are shaped, the budget now in force included, and live tuning's figures when it runs."""
        batching = dataclasses.asdict(self.policy)
        batching["window_seconds"] = batching.pop("window")  # the name /info has always shown
        budget = self.batcher.splitter.memory_budget
        batching["max_batch_tokens"] = budget.tuned
        batching["effective_max_batch_tokens"] = budget.current
        if (live := self.batcher.live_info()) is not None:
            batching["live_tuning"] = live
        return batching

    async def stop(self) -> None:
        """Stop admitting and answer every queued text before returning."""
        self.batcher.drain()
        await self.batcher.drained()
        if self._inference_thread is not None:
            self._inference_thread.shutdown(wait=False)
