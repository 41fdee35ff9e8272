"""Start-up tuning on the device: time each candidate precision and token budget on batches shaped like real traffic,
and compare each precision's scores with fp32's on the packaged calibration set. `service.tuning` decides."""

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch

from service.live_tuning import CHECK_TEXTS
from service.postprocess import ProblemType, activate
from service.runner import ModelRunner, release_cached_memory
from service.tuning import (
    MAX_PAIRS,
    MIN_PAIRS,
    PROBE_SHARE,
    BudgetTrial,
    Choice,
    MachineLoad,
    PairedRatios,
    PrecisionTrial,
    RunCost,
    budget_ladder,
    choose_budget,
    choose_precision,
    disturbance,
    fits_in_time,
    ladder_should_stop,
    next_probe,
    others_share,
    paired_speeds,
    reduced_ladder,
    traffic_shapes,
    traffic_throughput,
)

log = logging.getLogger(__name__)

# Each budget rung's batch shapes are timed this many times, in separate passes, and the fastest counts: the first
# run of a shape pays for kernel selection, and the machine may be busy with other work for a while.
REPEATS = 2
# A trial is expected to take, at most, the probe's fitted cost times the largest factor by which the latest
# this-many runs exceeded theirs (the first runs of each shape, which pay for kernel selection, soon drop out).
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
    unchecked_precisions: list[str] = field(default_factory=list)  # live traffic checks their scores against fp32's

    def as_dict(self) -> dict:
        return {
            "precision": asdict(self.precision),
            "max_batch_tokens": asdict(self.max_batch_tokens),
            "precision_trials": [asdict(trial) for trial in self.precision_trials],
            "budget_trials": [asdict(trial) for trial in self.budget_trials],
            "calibration_texts": self.calibration_texts,
            "seconds": round(self.seconds, 2),
            "disturbed": self.disturbed,
            "live_candidates": {
                "precision": self.live_precisions,
                "max_batch_tokens": self.live_budgets,
                "unchecked_precision": self.unchecked_precisions,
            },
        }

    def summary(self) -> str:
        """One line for the log."""
        precisions = ", ".join(
            f"{t.precision} {t.tokens_per_second:.0f} tok/s ({t.ratio_to_fp32:.2f}x fp32 over {t.pairs} paired "
            f"timings, spread {t.spread:.2f}) dev {t.max_deviation:.4f} flips {t.label_changes}"
            for t in self.precision_trials
        )
        budgets = ", ".join(f"{t.budget}: {'out of memory' if t.out_of_memory else f'{t.tokens_per_second:.0f} tok/s'}" for t in self.budget_trials)
        return (
            f"tuned in {self.seconds:.1f} s: precision {self.precision.value} ({self.precision.reason}) [{precisions}]; "
            f"max_batch_tokens {self.max_batch_tokens.value} ({self.max_batch_tokens.reason}) [{budgets}]"
        )

    def disturbance_note(self) -> str | None:
        """A line for the log when the machine was busy while measuring: why, and what was done about it."""
        if not self.disturbed:
            return None
        pairs = max((trial.pairs for trial in self.precision_trials), default=0)
        measured = (
            f"compared precisions on {pairs} paired timings (more rounds while they spread, up to {MAX_PAIRS}) and "
            "chose on their median ratios within the time limit; "
            if pairs
            else ""
        )
        checked = [*self.live_precisions[1:], *map(str, self.live_budgets[1:])]
        scored = (
            f"; it compares {', '.join(self.unchecked_precisions)}'s scores with the choice's on {CHECK_TEXTS} live texts first"
            if self.unchecked_precisions
            else ""
        )
        checked = [*self.unchecked_precisions, *checked]
        return f"start-up tuning was disturbed ({'; '.join(self.disturbed)}): {measured}live traffic under load checks " + (
            f"{', '.join(checked)} against the choice{scored}" if checked else "nothing: no faithful alternative to check"
        )


