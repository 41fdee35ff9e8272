"""The service's CUDA path on a real GPU, where the other tests use fakes: a real out-of-memory split with the budget
lowered and grown back, the tuning ladder stopped by one, pinned-memory collation overlapping the previous batch, and
fp16 and bf16 against fp32 on the calibration set. Skipped without a CUDA device; `pytest -m cuda` selects them and
the GPU check (loadtest/gpu_check.py) runs them first. Models are small random BERTs built here from a config."""

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import BertConfig, BertForSequenceClassification

from service.batcher import Batcher
from service.drain_rate import DrainRate
from service.measuring import Tuner, calibration_texts
from service.runner import BatchModelAdapter, ModelRunner, cuda_supports_bf16
from service.scheduler import BatchingPolicy, BatchQueue
from service.tuning import OOM_SAFETY_MARGIN, RECOVERY_GROWTH, RECOVERY_SECONDS, precision_candidates
from tests.conftest import build_tiny_tokenizer
from tests.fakes import FakeClock

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
LENGTH = 512  # every model's maximum length, and the length of the texts that fill memory
TOLERANCE = 0.01  # the service's default precision tolerance


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(max_length=LENGTH)


def bert(tokenizer, hidden: int, layers: int, heads: int, seed: int = 0) -> torch.nn.Module:
    """A random BERT classifier on the GPU, its encoder initialised as usual, its head scaled up so that its two
    labels are apart on most texts (a head initialised as usual leaves every text near a tie). (At 1.0 instead of
    0.25, bf16 autocast moved a score by 0.0114 on the CPU: the deviation scales with the logits.)"""
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.25)
    return model.to(DEVICE).eval()


def texts_of(count: int, length: int, vocabulary: int) -> list[list[int]]:
    """`count` different texts of `length` token ids (no special tokens: the model does not care)."""
    return [[5 + (7 * i + 3 * j) % (vocabulary - 5) for j in range(length)] for i in range(count)]


def peak_bytes(runner: ModelRunner, texts: list[list[int]]) -> int:
    """GPU memory one batch of `texts` takes at its peak, beyond what is allocated already."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    runner.run(texts, LENGTH)
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def leaving_free(free_bytes: int) -> Iterator[None]:
    """Hold all of the GPU's free memory but `free_bytes`, so that a batch bigger than that meets a real
    out-of-memory."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocker = None
    free, _ = torch.cuda.mem_get_info()
    size = free - free_bytes
    while blocker is None and size > 0:
        try:
            blocker = torch.empty(size, dtype=torch.uint8, device=DEVICE)
        except torch.cuda.OutOfMemoryError:  # the driver keeps a little for itself: hold a little less
            size -= 64 * 2**20
    try:
        yield
    finally:
        del blocker
        torch.cuda.empty_cache()


def splits(reason: str) -> float:
    return REGISTRY.get_sample_value("classifier_batch_splits_total", {"reason": reason}) or 0.0


async def classify_together(batcher: Batcher, texts: list[list[int]]) -> list:
    return await asyncio.gather(*batcher.submit(texts).futures, return_exceptions=True)


