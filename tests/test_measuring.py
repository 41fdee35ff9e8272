"""The start-up tuner on fake runners and a fake clock: paired rounds choose what a quiet machine chooses under a
neighbour that slows everything 10x, and the time limit holds however slow the machine is."""

import random

import pytest
import torch

from service.measuring import MAX_PAIRS, Tuner
from service.tuning import MachineLoad
from tests.fakes import FakeClock, FakeRunner

# Mixed lengths, like the packaged calibration set: many short texts, a few long ones.
CALIBRATION = [[7] * length for length in [12] * 60 + [40] * 40 + [120] * 20 + [400] * 6]
# Seconds per padded token, quiet: bf16 2.4x fp32's speed, as on an AMX Xeon.
FP32_SECONDS, BF16_SECONDS = 1 / 11_000, 1 / 26_400


QUIET = MachineLoad(wall_seconds=10, cpu_seconds=20, threads=2, others_share=0.01, steal=0.0)
BUSY = MachineLoad(wall_seconds=10, cpu_seconds=4, threads=2, others_share=0.5, steal=0.0)


def tuner_over(clock: FakeClock, deadline: float, make_runner, load: MachineLoad) -> Tuner:
    """A Tuner of the calibration texts on the fake clock, its runners from `make_runner`, the machine's `load`."""
    return Tuner(
        torch.nn.Identity(),
        torch.device("cpu"),
        0,
        "single_label_classification",
        CALIBRATION,
        128,
        floor=512,
        clock=clock,
        deadline=deadline,
        make_runner=make_runner,
        load=lambda: load,
    )


def tuner(clock: FakeClock, slowdown: float, jitter: tuple[float, ...], limit: float) -> Tuner:
    seconds = {"fp32": FP32_SECONDS, "bf16": BF16_SECONDS}

    def make_runner(precision: str) -> FakeRunner:
        return FakeRunner(clock, seconds[precision], slowdown, jitter)

    return tuner_over(clock, clock() + 0.9 * limit, make_runner, QUIET if slowdown == 1.0 else BUSY)


def tune(slowdown: float, jitter: tuple[float, ...] = (1.0,), limit: float = 20.0):
    clock = FakeClock(0.0)
    measuring = tuner(clock, slowdown, jitter, limit)
    precision, trials = measuring.precision(["fp32", "bf16"], 0.01, 2048, until=0.6 * limit)
    budget, rungs = measuring.budget(str(precision.value), climb_until=0.75 * limit, until=0.9 * limit, fallback=2048)
    assert bool(measuring.disturbed()) == (slowdown > 1)
    return precision, trials, budget, rungs, clock.now


def test_a_quiet_machine_chooses_bf16_after_the_minimum_of_paired_rounds():
    precision, trials, budget, rungs, seconds = tune(slowdown=1.0)
    assert precision.value == "bf16"
    bf16 = next(trial for trial in trials if trial.precision == "bf16")
    # The five calibration batches and the minimum of three traffic rounds, each a pair.
    assert bf16.ratio_to_fp32 == pytest.approx(2.4, rel=0.01) and bf16.pairs == 5 + 3 and bf16.spread == 0
    assert bf16.max_deviation == 0 and bf16.label_changes == 0
    assert rungs and budget.value in {rung.budget for rung in rungs}
    assert seconds < 18


def test_under_a_neighbour_slowing_everything_10x_the_choice_is_the_quiet_one_and_the_limit_holds():
    rng = random.Random(19)
    jitter = tuple(rng.uniform(0.6, 1.6) for _ in range(97))  # a busy machine: every timing off by up to 60%
    precision, trials, _, _, seconds = tune(slowdown=10.0, jitter=jitter)
    assert precision.value == "bf16"
    bf16 = next(trial for trial in trials if trial.precision == "bf16")
    assert 3 < bf16.pairs <= MAX_PAIRS  # the spread asked for more rounds than the quiet minimum
    assert seconds <= 0.9 * 20.0


