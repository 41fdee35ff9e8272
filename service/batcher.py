"""Runs the queue: admits encoded texts from the event loop, builds each batch's inputs on a collation thread,
runs batches on the one inference thread, and resolves every caller's future with its own scores. The batching
decisions themselves live in `scheduler`."""

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from queue import Queue
from typing import Any, Protocol

from service import metrics
from service.admission import Backlog, WaitCalibration, plain_wait, predicted_ends, refusal
from service.errors import DeadlineExceeded, InferenceFailed, NotAccepting, Overloaded, TextTooLargeForDevice
from service.scheduler import Batch, BatchQueue, QueuedText, unreachable
from service.tuning import MemoryBudget

log = logging.getLogger(__name__)

LAG_SMOOTHING = 0.2  # weight of the newest batch's delivery lag


class BatchModel(Protocol):
    """What the batcher runs batches on: building a batch's inputs, and scoring them."""

    def collate(self, sequences: list[list[int]], padded_length: int) -> Any:
        """The inputs for `sequences` padded to `padded_length`; called on the collation thread."""

    def run(self, inputs: Any) -> list[list[float]]:
        """Scores per sequence of collated inputs; raises OutOfMemory when the device ran out of memory."""


class OutOfMemory(Exception):
    """The device ran out of memory running a batch (the engine turns the framework's own error into this)."""


@dataclass(slots=True)
class Pending:
    """The caller's side of a queued text: its token ids, the future its scores go to, when admission predicted its
    answer, and, if it opened a batch of its own, its plain predicted wait (None when it joined a queued batch)."""

    ids: list[int]
    future: asyncio.Future
    answer_at: float
    opening_wait: float | None


@dataclass(frozen=True, slots=True)
class Collated:
    """A batch taken from the queue and its inputs, built on the collation thread (None when that failed), when it
    was taken, and whether texts were still queued behind it."""

    batch: Batch
    inputs: Any
    taken_at: float
    more_queued: bool


@dataclass(frozen=True, slots=True)
class RanBatch:
    """A batch the inference thread ran: its real tokens, and when it started and ended."""

    real_tokens: int
    started: float
    ended: float


@dataclass(frozen=True, slots=True)
class Submission:
    """One request's queued texts, in order: await their futures, or `Batcher.cancel` them."""

    items: list[QueuedText]

    @property
    def futures(self) -> list[asyncio.Future]:
        return [item.handle.future for item in self.items]


