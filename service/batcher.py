"""Runs the queue: admits encoded texts from the event loop, runs batches on the one inference thread, and
resolves every caller's future with its own scores. The batching decisions themselves live in `scheduler`."""

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from service import metrics
from service.admission import Backlog, refusal
from service.scheduler import Batch, BatchQueue, QueuedText
from service.tokenization import EncodedText
from service.tuning import MemoryBudget

log = logging.getLogger(__name__)

# Scores for each sequence of a batch padded to the given length; raises OutOfMemory when the device ran out.
Infer = Callable[[list[list[int]], int], list[list[float]]]


class OutOfMemory(Exception):
    """The device ran out of memory running a batch (the engine turns the framework's own error into this)."""


class TextTooLargeForDevice(Exception):
    """One text, run alone, ran the device out of memory: it cannot be answered at this length."""

    def __init__(self, tokens: int) -> None:
        super().__init__(
            f"a text of {tokens} tokens does not fit in the device's memory even alone; send it shorter"
        )
        self.tokens = tokens


class InferenceFailed(Exception):
    """The model raised on one text even when it ran alone."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"the model failed on a text: {type(cause).__name__}: {cause}")


@dataclass(slots=True)
class Pending:
    """The caller's side of a queued text: its token ids and the future its scores go to."""

    ids: list[int]
    future: asyncio.Future


@dataclass(frozen=True, slots=True)
class Submission:
    """One request's queued texts, in order: await their futures, or `Batcher.cancel` them."""

    items: list[QueuedText]

    @property
    def futures(self) -> list[asyncio.Future]:
        return [item.handle.future for item in self.items]


class Overloaded(Exception):
    """The queue cannot take these texts now: it would exceed its token limit (`queue_full`), or it would not reach
    them before their deadline (`predicted_wait`)."""

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(f"{message}; retry in about {retry_after:.0f} s")
        self.reason, self.retry_after = reason, retry_after


class DeadlineExceeded(Exception):
    """The texts' deadline passed before the model reached them."""


