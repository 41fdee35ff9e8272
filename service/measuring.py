"""Start-up tuning on the device: time each candidate precision and token budget on batches shaped like real traffic,
and compare each precision's scores with fp32's on the packaged calibration set. `service.tuning` decides."""

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from service.postprocess import ProblemType, activate
from service.runner import ModelRunner, release_cached_memory
from service.tuning import (
    BudgetTrial,
    Choice,
    PrecisionTrial,
    budget_ladder,
    choose_budget,
    choose_precision,
    ladder_should_stop,
    traffic_shapes,
    traffic_throughput,
)

log = logging.getLogger(__name__)

# Each batch shape is timed this many times, in separate passes over the candidates, and the fastest counts: the
# first run of a shape pays for kernel selection, and the machine may be busy with other work for a while.
REPEATS = 2


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

    def as_dict(self) -> dict:
        return {
            "precision": asdict(self.precision),
            "max_batch_tokens": asdict(self.max_batch_tokens),
            "precision_trials": [asdict(trial) for trial in self.precision_trials],
            "budget_trials": [asdict(trial) for trial in self.budget_trials],
            "calibration_texts": self.calibration_texts,
            "seconds": round(self.seconds, 2),
        }

    def summary(self) -> str:
        """One line for the log."""
        precisions = ", ".join(
            f"{t.precision} {t.tokens_per_second:.0f} tok/s dev {t.max_deviation:.4f} flips {t.label_changes}"
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


class Tuner:
    """Measures one loaded model on its device with the calibration texts' token ids."""

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
    ) -> None:
        self.model, self.device, self.pad_token_id = model, device, pad_token_id
        self.problem_type = problem_type
        self.calibration = calibration
        self.lengths = [len(ids) for ids in calibration]
        self.by_length = sorted(calibration, key=len)
        self.max_batch_size = max_batch_size
        self.floor = floor  # one text of the model's maximum length, padded
        self.clock = clock
        # Seconds per run of each (precision, padded length, texts) shape measured so far.
        self._timings: dict[tuple[str, int, int], list[float]] = {}
        self._runners: dict[str, ModelRunner] = {}  # one per precision: each low-precision one copies weights

    def runner(self, precision: str) -> ModelRunner:
        if precision not in self._runners:
            self._runners[precision] = ModelRunner(self.model, self.device, precision, self.pad_token_id)
        return self._runners[precision]

    def precision(self, candidates: list[str], tolerance: float, budget: int) -> tuple[Choice, list[PrecisionTrial]]:
        """Time each candidate at `budget` and compare its calibration scores with fp32's."""
        reference = torch.tensor(self._scores(self.runner("fp32"), budget))
        deviations = {}
        for precision in candidates:
            scores = reference if precision == "fp32" else torch.tensor(self._scores(self.runner(precision), budget))
            deviations[precision] = (
                round(float((scores - reference).abs().max()), 6),
                int((scores.argmax(-1) != reference.argmax(-1)).sum()),
            )
        speeds = {}
        for samples in range(1, REPEATS + 1):  # interleaved, so a busy spell slows every candidate alike
            for precision in candidates:
                speeds[precision] = self._throughput(precision, budget, samples)
        trials = [
            PrecisionTrial(precision, round(speeds[precision], 1), *deviations[precision]) for precision in candidates
        ]
        return choose_precision(trials, tolerance), trials

    def budget(self, precision: str, climb_until: float) -> tuple[Choice, list[BudgetTrial]]:
        """Climb the ladder of budgets until one runs out of memory or gets clearly slower, or the clock passes
        `climb_until`; time the rungs that ran once more (about as long again), and choose among them."""
        ladder = budget_ladder(self.floor, self.device.type)
        trials: list[BudgetTrial] = []
        for budget in ladder:
            trials.append(BudgetTrial(budget, self._rung_speed(precision, budget)))
            if ladder_should_stop(trials, out_of_time=self.clock() >= climb_until):
                break
        trials = [
            trial if trial.out_of_memory else BudgetTrial(trial.budget, self._rung_speed(precision, trial.budget, REPEATS))
            for trial in trials
        ]
        if not any(trial.out_of_memory for trial in trials):
            # Rungs above a stop for time whose batches the precision trials already timed cost nothing more.
            climbed = {trial.budget for trial in trials}
            trials += [
                BudgetTrial(budget, round(self._throughput(precision, budget, REPEATS), 1))
                for budget in ladder
                if budget not in climbed and self._timed(precision, budget)
            ]
        return choose_budget(trials, self.floor), trials

    def _timed(self, precision: str, budget: int) -> bool:
        """Whether every batch shape of `budget` already has all its timings."""
        shapes = traffic_shapes(self.lengths, budget, self.max_batch_size)
        return all(len(self._timings.get((precision, *shape), [])) >= REPEATS for shape in shapes)

    def _rung_speed(self, precision: str, budget: int, samples: int = 1) -> float | None:
        """Real tokens/s at `budget`, or None when it ran out of memory."""
        try:
            if self.device.type == "cuda" and samples == 1:
                # The largest activations a budget allows: as many texts of the maximum length as it holds.
                self._run(self.runner(precision), self._batch(self.floor, max(1, budget // self.floor)), self.floor)
            return round(self._throughput(precision, budget, samples), 1)
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
            batch_scores = activate(runner.run([self.calibration[i] for i in batch], padded), self.problem_type)
            for index, text_scores in zip(batch, batch_scores):
                scores[index] = text_scores
            start = end
        return [scores[index] for index in range(len(order))]

    def _throughput(self, precision: str, budget: int, samples: int) -> float:
        """Real tokens/s over batches shaped like traffic at `budget`, one per stratum of the calibration lengths,
        each timed until it has `samples` timings (shapes shared with earlier measurements are not run again)."""
        runner = self.runner(precision)
        seconds_per_token = []
        for length, count in traffic_shapes(self.lengths, budget, self.max_batch_size):
            timings = self._timings.setdefault((precision, length, count), [])
            while len(timings) < samples:
                timings.append(self._run(runner, self._batch(length, count), length))
            seconds_per_token.append(min(timings) / (length * count))
        return traffic_throughput(seconds_per_token)

    def _batch(self, length: int, count: int) -> list[list[int]]:
        """`count` real calibration sequences at least `length` long (reused in turn), each cut to `length`."""
        long_enough = [ids for ids in self.by_length if len(ids) >= length] or [self.by_length[-1]]
        return [(long_enough[i % len(long_enough)] * length)[:length] for i in range(count)]

    def _run(self, runner: ModelRunner, sequences: list[list[int]], padded_length: int) -> float:
        started = self.clock()
        runner.run(sequences, padded_length)
        return self.clock() - started