def _rotated(candidates: list[str], turn: int) -> list[str]:
    """The candidates in the order of round `turn`: each goes first in turn."""
    shift = turn % len(candidates)
    return candidates[shift:] + candidates[:shift]


class OutOfTime(Exception):
    """A trial would not end before the tuning time limit; it was not started."""


class LoadMeter:
    """This process's CPU time, and the machine's CPU time that other processes used and that the hypervisor stole,
    since it was made (`load`), from Linux's /proc/stat where there is one (in a container: the host's)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._stat = _cpu_ticks()

    def load(self) -> MachineLoad:
        wall, cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        stat = _cpu_ticks()
        others, steal = None, None
        if stat is not None and self._stat is not None and stat.total > self._stat.total:
            ticks_per_second = os.sysconf("SC_CLK_TCK")
            total = (stat.total - self._stat.total) / ticks_per_second
            others = others_share((stat.busy - self._stat.busy) / ticks_per_second, cpu, total)
            steal = (stat.steal - self._stat.steal) / ticks_per_second / total
        return MachineLoad(wall, cpu, self.threads, others, steal)


@dataclass(frozen=True)
class _CpuTicks:
    busy: int  # running anything: user, nice, system, interrupts
    steal: int
    total: int  # every state, idle and waiting for I/O included


def _cpu_ticks() -> _CpuTicks | None:
    """The machine's CPU ticks since boot, all CPUs together (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    user, nice, system, _, _, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return _CpuTicks(user + nice + system + irq + softirq, steal, sum(ticks[:8]))


