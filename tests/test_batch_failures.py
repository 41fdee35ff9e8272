"""A batch that runs out of memory is split, with the budget shrinking and growing back, driven in-process with a
fake torch classifier (and a torch-free model for the splitting runner alone) and an injected clock. (A poisoned
text, which fails alone: tests/test_batcher_inprocess.py.)"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from service.batcher import Batcher
from service.drain_rate import DrainRate
from service.errors import TextTooLargeForDevice
from service.runner import BatchModelAdapter, ModelRunner
from service.scheduler import BatchingPolicy, BatchQueue, QueuedText
from service.splitting import OutOfMemory, SplittingRunner
from tests.fakes import FakeClock


class FakeClassifier(torch.nn.Module):
    """Logits from the ids alone (so each text's answer is known), failing like a real model on a GPU might: CUDA
    out-of-memory above `max_tokens` padded tokens per batch."""

    def __init__(self, max_tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.batches: list[tuple[int, int]] = []  # (texts, padded length) of every batch that ran

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        if input_ids.numel() > self.max_tokens:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake): {tuple(input_ids.shape)}")
        self.batches.append(tuple(input_ids.shape))
        total = (input_ids * attention_mask).sum(-1).float()
        return SimpleNamespace(logits=torch.stack([total / 100, torch.zeros_like(total)], dim=-1))


def expected_scores(ids: list[int]) -> list[float]:
    """The logits the batcher answers with (the engine's front activates them)."""
    return [sum(ids) / 100, 0.0]


def make_batcher(model: FakeClassifier, clock: FakeClock, max_batch_tokens: int = 1024) -> Batcher:
    policy = BatchingPolicy(
        bucket_bounds=(8, 16, 32, 96),
        max_batch_tokens=max_batch_tokens,
        max_batch_size=64,
        window=0.0,
        merge_min_efficiency=0.01,  # every text joins one batch, so the failure has innocent neighbours
    )
    runner = ModelRunner(model, torch.device("cpu"), "fp32", pad_token_id=0)
    adapter = BatchModelAdapter(runner)
    return Batcher(BatchQueue(policy), adapter, max_queue_tokens=100_000, rates=DrainRate(), clock=clock)


async def classify_together(batcher: Batcher, texts: list[list[int]]) -> list:
    """Submit the texts at once and wait for every answer (scores or the exception)."""
    submission = batcher.submit(texts)
    return await asyncio.gather(*submission.futures, return_exceptions=True)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def short_text(i: int) -> list[int]:
    return [101 + i] * 16


def test_out_of_memory_splits_the_batch_shrinks_the_budget_and_recovers_slowly():
    model, clock = FakeClassifier(max_tokens=64), FakeClock()
    batcher = make_batcher(model, clock)
    splits_before = counter("classifier_batch_splits_total", reason="out_of_memory")
    long_text = [7] * 90
    texts = [short_text(i) for i in range(8)] + [long_text]

    async def scenario():
        with ThreadPoolExecutor(max_workers=1) as thread:
            batcher.start(thread)
            first = await classify_together(batcher, texts)
            budget_after_oom = batcher.queue.policy.max_batch_tokens
            clock.now += 31  # a quiet period: the next batch grows the budget back one step
            second = await classify_together(batcher, [short_text(0)])
            budget_after_quiet = batcher.queue.policy.max_batch_tokens
            batcher.drain()
            await batcher.drained()
        return first, budget_after_oom, second, budget_after_quiet

    first, budget_after_oom, second, budget_after_quiet = asyncio.run(scenario())
    for ids, answer in zip(texts[:8], first[:8]):
        assert answer == pytest.approx(expected_scores(ids))
    assert isinstance(first[8], TextTooLargeForDevice) and "90 tokens" in str(first[8])
    assert second[0] == pytest.approx(expected_scores(short_text(0)))
    assert all(texts_ * length <= 64 for texts_, length in model.batches)
    # 9 x 90 tokens ran out of memory: the budget fell below half of it, down to the floor (one 96-token text).
    assert budget_after_oom == 96
    assert budget_after_quiet == 120  # x 1.25 after 30 quiet seconds, up to 1024 eventually
    assert batcher.splitter.memory_budget.tuned == 1024
    assert counter("classifier_batch_splits_total", reason="out_of_memory") - splits_before >= 3
    assert REGISTRY.get_sample_value("classifier_effective_max_batch_tokens") == 120


class OutOfMemoryAbove:
    """A batch model (no torch) that runs out of memory above `max_tokens` padded tokens and scores a text by its
    length."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def collate(self, sequences: list[list[int]], padded_length: int) -> tuple[list[list[int]], int]:
        return sequences, padded_length

    def run(self, inputs: tuple[list[list[int]], int]) -> list[list[float]]:
        sequences, padded_length = inputs
        if len(sequences) * padded_length > self.max_tokens:
            raise OutOfMemory(f"{len(sequences)} x {padded_length}")
        return [[float(len(ids))] for ids in sequences]


def test_the_splitting_runner_yields_each_group_once_done_with_the_budget_set_before_its_answers():
    policy = BatchingPolicy(bucket_bounds=(8, 16, 32, 96), max_batch_tokens=1024, max_batch_size=64, window=0.0)
    budgets: list[int] = []
    runner = SplittingRunner(OutOfMemoryAbove(max_tokens=64), policy, budgets.append, clock=lambda: 0.0)
    items = [QueuedText(len(ids), 0.0, SimpleNamespace(ids=ids)) for ids in ([1] * 16, [2] * 90, [3] * 16, [4] * 16)]
    done = []
    for group, outcome in runner.run(items, None):
        done.append(([item.handle.ids[0] for item in group], outcome, len(budgets)))
    # 4 x 90 ran out of memory (budget 180), the short half ran; 2 x 90 too (budget 96, the floor: one longest
    # text), its short half ran, and the long text alone did not fit.
    assert [names for names, _, _ in done] == [[1, 3], [4], [2]]
    assert done[0][1] == [[16.0], [16.0]] and done[1][1] == [[16.0]]
    assert isinstance(done[2][1], TextTooLargeForDevice) and "90 tokens" in str(done[2][1])
    assert budgets == [180, 180, 96, 96, 96]
    assert [budgets_set for _, _, budgets_set in done] == [2, 4, 5]  # each answer follows its budget
