"""Start-up tuning and run-time memory decisions, as pure functions of measurements.

No torch, no clock, no I/O: the engine measures (speed, score deviations, out-of-memory) and these functions
decide. Tests drive every decision with made-up numbers.
"""

import math
from dataclasses import dataclass

# Budgets tried at start-up: powers of two, from a few short texts' worth up to what a GPU launch can use (a CPU's
# best lies far lower: 1024-2048 tokens on the CPUs measured, slower beyond as attention tensors outgrow the caches).
LADDER_START = 512
LADDER_CEILING = {"cpu": 8192, "cuda": 65536}
# A budget within this fraction of the best measured throughput counts as good as the best; the smallest such
# budget wins (smaller batches fill sooner at light load and hold less memory).
BUDGET_WITHIN = 0.03
# The ladder stops once a rung runs this much slower than the best so far: bigger budgets only get slower.
LADDER_DECLINE = 0.15
# On a GPU the chosen budget stays this fraction below the largest budget that fit at the model's maximum length.
OOM_SAFETY_MARGIN = 0.25
# After an out-of-memory at run time the budget grows back by this factor per quiet period.
RECOVERY_GROWTH = 1.25
RECOVERY_SECONDS = 30.0


@dataclass(frozen=True)
class PrecisionTrial:
    """One candidate precision, measured: real tokens/s on representative batches, and how its scores differ from
    fp32's on the calibration set (largest absolute difference, and how many top-1 labels changed)."""

    precision: str
    tokens_per_second: float
    max_deviation: float
    label_changes: int


@dataclass(frozen=True)
class BudgetTrial:
    """One rung of the budget ladder: real tokens/s at that budget, or None when it ran out of memory."""

    budget: int
    tokens_per_second: float | None

    @property
    def out_of_memory(self) -> bool:
        return self.tokens_per_second is None


@dataclass(frozen=True)
class Choice:
    """What tuning settled on and why, in words for /info and the log."""

    value: str | int
    reason: str


def precision_candidates(device_type: str, *, cpu_native_bf16: bool, cuda_bf16: bool, regression: bool) -> list[str]:
    """Precisions worth timing, fp32 (the reference) first.

    Regression heads stay fp32: reduced precision moves raw outputs by amounts no probability tolerance bounds.
    On a CPU, bf16 autocast is worth trying only where the CPU has bf16 instructions; elsewhere it is emulated
    and several times slower.
    """
    if regression:
        return ["fp32"]
    if device_type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if cuda_bf16 else [])
    return ["fp32"] + (["bf16"] if cpu_native_bf16 else [])


def choose_precision(trials: list[PrecisionTrial], tolerance: float) -> Choice:
    """The fastest precision whose scores stay within `tolerance` of fp32's with no top-1 label changed; else fp32."""
    reference = next(trial for trial in trials if trial.precision == "fp32")
    faithful = [
        trial for trial in trials if trial is reference or (trial.max_deviation <= tolerance and trial.label_changes == 0)
    ]
    best = max(faithful, key=lambda trial: trial.tokens_per_second)
    rejected = [trial for trial in trials if trial not in faithful]
    why_not = "; ".join(
        f"{trial.precision} rejected (deviation {trial.max_deviation:.4f}, {trial.label_changes} labels changed)"
        for trial in rejected
    )
    if best is reference:
        reason = "fp32 is the fastest faithful precision" if len(trials) > 1 else "fp32 is the only candidate"
    else:
        reason = (
            f"{best.precision} is {best.tokens_per_second / reference.tokens_per_second:.2f}x fp32's speed with "
            f"deviation {best.max_deviation:.4f} <= {tolerance} and no label changed"
        )
    return Choice(best.precision, f"{reason}; {why_not}" if why_not else reason)


def budget_ladder(floor: int, device_type: str) -> list[int]:
    """Budgets to try, ascending: powers of two from 512 up to the device's ceiling, none below `floor` (one text
    of the model's maximum length, padded), which comes first when it is not itself a power of two."""
    ceiling = max(floor, LADDER_CEILING.get(device_type, LADDER_CEILING["cpu"]))
    rungs = [floor] if floor > LADDER_START and floor & (floor - 1) else []
    budget = LADDER_START
    while budget <= ceiling:
        if budget >= floor:
            rungs.append(budget)
        budget *= 2
    return rungs


