"""Start-up tuning on the device: time each candidate precision and token budget on batches shaped like real traffic,
and compare each precision's scores with fp32's on the packaged calibration set. `service.tuning` decides."""

import json
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch

from service.postprocess import ProblemType, activate
from service.runner import ModelRunner, release_cached_memory
from service.tuning import (
    MAX_PAIRS,
    BudgetTrial,
    Choice,
    MachineLoad,
    PairedRatios,
    PrecisionTrial,
    budget_ladder,
    choose_budget,
    choose_precision,
    disturbance,
    fits_in_time,
    ladder_should_stop,
    paired_speeds,
    traffic_shapes,
    traffic_throughput,
)

log = logging.getLogger(__name__)

# Each budget rung's batch shapes are timed this many times, in separate passes, and the fastest counts: the first
# run of a shape pays for kernel selection, and the machine may be busy with other work for a while.
REPEATS = 2
# A trial is expected to take, at most, as long per padded token as the slowest of the latest this-many runs (the
# first runs of each shape, which pay for kernel selection, soon drop out).
RECENT_RUNS = 8


def calibration_texts() -> list[str]:
    """The packaged calibration set: real texts of mixed lengths (see loadtest/make_calibration.py)."""
    document = json.loads(resources.files("service").joinpath("calibration_texts.json").read_text(encoding="utf-8"))
    return document["texts"]


@dataclass(frozen=True)
class TuningReport:
    """What start-up tuning measured and what it chose, with why, for /info and the start-up log."""

    precision: Choice
    max_batch_tokens: Choice
    precision_trials: list[PrecisionTrial]
    budget_trials: list[BudgetTrial]
    calibration_texts: int
    seconds: float
    disturbed: list[str] = field(default_factory=list)  # why the machine looked busy while measuring (empty: quiet)
    live_precisions: list[str] = field(default_factory=list)  # what live traffic checks (the chosen first)
    live_budgets: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "precision": asdict(self.precision),
            "max_batch_tokens": asdict(self.max_batch_tokens),
            "precision_trials": [asdict(trial) for trial in self.precision_trials],
            "budget_trials": [asdict(trial) for trial in self.budget_trials],
            "calibration_texts": self.calibration_texts,
            "seconds": round(self.seconds, 2),
            "disturbed": self.disturbed,
            "live_candidates": {"precision": self.live_precisions, "max_batch_tokens": self.live_budgets},
        }

    def summary(self) -> str:
        """One line for the log."""
        precisions = ", ".join(
            f"{t.precision} {t.tokens_per_second:.0f} tok/s ({t.ratio_to_fp32:.2f}x fp32 over {t.pairs} paired rounds, "
            f"spread {t.spread:.2f}) dev {t.max_deviation:.4f} flips {t.label_changes}"
            for t in self.precision_trials
        )
        budgets = ", ".join(
            f"{t.budget}: {'out of memory' if t.out_of_memory else f'{t.tokens_per_second:.0f} tok/s'}"
            for t in self.budget_trials
        )
        return (
            f"tuned in {self.seconds:.1f} s: precision {self.precision.value} ({self.precision.reason}) [{precisions}]; "
            f"max_batch_tokens {self.max_batch_tokens.value} ({self.max_batch_tokens.reason}) [{budgets}]"
        )

    def disturbance_note(self) -> str | None:
        """A line for the log when the machine was busy while measuring: why, and what was done about it."""
        if not self.disturbed:
            return None
        rounds = max((trial.pairs for trial in self.precision_trials), default=0)
        checked = [*self.live_precisions[1:], *map(str, self.live_budgets[1:])]
        return (
            f"start-up tuning was disturbed ({'; '.join(self.disturbed)}): measured {rounds} paired rounds (up to "
            f"{MAX_PAIRS}) within the time limit and chose on their median ratios; live traffic under load checks "
            + (f"{', '.join(checked)} against the choice" if checked else "nothing: no faithful alternative")
        )


class OutOfTime(Exception):
    """A trial would not end before the tuning time limit; it was not started."""


