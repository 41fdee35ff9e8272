"""Start-up tuning and run-time memory decisions, as pure functions of measurements.

No torch, no clock, no I/O: the engine measures (speed, score deviations, out-of-memory) and these functions
decide. Tests drive every decision with made-up numbers.
"""

import math
import statistics
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
# Start-up precision trials come in pairs (each candidate timed once per round, the order rotating from round to
# round), so a busy spell slows both sides of a pair alike; the decision is taken on the rounds' ratios. At least
# MIN_PAIRS rounds, more (up to MAX_PAIRS, within the time limit) while the ratios spread wider than NOISY_SPREAD
# (interquartile range over the median) or the machine looked busy.
MIN_PAIRS = 3
MAX_PAIRS = 12
NOISY_SPREAD = 0.15
# Signs of a busy machine while trials ran: this process got less than this share of its threads' wall time on a
# CPU, other processes used more than this share of the machine's CPU time, or the hypervisor stole more than this
# share of it. (Not Linux's CPU pressure, the share of time any task waits for a CPU: while the trials keep every
# core busy, any other task that wakes waits, however little it runs, and quiet starts on 2 cores read 23-25%.)
STARVED_CPU_SHARE = 0.6
BUSY_OTHERS_SHARE = 0.2
BUSY_STEAL = 0.05
# The probe (single texts of growing length, to tell per-batch overhead from per-token time) takes at most this
# share of the time left.
PROBE_SHARE = 0.2
# Alternatives that start-up ranked within this factor of the chosen one are checked again on live traffic (all
# faithful ones when the start-up measurement was disturbed).
LIVE_CLOSE = 1.25
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
    # Paired trials: the median of this precision's speed over fp32's, round by round, and the rounds' spread.
    ratio_to_fp32: float = 1.0
    spread: float = 0.0
    pairs: int = 0

    def faithful(self, tolerance: float) -> bool:
        """Whether its scores stay within `tolerance` of fp32's with no top-1 label changed."""
        return self.precision == "fp32" or (self.max_deviation <= tolerance and self.label_changes == 0)


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
    faithful = [trial for trial in trials if trial.faithful(tolerance)]
    best = max(faithful, key=lambda trial: trial.tokens_per_second)
    rejected = [trial for trial in trials if trial not in faithful]
    why_not = "; ".join(
        f"{trial.precision} rejected (deviation {trial.max_deviation:.4f}, {trial.label_changes} labels changed)" for trial in rejected
    )
    if best is reference:
        reason = "fp32 is the fastest faithful precision" if len(trials) > 1 else "fp32 is the only candidate"
    else:
        reason = (
            f"{best.precision} is {best.tokens_per_second / reference.tokens_per_second:.2f}x fp32's speed with "
            f"deviation {best.max_deviation:.4f} <= {tolerance} and no label changed"
        )
    return Choice(best.precision, f"{reason}; {why_not}" if why_not else reason)


@dataclass(frozen=True)
class PairedRatios:
    """A candidate's speed over the reference's, one ratio per round of paired trials."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else 1.0

    @property
    def spread(self) -> float:
        """Interquartile range of the ratios over their median (0 with fewer than two)."""
        if len(self.ratios) < 2:
            return 0.0
        low, _, high = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return (high - low) / self.median

    def settled(self, busy: bool, min_pairs: int = MIN_PAIRS, noisy_spread: float = NOISY_SPREAD) -> bool:
        """Enough rounds to decide on: at least `min_pairs`, twice as many on a busy machine, and a narrow spread."""
        wanted = min_pairs * 2 if busy else min_pairs
        return len(self.ratios) >= wanted and self.spread <= noisy_spread


def paired_speeds(reference_speed: float, pairs: dict[str, PairedRatios]) -> dict[str, float]:
    """Each candidate's speed on one scale: the reference's (its median over the rounds) times the candidate's median
    ratio to it, so a choice among them is the paired comparison's."""
    return {precision: reference_speed * ratios.median for precision, ratios in pairs.items()}