class ThroughputMeter:
    """Recent real tokens per second of inference, smoothed over batches, for queue drain-time estimates."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.tokens_per_second: float | None = None

    def record(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-6)
        previous = self.tokens_per_second
        self.tokens_per_second = rate if previous is None else previous + self.smoothing * (rate - previous)


class Batcher:
    """Owns the queue: `submit` texts from the event loop; one inference thread runs batches back to back.

    A collation thread takes the next batch from the queue and builds its inputs while the current batch runs, then
    hands it over (one batch at most waits ready), so the inference thread only runs the model. The queue is guarded
    by one lock; scores go back to the callers' futures on the event loop.
    """

    def __init__(
        self,
        queue: BatchQueue,
        model: BatchModel,
        max_queue_tokens: int,
        meter: ThroughputMeter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.model = model
        self.max_queue_tokens = max_queue_tokens
        self.meter = meter
        # Tokens per second of wall time while batches run back to back: what the model, the tokenizer, HTTP and
        # the rest of the process sharing the CPU together really drain. Admission and Retry-After use it once it
        # has a measurement (model time alone promised 5 s waits that took 6 under 3x overload).
        self.backlog_meter = ThroughputMeter()
        self.wait_calibration = WaitCalibration()
        self._previous_batch: RanBatch | None = None
        # Texts of the batch collated while another runs, waiting their turn: still cancellable. A batch taken while
        # the inference thread is idle counts as running at once, as it did before collation had its own thread.
        self._taken: list[QueuedText] = []
        self._inference_idle = True
        self._running: tuple[int, float] = (0, 0.0)  # real tokens and start of the batch running now (0: none)
        # Seconds from a batch's end until its answers reach the event loop, smoothed: under overload the loop
        # lags behind arrivals, and an answer that reaches it after the deadline is a late answer.
        self.delivery_lag = 0.0
        self.clock = clock
        policy = queue.policy
        self.memory_budget = MemoryBudget(policy.max_batch_tokens, policy.padded_length(policy.bucket_bounds[-1]))
        metrics.EFFECTIVE_MAX_BATCH_TOKENS.set(policy.max_batch_tokens)
        self._changed = threading.Condition()
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worked: asyncio.Future | None = None
        # The collated batch waiting for the inference thread; None once draining has emptied the queue.
        self._ready: Queue[Collated | None] = Queue(maxsize=1)

    def start(self, inference_thread: Executor) -> None:
        """Run batches on `inference_thread` (a one-thread executor) until drained; futures resolve on this loop."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._collate_batches, name="collate", daemon=True).start()
        self._worked = self._loop.run_in_executor(inference_thread, self._work)

    def submit(self, texts: list[list[int]], deadline: float = math.inf) -> Submission:
        """Queue the texts (token ids), to be answered by `deadline` (on this batcher's clock); one future per text.

        Raises NotAccepting while draining, DeadlineExceeded when the deadline has already passed, and Overloaded
        when the queue is full or these texts' predicted answer would come after the deadline.
        """
        with self._changed:
            now = self.clock()
            if not self._accepting:
                raise NotAccepting()
            if now >= deadline:
                raise DeadlineExceeded()
            predictions = self._admit(texts, now, deadline - now)
            items = [
                QueuedText(len(ids), now, Pending(ids, self._loop.create_future(), *prediction), deadline)
                for ids, prediction in zip(texts, predictions)
            ]
            for item in items:
                self.queue.append(item)
            self._publish_queue_state()
            self._changed.notify()
        return Submission(items)

    def _admit(self, texts: list[list[int]], now: float, time_left: float) -> list[tuple[float, float | None]]:
        """Refuse at once what the queue cannot take, rather than accept it to time out later (`admission` decides,
        counting the batch running now, the queued batches texts join or wait behind, and how far real waits have
        strayed from the plain prediction). Returns, per admitted text, when its answer is predicted and, if it opens
        a batch of its own, its plain predicted wait (what calibrates the next predictions)."""
        running_tokens, running_since = self._running
        waiting_tokens = sum(item.tokens for item in self._taken)  # collated, waiting for the running batch
        backlog = Backlog(self.queue.tokens + waiting_tokens, running_tokens, now - running_since)
        places = [self.queue.place(len(ids)) for ids in texts]
        follows = [None if place.follows is None else place.follows.handle.answer_at for place in places]
        ahead = [place.tokens_ahead + waiting_tokens for place in places]
        tokens, rate = sum(len(ids) for ids in texts), self._drain_rate()
        ends = predicted_ends(now, backlog, tokens, ahead, follows, rate, self.wait_calibration.factor)
        refused = refusal(backlog, tokens, time_left - self.delivery_lag, self.max_queue_tokens, rate, max(ends) - now)
        if refused is not None:
            metrics.REJECTED_TEXTS.labels(refused.reason).inc(len(texts))
            raise Overloaded(refused.reason, refused.message, refused.retry_after)
        opening_wait = plain_wait(backlog, tokens, rate)
        return [(end, opening_wait if after is None else None) for end, after in zip(ends, follows)]

    def _record_waits(self, items: list[QueuedText], now: float) -> None:
        """Teach the calibration how long those of `items` that opened a batch really waited, until `now` (called
        under the lock)."""
        for item in items:
            if item.handle.opening_wait is not None:
                self.wait_calibration.record(item.handle.opening_wait, now - item.arrived_at)

    def cancel(self, submission: Submission, reason: str) -> int:
        """Drop the submission's texts still queued or in the batch waiting to run (`reason`: client_gone, deadline),
        so the model never runs them, and cancel their futures. Texts already in a running batch are left to finish.
        Returns how many were dropped.
        """
        with self._changed:
            removed = self.queue.remove(submission.items) + self._untake(submission.items)
            if removed:
                metrics.CANCELLED_TEXTS.labels(reason).inc(len(removed))
                if reason == "deadline":
                    self._record_waits(removed, self.clock())
                self._publish_queue_state()
        for item in removed:
            item.handle.future.cancel()
        return len(removed)

    def _untake(self, items: list[QueuedText]) -> list[QueuedText]:
        """Remove those of `items` taken for the next batch, not yet running, and return them (under the lock)."""
        wanted = {id(item) for item in items}
        untaken = [item for item in self._taken if id(item) in wanted]
        if untaken:
            self._taken = [item for item in self._taken if id(item) not in wanted]
        return untaken

    @property
    def accepting(self) -> bool:
        """Whether `submit` admits texts (false once draining)."""
        return self._accepting

    def drain(self) -> None:
        """Stop admitting; the inference thread finishes every text already queued, then ends."""
        with self._changed:
            self._accepting = False
            self._changed.notify()

    async def drained(self) -> None:
        """Wait until the batch loop has ended (at once if it never started)."""
        if self._worked is not None:
            await self._worked

    def _collate_batches(self) -> None:
        """Take each batch once the inference thread has taken the previous one, and build its inputs."""
        try:
            while (taken := self._next_batch()) is not None:
                batch, more_queued = taken
                taken_at = self.clock()
                self._ready.put(Collated(batch, self._collate(batch.items), taken_at, more_queued))
                self._ready.join()  # taken: the next batch is chosen while this one runs, not before
        finally:
            self._ready.put(None)

    def _collate(self, items: list[QueuedText]) -> Any:
        try:
            return self.model.collate([item.handle.ids for item in items], self._padded_length(items))
        except Exception:  # the inference thread collates it again and fails only the texts that fail alone
            log.exception("collating a batch failed")
            return None

    def _work(self) -> None:
        while (collated := self._ready.get()) is not None:
            live = self._start_running(collated.batch)
            self._ready.task_done()  # only now may the collation thread take the next batch
            self._run(collated, live)
            with self._changed:
                self._inference_idle = True

    def _next_batch(self) -> tuple[Batch, bool] | None:
        """Wait until the scheduler hands out a batch, and say whether texts are still queued behind it; None once
        draining has emptied the queue."""
        with self._changed:
            while True:
                now = self.clock()
                self._expire(now)
                batch = self.queue.next_batch(now)
                if batch is not None:
                    self._taken = [] if self._inference_idle else list(batch.items)
                    self._publish_queue_state()
                    return batch, len(self.queue) > 0
                if not self._accepting and not len(self.queue):
                    return None
                deadline = self.queue.next_deadline()
                self._changed.wait(None if deadline is None else max(0.0, deadline - self.clock()))

    def _measure_backlog(self, collated: Collated, started: float) -> None:
        """A batch taken from the queue before the previous one ended, with texts still queued behind it, means the
        queue was backlogged all along: the previous batch's tokens over the wall time from its start to this one's
        is the rate the queue drains at. Without texts left behind it is one text waiting for another, whose rate
        says nothing of a backlog's (an 8-token batch followed by a 512-token one measured 300 tokens/s, a twentieth
        of the rate, and a lone text was then refused as if 10 s of work were queued)."""
        previous = self._previous_batch
        if previous is not None and collated.more_queued and collated.taken_at <= previous.ended:
            with self._changed:  # admission reads the meter under the lock
                self.backlog_meter.record(previous.real_tokens, started - previous.started)

    def _expire(self, now: float) -> None:
        """Fail the queued texts whose deadline has passed, before they cost model time (called under the lock)."""
        expired = self.queue.remove_expired(now)
        if expired:
            metrics.CANCELLED_TEXTS.labels("deadline").inc(len(expired))
            self._record_waits(expired, now)
            self._publish_queue_state()
            self._loop.call_soon_threadsafe(_fail, expired, DeadlineExceeded())

    def _run(self, collated: Collated, live: list[QueuedText]) -> None:
        if not live:
            with self._changed:
                self._running = (0, 0.0)
            return
        inputs = collated.inputs if len(live) == len(collated.batch.items) else None
        batch = Batch(live, self._padded_length(live), collated.batch.reason)
        started = self.clock()
        self._measure_backlog(collated, started)
        self._observe_batch(batch, started)
        answered_tokens = self._run_splitting(live, inputs)
        ended = self.clock()
        self._previous_batch = RanBatch(batch.real_tokens, started, ended)
        if answered_tokens:
            self.meter.record(answered_tokens, ended - started)
        metrics.BATCH_INFERENCE.observe(ended - started)
        for item in live:
            metrics.TEXT_LATENCY.labels(metrics.length_class(item.tokens)).observe(ended - item.arrived_at)
        with self._changed:
            self._running = (0, 0.0)
            self._record_waits(live, ended)
            metrics.ADMISSION_WAIT_FACTOR.set(self.wait_calibration.update())
            self._publish_queue_state()

    def _start_running(self, batch: Batch) -> list[QueuedText]:
        """The batch's texts that still need their answer, now running. Cancelled ones, and those whose deadline
        would pass before the batch ends (at the model's measured rate), do not cost model time: a late answer is
        one the caller has stopped waiting for (under 3x overload, texts taken just before their deadline made a
        few 500 ms requests answer 200 after 600-700 ms)."""
        with self._changed:
            self._taken, self._inference_idle = [], False
            now = self.clock()
            live = [item for item in batch.items if not item.handle.future.done()]
            late = unreachable(live, now + self.delivery_lag, self.meter.tokens_per_second)
            if late:
                dropped = {id(item) for item in late}
                live = [item for item in live if id(item) not in dropped]
                metrics.CANCELLED_TEXTS.labels("deadline").inc(len(late))
                self._record_waits(late, now)
                error = DeadlineExceeded(DeadlineExceeded.unreachable_message)
                self._loop.call_soon_threadsafe(_fail, late, error)
            self._running = (sum(item.tokens for item in live), now)
            return live

    def _run_splitting(self, items: list[QueuedText], inputs: Any) -> int:
        """Run `items` as one batch (on `inputs` when collated already); when it fails, retry its halves (shortest
        texts first), down to single texts, so every text that can run gets its answer and only a text that fails
        alone fails. An out-of-memory also lowers the token budget. The batch's first error is logged once. Returns
        the real tokens answered."""
        groups, answered, logged = [items], 0, False
        while groups:
            group = groups.pop()
            padded_length = self._padded_length(group)
            try:
                if group is not items or inputs is None:
                    inputs = self.model.collate([item.handle.ids for item in group], padded_length)
                scores = self.model.run(inputs)
            except Exception as error:  # a failed batch fails at most its culprits, never the thread
                out_of_memory = isinstance(error, OutOfMemory)
                if out_of_memory:
                    self._set_budget(self.memory_budget.out_of_memory(len(group) * padded_length, self.clock()))
                if not logged:
                    self._log_failure(error, len(items), len(group), padded_length)
                    logged = True
                if len(group) == 1:
                    failure = TextTooLargeForDevice(group[0].tokens) if out_of_memory else InferenceFailed(error)
                    self._loop.call_soon_threadsafe(_fail, group, failure)
                    continue
                metrics.BATCH_SPLITS.labels("out_of_memory" if out_of_memory else "error").inc()
                ordered = sorted(group, key=lambda item: item.tokens)
                half = len(ordered) // 2
                groups += [ordered[half:], ordered[:half]]  # a stack: the short half runs next
                continue
            self._set_budget(self.memory_budget.succeeded(self.clock()))
            self._loop.call_soon_threadsafe(self._deliver, group, scores, self.clock())
            answered += sum(item.tokens for item in group)
        return answered

    def _padded_length(self, items: list[QueuedText]) -> int:
        return self.queue.policy.padded_length(max(item.tokens for item in items))

    def _log_failure(self, error: Exception, texts: int, group: int, padded_length: int) -> None:
        if isinstance(error, OutOfMemory):
            log.warning(
                "out of memory on %d texts x %d tokens (batch of %d); splitting it, token budget now %d",
                group, padded_length, texts, self.memory_budget.current,
            )
        else:
            log.error("inference failed for a batch of %d texts; retrying it in halves", texts, exc_info=error)

    def _set_budget(self, tokens: int) -> None:
        if tokens != self.queue.policy.max_batch_tokens:
            with self._changed:
                self.queue.set_max_batch_tokens(tokens)
            metrics.EFFECTIVE_MAX_BATCH_TOKENS.set(tokens)

    def _observe_batch(self, batch: Batch, started: float) -> None:
        for item in batch.items:
            metrics.QUEUE_WAIT.observe(started - item.arrived_at)
            metrics.TEXT_QUEUE_WAIT.labels(metrics.length_class(item.tokens)).observe(started - item.arrived_at)
        metrics.BATCH_FLUSHES.labels(batch.reason).inc()
        metrics.BATCH_SIZE.observe(len(batch.items))
        metrics.BATCH_PADDED_LENGTH.observe(batch.padded_length)
        metrics.REAL_TOKENS.inc(batch.real_tokens)
        metrics.PADDED_TOKENS.inc(batch.padded_tokens)
        metrics.BATCH_PADDING_EFFICIENCY.observe(batch.padding_efficiency)

    def _publish_queue_state(self) -> None:
        metrics.QUEUE_TEXTS.set(len(self.queue))
        metrics.QUEUE_TOKENS.set(self.queue.tokens)
        metrics.QUEUE_DRAIN.set(self._drain_seconds(self.queue.tokens))

    def _drain_seconds(self, tokens: int) -> float:
        rate = self._drain_rate()
        return tokens / rate if rate else 0.0

    def _drain_rate(self) -> float | None:
        """Tokens per second the queue drains at: measured back to back once it has been, else model time."""
        return self.backlog_meter.tokens_per_second or self.meter.tokens_per_second


    def _deliver(self, items: list[QueuedText], scores: list[list[float]], ended: float) -> None:
        """On the event loop: answer the batch's callers, and measure how long the answers took to get here."""
        lag = max(0.0, self.clock() - ended)
        metrics.ANSWER_DELIVERY.observe(lag)
        self.delivery_lag += LAG_SMOOTHING * (lag - self.delivery_lag)
        _resolve(items, scores)


def _resolve(items: list[QueuedText], scores: list[list[float]]) -> None:
    for item, text_scores in zip(items, scores):
        if item.handle.future.done():  # its caller left (or its deadline passed) while the batch ran
            metrics.UNANSWERED_TOKENS.inc(item.tokens)
        else:
            item.handle.future.set_result(text_scores)


def _fail(items: list[QueuedText], error: Exception) -> None:
    for item in items:
        if not item.handle.future.done():
            item.handle.future.set_exception(error)