def test_a_real_out_of_memory_splits_the_batch_lowers_the_budget_and_it_grows_back(tokenizer):
    runner = ModelRunner(bert(tokenizer, 128, 2, 4), DEVICE, "fp32", tokenizer.pad_token_id)
    adapter = BatchModelAdapter(runner)
    texts = texts_of(64, LENGTH, len(tokenizer))
    four_texts = peak_bytes(runner, texts[:4])
    tuned = 64 * LENGTH
    policy = BatchingPolicy(bucket_bounds=(128, 256, LENGTH), max_batch_tokens=tuned, max_batch_size=64, window=0.0, pad_multiple=8)
    clock = FakeClock()
    batcher = Batcher(BatchQueue(policy), adapter, max_queue_tokens=10**6, rates=DrainRate(), clock=clock)
    splits_before = splits("out_of_memory")

    def every_shape_once() -> list[list[float]]:
        """Each batch shape a split can produce, run once before memory is held, on the inference thread itself: so
        that no kernel loads lazily and no cuBLAS workspace (one per thread) is allocated while memory is held, which
        would fail otherwise than as the batch's own out-of-memory. Returns the whole batch's scores."""
        whole, *_ = [adapter.run(adapter.collate(texts[:count], LENGTH)) for count in (64, 32, 16, 8, 4, 2, 1)]
        return whole

    async def scenario(thread: ThreadPoolExecutor):
        batcher.start(thread)
        with leaving_free(3 * four_texts):  # room for about 12 texts: 64 at once run out of memory
            first = await classify_together(batcher, texts)
        budget_after_oom = batcher.queue.policy.max_batch_tokens
        clock.now += RECOVERY_SECONDS + 1  # a quiet period: the next batch grows the budget back one step
        second = await classify_together(batcher, texts[:1])
        budget_after_quiet = batcher.queue.policy.max_batch_tokens
        batcher.drain()
        await batcher.drained()
        return first, budget_after_oom, second, budget_after_quiet

    with ThreadPoolExecutor(max_workers=1) as thread:
        expected = thread.submit(every_shape_once).result()
        first, budget_after_oom, second, budget_after_quiet = asyncio.run(scenario(thread))
    assert not [answer for answer in first if isinstance(answer, BaseException)]
    for answer, scores in zip(first, expected):
        assert answer == pytest.approx(scores, abs=1e-4)
    assert second[0] == pytest.approx(expected[0], abs=1e-4)
    assert splits("out_of_memory") - splits_before >= 1
    assert LENGTH <= budget_after_oom <= 32 * LENGTH  # at most half of the batch that failed
    assert budget_after_quiet == min(tuned, math.ceil(budget_after_oom * RECOVERY_GROWTH))
    assert REGISTRY.get_sample_value("classifier_effective_max_batch_tokens") == budget_after_quiet


def calibration_ids(tokenizer) -> list[list[int]]:
    return tokenizer(calibration_texts(), truncation=True, max_length=LENGTH)["input_ids"]


def test_the_tuning_ladder_stops_at_a_real_out_of_memory_and_chooses_below_it(tokenizer):
    model = bert(tokenizer, 128, 2, 4)
    runner = ModelRunner(model, DEVICE, "fp32", tokenizer.pad_token_id)
    texts = texts_of(4, LENGTH, len(tokenizer))
    room = (peak_bytes(runner, texts[:2]) + peak_bytes(runner, texts)) // 2  # 2 maximum-length texts fit, 4 do not
    calibration = calibration_ids(tokenizer)

    def tuner() -> Tuner:
        return Tuner(model, DEVICE, tokenizer.pad_token_id, "single_label_classification", calibration, 128, floor=LENGTH)

    tuner().budget("fp32", climb_until=time.perf_counter() + 120)  # every shape once, with memory free (kernels load lazily)
    tuner = tuner()  # a fresh one, which has timed nothing yet
    with leaving_free(room):
        choice, trials = tuner.budget("fp32", climb_until=time.perf_counter() + 120)
    assert trials[-1].out_of_memory and trials[-1].budget <= 4 * LENGTH, trials
    fitted = [trial for trial in trials if not trial.out_of_memory]
    assert fitted and all(trial.tokens_per_second > 0 for trial in fitted)
    largest = max(trial.budget for trial in fitted)
    assert choice.value <= max(LENGTH, largest * (1 - OOM_SAFETY_MARGIN)), choice