@dataclass(frozen=True)
class MachineLoad:
    """What the operating system said about the machine while trials ran: wall and this process's CPU seconds, the
    threads the trials ran on, and where Linux gives them, the share of the machine's CPU time that other processes
    used (the machine's busy time less this process's) and the share the hypervisor stole."""

    wall_seconds: float
    cpu_seconds: float
    threads: int
    others_share: float | None = None
    steal: float | None = None


def disturbance(load: MachineLoad) -> list[str]:
    """Why the machine looked busy while trials ran, in words; empty when it looked quiet. Only others' load counts:
    this process's own threads, however many, neither starve it nor count as other processes' CPU time."""
    reasons = []
    if load.wall_seconds > 0 and load.threads > 0:
        share = load.cpu_seconds / (load.wall_seconds * load.threads)
        if share < STARVED_CPU_SHARE:
            reasons.append(f"this process ran {share:.0%} of its {load.threads} threads' wall time")
    if load.others_share is not None and load.others_share > BUSY_OTHERS_SHARE:
        reasons.append(f"other processes used {load.others_share:.0%} of the CPU time")
    if load.steal is not None and load.steal > BUSY_STEAL:
        reasons.append(f"{load.steal:.0%} of CPU time stolen")
    return reasons


def others_share(busy_cpu_seconds: float, own_cpu_seconds: float, cpu_seconds: float) -> float | None:
    """The share of the machine's `cpu_seconds` (all CPUs' time between two readings) that other processes kept busy:
    the machine's busy time less this process's own (the two are counted differently, so the difference is clamped
    at 0); None without CPU time to divide by."""
    if cpu_seconds <= 0:
        return None
    return min(1.0, max(0.0, busy_cpu_seconds - own_cpu_seconds) / cpu_seconds)


def fits_in_time(now: float, expected_seconds: float, until: float) -> bool:
    """Whether a trial expected to take `expected_seconds` ends by `until` if started `now`."""
    return now + expected_seconds <= until


@dataclass(frozen=True)
class RunCost:
    """How long one batch takes: a fixed per-batch overhead (Python, dispatch, one launch per layer) plus a time per
    padded token. A short text's time is nearly all overhead; counting it per token predicted a full batch 50-100x
    too long, and under a neighbour's job every trial looked past the time limit."""

    overhead: float
    per_token: float

    def seconds(self, tokens: int) -> float:
        return self.overhead + self.per_token * tokens

    @classmethod
    def bounding(cls, tokens: int, seconds: float) -> "RunCost":
        """From one run alone: all of it per token, which bounds any larger batch's time from above (its overhead is
        paid once)."""
        return cls(0.0, seconds / tokens)

    @classmethod
    def fitted(cls, small: tuple[int, float], large: tuple[int, float]) -> "RunCost":
        """The line through two runs, (tokens, seconds) each, the larger with more tokens. When the larger ran no
        slower than the smaller (noise), it bounds as one run would."""
        (small_tokens, small_seconds), (large_tokens, large_seconds) = small, large
        per_token = (large_seconds - small_seconds) / (large_tokens - small_tokens)
        if per_token <= 0:
            return cls.bounding(large_tokens, large_seconds)
        return cls(max(0.0, small_seconds - per_token * small_tokens), per_token)


def next_probe(small: tuple[int, float], last: tuple[int, float], longest: int, seconds_left: float) -> int | None:
    """How many tokens the probe's next run, one text, has; None when it is done. The probe climbs from the shortest
    text (`small`: its tokens and seconds) in runs that its `last` run, counted all per token (an upper bound: a
    larger run pays the overhead once), says end within `seconds_left`; it is done once the last run took at least
    twice the shortest's time (per-token time then shows through the overhead: a line through the two tells them
    apart), reached the `longest` text's length, or cannot grow. Under a neighbour's job a short run's time is
    nearly all overhead, so the probe grows about as fast as the time it may spend allows."""
    if last[0] >= longest or last[1] >= 2 * small[1]:
        return None
    length = min(longest, math.floor(seconds_left * last[0] / last[1]))
    return length if length > last[0] else None


