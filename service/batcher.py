"""Runs the queue on the event loop: admits encoded texts, hands each batch to the one inference thread, and
resolves every caller's future with its own scores. The batching decisions themselves live in `scheduler`."""

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service import metrics
from service.scheduler import Batch, BatchQueue, QueuedText
from service.tokenization import EncodedText

log = logging.getLogger(__name__)

Infer = Callable[[list[list[int]], int], list[list[float]]]


@dataclass(slots=True)
class Pending:
    """The caller's side of a queued text: its token ids and the future its scores go to."""

    ids: list[int]
    future: asyncio.Future


class QueueFull(Exception):
    """Admitting these texts would push the queue past its token limit."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the queue is full; retry in about {retry_after:.0f} s")
        self.retry_after = retry_after


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

    def seconds_for(self, tokens: int) -> float:
        return tokens / self.tokens_per_second if self.tokens_per_second else 0.0


class Batcher:
    """Owns the queue's event-loop side; `submit` texts, `run` the loop, `drain` before exit."""

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
        self.clock = clock
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def submit(self, texts: list[EncodedText]) -> list[asyncio.Future]:
        """Queue the texts; one future per text, resolved with its scores."""
        if not self._accepting:
            raise NotAccepting()
        tokens = sum(len(text.ids) for text in texts)
        if self.queue.tokens + tokens > self.max_queue_tokens:
            metrics.REJECTED_TEXTS.labels("queue_full").inc(len(texts))
            raise QueueFull(retry_after=max(1.0, math.ceil(self.meter.seconds_for(self.queue.tokens))))
        loop = asyncio.get_running_loop()
        now = self.clock()
        futures = []
        for text in texts:
            future = loop.create_future()
            self.queue.append(QueuedText(len(text.ids), now, Pending(text.ids, future)))
            futures.append(future)
        self._publish_queue_state()
        self._wakeup.set()
        return futures

    async def run(self) -> None:
        """Form and run batches until drained: the one place batches start."""
        while self._accepting or len(self.queue):
            batch = self.queue.next_batch(self.clock())
            if batch is None:
                await self._wait_for_work()
                continue
            self._publish_queue_state()
            await self._run(batch)
        self._executor.shutdown(wait=True)

    def drain(self) -> None:
        """Stop admitting; the run loop finishes every text already queued, then returns."""
        self._accepting = False
        self._wakeup.set()

    async def _wait_for_work(self) -> None:
        deadline = self.queue.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    async def _run(self, batch: Batch) -> None:
        # Callers that went away (cancelled futures) do not cost model time.
        live = [item for item in batch.items if not item.handle.future.done()]
        if not live:
            return
        batch = Batch(live, self.queue.policy.padded_length(max(item.tokens for item in live)), batch.reason)
        started = self.clock()
        self._observe_batch(batch, started)
        sequences = [item.handle.ids for item in live]
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.infer, sequences, batch.padded_length
            )
        except Exception as error:  # a failed batch fails its callers, never the loop
            log.exception("inference failed for a batch of %d texts", len(live))
            for item in live:
                if not item.handle.future.done():
                    item.handle.future.set_exception(error)
            return
        elapsed = self.clock() - started
        self.meter.record(batch.real_tokens, elapsed)
        metrics.BATCH_INFERENCE.observe(elapsed)
        for item, text_scores in zip(live, scores):
            if not item.handle.future.done():
                item.handle.future.set_result(text_scores)
        self._publish_queue_state()

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
        metrics.QUEUE_DRAIN.set(self.meter.seconds_for(self.queue.tokens))
