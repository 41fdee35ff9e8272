"""The engine's back half: queue, scheduler, batcher and model runner, on one inference thread.

`Scorer.score` takes token ids and returns each text's activated fp32 scores; what crosses it is plain data and
`service.errors`, so the back can run in a process of its own, apart from tokenization and post-processing.
"""

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from service import metrics
from service.batcher import Batcher, OutOfMemory, Submission, ThroughputMeter
from service.errors import DeadlineExceeded
from service.postprocess import ProblemType, activate
from service.runner import ModelRunner, release_cached_memory
from service.scheduler import BatchingPolicy, BatchQueue

log = logging.getLogger(__name__)


class ScoringModel:
    """The runner as the batcher's model: inputs collated on the host, scores activated in fp32."""

    def __init__(self, runner: ModelRunner, problem_type: ProblemType) -> None:
        self.runner = runner
        self.problem_type = problem_type

    def collate(self, sequences: list[list[int]], padded_length: int) -> dict[str, torch.Tensor]:
        return self.runner.collate(sequences, padded_length)

    def run(self, inputs: dict[str, torch.Tensor]) -> list[list[float]]:
        """Scores for one batch. The framework's out-of-memory becomes the batcher's OutOfMemory (after the
        allocator's cache is released), so the batcher can split the batch without knowing torch."""
        try:
            logits = self.runner.forward(inputs)
        except torch.cuda.OutOfMemoryError as error:
            release_cached_memory(self.runner.device)
            raise OutOfMemory(str(error)) from error
        return activate(logits, self.problem_type)


class Scorer:
    """Scores token ids in batches: `score` from the event loop, `stop` to drain. Built started and warmed up by
    `Scorer.start`."""

    def __init__(self, batcher: Batcher, model: ScoringModel, inference_thread: ThreadPoolExecutor) -> None:
        self.batcher = batcher
        self.model = model
        self._inference_thread = inference_thread

    @classmethod
    async def start(
        cls, model: ScoringModel, policy: BatchingPolicy, max_queue_tokens: int, inference_thread: ThreadPoolExecutor
    ) -> "Scorer":
        """Warm the model up on `inference_thread` (which loaded it), then start batching on it."""
        scorer = cls(Batcher(BatchQueue(policy), model, max_queue_tokens, ThroughputMeter()), model, inference_thread)
        await asyncio.get_running_loop().run_in_executor(inference_thread, scorer._warm_up)
        scorer.batcher.start(inference_thread)
        return scorer

    @property
    def ready(self) -> bool:
        """Whether new texts are admitted (false once draining)."""
        return self.batcher.accepting

    @property
    def policy(self) -> BatchingPolicy:
        return self.batcher.queue.policy

    async def score(self, token_ids: list[list[int]], deadline: float) -> list[list[float]]:
        """Each text's scores, once all have run, by `deadline` (`time.monotonic()` seconds).

        Raises Overloaded or NotAccepting (refused at admission), DeadlineExceeded (texts still queued at the
        deadline, now dropped), TextTooLargeForDevice or InferenceFailed (a text that failed alone). Cancelling the
        caller drops its texts still queued (reason client_gone).
        """
        submission = self.batcher.submit(token_ids, deadline)
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
        futures = submission.futures
        timeout = max(0.0, deadline - self.batcher.clock())
        done, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        failed = any(not future.cancelled() and future.exception() is not None for future in done)
        if pending and not failed:
            if self.batcher.cancel(submission, "deadline"):
                raise DeadlineExceeded()
            # Nothing of it is queued any more: the rest is in a running batch, which finishes.
            await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        return [future.result() for future in futures]

    @staticmethod
    def _discard(submission: Submission) -> None:
        """Answers of its texts in a running batch are discarded (and counted) when the batch ends."""
        for future in submission.futures:
            future.cancel()

    def info(self) -> dict:
        """How batches are shaped, the budget now in force included."""
        batching = dataclasses.asdict(self.policy)
        batching["window_seconds"] = batching.pop("window")  # the name /info has always shown
        batching["max_batch_tokens"] = self.batcher.memory_budget.tuned
        batching["effective_max_batch_tokens"] = self.batcher.memory_budget.current
        return batching

    async def stop(self) -> None:
        """Stop admitting and answer every queued text before returning."""
        self.batcher.drain()
        await self.batcher.drained()
        self._inference_thread.shutdown(wait=False)

    def _warm_up(self) -> None:
        """One batch per bucket, so first requests do not pay for lazy initialisation (and CUDA OOMs show now).

        On the CPU one text per bucket is enough; on a GPU each batch is as big as the budget allows.
        """
        policy, runner = self.policy, self.model.runner
        started = time.monotonic()
        tokens = 0
        for bound in policy.bucket_bounds:
            length = policy.padded_length(bound)
            count = 1 if runner.device.type == "cpu" else max(1, min(policy.max_batch_size, policy.max_batch_tokens // length))
            self.model.run(self.model.collate([[runner.pad_token_id] * length] * count, length))
            tokens += count * length
        self.batcher.meter.record(tokens, time.monotonic() - started)
        log.info("warmed up %d buckets in %.1f s", len(policy.bucket_bounds), time.monotonic() - started)