def live_precisions(trials: list[PrecisionTrial], chosen: str, tolerance: float, disturbed: bool) -> list[str]:
    """The precisions live traffic checks (the chosen one first): faithful ones that start-up ranked within
    LIVE_CLOSE of the chosen, or every faithful one when the start-up measurement was disturbed."""
    speeds = {trial.precision: trial.tokens_per_second for trial in trials if trial.faithful(tolerance)}
    if chosen not in speeds:
        return [chosen]
    close = [precision for precision, speed in speeds.items() if precision != chosen and (disturbed or speed * LIVE_CLOSE >= speeds[chosen])]
    return [chosen, *close]


def live_budgets(trials: list[BudgetTrial], chosen: int, disturbed: bool, ladder: list[int]) -> list[int]:
    """The budgets live traffic checks (the chosen one first): the rungs of `ladder` next to the chosen one, when
    start-up ranked them within LIVE_CLOSE of it, or whatever it measured when it was disturbed (a busy start-up may
    have had time for the chosen rung alone); after an out-of-memory, none above the margin `choose_budget` keeps."""
    speeds = {trial.budget: _speed(trial) for trial in trials if not trial.out_of_memory}
    # After an out-of-memory, no budget above the margin the start-up choice keeps below the largest that fit.
    out_of_memory = math.inf
    if any(trial.out_of_memory for trial in trials):
        out_of_memory = max(speeds, default=0) * (1 - OOM_SAFETY_MARGIN) + 1
    rungs = sorted({*ladder, chosen})
    index = rungs.index(chosen)
    neighbours = [budget for budget in rungs[max(0, index - 1) : index] + rungs[index + 1 : index + 2]]
    close = [
        budget
        for budget in neighbours
        if budget < out_of_memory and (disturbed or (budget in speeds and chosen in speeds and speeds[budget] * LIVE_CLOSE >= speeds[chosen]))
    ]
    return [chosen, *close]


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


def reduced_ladder(ladder: list[int], default: int, rung_seconds: dict[int, float], seconds_left: float) -> list[int] | None:
    """None when climbing `ladder` from its bottom to the rung above `default` is expected (`rung_seconds`: each
    rung's expected time, 0 for rungs already timed) to end within `seconds_left`: climb as usual. Otherwise, on a
    busy machine, the rungs worth the time there is: the ladder's rung nearest `default`, then its lower and its upper
    neighbour, each that still fits after those before it; none when that first rung does not fit (a neighbour alone
    says nothing against the default). Climbing from the bottom would measure only the cheapest rungs, and noise
    made 512 look best."""
    centre = min(range(len(ladder)), key=lambda index: abs(ladder[index] - default))
    if sum(rung_seconds[budget] for budget in ladder[: centre + 2]) <= seconds_left:
        return None
    rungs: list[int] = []
    spent = 0.0
    for budget in [ladder[centre], *ladder[max(0, centre - 1) : centre], *ladder[centre + 1 : centre + 2]]:
        if spent + rung_seconds[budget] > seconds_left:
            if not rungs:
                return []
            continue
        rungs.append(budget)
        spent += rung_seconds[budget]
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


def choose_budget(trials: list[BudgetTrial], floor: int, within: float = BUDGET_WITHIN, margin: float = OOM_SAFETY_MARGIN) -> Choice:
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

    def __init__(self, tuned: int, floor: int, recovery_seconds: float = RECOVERY_SECONDS, growth: float = RECOVERY_GROWTH) -> None:
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

    def retune(self, tokens: int) -> int:
        """Live tuning put `tokens` in force as the tuned budget: the budget now (still held down while recovering
        from an out-of-memory)."""
        recovering = self.current < self.tuned
        self.tuned = tokens
        self.current = min(self.current, tokens) if recovering else tokens
        return self.current

    def succeeded(self, now: float) -> int:
        """A batch ran: the budget, grown back one step if the last change was a quiet period ago."""
        if self.current < self.tuned and now - self._changed_at >= self.recovery_seconds:
            self.current = min(self.tuned, math.ceil(self.current * self.growth))
            self._changed_at = now
        return self.current