def test_a_slow_first_run_and_per_batch_overhead_do_not_stop_a_quiet_start_up():
    """As a real runner on the CPU: 0.3 s of set-up on its first batch and 5 ms per batch. Extrapolating a short text's
    first run token by token predicted every trial far past the limit, and a quiet start measured nothing."""
    clock = FakeClock(0.0)
    measuring = tuner_over(clock, 18.0, lambda precision: FakeRunner(clock, FP32_SECONDS, overhead=0.005, set_up=0.3), QUIET)
    precision, trials = measuring.precision(["fp32"], 0.01, 2048, until=12.0)
    budget, rungs = measuring.budget(str(precision.value), climb_until=15.0, until=18.0, fallback=2048)
    assert trials[0].tokens_per_second > 0 and len(rungs) >= 3 and budget.value in {rung.budget for rung in rungs}
    assert measuring.disturbed() == [] and clock.now < 18.0


def busy_start(candidates: list[str], overhead: float, seed: int) -> tuple:
    """A start-up under a neighbour's job that slows everything 10x, each run off by up to 25% more or less at random,
    with a real runner's first-run set-up (0.1 s quiet) and a per-batch `overhead`: 5 ms quiet, but up to 10x more
    under a neighbour whose threads take the cores from the trials' (each operation's threads wait for the one
    descheduled), the per-token work only 10x: under the neighbour of 2026-12-07, one 3-token text took 0.5 s."""
    rng = random.Random(seed)
    jitter = tuple(rng.uniform(0.8, 1.25) for _ in range(97))
    clock = FakeClock(0.0)
    seconds = {"fp32": FP32_SECONDS, "bf16": BF16_SECONDS}
    measuring = tuner_over(
        clock,
        18.0,
        lambda precision: FakeRunner(clock, seconds[precision], 10.0, jitter, overhead=overhead, set_up=0.1),
        BUSY,
    )
    precision, trials = measuring.precision(candidates, 0.01, 2048, until=12.0)
    budget, rungs = measuring.budget(str(precision.value), climb_until=15.0, until=18.0, fallback=2048)
    return precision, trials, budget, rungs, clock.now, measuring.disturbed()


@pytest.mark.parametrize("overhead", [0.005, 0.05])
@pytest.mark.parametrize("seed", range(3))
def test_a_start_10x_slower_throughout_measures_the_default_budget_within_the_limit(overhead, seed):
    """fp32 alone (a CPU without bf16 instructions), 10x slower for the whole start-up. Before, the probe counted a
    short text's time (mostly per-batch overhead) per token; with 0.5 s per batch every trial looked past the limit
    and nothing was measured, and with less, the climb from the bottom measured 512 first, which noise then made look
    best. Now the time goes to the default and its neighbours."""
    precision, _, budget, rungs, seconds, disturbed = busy_start(["fp32"], overhead, seed)
    assert precision.value == "fp32" and seconds <= 18.0
    assert 2048 in {rung.budget for rung in rungs} and 512 not in {rung.budget for rung in rungs}
    assert budget.value in {1024, 2048}
    assert any(reason.startswith("no time to climb the budget ladder") for reason in disturbed)


@pytest.mark.parametrize("seed", range(3))
def test_a_start_10x_slower_throughout_still_compares_precisions_on_pairs(seed):
    """bf16 and fp32, 10x slower for the whole start-up (20 ms per batch): the precisions are compared on the pairs
    there is time for (the calibration batches', no traffic rounds) and bf16 is chosen, as on a quiet machine; the
    limit holds."""
    precision, trials, _, _, seconds, disturbed = busy_start(["fp32", "bf16"], 0.002, seed)
    bf16 = next(trial for trial in trials if trial.precision == "bf16")
    assert precision.value == "bf16" and bf16.pairs >= 5 and seconds <= 18.0
    assert "time for 0 paired rounds only" in disturbed


@pytest.mark.parametrize("slowdown", [30.0, 300.0, 3000.0])
def test_the_time_limit_holds_however_slow_the_machine(slowdown):
    precision, _, budget, _, seconds = tune(slowdown=slowdown, limit=20.0)
    assert seconds <= 0.9 * 20.0 + 1e-9  # no trial started that would end after the last trial's share
    assert precision.value in {"fp32", "bf16"} and int(budget.value) >= 512


