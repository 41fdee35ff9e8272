"""Tuning that goes on while serving, as a pure function of the batches' figures and the times given to it.

Start-up tuning decides once, on a machine that may have been busy. Under sustained load (texts waiting beyond the
next batch for a while), one batch in EXPLORE_EVERY runs with an alternative (`Arm`: a precision or a token budget
that start-up ranked close or measured under noise); each such batch's tokens/s is paired with the in-force
setting's latest batch of the same length class, so a busy spell slows both sides of a pair alike. Once the pairs
say with confidence that the alternative's median ratio is at least 1 + SWITCH_MARGIN, it is put in force: one
switch, then HOLD_SECONDS before the next, and the margin holds both ways, so it never flip-flops. An alternative no
faster, or not clearly after MAX_PAIRS, is retired (explored again after RETRY_SECONDS). At low load nothing is
explored. The batcher executes what `LiveTuner` says.

A precision whose scores start-up had no time to compare with fp32's (a machine too busy to score the calibration set
in time) is checked on live traffic instead: its exploration batches run in the setting in force, whose scores answer
the callers, then again in that precision as a shadow (`shadowed`), and the two runs' scores are compared (`checked`).
After CHECK_TEXTS texts within the tolerance and with no top-1 label changed, and MIN_PAIRS shadow runs (the same
batch in both settings: tight pairs), it is judged on those pairs and then explored like any faithful one; one text
beyond the tolerance rejects it.
"""

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

EXPLORE_EVERY = 8  # under sustained load, one batch in this many runs an alternative
SUSTAINED_SECONDS = 2.0  # texts must have waited beyond the next batch this long before anything is explored
# An alternative's pairs are judged only at these counts (judging after every pair would let noise win one of the
# many looks): it is put in force, retired, or measured on; after the last, retired unless put in force.
CHECKPOINTS = (12, 24, 40)
MIN_PAIRS, MAX_PAIRS = CHECKPOINTS[0], CHECKPOINTS[-1]
# The alternative must be faster by this margin with confidence: the lower bound of a distribution-free confidence
# interval for the median paired ratio (an order statistic, this many standard deviations of the sign test below the
# middle) must reach 1 + SWITCH_MARGIN: of 12 pairs, the smallest; of 24, the fifth smallest; of 40, the eleventh.
SWITCH_MARGIN = 0.10
CONFIDENCE_Z = 3.0
RETIRE_BELOW = 1.0  # an alternative whose median ratio is below this at a checkpoint is retired
HOLD_SECONDS = 60.0  # no switch within this long of the last one
RETRY_SECONDS = 300.0  # a retired alternative is explored again after this long
PAIR_WITHIN_SECONDS = 5.0  # the in-force batch an exploration batch is paired with ran at most this long before
SMOOTHING = 0.2  # weight of the newest batch in each arm's live tokens/s
CHECK_TEXTS = 160  # live texts an unchecked precision is compared on: as many as start-up's calibration set


@dataclass(frozen=True, order=True)
class Arm:
    """One setting batches can run with: a precision and a token budget."""

    precision: str
    budget: int

    @property
    def label(self) -> str:
        return f"{self.precision}/{self.budget}"


@dataclass(frozen=True)
class Switch:
    """A change of the setting in force, with its evidence."""

    what: str  # "precision" or "budget"
    old: Arm
    new: Arm
    median_ratio: float
    faster_share: float
    pairs: int
    at: float

    def describe(self) -> str:
        return (
            f"live tuning: {self.what} {self.old.label} -> {self.new.label}: {self.new.label} ran {self.median_ratio:.2f}x "
            f"the tokens/s of {self.old.label} (median of {self.pairs} paired batches, faster in {self.faster_share:.0%})"
        )


@dataclass
class _Evidence:
    """What live batches said about one arm: its smoothed tokens/s, its paired ratios to the setting in force, and
    until when it is retired."""

    tokens_per_second: float | None = None
    batches: int = 0
    ratios: list[float] = field(default_factory=list)
    retired_until: float = -math.inf

    def observe(self, speed: float) -> None:
        """One more batch of this arm ran at `speed` tokens/s."""
        self.batches += 1
        self.tokens_per_second = speed if self.tokens_per_second is None else SMOOTHING * speed + (1 - SMOOTHING) * self.tokens_per_second


@dataclass
class _Check:
    """What shadow runs said of a precision start-up could not check: texts compared, the largest score difference
    from the setting in force, and top-1 labels changed."""

    texts: int = 0
    max_deviation: float = 0.0
    label_changes: int = 0

    def describe(self) -> str:
        return f"{self.texts} live texts, largest score difference {self.max_deviation:.4f}, {self.label_changes} top-1 labels changed"


def median_lower_bound(ratios: list[float], z: float = CONFIDENCE_Z) -> float:
    """A lower confidence bound for the median of `ratios`: the order statistic `z` standard deviations of the sign
    test below the middle (the smallest one with few ratios)."""
    index = max(0, math.floor(len(ratios) / 2 - z * math.sqrt(len(ratios)) / 2))
    return sorted(ratios)[index]