class Tuner:
    """Measures one loaded model on its device with the calibration texts' token ids, never starting a trial that
    would end after `deadline` (on `clock`). Its runners, one per precision, come from `make_runner` (by default a
    `ModelRunner` of the model); what the machine did meanwhile, from `load` (by default Linux's account)."""

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
        make_runner: Callable[[str], ModelRunner] | None = None,
        load: Callable[[], MachineLoad] | None = None,
    ) -> None:
        self.device = device
        self.problem_type = problem_type
        self.calibration = calibration
        self.lengths = [len(ids) for ids in calibration]
        self.by_length = sorted(calibration, key=len)
        self.max_batch_size = max_batch_size
        self.floor = floor  # one text of the model's maximum length, padded
        self.clock = clock
        self.deadline = deadline
        self._make_runner = make_runner or (lambda precision: ModelRunner(model, device, precision, pad_token_id))
        # CPU time says how much of the cores the trials got only where the trials run on them (0: not checked).
        threads = torch.get_num_threads() if device.type == "cpu" else 0
        # What the machine did while measuring (by default, what Linux says since now).
        self.load = load or LoadMeter(min(threads, os.cpu_count() or 1)).load
        # Seconds per run of each (precision, padded length, texts) shape measured so far.
        self._timings: dict[tuple[str, int, int], list[float]] = {}
        self._runners: dict[str, ModelRunner] = {}  # one per precision: each low-precision one copies weights
        self.unchecked: list[str] = []  # candidate precisions whose scores there was no time to compare with fp32's
        self._warm: set[ModelRunner] = set()  # the runners that ran once, paying their one-time set-up
        # A batch's time as the probe measured it, and by what factor each latest run exceeded that: the largest
        # factor times the cost is how long a trial is expected to take, at worst.
        self._cost: RunCost | None = None
        self._slowness: deque[float] = deque(maxlen=RECENT_RUNS)
        self._paired: list[PairedRatios] = []  # the candidates' ratios to fp32, once the precision rounds ran
        self._short_of_time: list[str] = []  # measurements the time limit cut short

    def runner(self, precision: str) -> ModelRunner:
        if precision not in self._runners:
            self._runners[precision] = self._make_runner(precision)
        return self._runners[precision]

    def disturbed(self) -> list[str]:
        """Why the measurements so far look disturbed (a busy machine, paired rounds spread wide, or measurements
        the time limit cut short); empty when quiet."""
        reasons = disturbance(self.load())
        noisy = [ratios for ratios in self._paired if not ratios.settled(busy=False)]
        if noisy:
            spread = max(ratios.spread for ratios in noisy)
            reasons.append(f"paired rounds spread {spread:.2f} around their median")
        return reasons + self._short_of_time

    def precision(self, candidates: list[str], tolerance: float, budget: int, until: float) -> tuple[Choice, list[PrecisionTrial]]:
        """Score the calibration set in each candidate, batch by batch, and compare each candidate's scores with
        fp32's; then time the candidates on traffic-shaped batches in rounds, until their ratios to fp32 settle,
        MAX_PAIRS rounds, or the clock passes `until`. Every batch runs in each candidate in turn (the order rotating),
        so each gives a pair; the choice is taken on each candidate's median ratio to fp32."""
        if len(candidates) == 1:  # fp32 alone: timed once for the record (the budget ladder reuses the timings)
            try:
                speed = round(self._pass_speed("fp32", budget, until), 1)
            except OutOfTime:
                speed = 0.0
            trials = [PrecisionTrial("fp32", speed, 0.0, 0)]
            return choose_precision(trials, tolerance), trials
        ratios: dict[str, list[float]] = {precision: [] for precision in candidates}
        tally = [0.0, 0.0]  # fp32's tokens and seconds over every pair: the scale the speeds are shown on

        def pair(speeds: dict[str, float], tokens: float) -> None:
            tally[0] += tokens
            tally[1] += tokens / speeds["fp32"]
            for precision in candidates:
                ratios[precision].append(speeds[precision] / speeds["fp32"])

        try:  # the scores decide what may be chosen at all: they may take until the deadline
            deviations = self._fidelity(candidates, budget, self.deadline, pair)
        except OutOfTime:
            self._short_of_time.append("the calibration set could not be scored in every precision in time")
            self.unchecked = [precision for precision in candidates if precision != "fp32"]
            return Choice("fp32", "no time to compare other precisions' scores with fp32's: fp32, the reference"), []
        shapes = traffic_shapes(self.lengths, budget, self.max_batch_size)
        for round_number in range(MAX_PAIRS):
            try:
                speeds = {precision: self._pass_speed(precision, budget, until) for precision in _rotated(candidates, round_number)}
            except OutOfTime:
                self._short_of_time.append(f"time for {round_number} paired rounds only")
                break
            pair(speeds, sum(length * count for length, count in shapes))
            busy = bool(disturbance(self.load()))
            if round_number + 1 >= MIN_PAIRS and all(PairedRatios(tuple(values)).settled(busy) for values in ratios.values()):
                break
        pairs = {precision: PairedRatios(tuple(values)) for precision, values in ratios.items()}
        self._paired = [ratios for precision, ratios in pairs.items() if precision != "fp32"]
        speeds = paired_speeds(tally[0] / tally[1], pairs)
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

    def _fidelity(
        self, candidates: list[str], budget: int, until: float, pair: Callable[[dict[str, float], float], None]
    ) -> dict[str, tuple[float, int]]:
        """Each candidate's largest score difference from fp32 and top-1 labels changed on the calibration set,
        scored in length-sorted batches within `budget`, each batch in every candidate in turn (each such batch's
        speeds go to `pair`)."""
        scores: dict[str, list[torch.Tensor]] = {precision: [] for precision in candidates}
        for number, batch in enumerate(self._calibration_batches(budget)):
            padded = max(len(ids) for ids in batch)
            speeds = {}
            for precision in _rotated(candidates, number):
                logits, seconds = self._run(self.runner(precision), batch, padded, until)
                speeds[precision] = len(batch) * padded / seconds
                scores[precision].append(torch.tensor(activate(logits, self.problem_type)))
            pair(speeds, len(batch) * padded)
        reference = torch.cat(scores["fp32"])
        deviations = {}
        for precision in candidates:
            own = torch.cat(scores[precision])
            deviations[precision] = (
                round(float((own - reference).abs().max()), 6),
                int((own.argmax(-1) != reference.argmax(-1)).sum()),
            )
        return deviations

    def _calibration_batches(self, budget: int) -> list[list[list[int]]]:
        """The calibration texts sorted by length, in batches within `budget` and the size cap."""
        batches: list[list[list[int]]] = []
        for ids in self.by_length:
            batch = batches[-1] if batches else None
            if batch is None or len(batch) >= self.max_batch_size or (len(batch) + 1) * len(ids) > budget:
                batches.append([ids])
            else:
                batch.append(ids)
        return batches

    def budget(self, precision: str, climb_until: float, until: float, fallback: int) -> tuple[Choice, list[BudgetTrial]]:
        """Climb the ladder of budgets until one runs out of memory or gets clearly slower, or the clock passes
        `climb_until`; time the rungs that ran once more, in turn, while that ends before `until`; choose among them
        on the fastest timing of each batch shape. Where the climb is not expected to fit (a busy machine), a reduced
        ladder instead: `fallback` (the default) and its neighbours, as many as fit before `until`. With no time for
        a rung, `fallback`."""
        ladder = budget_ladder(self.floor, self.device.type)
        self._probed(self.runner(precision), min(until, self.deadline))
        reduced = reduced_ladder(
            ladder,
            fallback,
            {budget: self._rung_seconds(precision, budget) for budget in ladder},
            min(climb_until, self.deadline) - self.clock(),
        )
        trials: list[BudgetTrial] = []
        rung_until = climb_until if reduced is None else until  # a reduced ladder is not timed again: all its time
        for budget in ladder if reduced is None else reduced:
            try:
                trials.append(BudgetTrial(budget, self._rung_speed(precision, budget, rung_until)))
            except OutOfTime:
                if reduced is None:
                    break
                continue
            if reduced is None and ladder_should_stop(trials, out_of_time=self.clock() >= climb_until):
                break
        if reduced is not None:
            measured = ", ".join(str(trial.budget) for trial in trials) or "none"
            self._short_of_time.append(f"no time to climb the budget ladder: the default {fallback} and its neighbours instead ({measured} measured)")
        if not trials:  # not even one rung fitted in the time: the rung the precision trials timed, if any
            timed = [budget for budget in ladder if self._timed(precision, budget, 1)]
            trials = [BudgetTrial(budget, round(self._measured_speed(precision, budget), 1)) for budget in timed[:1]]
            self._short_of_time.append("no budget rung fitted in the time limit")
            if not trials:
                return Choice(fallback, f"no rung fitted in the time limit: {fallback}, the default"), []
        fitted = [trial.budget for trial in trials if not trial.out_of_memory]
        try:
            for budget in fitted:
                self._throughput(precision, budget, REPEATS, until)
        except OutOfTime:
            pass  # the rungs keep the timings they have
        trials = [
            trial if trial.out_of_memory else BudgetTrial(trial.budget, round(self._measured_speed(precision, trial.budget), 1)) for trial in trials
        ]
        if not any(trial.out_of_memory for trial in trials):
            # Rungs above a stop for time whose batches the precision trials already timed cost nothing more.
            climbed = {trial.budget for trial in trials}
            trials += [
                BudgetTrial(budget, round(self._measured_speed(precision, budget), 1))
                for budget in ladder
                if budget not in climbed and self._timed(precision, budget, REPEATS)
            ]
        return choose_budget(trials, self.floor), sorted(trials, key=lambda trial: trial.budget)

    def _rung_seconds(self, precision: str, budget: int) -> float:
        """How long `_rung_speed` at `budget` is expected to take: its batch shapes not timed yet (and on CUDA, its
        batch of maximum-length texts first)."""
        shapes = traffic_shapes(self.lengths, budget, self.max_batch_size)
        largest = self._expected_seconds(max(1, budget // self.floor) * self.floor) if self.device.type == "cuda" else 0
        return largest + sum(self._expected_seconds(length * count) for length, count in shapes if not self._timings.get((precision, length, count)))

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

    def _pass_speed(self, precision: str, budget: int, until: float) -> float:
        """Real tokens/s of one fresh timing of each traffic-shaped batch at `budget` (kept for the budget ladder)."""
        runner = self.runner(precision)
        seconds_per_token = []
        for length, count in traffic_shapes(self.lengths, budget, self.max_batch_size):
            _, seconds = self._run(runner, self._batch(length, count), length, until)
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
                timings.append(self._run(runner, self._batch(length, count), length, until)[1])
        return self._measured_speed(precision, budget)

    def _measured_speed(self, precision: str, budget: int) -> float:
        """Real tokens/s at `budget` from the fastest timing of each of its shapes (each timed at least once)."""
        shapes = traffic_shapes(self.lengths, budget, self.max_batch_size)
        return traffic_throughput([min(self._timings[(precision, *shape)]) / (shape[0] * shape[1]) for shape in shapes])

    def _batch(self, length: int, count: int) -> list[list[int]]:
        """`count` real calibration sequences at least `length` long (reused in turn), each cut to `length`."""
        long_enough = [ids for ids in self.by_length if len(ids) >= length] or [self.by_length[-1]]
        return [(long_enough[i % len(long_enough)] * length)[:length] for i in range(count)]

    def _run(self, runner: ModelRunner, sequences: list[list[int]], padded_length: int, until: float) -> tuple[torch.Tensor, float]:
        """Run one batch: its logits and the seconds it took (kept as a recent slowness). Raises OutOfTime instead
        when, at the probe's cost times the largest recent slowness, it would end after `until` or the deadline."""
        tokens = padded_length * len(sequences)
        cost = self._probed(runner, min(until, self.deadline))
        self._warmed(runner)
        if not fits_in_time(self.clock(), self._expected_seconds(tokens), min(until, self.deadline)):
            raise OutOfTime()
        logits, seconds = self._time(runner, sequences, padded_length)
        self._slowness.append(seconds / cost.seconds(tokens))
        return logits, seconds

    def _expected_seconds(self, tokens: int) -> float:
        """How long a batch of `tokens` padded tokens is expected to take at worst, once probed."""
        assert self._cost is not None, "probed first"
        return self._cost.seconds(tokens) * max(self._slowness)

    def _probed(self, runner: ModelRunner, until: float) -> RunCost:
        """The cost of a batch, from the probe on the first call: a fresh runner's first run pays one-time set-up, so
        the shortest text runs twice and the second counts; then single texts of growing length, each as long as the
        previous one's time counted all per token (an upper bound) says fits in the probe's share of the time left,
        until per-token time shows through the per-batch overhead; the line through the first and the last tells
        the two apart."""
        if self._cost is None:
            shortest, longest = self.by_length[0], len(self.by_length[-1])
            self._warmed(runner)
            small = last = (len(shortest), self._time(runner, [shortest], len(shortest))[1])
            probe_until = self.clock() + PROBE_SHARE * (until - self.clock())
            while (length := next_probe(small, last, longest, probe_until - self.clock())) is not None:
                last = (length, self._time(runner, self._batch(length, 1), length)[1])
            self._cost = RunCost.bounding(*small) if last is small else RunCost.fitted(small, last)
            self._slowness.append(1.0)
        return self._cost

    def _warmed(self, runner: ModelRunner) -> None:
        """A fresh runner's first run pays one-time set-up (kernel selection, a low precision's first casts) that no
        later batch does: it runs the shortest text first, uncounted, so the set-up does not read as a slow
        machine."""
        if runner not in self._warm:
            self._warm.add(runner)
            self._time(runner, [self.by_length[0]], len(self.by_length[0]))

    def _time(self, runner: ModelRunner, sequences: list[list[int]], padded_length: int) -> tuple[torch.Tensor, float]:
        started = self.clock()
        logits = runner.run(sequences, padded_length)
        return logits, self.clock() - started