class NotAccepting(Exception):
    """The batcher is draining for shutdown and takes no new texts."""


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
    """Owns the queue: `submit` texts from the event loop; one inference thread takes batches and runs them.

    The thread pulls its next batch itself, back to back, without a round trip through the event loop. The queue
    is guarded by one lock; scores go back to the callers' futures on the event loop.
    """

    def __init__(
        self,
        queue: BatchQueue,
        infer: Infer,
        max_queue_tokens: int,
        meter: ThroughputMeter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.infer = infer
        self.max_queue_tokens = max_queue_tokens
        self.meter = meter
        # Tokens per second of wall time while batches run back to back: what the model, the tokenizer, HTTP and
        # the rest of the process sharing the CPU together really drain. Admission and Retry-After use it once it
        # has a measurement (model time alone promised 5 s waits that took 6 under 3x overload).
        self.backlog_meter = ThroughputMeter()
        self._previous_batch: tuple[int, float] | None = None  # real tokens and start of the last batch taken
        self._running: tuple[int, float] = (0, 0.0)  # real tokens and start of the batch running now (0: none)
        self.clock = clock
        policy = queue.policy
        self.memory_budget = MemoryBudget(policy.max_batch_tokens, policy.padded_length(policy.bucket_bounds[-1]))
        metrics.EFFECTIVE_MAX_BATCH_TOKENS.set(policy.max_batch_tokens)
        self._changed = threading.Condition()
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worked: asyncio.Future | None = None

    def start(self, inference_thread: Executor) -> None:
        """Run batches on `inference_thread` (a one-thread executor) until drained; futures resolve on this loop."""
        self._loop = asyncio.get_running_loop()
        self._worked = self._loop.run_in_executor(inference_thread, self._work)

    def submit(self, texts: list[EncodedText], deadline: float = math.inf) -> Submission:
        """Queue the texts, to be answered by `deadline` (on this batcher's clock); one future per text.

        Raises NotAccepting while draining, DeadlineExceeded when the deadline has already passed, and Overloaded
        when the queue is full or its measured drain time plus these texts' own would pass the deadline.
        """
        tokens = sum(len(text.ids) for text in texts)
        with self._changed:
            now = self.clock()
            if not self._accepting:
                raise NotAccepting()
            if now >= deadline:
                raise DeadlineExceeded()
            self._admit(len(texts), tokens, now, deadline - now)
            items = [
                QueuedText(len(text.ids), now, Pending(text.ids, self._loop.create_future()), deadline)
                for text in texts
            ]
            for item in items:
                self.queue.append(item)
            self._publish_queue_state()
            self._changed.notify()
        return Submission(items)

    def _admit(self, texts: int, tokens: int, now: float, time_left: float) -> None:
        """Refuse at once what the queue cannot take, rather than accept it to time out later (`admission` decides,
        counting the batch running now as well as the queue)."""
        running_tokens, running_since = self._running
        backlog = Backlog(self.queue.tokens, running_tokens, now - running_since)
        refused = refusal(backlog, tokens, time_left, self.max_queue_tokens, self._drain_rate())
        if refused is not None:
            metrics.REJECTED_TEXTS.labels(refused.reason).inc(texts)
            raise Overloaded(refused.reason, refused.message, refused.retry_after)

    def cancel(self, submission: Submission, reason: str) -> int:
        """Drop the submission's texts still queued (`reason`: client_gone, deadline), so the model never runs them,
        and cancel their futures. Texts already in a running batch are left to finish. Returns how many were dropped.
        """
        with self._changed:
            removed = self.queue.remove(submission.items)
            if removed:
                metrics.CANCELLED_TEXTS.labels(reason).inc(len(removed))
                self._publish_queue_state()
        for item in removed:
            item.handle.future.cancel()
        return len(removed)

    def drain(self) -> None:
        """Stop admitting; the inference thread finishes every text already queued, then ends."""
        with self._changed:
            self._accepting = False
            self._changed.notify()

    async def drained(self) -> None:
        """Wait until the batch loop has ended (at once if it never started)."""
        if self._worked is not None:
            await self._worked

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> Batch | None:
        """Wait until the scheduler hands out a batch; None once draining has emptied the queue."""
        with self._changed:
            backlogged = True
            while True:
                now = self.clock()
                self._expire(now)
                batch = self.queue.next_batch(now)
                if batch is not None:
                    self._measure_backlog(batch, now, backlogged)
                    self._running = (batch.real_tokens, now)
                    self._publish_queue_state()
                    return batch
                backlogged = False
                if not self._accepting and not len(self.queue):
                    return None
                deadline = self.queue.next_deadline()
                self._changed.wait(None if deadline is None else max(0.0, deadline - self.clock()))

    def _measure_backlog(self, batch: Batch, now: float, backlogged: bool) -> None:
        """A batch ready the moment the previous one ended means the queue was backlogged all along: the previous
        batch's tokens over the wall time since it started is the rate the queue really drains at."""
        if backlogged and self._previous_batch is not None:
            tokens, started = self._previous_batch
            self.backlog_meter.record(tokens, now - started)
        self._previous_batch = (batch.real_tokens, now)

    def _expire(self, now: float) -> None:
        """Fail the queued texts whose deadline has passed, before they cost model time (called under the lock)."""
        expired = self.queue.remove_expired(now)
        if expired:
            metrics.CANCELLED_TEXTS.labels("deadline").inc(len(expired))
            self._publish_queue_state()
            self._loop.call_soon_threadsafe(_fail, expired, DeadlineExceeded())

    def _run(self, batch: Batch) -> None:
        # Callers that went away (cancelled futures) do not cost model time.
        live = [item for item in batch.items if not item.handle.future.done()]
        if not live:
            with self._changed:
                self._running = (0, 0.0)
            return
        batch = Batch(live, self.queue.policy.padded_length(max(item.tokens for item in live)), batch.reason)
        started = self.clock()
        self._observe_batch(batch, started)
        answered_tokens = self._run_splitting(live)
        elapsed = self.clock() - started
        if answered_tokens:
            self.meter.record(answered_tokens, elapsed)
        metrics.BATCH_INFERENCE.observe(elapsed)
        with self._changed:
            self._running = (0, 0.0)
            self._publish_queue_state()

    def _run_splitting(self, items: list[QueuedText]) -> int:
        """Run `items` as one batch; when it fails, retry its halves (shortest texts first), down to single texts,
        so every text that can run gets its answer and only a text that fails alone fails. An out-of-memory also
        lowers the token budget. The batch's first error is logged once. Returns the real tokens answered."""
        groups, answered, logged = [items], 0, False
        while groups:
            group = groups.pop()
            padded_length = self.queue.policy.padded_length(max(item.tokens for item in group))
            try:
                scores = self.infer([item.handle.ids for item in group], padded_length)
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
            self._loop.call_soon_threadsafe(_resolve, group, scores)
            answered += sum(item.tokens for item in group)
        return answered

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
        metrics.BATCH_FLUSHES.labels(batch.reason).inc()
        metrics.BATCH_SIZE.observe(len(batch.items))
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