def length_class(padded_length: int) -> int:
    """Batches are paired within a power-of-two class of padded length: tokens/s depends on the length."""
    return max(0, padded_length - 1).bit_length()


class LiveTuner:
    """The live decisions: which arm the next batch runs with (`choose`), and what a batch that ran says (`ran`,
    which returns the switch it decided on, if any). Not thread-safe: the batcher calls it under its lock."""

    def __init__(
        self,
        in_force: Arm,
        precisions: list[str],
        budgets: list[int],
        now: float,
        unchecked: list[str] | None = None,
        tolerance: float = 0.0,
    ) -> None:
        self.in_force = in_force
        self.since = now
        self.precisions = precisions  # the precisions that may be explored (faithful at start-up)
        self.budgets = budgets
        # Precisions start-up could not compare with fp32, checked on live traffic against the one in force (fp32).
        self.unchecked = {precision: _Check() for precision in unchecked or () if precision not in precisions}
        self.tolerance = tolerance  # the largest score difference a checked precision may show
        self.rejected: dict[str, str] = {}  # precision -> what its live check found
        self._judged: set[Arm] = set()  # alternatives judged at a checkpoint since the last switch
        self.switches: list[Switch] = []
        self._evidence: dict[Arm, _Evidence] = {}
        self._busy_since: float | None = None
        self._since_exploring = 0  # in-force batches taken since the last exploration batch was taken
        self._turn = 0  # round robin over the alternatives
        self._last_in_force: dict[int, tuple[float, float]] = {}  # length class -> (tokens/s, when)

    @property
    def exploring(self) -> bool:
        """Whether there is anything to explore at all."""
        return len(self.precisions) > 1 or len(self.budgets) > 1 or bool(self.unchecked)

    def alternatives(self) -> list[Arm]:
        """The arms that differ from the one in force in one setting (the unchecked precisions first)."""
        precision, budget = self.in_force.precision, self.in_force.budget
        return [Arm(other, budget) for other in [*self.unchecked, *self.precisions] if other != precision] + [
            Arm(precision, other) for other in self.budgets if other != budget
        ]

    def shadowed(self, arm: Arm) -> bool:
        """Whether a batch taken with `arm` runs in the setting in force for its answers and in `arm` as a shadow,
        to be compared (`checked`): its precision is not yet checked."""
        return arm.precision in self.unchecked

    def choose(self, now: float, waiting: bool) -> Arm:
        """The arm for the next batch; `waiting`: texts are queued beyond what that batch can take."""
        if not waiting:
            self._busy_since = None
            return self.in_force
        if self._busy_since is None:
            self._busy_since = now
        if now - self._busy_since < SUSTAINED_SECONDS or self._since_exploring < EXPLORE_EVERY - 1:
            return self.in_force
        candidates = [arm for arm in self.alternatives() if self._evidence_of(arm).retired_until <= now]
        if not candidates:
            return self.in_force
        # A check comes first (it decides what may be explored at all), then another precision until judged once: it
        # is the large difference (bf16 1.5-1.8x fp32), and in turns with two budgets its first judgement came 56-70 s
        # into the load (a busy start that chose fp32).
        first = [arm for arm in candidates if self.shadowed(arm) or (arm.precision != self.in_force.precision and arm not in self._judged)]
        if first:
            return first[0]
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    def taken(self, arm: Arm) -> None:
        """A batch was taken to run with `arm` (`choose`'s answer). Counted as batches are taken, not as they end: the
        next batch is chosen while this one runs, and counting at its end let two exploration batches follow each
        other (9 to 16 instead of 10 in 80 batches, from run to run, in the batcher's test)."""
        self._since_exploring = self._since_exploring + 1 if arm == self.in_force else 0

    def ran(self, arm: Arm, real_tokens: int, padded_length: int, seconds: float, now: float) -> Switch | None:
        """A batch of `real_tokens` ran with `arm` in `seconds`, ending at `now`: the switch it decides, if any."""
        if seconds <= 0 or real_tokens <= 0:
            return None
        speed = real_tokens / seconds
        evidence = self._evidence_of(arm)
        evidence.observe(speed)
        length = length_class(padded_length)
        if arm == self.in_force:
            self._last_in_force[length] = (speed, now)
            return None
        paired = self._last_in_force.get(length)
        if paired is None or now - paired[1] > PAIR_WITHIN_SECONDS or arm not in self.alternatives():
            return None
        evidence.ratios.append(speed / paired[0])
        return self._judge(arm, evidence, now)

    def checked(
        self,
        arm: Arm,
        texts: int,
        deviation: float,
        label_changes: int,
        real_tokens: int,
        padded_length: int,
        in_force_seconds: float,
        shadow_seconds: float,
        now: float,
    ) -> tuple[str | None, Switch | None]:
        """A shadowed batch of `texts` ran in the setting in force in `in_force_seconds` (told to `ran` as any batch),
        then in `arm` in `shadow_seconds`, its scores differing by up to `deviation` with `label_changes` top-1 labels
        changed. Returns a line for the log when the check ended (passed or rejected), and the switch decided, if any."""
        check = self.unchecked.get(arm.precision)
        if check is None or in_force_seconds <= 0 or shadow_seconds <= 0:
            return None, None
        check.texts += texts
        check.max_deviation = max(check.max_deviation, deviation)
        check.label_changes += label_changes
        if check.max_deviation > self.tolerance or check.label_changes:
            del self.unchecked[arm.precision]
            self.rejected[arm.precision] = check.describe()
            self._evidence.pop(arm, None)
            return f"live tuning: {arm.precision} rejected against {self.in_force.precision} on {check.describe()} (tolerance {self.tolerance})", None
        evidence = self._evidence_of(arm)
        evidence.observe(real_tokens / shadow_seconds)
        evidence.ratios.append(in_force_seconds / shadow_seconds)  # the same batch in both settings: a tight pair
        # Shadowed until judged once too: pairs of different batches spread too widely on a busy machine to clear
        # the margin at the first checkpoint (a busy start stayed on fp32 at 0.66x a quiet start's throughput).
        if check.texts < CHECK_TEXTS or len(evidence.ratios) < MIN_PAIRS:
            return None, None
        del self.unchecked[arm.precision]
        self.precisions.append(arm.precision)
        message = f"live tuning: {arm.precision} passed its check against {self.in_force.precision} on {check.describe()}: explored from now on"
        return message, self._judge(arm, evidence, now, look_now=True)

    def _judge(self, arm: Arm, evidence: _Evidence, now: float, look_now: bool = False) -> Switch | None:
        pairs = len(evidence.ratios)
        if pairs not in CHECKPOINTS and not look_now:
            return None
        self._judged.add(arm)
        median = statistics.median(evidence.ratios)
        faster = sum(ratio > 1 for ratio in evidence.ratios) / pairs
        clear = median_lower_bound(evidence.ratios) >= 1 + SWITCH_MARGIN
        held = bool(self.switches) and now - self.switches[-1].at < HOLD_SECONDS
        if not clear or held:
            if median < RETIRE_BELOW or pairs >= MAX_PAIRS:
                evidence.ratios.clear()  # no faster, or not clearly after all its pairs: stop paying for it
                evidence.retired_until = now + RETRY_SECONDS
            return None
        what = "precision" if arm.precision != self.in_force.precision else "budget"
        switch = Switch(what, self.in_force, arm, round(median, 3), round(faster, 3), len(evidence.ratios), now)
        self.switches.append(switch)
        self.in_force, self.since = arm, now
        # Ratios were against the old setting; each arm starts again against the new one.
        for other in self._evidence.values():
            other.ratios.clear()
            other.retired_until = -math.inf
        self._last_in_force.clear()
        self._judged.clear()
        return switch

    def tokens_per_second(self, arm: Arm) -> float:
        """The arm's smoothed live tokens/s (0 before its first batch)."""
        return self._evidence_of(arm).tokens_per_second or 0.0

    def _evidence_of(self, arm: Arm) -> _Evidence:
        return self._evidence.setdefault(arm, _Evidence())

    def info(self, now: float, wall_now: float) -> dict:
        """The live figures per arm, and what is in force since when (`now` on the tuner's clock is `wall_now` in
        Unix seconds: times are shown as Unix seconds)."""

        def wall(at: float) -> float:
            return round(wall_now - (now - at), 3)

        return {
            "in_force": {
                "precision": self.in_force.precision,
                "max_batch_tokens": self.in_force.budget,
                "since": wall(self.since),
            },
            "explored": [arm.label for arm in self.alternatives()],
            "checking": {precision: asdict(check) for precision, check in self.unchecked.items()},
            "rejected": self.rejected,
            "candidates": {
                arm.label: {
                    "batches": evidence.batches,
                    "tokens_per_second": None if evidence.tokens_per_second is None else round(evidence.tokens_per_second, 1),
                    "pairs": len(evidence.ratios),
                    "median_ratio_to_in_force": round(statistics.median(evidence.ratios), 3) if evidence.ratios else None,
                    "retired": evidence.retired_until > now,
                }
                for arm, evidence in sorted(self._evidence.items())
            },
            "switches": [
                {
                    "what": switch.what,
                    "from": switch.old.label,
                    "to": switch.new.label,
                    "median_ratio": switch.median_ratio,
                    "faster_share": switch.faster_share,
                    "pairs": switch.pairs,
                    "at": wall(switch.at),
                }
                for switch in self.switches
            ],
        }


@dataclass(frozen=True)
class LiveTuning:
    """What the batcher needs to tune live: the decisions, how to run the next batch in a precision (called on the
    inference thread, just before the batch runs), and how far a shadow run's logits are from the answered ones (the
    largest score difference, and top-1 labels changed)."""

    tuner: LiveTuner
    use_precision: Callable[[str], None]
    compare: Callable[[list[list[float]], list[list[float]]], tuple[float, int]]