class LoadMeter:
    """This process's CPU time and the machine's CPU pressure and steal since it was made (`load`), from Linux's
    /proc where there is one."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._pressure, self._stat = _cpu_pressure_microseconds(), _cpu_steal_and_total()

    def load(self) -> MachineLoad:
        wall = time.perf_counter() - self._wall
        pressure = _cpu_pressure_microseconds()
        stat = _cpu_steal_and_total()
        waited = None if pressure is None or self._pressure is None or wall <= 0 else (
            (pressure - self._pressure) / 1e6 / wall
        )
        steal = None
        if stat is not None and self._stat is not None and stat[1] > self._stat[1]:
            steal = (stat[0] - self._stat[0]) / (stat[1] - self._stat[1])
        return MachineLoad(wall, time.process_time() - self._cpu, self.threads, waited, steal)


def _cpu_pressure_microseconds() -> float | None:
    """Total microseconds some task waited for a CPU (Linux pressure stall information), or None."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = pressure.readline().split()
    except OSError:
        return None
    fields = dict(item.split("=", 1) for item in some[1:] if "=" in item)
    return float(fields["total"]) if "total" in fields else None


def _cpu_steal_and_total() -> tuple[int, int] | None:
    """The machine's stolen and total CPU ticks since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)



class Tuner:
    """Measures one loaded model on its device with the calibration texts' token ids, never starting a trial that
    would end after `deadline` (on `clock`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        pad_token_id: int,
        problem_type: ProblemType,
        calibration: list[list[int]],
        max_batch_size: int,
        floor: int,
        clock: Callable[[], float] = time.perf_counter,
        deadline: float = math.inf,
    ) -> None:
        self.model, self.device, self.pad_token_id = model, device, pad_token_id
        self.problem_type = problem_type
        self.calibration = calibration
        self.lengths = [len(ids) for ids in calibration]
        self.by_length = sorted(calibration, key=len)
        self.max_batch_size = max_batch_size
        self.floor = floor  # one text of the model's maximum length, padded
        self.clock = clock
        self.deadline = deadline
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        self.meter = LoadMeter(min(threads, os.cpu_count() or threads))
        # Seconds per run of each (precision, padded length, texts) shape measured so far.
        self._timings: dict[tuple[str, int, int], list[float]] = {}
        self._runners: dict[str, ModelRunner] = {}  # one per precision: each low-precision one copies weights
        # Seconds per padded token of the latest runs: the slowest is how long a trial is expected to take, at worst.
        self._recent_rates: deque[float] = deque(maxlen=RECENT_RUNS)
        self._paired: list[PairedRatios] = []  # the candidates' ratios to fp32, once the precision rounds ran
        self._short_of_time: list[str] = []  # measurements the time limit cut short

    def runner(self, precision: str) -> ModelRunner:
        if precision not in self._runners:
            self._runners[precision] = ModelRunner(self.model, self.device, precision, self.pad_token_id)
        return self._runners[precision]

    def disturbed(self) -> list[str]:
        """Why the measurements so far look disturbed (a busy machine, paired rounds spread wide, or measurements
        the time limit cut short); empty when quiet."""
        reasons = disturbance(self.meter.load())
        noisy = [ratios for ratios in self._paired if not ratios.settled(busy=False)]
        if noisy:
            spread = max(ratios.spread for ratios in noisy)
            reasons.append(f"paired rounds spread {spread:.2f} around their median")
        return reasons + self._short_of_time

    def precision(
        self, candidates: list[str], tolerance: float, budget: int, until: float
    ) -> tuple[Choice, list[PrecisionTrial]]:
        """Compare each candidate's scores with fp32's, then time the candidates in paired rounds (each once per
        round, the order rotating) until their ratios to fp32 settle, MAX_PAIRS rounds, or the clock passes
        `until`; the choice is taken on each candidate's median ratio."""
        deviations = {"fp32": (0.0, 0)}
        if len(candidates) > 1:
            reference = torch.tensor(self._scores(self.runner("fp32"), budget))
            for precision in candidates[1:]:
                scores = torch.tensor(self._scores(self.runner(precision), budget))
                deviations[precision] = (
                    round(float((scores - reference).abs().max()), 6),
                    int((scores.argmax(-1) != reference.argmax(-1)).sum()),
                )
        reference_speeds: list[float] = []
        ratios: dict[str, list[float]] = {precision: [] for precision in candidates}
        for round_number in range(MAX_PAIRS):
            order = candidates[round_number % len(candidates) :] + candidates[: round_number % len(candidates)]
            try:
                speeds = {precision: self._pass_speed(precision, budget, until) for precision in order}
            except OutOfTime:
                break
            reference_speeds.append(speeds["fp32"])
            for precision in candidates:
                ratios[precision].append(speeds[precision] / speeds["fp32"])
            paired = [PairedRatios(tuple(values)) for values in ratios.values()]
            if all(pairs.settled(busy=bool(disturbance(self.meter.load()))) for pairs in paired):
                break
        if not reference_speeds:
            self._short_of_time.append("no paired precision round fitted in the time limit")
            trials = [PrecisionTrial(precision, 0.0, *deviations[precision]) for precision in candidates]
            return Choice("fp32", "no paired round fitted in the time limit; fp32, the reference"), trials
        pairs = {precision: PairedRatios(tuple(values)) for precision, values in ratios.items()}
        self._paired = [ratios for precision, ratios in pairs.items() if precision != "fp32"]
        speeds = paired_speeds(statistics.median(reference_speeds), pairs)
        trials = [
            PrecisionTrial(
                precision,
                round(speeds[precision], 1),
                *deviations[precision],
                ratio_to_fp32=round(pairs[precision].median, 3),
                spread=round(pairs[precision].spread, 3),
                pairs=len(pairs[precision].ratios),
            )
            for precision in candidates
        ]
        return choose_precision(trials, tolerance), trials

    def budget(self, precision: str, climb_until: float, until: float) -> tuple[Choice, list[BudgetTrial]]:
        """Climb the ladder of budgets until one runs out of memory or gets clearly slower, or the clock passes
        `climb_until`; time the rungs that ran once more, in turn, while that ends before `until`; choose among them
        on the fastest timing of each batch shape."""
        ladder = budget_ladder(self.floor, self.device.type)
        trials: list[BudgetTrial] = []
        for budget in ladder:
            try:
                trials.append(BudgetTrial(budget, self._rung_speed(precision, budget, until=climb_until)))
            except OutOfTime:
                break
            if ladder_should_stop(trials, out_of_time=self.clock() >= climb_until):
                break
        if not trials:  # not even one rung fitted in the time: the rung the precision trials timed, if any
            timed = [budget for budget in ladder if self._timed(precision, budget, 1)]
            trials = [BudgetTrial(budget, round(self._measured_speed(precision, budget), 1)) for budget in timed[:1]]
            self._short_of_time.append("no budget rung fitted in the time limit")
            if not trials:
                return Choice(self.floor, "no rung fitted in the time limit; one text of the maximum length"), []
        fitted = [trial.budget for trial in trials if not trial.out_of_memory]
        try:
            for budget in fitted:
                self._throughput(precision, budget, REPEATS, until)
        except OutOfTime:
            pass  # the rungs keep the timings they have
        trials = [
            trial if trial.out_of_memory else BudgetTrial(trial.budget, round(self._measured_speed(precision, trial.budget), 1))
            for trial in trials
        ]
        if not any(trial.out_of_memory for trial in trials):
            # Rungs above a stop for time whose batches the precision trials already timed cost nothing more.
            climbed = {trial.budget for trial in trials}
            trials += [
                BudgetTrial(budget, round(self._measured_speed(precision, budget), 1))
                for budget in ladder
                if budget not in climbed and self._timed(precision, budget, REPEATS)
            ]
        return choose_budget(trials, self.floor), trials

    def _timed(self, precision: str, budget: int, samples: int) -> bool:
        """Whether every batch shape of `budget` already has `samples` timings."""
        shapes = traffic_shapes(self.lengths, budget, self.max_batch_size)
        return all(len(self._timings.get((precision, *shape), [])) >= samples for shape in shapes)

    def _rung_speed(self, precision: str, budget: int, until: float) -> float | None:
        """Real tokens/s at `budget` (each shape timed once), or None when it ran out of memory."""
        try:
            if self.device.type == "cuda":
                # The largest activations a budget allows: as many texts of the maximum length as it holds.
                count = max(1, budget // self.floor)
                self._run(self.runner(precision), self._batch(self.floor, count), self.floor, until)
            return round(self._throughput(precision, budget, 1, until), 1)
        except torch.cuda.OutOfMemoryError:
            release_cached_memory(self.device)
            return None

    def _scores(self, runner: ModelRunner, budget: int) -> list[list[float]]:
        """Scores of every calibration text, in order, from length-sorted batches within `budget`."""
        order = sorted(range(len(self.calibration)), key=lambda i: self.lengths[i])
        scores: dict[int, list[float]] = {}
        start = 0
        while start < len(order):
            end = start + 1
            while (
                end < len(order)
                and end - start < self.max_batch_size
                and (end - start + 1) * self.lengths[order[end]] <= budget
            ):
                end += 1
            batch = order[start:end]
            padded = self.lengths[batch[-1]]
            sequences = [self.calibration[i] for i in batch]
            # Always run (the guard needs every score), and timed: the first estimate of a trial's duration.
            logits, _ = self._timed_run(runner, sequences, padded)
            for index, text_scores in zip(batch, activate(logits, self.problem_type)):
                scores[index] = text_scores
            start = end
        return [scores[index] for index in range(len(order))]

    def _pass_speed(self, precision: str, budget: int, until: float) -> float:
        """Real tokens/s of one fresh timing of each traffic-shaped batch at `budget` (kept for the budget ladder)."""
        runner = self.runner(precision)
        seconds_per_token = []
        for length, count in traffic_shapes(self.lengths, budget, self.max_batch_size):
            seconds = self._run(runner, self._batch(length, count), length, until)
            self._timings.setdefault((precision, length, count), []).append(seconds)
            seconds_per_token.append(seconds / (length * count))
        return traffic_throughput(seconds_per_token)

    def _throughput(self, precision: str, budget: int, samples: int, until: float) -> float:
        """Real tokens/s over batches shaped like traffic at `budget`, one per stratum of the calibration lengths,
        each timed until it has `samples` timings (shapes shared with earlier measurements are not run again)."""
        runner = self.runner(precision)
        for length, count in traffic_shapes(self.lengths, budget, self.max_batch_size):
            timings = self._timings.setdefault((precision, length, count), [])
            while len(timings) < samples:
                timings.append(self._run(runner, self._batch(length, count), length, until))
        return self._measured_speed(precision, budget)

    def _measured_speed(self, precision: str, budget: int) -> float:
        """Real tokens/s at `budget` from the fastest timing of each of its shapes (each timed at least once)."""
        shapes = traffic_shapes(self.lengths, budget, self.max_batch_size)
        return traffic_throughput([min(self._timings[(precision, *shape)]) / (shape[0] * shape[1]) for shape in shapes])

    def _batch(self, length: int, count: int) -> list[list[int]]:
        """`count` real calibration sequences at least `length` long (reused in turn), each cut to `length`."""
        long_enough = [ids for ids in self.by_length if len(ids) >= length] or [self.by_length[-1]]
        return [(long_enough[i % len(long_enough)] * length)[:length] for i in range(count)]

    def _run(self, runner: ModelRunner, sequences: list[list[int]], padded_length: int, until: float) -> float:
        """Seconds one batch took; raises OutOfTime instead when, at the slowest rate seen, it would end after
        `until` or the deadline."""
        expected = max(self._recent_rates, default=0.0) * padded_length * len(sequences)
        if not fits_in_time(self.clock(), expected, min(until, self.deadline)):
            raise OutOfTime()
        return self._timed_run(runner, sequences, padded_length)[1]

    def _timed_run(
        self, runner: ModelRunner, sequences: list[list[int]], padded_length: int
    ) -> tuple[torch.Tensor, float]:
        """Run one batch: its logits and the seconds it took (kept as a recent rate)."""
        started = self.clock()
        logits = runner.run(sequences, padded_length)
        seconds = self.clock() - started
        self._recent_rates.append(seconds / (padded_length * len(sequences)))
        return logits, seconds
