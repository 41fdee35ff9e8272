"""Tuning decisions from made-up measurements: precision, budget ladder, traffic shapes, run-time memory budget."""

import pytest

from service.tuning import (
    BudgetTrial,
    MemoryBudget,
    PrecisionTrial,
    budget_ladder,
    choose_budget,
    choose_precision,
    ladder_should_stop,
    precision_candidates,
    traffic_shapes,
    traffic_throughput,
)

FP32 = PrecisionTrial("fp32", 5000.0, 0.0, 0)


def test_candidates_follow_the_device_and_the_head():
    assert precision_candidates("cpu", cpu_native_bf16=True, cuda_bf16=False, regression=False) == ["fp32", "bf16"]
    assert precision_candidates("cpu", cpu_native_bf16=False, cuda_bf16=True, regression=False) == ["fp32"]
    assert precision_candidates("cuda", cpu_native_bf16=False, cuda_bf16=True, regression=False) == ["fp32", "fp16", "bf16"]
    assert precision_candidates("cuda", cpu_native_bf16=False, cuda_bf16=False, regression=False) == ["fp32", "fp16"]
    assert precision_candidates("cuda", cpu_native_bf16=True, cuda_bf16=True, regression=True) == ["fp32"]


def test_the_fastest_faithful_precision_wins():
    bf16 = PrecisionTrial("bf16", 8500.0, 0.004, 0)
    fp16 = PrecisionTrial("fp16", 9000.0, 0.002, 0)
    choice = choose_precision([FP32, bf16, fp16], tolerance=0.01)
    assert choice.value == "fp16" and "1.80x" in choice.reason


def test_a_fast_precision_that_moves_scores_too_far_or_flips_a_label_is_rejected():
    too_far = PrecisionTrial("fp16", 9000.0, 0.02, 0)
    flipped = PrecisionTrial("bf16", 8500.0, 0.004, 1)
    choice = choose_precision([FP32, too_far, flipped], tolerance=0.01)
    assert choice.value == "fp32"
    assert "fp16 rejected (deviation 0.0200" in choice.reason and "1 labels changed" in choice.reason


def test_a_faithful_but_slower_precision_loses_to_fp32():
    slow = PrecisionTrial("bf16", 800.0, 0.001, 0)  # emulated bf16 on a CPU without the instructions
    assert choose_precision([FP32, slow], tolerance=0.01).value == "fp32"
    assert choose_precision([FP32], tolerance=0.01).reason == "fp32 is the only candidate"


def test_ladder_is_powers_of_two_above_the_longest_text():
    assert budget_ladder(64, "cpu") == [512, 1024, 2048, 4096, 8192]
    assert budget_ladder(512, "cpu")[0] == 512
    assert budget_ladder(520, "cuda") == [520, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    assert budget_ladder(40000, "cpu") == [40000]


def test_ladder_stops_at_out_of_memory_or_a_clear_decline():
    rising = [BudgetTrial(512, 4000.0), BudgetTrial(1024, 4500.0)]
    assert not ladder_should_stop([])
    assert not ladder_should_stop(rising)
    assert not ladder_should_stop([*rising, BudgetTrial(2048, 4000.0)])  # 11% down: noise or a plateau
    assert ladder_should_stop([*rising, BudgetTrial(2048, 3700.0)])
    assert ladder_should_stop([*rising, BudgetTrial(2048, None)])
    assert ladder_should_stop(rising, out_of_time=True)
    assert not ladder_should_stop([], out_of_time=True)  # one rung is always measured


def test_the_smallest_budget_within_a_few_percent_of_the_best_wins():
    trials = [BudgetTrial(512, 4000.0), BudgetTrial(1024, 5900.0), BudgetTrial(2048, 6000.0), BudgetTrial(4096, 5000.0)]
    assert choose_budget(trials, floor=512).value == 1024  # 5900 >= 0.97 x 6000
    assert choose_budget(trials, floor=512, within=0.01).value == 2048


def test_after_an_out_of_memory_the_budget_keeps_a_margin_below_the_largest_that_fit():
    trials = [BudgetTrial(4096, 1e5), BudgetTrial(8192, 2e5), BudgetTrial(16384, 3e5), BudgetTrial(32768, None)]
    choice = choose_budget(trials, floor=512)
    assert choice.value == 8192  # 16384 fit, but 0.75 x 16384 = 12288 is the most allowed
    assert "out of memory above 16384" in choice.reason
    only_one = choose_budget([BudgetTrial(1024, 1e5), BudgetTrial(2048, None)], floor=512)
    assert only_one.value == 768
    assert choose_budget([BudgetTrial(512, None)], floor=512).value == 512


def test_traffic_shapes_fill_the_budget_at_each_strata_length():
    lengths = [10] * 50 + [40] * 10 + [500] * 2  # tokens: 500, 400, 1000
    shapes = traffic_shapes(lengths, budget=2048, max_batch_size=128, strata=4)
    assert shapes == [(10, 128), (40, 51), (500, 4), (500, 4)]
    assert traffic_shapes([600], budget=512, max_batch_size=128, strata=2) == [(600, 1), (600, 1)]
    # equal token shares: two strata at 1000 and 3000 tokens/s take 1/1000 + 1/3000 s per 2 tokens
    assert traffic_throughput([1 / 1000, 1 / 3000]) == pytest.approx(1500.0)


def test_memory_budget_halves_below_a_failed_batch_and_recovers_slowly():
    budget = MemoryBudget(tuned=16384, floor=512, recovery_seconds=30, growth=1.25)
    assert budget.out_of_memory(failed_tokens=12000, now=100.0) == 6000
    assert budget.out_of_memory(failed_tokens=16000, now=101.0) == 6000  # never grows on an out-of-memory
    assert budget.succeeded(now=120.0) == 6000  # not quiet long enough yet
    assert budget.succeeded(now=131.0) == 7500
    assert budget.succeeded(now=140.0) == 7500
    assert budget.succeeded(now=161.0) == 9375
    for step in range(10):
        budget.succeeded(now=200.0 + 30 * step)
    assert budget.current == 16384
    assert budget.out_of_memory(failed_tokens=600, now=1000.0) == 512  # one longest text always fits the budget


def test_tuning_settings_default_to_measuring_and_numbers_force_a_budget(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    defaults = Settings()
    assert (defaults.precision, defaults.max_batch_tokens, defaults.precision_tolerance, defaults.tune) == (
        "auto", "auto", 0.01, True
    )
    monkeypatch.setenv("CLASSIFIER_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("CLASSIFIER_TUNE", "false")
    assert (Settings().max_batch_tokens, Settings().tune) == (4096, False)
    for bad in ({"max_batch_tokens": "fast"}, {"max_batch_tokens": 0}, {"precision_tolerance": -0.1}):
        with pytest.raises(ValidationError):
            Settings(**bad)