def ladder_should_stop(trials: list[BudgetTrial], out_of_time: bool = False, decline: float = LADDER_DECLINE) -> bool:
    """Stop climbing at the first out-of-memory, once the last rung is clearly slower than the best so far, or when
    the time for climbing has run out (after at least one rung)."""
    if not trials:
        return False
    if trials[-1].out_of_memory or out_of_time:
        return True
    best = max(_speed(trial) for trial in trials if not trial.out_of_memory)
    return _speed(trials[-1]) < (1 - decline) * best


def _speed(trial: BudgetTrial) -> float:
    """Tokens/s of a rung that fitted in memory."""
    if trial.tokens_per_second is None:
        raise ValueError(f"budget {trial.budget} ran out of memory: it has no speed")
    return trial.tokens_per_second


def choose_budget(
    trials: list[BudgetTrial], floor: int, within: float = BUDGET_WITHIN, margin: float = OOM_SAFETY_MARGIN
) -> Choice:
    """The smallest budget within `within` of the best throughput. When a rung ran out of memory, only budgets at
    least `margin` below the largest that fit are eligible (the floor always is: one text must fit)."""
    fitted = [trial for trial in trials if not trial.out_of_memory]
    if not fitted:
        return Choice(floor, f"every rung ran out of memory; {floor} (one text of the maximum length)")
    eligible = fitted
    limit_note = ""
    if len(fitted) < len(trials):
        largest = max(trial.budget for trial in fitted)
        ceiling = max(floor, math.floor(largest * (1 - margin)))
        eligible = [trial for trial in fitted if trial.budget <= ceiling]
        limit_note = f"; out of memory above {largest}, so at most {ceiling}"
        if not eligible:
            return Choice(ceiling, f"only {largest} fit{limit_note}")
    best = max(eligible, key=_speed)
    good = min(
        (trial for trial in eligible if _speed(trial) >= (1 - within) * _speed(best)),
        key=lambda trial: trial.budget,
    )
    return Choice(
        good.budget,
        f"smallest budget within {within:.0%} of the best ({best.budget}: {best.tokens_per_second:.0f} tokens/s; "
        f"{good.budget}: {good.tokens_per_second:.0f}){limit_note}",
    )


def traffic_shapes(lengths: list[int], budget: int, max_batch_size: int, strata: int = 4) -> list[tuple[int, int]]:
    """Batches shaped like real traffic at saturation: (padded length, texts) per stratum of the calibration texts.

    The texts are sorted by length and cut into `strata` groups holding equal shares of the tokens; each group is
    represented by its median-token length, and its batch fills the budget (or the size cap) at that length, as
    the scheduler's length buckets do under load. Equal token shares mean the traffic's time per token is the
    plain mean of the strata's times per token.
    """
    ordered = sorted(lengths)
    total = sum(ordered)
    shapes, cumulative, index = [], 0, 0
    for stratum in range(strata):
        target = total * (stratum + 0.5) / strata
        while index < len(ordered) - 1 and cumulative + ordered[index] < target:
            cumulative += ordered[index]
            index += 1
        length = ordered[index]
        shapes.append((length, max(1, min(max_batch_size, budget // length))))
    return shapes


def traffic_throughput(seconds_per_token: list[float]) -> float:
    """Tokens/s over strata of equal token share, from each stratum's measured seconds per token."""
    return len(seconds_per_token) / sum(seconds_per_token)


class MemoryBudget:
    """The token budget in force while out-of-memory errors happen at run time.

    An out-of-memory halves the budget below the batch that failed (never under `floor`, one longest text); after
    `recovery_seconds` without one, it grows back by `growth` per quiet period, up to the tuned budget. Time comes
    in as arguments.
    """

    def __init__(
        self, tuned: int, floor: int, recovery_seconds: float = RECOVERY_SECONDS, growth: float = RECOVERY_GROWTH
    ) -> None:
        self.tuned = tuned
        self.floor = min(floor, tuned)
        self.recovery_seconds = recovery_seconds
        self.growth = growth
        self.current = tuned
        self._changed_at = -math.inf

    def out_of_memory(self, failed_tokens: int, now: float) -> int:
        """A batch of `failed_tokens` padded tokens ran out of memory: the new budget."""
        self.current = max(self.floor, min(self.current, failed_tokens // 2))
        self._changed_at = now
        return self.current

    def succeeded(self, now: float) -> int:
        """A batch ran: the budget, grown back one step if the last change was a quiet period ago."""
        if self.current < self.tuned and now - self._changed_at >= self.recovery_seconds:
            self.current = min(self.tuned, math.ceil(self.current * self.growth))
            self._changed_at = now
        return self.current
