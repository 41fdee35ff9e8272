"""Running a batch on the model so that a failure costs only the texts that fail alone: a failed batch is retried in
halves, down to single texts, and an out-of-memory also lowers the token budget (`tuning.MemoryBudget`), which grows
back once memory stays quiet. What the batcher runs batches on is the `BatchModel` protocol."""

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from service import metrics
from service.errors import ClassifierError, InferenceFailed, TextTooLargeForDevice
from service.scheduler import BatchingPolicy, QueuedText
from service.tuning import MemoryBudget

log = logging.getLogger(__name__)

Scores = list[list[float]]  # per text, one score per label


class BatchModel(Protocol):
    """What the batcher runs batches on: building a batch's inputs, and scoring them."""

    def collate(self, sequences: list[list[int]], padded_length: int) -> Any:
        """The inputs for `sequences` padded to `padded_length`; called on the collation thread."""

    def run(self, inputs: Any) -> list[list[float]]:
        """Scores per sequence of collated inputs; raises OutOfMemory when the device ran out of memory."""


class OutOfMemory(Exception):
    """The device ran out of memory running a batch (the model adapter turns the framework's own error into this)."""


class SplittingRunner:
    """Runs texts on `model` as one batch, splitting it when it fails, and keeps the memory budget: `set_budget` is
    told the token budget in force after every batch (the batcher applies it to the queue)."""

    def __init__(
        self,
        model: BatchModel,
        policy: BatchingPolicy,
        set_budget: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.policy = policy  # how texts pad, which a budget change leaves as it is
        self.memory_budget = MemoryBudget(policy.max_batch_tokens, policy.padded_length(policy.bucket_bounds[-1]))
        metrics.EFFECTIVE_MAX_BATCH_TOKENS.set(policy.max_batch_tokens)
        self._set_budget = set_budget
        self._clock = clock

    def run(self, items: list[QueuedText], inputs: Any) -> Iterator[tuple[list[QueuedText], Scores | ClassifierError]]:
        """Run `items` as one batch (on `inputs` when collated already); when it fails, retry its halves (shortest
        texts first), down to single texts, so every text that can run gets its answer and only a text that fails
        alone fails. Yields each group as it is done, with its scores or the error its one text fails with; the
        budget in force is set before each group's answers are yielded. The batch's first error is logged once."""
        groups, logged = [items], False
        while groups:
            group = groups.pop()
            padded_length = self.policy.padded_length_of(group)
            try:
                if group is not items or inputs is None:
                    inputs = self.model.collate([item.handle.ids for item in group], padded_length)
                scores = self.model.run(inputs)
            except Exception as error:  # a failed batch fails at most its culprits, never the thread
                out_of_memory = isinstance(error, OutOfMemory)
                if out_of_memory:
                    self._set_budget(self.memory_budget.out_of_memory(len(group) * padded_length, self._clock()))
                if not logged:
                    self._log_failure(error, len(items), len(group), padded_length)
                    logged = True
                if len(group) == 1:
                    yield group, TextTooLargeForDevice(group[0].tokens) if out_of_memory else InferenceFailed(error)
                    continue
                metrics.BATCH_SPLITS.labels("out_of_memory" if out_of_memory else "error").inc()
                ordered = sorted(group, key=lambda item: item.tokens)
                half = len(ordered) // 2
                groups += [ordered[half:], ordered[:half]]  # a stack: the short half runs next
                continue
            self._set_budget(self.memory_budget.succeeded(self._clock()))
            yield group, scores

    def _log_failure(self, error: Exception, texts: int, group: int, padded_length: int) -> None:
        if isinstance(error, OutOfMemory):
            log.warning(
                "out of memory on %d texts x %d tokens (batch of %d); splitting it, token budget now %d",
                group,
                padded_length,
                texts,
                self.memory_budget.current,
            )
        else:
            log.error("inference failed for a batch of %d texts; retrying it in halves", texts, exc_info=error)