class Recording:
    """The batcher's model around a real adapter, recording when each batch was collated (and whether into pinned
    memory) and when each ran, on which inputs."""

    def __init__(self, adapter: BatchModelAdapter) -> None:
        self.adapter = adapter
        self.collations: list[tuple[float, float, bool, int]] = []  # start, end, pinned, id of the inputs
        self.runs: list[tuple[float, float, int]] = []  # start, end, id of the inputs

    def collate(self, sequences: list[list[int]], padded_length: int) -> dict[str, torch.Tensor]:
        began = time.perf_counter()
        inputs = self.adapter.collate(sequences, padded_length)
        pinned = all(tensor.is_pinned() for tensor in inputs.values())
        self.collations.append((began, time.perf_counter(), pinned, id(inputs)))
        return inputs

    def run(self, inputs: dict[str, torch.Tensor]) -> list[list[float]]:
        began = time.perf_counter()
        scores = self.adapter.run(inputs)  # ends with the logits copied to the host: the GPU's work is done
        self.runs.append((began, time.perf_counter(), id(inputs)))
        return scores


def test_collation_into_pinned_memory_overlaps_the_previous_batch(tokenizer):
    adapter = BatchModelAdapter(ModelRunner(bert(tokenizer, 768, 6, 12), DEVICE, "fp32", tokenizer.pad_token_id))
    texts = texts_of(64, LENGTH, len(tokenizer))
    expected = [scores for start in range(0, 64, 8) for scores in adapter.run(adapter.collate(texts[start : start + 8], LENGTH))]
    recording = Recording(adapter)
    policy = BatchingPolicy(bucket_bounds=(LENGTH,), max_batch_tokens=8 * LENGTH, max_batch_size=8, window=0.0, pad_multiple=8)
    batcher = Batcher(BatchQueue(policy), recording, max_queue_tokens=10**6, rates=DrainRate())

    async def scenario():
        with ThreadPoolExecutor(max_workers=1) as thread:
            batcher.start(thread)
            answers = await classify_together(batcher, texts)
            batcher.drain()
            await batcher.drained()
        return answers

    answers = asyncio.run(scenario())
    for answer, scores in zip(answers, expected):
        assert answer == pytest.approx(scores, abs=1e-4)
    assert len(recording.runs) == 8 and len(recording.collations) == 8
    assert all(pinned for _, _, pinned, _ in recording.collations)
    assert [inputs for _, _, inputs in recording.runs] == [inputs for _, _, _, inputs in recording.collations]  # none collated twice
    # Batch i+1 was collated while batch i ran: its inputs were ready before batch i ended (the first collations may
    # pay for the pinned allocator's first blocks).
    ready_in_time = sum(collated_end <= run_end for (_, collated_end, _, _), (_, run_end, _) in zip(recording.collations[1:], recording.runs))
    assert ready_in_time >= len(recording.runs) - 3, (recording.collations, recording.runs)


def test_fp16_and_bf16_score_the_calibration_set_as_fp32_does(tokenizer):
    model = bert(tokenizer, 384, 6, 12)  # MiniLM-sized
    candidates = precision_candidates("cuda", cpu_native_bf16=False, cuda_bf16=cuda_supports_bf16(DEVICE), regression=False)
    assert candidates[:2] == ["fp32", "fp16"]
    assert ("bf16" in candidates) == (torch.cuda.get_device_capability(DEVICE) >= (8, 0))
    calibration = calibration_ids(tokenizer)
    tuner = Tuner(model, DEVICE, tokenizer.pad_token_id, "single_label_classification", calibration, 128, floor=LENGTH)
    choice, trials = tuner.precision(candidates, TOLERANCE, budget=2048)
    # A top-1 label can only change where fp32's two scores are closer than twice the deviation.
    single = ModelRunner(model, DEVICE, "fp32", tokenizer.pad_token_id)
    margins = [float(logits.softmax(-1).diff().abs()) for ids in calibration for logits in single.run([ids], len(ids))]
    by_precision = {trial.precision: trial for trial in trials}
    assert set(by_precision) == set(candidates)
    for precision in candidates[1:]:
        trial = by_precision[precision]
        assert trial.tokens_per_second > 0
        assert trial.max_deviation <= TOLERANCE, trial
        assert trial.label_changes <= sum(margin < 2 * trial.max_deviation for margin in margins), trial
    assert choice.value in candidates
