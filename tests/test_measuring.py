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


QUIET = MachineLoad(wall_seconds=10, cpu_seconds=20, threads=2, cpu_pressure=0.0, steal=0.0)
BUSY = MachineLoad(wall_seconds=10, cpu_seconds=4, threads=2, cpu_pressure=0.8, steal=0.0)


def tuner(clock: FakeClock, slowdown: float, jitter: tuple[float, ...], limit: float) -> Tuner:
    seconds = {"fp32": FP32_SECONDS, "bf16": BF16_SECONDS}
    return Tuner(
        torch.nn.Identity(), torch.device("cpu"), 0, "single_label_classification", CALIBRATION, 128, floor=512,
        clock=clock, deadline=clock() + 0.9 * limit,
        make_runner=lambda precision: FakeRunner(clock, seconds[precision], slowdown, jitter),
        load=lambda: QUIET if slowdown == 1.0 else BUSY,
    )


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
    measuring = Tuner(
        torch.nn.Identity(), torch.device("cpu"), 0, "single_label_classification", CALIBRATION, 128, floor=512,
        clock=clock, deadline=18.0,
        make_runner=lambda precision: FakeRunner(clock, FP32_SECONDS, overhead=0.005, set_up=0.3),
        load=lambda: QUIET,
    )
    precision, trials = measuring.precision(["fp32"], 0.01, 2048, until=12.0)
    budget, rungs = measuring.budget(str(precision.value), climb_until=15.0, until=18.0, fallback=2048)
    assert trials[0].tokens_per_second > 0 and len(rungs) >= 3 and budget.value in {rung.budget for rung in rungs}
    assert measuring.disturbed() == [] and clock.now < 18.0


@pytest.mark.parametrize("slowdown", [30.0, 300.0, 3000.0])
def test_the_time_limit_holds_however_slow_the_machine(slowdown):
    precision, _, budget, _, seconds = tune(slowdown=slowdown, limit=20.0)
    assert seconds <= 0.9 * 20.0 + 1e-9  # no trial started that would end after the last trial's share
    assert precision.value in {"fp32", "bf16"} and int(budget.value) >= 512


def test_a_disturbed_start_up_says_why_and_what_was_done():
    from service.measuring import TuningReport
    from service.tuning import BudgetTrial, Choice, PrecisionTrial

    trials = [PrecisionTrial("fp32", 1800.0, 0.0, 0, pairs=11), PrecisionTrial("bf16", 4100.0, 0.004, 0, 2.3, 0.2, 11)]
    report = TuningReport(
        Choice("bf16", "fastest"), Choice(2048, "default"), trials, [BudgetTrial(2048, 4000.0)], 160, 17.5,
        disturbed=["tasks waited for a CPU 80% of the time"], live_precisions=["bf16", "fp32"], live_budgets=[2048, 1024],
    )
    note = report.disturbance_note()
    assert note is not None
    assert note.startswith("start-up tuning was disturbed (tasks waited for a CPU 80% of the time): compared")
    assert "11 paired timings" in note and note.endswith("checks fp32, 1024 against the choice")
    assert report.as_dict()["live_candidates"] == {"precision": ["bf16", "fp32"], "max_batch_tokens": [2048, 1024]}
    quiet = TuningReport(Choice("bf16", "fastest"), Choice(2048, "default"), trials, [], 160, 4.0)
    assert quiet.disturbance_note() is None and quiet.as_dict()["disturbed"] == []
