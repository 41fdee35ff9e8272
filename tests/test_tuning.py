"""Tuning decisions from made-up measurements: precision (paired rounds, a busy machine), budget ladder, traffic
shapes, what live traffic checks, run-time memory budget."""

import itertools

import pytest

from service.tuning import (
    BudgetTrial,
    MachineLoad,
    MemoryBudget,
    PairedRatios,
    PrecisionTrial,
    RunCost,
    budget_ladder,
    choose_budget,
    choose_precision,
    disturbance,
    fits_in_time,
    ladder_should_stop,
    live_budgets,
    live_precisions,
    next_probe,
    others_share,
    paired_speeds,
    precision_candidates,
    reduced_ladder,
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
    assert (defaults.precision, defaults.max_batch_tokens, defaults.precision_tolerance, defaults.tune) == ("auto", "auto", 0.01, True)
    monkeypatch.setenv("CLASSIFIER_MAX_BATCH_TOKENS", "4096")
    monkeypatch.setenv("CLASSIFIER_TUNE", "false")
    assert (Settings().max_batch_tokens, Settings().tune) == (4096, False)
    for bad in ({"max_batch_tokens": "fast"}, {"max_batch_tokens": 0}, {"precision_tolerance": -0.1}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def rounds(speeds: dict[str, float], slowdowns: list[float], jitter: list[float]) -> dict[str, PairedRatios]:
    """Paired rounds on a made-up machine: in round i every candidate runs `slowdowns[i]` times slower (a neighbour's
    job), and each timing also varies by the next factor of `jitter` (unevenness within a round)."""
    factors = itertools.cycle(jitter)
    ratios: dict[str, list[float]] = {precision: [] for precision in speeds}
    for slowdown in slowdowns:
        measured = {precision: speed / slowdown * next(factors) for precision, speed in speeds.items()}
        for precision in speeds:
            ratios[precision].append(measured[precision] / measured["fp32"])
    return {precision: PairedRatios(tuple(values)) for precision, values in ratios.items()}


def test_paired_rounds_see_through_a_neighbour_that_slows_every_candidate_10x():
    quiet = {"fp32": 11_272.0, "bf16": 26_520.0}
    # The whole start-up under a neighbour: every timing 8-12x slower, varying from round to round and within one.
    pairs = rounds(quiet, slowdowns=[10, 8, 12, 9, 11, 10], jitter=[1.0, 0.8, 1.2, 0.9, 1.1, 0.85, 1.15])
    assert 1.8 < pairs["bf16"].median < 3.2
    speeds = paired_speeds(1_100.0, pairs)
    trials = [
        PrecisionTrial(precision, speeds[precision], 0.0 if precision == "fp32" else 0.002, 0, ratio_to_fp32=pairs[precision].median)
        for precision in quiet
    ]
    assert choose_precision(trials, tolerance=0.01).value == "bf16"  # what a quiet start chooses


def test_paired_rounds_on_a_quiet_machine_settle_at_the_minimum_and_wide_ones_ask_for_more():
    quiet = rounds({"fp32": 11_000.0, "bf16": 26_000.0}, slowdowns=[1, 1, 1], jitter=[1.0, 1.02, 0.99])
    assert quiet["bf16"].settled(busy=False)
    assert not quiet["bf16"].settled(busy=True)  # on a busy machine: twice the rounds
    noisy = rounds({"fp32": 11_000.0, "bf16": 26_000.0}, slowdowns=[1, 3, 1, 5, 1, 2], jitter=[1.0, 0.6, 1.5])
    assert noisy["bf16"].spread > 0.15 and not noisy["bf16"].settled(busy=False)
    assert PairedRatios(()).median == 1.0 and PairedRatios((2.0,)).spread == 0.0


def test_a_busy_machine_is_recognised_from_cpu_share_others_load_and_steal():
    assert disturbance(MachineLoad(wall_seconds=10, cpu_seconds=19, threads=2, others_share=0.01, steal=0.0)) == []
    starved = disturbance(MachineLoad(wall_seconds=10, cpu_seconds=6, threads=2))
    assert starved == ["this process ran 30% of its 2 threads' wall time"]
    both = disturbance(MachineLoad(wall_seconds=10, cpu_seconds=20, threads=2, others_share=0.6, steal=0.2))
    assert both == ["other processes used 60% of the CPU time", "20% of CPU time stolen"]
    assert disturbance(MachineLoad(wall_seconds=0, cpu_seconds=0, threads=2)) == []


def test_the_service_s_own_threads_are_not_others_load():
    """A quiet 2-core machine while the trials run on both cores: the machine was busy 19.6 of its 20 CPU seconds,
    19.2 of them this process's (the rest: the kernel, a health check). Linux's CPU pressure read 23-25% there (any
    task that woke waited for a core the trials held), which called every quiet start disturbed."""
    quiet = others_share(busy_cpu_seconds=19.6, own_cpu_seconds=19.2, cpu_seconds=20.0)
    assert quiet == pytest.approx(0.02)
    assert disturbance(MachineLoad(wall_seconds=10, cpu_seconds=19.2, threads=2, others_share=quiet, steal=0.0)) == []
    # A neighbour's two-thread job: the machine as busy, but half of it someone else's.
    busy = others_share(busy_cpu_seconds=19.9, own_cpu_seconds=9.8, cpu_seconds=20.0)
    assert busy == pytest.approx(0.505)
    reasons = disturbance(MachineLoad(wall_seconds=10, cpu_seconds=9.8, threads=2, others_share=busy, steal=0.0))
    assert reasons == ["this process ran 49% of its 2 threads' wall time", "other processes used 50% of the CPU time"]
    # One neighbour thread against two of ours: this process still ran 75% of its threads' time (a thread waiting for
    # the other spins on its core), which alone would pass; others' share says it.
    one = others_share(busy_cpu_seconds=20.0, own_cpu_seconds=15.0, cpu_seconds=20.0)
    assert disturbance(MachineLoad(wall_seconds=10, cpu_seconds=15.0, threads=2, others_share=one)) == ["other processes used 25% of the CPU time"]
    assert others_share(busy_cpu_seconds=18.0, own_cpu_seconds=18.3, cpu_seconds=20.0) == 0.0  # counted differently
    assert others_share(busy_cpu_seconds=1.0, own_cpu_seconds=0.0, cpu_seconds=0.0) is None


def test_a_trial_starts_only_when_it_ends_in_time():
    assert fits_in_time(now=10.0, expected_seconds=2.0, until=12.0)
    assert not fits_in_time(now=10.5, expected_seconds=2.0, until=12.0)


def test_live_traffic_checks_close_or_disturbed_faithful_alternatives_only():
    fp32, bf16 = FP32, PrecisionTrial("bf16", 5500.0, 0.004, 0)
    unfaithful = PrecisionTrial("fp16", 5200.0, 0.05, 0)
    assert live_precisions([fp32, bf16, unfaithful], "bf16", 0.01, disturbed=False) == ["bf16", "fp32"]
    far = PrecisionTrial("bf16", 12_500.0, 0.004, 0)  # 2.5x fp32: fp32 is not worth a live batch
    assert live_precisions([fp32, far], "bf16", 0.01, disturbed=False) == ["bf16"]
    assert live_precisions([fp32, far], "bf16", 0.01, disturbed=True) == ["bf16", "fp32"]
    assert live_precisions([fp32, unfaithful], "fp32", 0.01, disturbed=True) == ["fp32"]
    ladder = [BudgetTrial(512, 4000.0), BudgetTrial(1024, 5800.0), BudgetTrial(2048, 6000.0), BudgetTrial(4096, None)]
    rungs = budget_ladder(512, "cpu")
    fitted = ladder[:3]
    assert live_budgets(fitted, 1024, disturbed=False, ladder=rungs) == [1024, 2048]  # 512 is 1.45x slower
    assert live_budgets(fitted, 1024, disturbed=True, ladder=rungs) == [1024, 512, 2048]
    assert live_budgets(ladder, 1024, disturbed=True, ladder=rungs) == [1024, 512]  # 2048 > 0.75 x 2048, which fit
    # No rung measured in time (a very busy start): the default and its neighbours on the ladder.
    assert live_budgets([], 2048, disturbed=True, ladder=rungs) == [2048, 1024, 4096]
    assert live_budgets([], 2048, disturbed=False, ladder=rungs) == [2048]
    # A busy start with time for the default rung alone: its neighbours are checked live.
    assert live_budgets([BudgetTrial(2048, 900.0)], 2048, disturbed=True, ladder=rungs) == [2048, 1024, 4096]


def test_live_tuning_retunes_the_memory_budget_but_an_out_of_memory_still_holds_it_down():
    budget = MemoryBudget(tuned=2048, floor=512)
    assert budget.retune(4096) == 4096 and budget.tuned == 4096
    budget.out_of_memory(failed_tokens=4096, now=0.0)
    assert budget.retune(8192) == 2048 and budget.tuned == 8192


def test_a_batch_costs_its_overhead_plus_its_tokens():
    # Under a neighbour: 0.5 s for 3 tokens, 0.62 s for 130 (the 2026-12-07 probe): nearly all per-batch overhead.
    cost = RunCost.fitted((3, 0.5), (130, 0.627))
    assert cost.per_token == pytest.approx(0.001) and cost.overhead == pytest.approx(0.497)
    assert cost.seconds(8192) == pytest.approx(8.69, abs=0.01)  # a traffic pass at 2048: fits a 12 s share
    assert RunCost.bounding(3, 0.5).seconds(8192) == pytest.approx(1365, abs=1)  # the old estimate: nothing fits
    # The larger run no slower (noise): bound by it alone; a fit never gives negative overhead.
    assert RunCost.fitted((3, 0.5), (130, 0.45)) == RunCost.bounding(130, 0.45)
    assert RunCost.fitted((10, 0.001), (100, 0.1)).overhead == 0.0


def test_the_probe_grows_within_its_time_until_per_token_time_shows():
    quiet = (3, 0.005)
    assert next_probe(quiet, quiet, longest=130, seconds_left=2.4) == 130  # the longest at once
    assert next_probe(quiet, (130, 0.018), longest=130, seconds_left=2.3) is None
    busy = (3, 0.5)
    first = next_probe(busy, busy, longest=130, seconds_left=2.4)
    assert first == 14  # 14 tokens at the 3-token run's rate, all per token: 2.33 s at most
    second = next_probe(busy, (first, 0.51), longest=130, seconds_left=1.9)
    assert second == 52  # the 14-token run's rate allows more
    assert next_probe(busy, (second, 1.1), longest=130, seconds_left=1.4) is None  # twice the overhead: enough
    assert next_probe(busy, busy, longest=130, seconds_left=0.6) is None  # no larger run fits


def test_a_busy_start_measures_the_default_and_its_neighbours_instead_of_climbing_from_the_bottom():
    ladder = [512, 1024, 2048, 4096, 8192]
    quiet = {512: 0.35, 1024: 0.7, 2048: 0.0, 4096: 2.8, 8192: 5.6}  # 2048 timed by the precision trials
    assert reduced_ladder(ladder, 2048, quiet, seconds_left=10.0) is None  # 512 to 4096 fit: climb
    busy = {budget: seconds * 10 for budget, seconds in quiet.items()}
    assert reduced_ladder(ladder, 2048, busy, seconds_left=10.0) == [2048, 1024]
    assert reduced_ladder(ladder, 2048, busy, seconds_left=36.0) == [2048, 1024, 4096]  # the climb: 38.5 s
    untimed = {**busy, 2048: 14.0}
    assert reduced_ladder(ladder, 2048, untimed, seconds_left=16.0) == [2048]
    assert reduced_ladder(ladder, 2048, untimed, seconds_left=10.0) == []  # a neighbour alone says nothing
    assert reduced_ladder([2048, 4096], 2048, {2048: 9.0, 4096: 20.0}, seconds_left=10.0) == [2048]
