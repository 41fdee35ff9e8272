"""The engine's back half: queue, scheduler, batcher and model runner, on one inference thread.

`Scorer.score` takes token ids and returns each text's fp32 logits (the front activates them); what crosses it is
plain data and `service.errors`, so the back can run in a process of its own, apart from tokenization and
post-processing.
"""

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

from service import metrics
from service.batcher import Batcher, Submission
from service.drain_rate import DrainRate
from service.errors import DeadlineExceeded
from service.live_tuning import LiveTuning
from service.runner import BatchModelAdapter
from service.scheduler import BatchingPolicy, BatchQueue, deadline_passed


class Scorer:
    """Scores token ids in batches: `score` from the event loop, `stop` to drain. Built started and warmed up by
    `Scorer.start`."""

    def __init__(self, batcher: Batcher, inference_thread: ThreadPoolExecutor | None) -> None:
        self.batcher = batcher
        self._inference_thread = inference_thread

    @classmethod
    async def start(
        cls,
        model: BatchModelAdapter,
        policy: BatchingPolicy,
        max_queue_tokens: int,
        inference_thread: ThreadPoolExecutor,
        live: LiveTuning | None = None,
        fair_share_headroom: float = 0.0,
    ) -> "Scorer":
        """Warm the model up on `inference_thread` (which loaded it), then start batching on it (tuning live when
        `live` is given; callers under their fair share may queue `fair_share_headroom` beyond `max_queue_tokens`)."""
        rates = DrainRate()
        tokens, seconds = await asyncio.get_running_loop().run_in_executor(inference_thread, model.warm_up, policy)
        rates.model_ran(tokens, seconds)
        batcher = Batcher(
            BatchQueue(policy), model, max_queue_tokens, rates, live=live, fair_share_headroom=fair_share_headroom
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
        submission = self.batcher.submit(token_ids, deadline, caller)
        try:
            scores = await self._scores(submission, deadline)
            if self.batcher.clock() > deadline:
                metrics.LATE_ANSWERS.inc()
            return scores
        except asyncio.CancelledError:
            self.batcher.cancel(submission, "client_gone")
            self._discard(submission)
            raise
        except DeadlineExceeded:
            # Texts dropped at their batch's start leave the request's others queued: nobody waits for them now.
            self.batcher.cancel(submission, "deadline")
            self._discard(submission)
            raise

    async def _scores(self, submission: Submission, deadline: float) -> list[list[float]]:
        """The texts' scores; at the deadline, those still queued are dropped and DeadlineExceeded raised, while
        texts already running finish. The first failure among them is raised as soon as it comes."""
        futures = submission.futures
        pending: set[asyncio.Future] = set(futures)
        while pending:
            timeout = max(0.0, deadline - self.batcher.clock())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            if any(not future.cancelled() and future.exception() is not None for future in done):
                break
            if pending and deadline_passed(deadline, self.batcher.clock()):
                if self.batcher.cancel(submission, "deadline"):
                    raise DeadlineExceeded()
                # Nothing of it is queued any more: the rest is in a running batch, which finishes.
                await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                break
        for future in futures:  # the first failure, whatever the order the texts finished in
            if future.done() and not future.cancelled() and (error := future.exception()) is not None:
                raise error
        return [future.result() for future in futures]

    @staticmethod
    def _discard(submission: Submission) -> None:
        """Answers of its texts in a running batch are discarded (and counted) when the batch ends."""
        for future in submission.futures:
            future.cancel()

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