def test_a_precision_whose_scores_there_was_no_time_to_compare_is_left_to_live_traffic():
    """3000x slower: not even the calibration set is scored in both precisions in time. fp32, the reference, stands,
    and bf16 is named unchecked (live traffic compares its scores before anything else), in the report and its note."""
    from service.measuring import TuningReport
    from service.tuning import Choice

    clock = FakeClock(0.0)
    measuring = tuner(clock, 3000.0, (1.0,), 20.0)
    precision, trials = measuring.precision(["fp32", "bf16"], 0.01, 2048, until=12.0)
    assert precision.value == "fp32" and trials == [] and measuring.unchecked == ["bf16"]
    report = TuningReport(
        precision,
        Choice(2048, "default"),
        [],
        [],
        160,
        18.0,
        ["the calibration set could not be scored in every precision in time"],
        ["fp32"],
        [2048],
        measuring.unchecked,
    )
    assert report.as_dict()["live_candidates"]["unchecked_precision"] == ["bf16"]
    note = report.disturbance_note()
    assert note is not None and note.endswith("checks bf16 against the choice; it compares bf16's scores with the choice's on 160 live texts first")
    quiet = tuner(FakeClock(0.0), 1.0, (1.0,), 20.0)
    quiet.precision(["fp32", "bf16"], 0.01, 2048, until=12.0)
    assert quiet.unchecked == []


def test_a_disturbed_start_up_says_why_and_what_was_done():
    from service.measuring import TuningReport
    from service.tuning import BudgetTrial, Choice, PrecisionTrial

    trials = [PrecisionTrial("fp32", 1800.0, 0.0, 0, pairs=11), PrecisionTrial("bf16", 4100.0, 0.004, 0, 2.3, 0.2, 11)]
    report = TuningReport(
        Choice("bf16", "fastest"),
        Choice(2048, "default"),
        trials,
        [BudgetTrial(2048, 4000.0)],
        160,
        17.5,
        disturbed=["other processes used 50% of the CPU time"],
        live_precisions=["bf16", "fp32"],
        live_budgets=[2048, 1024],
    )
    note = report.disturbance_note()
    assert note is not None
    assert note.startswith("start-up tuning was disturbed (other processes used 50% of the CPU time): compared")
    assert "11 paired timings" in note and note.endswith("checks fp32, 1024 against the choice")
    assert report.as_dict()["live_candidates"] == {"precision": ["bf16", "fp32"], "max_batch_tokens": [2048, 1024], "unchecked_precision": []}
    quiet = TuningReport(Choice("bf16", "fastest"), Choice(2048, "default"), trials, [], 160, 4.0)
    assert quiet.disturbance_note() is None and quiet.as_dict()["disturbed"] == []


def test_the_load_meter_counts_others_cpu_time_not_this_process_s(monkeypatch):
    """Made-up /proc/stat readings 10 s apart on 2 CPUs (100 ticks a second): the machine busy 1,960 of its 2,000
    ticks, this process 19.2 CPU seconds of them: others used 2%; then a neighbour's: 50%, and 5% stolen."""
    from service import measuring

    readings = iter(
        [
            measuring._CpuTicks(busy=10_000, steal=0, total=50_000),
            measuring._CpuTicks(busy=11_960, steal=0, total=52_000),
            measuring._CpuTicks(busy=11_960, steal=0, total=52_000),
            measuring._CpuTicks(busy=13_850, steal=100, total=54_000),
        ]
    )
    clocks = iter([(0.0, 0.0), (10.0, 19.2), (10.0, 19.2), (20.0, 28.2)])  # (wall, this process's CPU) seconds
    now = [(0.0, 0.0)]

    def tick() -> tuple[float, float]:
        now[0] = next(clocks)
        return now[0]

    monkeypatch.setattr(measuring, "_cpu_ticks", lambda: next(readings))
    monkeypatch.setattr(measuring.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(measuring.time, "perf_counter", lambda: tick()[0])
    monkeypatch.setattr(measuring.time, "process_time", lambda: now[0][1])
    quiet_meter = measuring.LoadMeter(threads=2)
    quiet = quiet_meter.load()
    assert quiet.wall_seconds == 10.0 and quiet.cpu_seconds == pytest.approx(19.2)
    assert quiet.others_share == pytest.approx(0.02) and quiet.steal == 0.0
    busy = measuring.LoadMeter(threads=2).load()
    assert busy.others_share == pytest.approx((18.9 - 9.0) / 20) and busy.steal == pytest.approx(0.05)
