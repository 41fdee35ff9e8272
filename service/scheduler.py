"""Batching decisions: which queued texts run together, and when.

Pure logic: no torch, no I/O, no sleeping. Time comes in as the `now` argument, so tests drive every decision
with a fake clock. Texts wait in length buckets; a batch is seeded from one bucket, may take texts from
neighbouring buckets while its padding efficiency stays high, is padded only to its own longest text, and is
flushed when it meets its token budget or size limit, or when its oldest text has waited the time window.
Two older strategies stay available as modes, so a report can show what each step buys on the same code path:
`batching="arrival"` (one queue in arrival order, no buckets) and `padding="fixed"` (every batch padded to the
longest bucket's bound, the model's maximum length).
Texts also carry their caller's deadline: the queue hands back those whose deadline has passed, and those whose
caller has gone, so they never reach the model; `missed_deadlines`, the one deadline decision, also names the texts
of a batch about to start whose deadline would pass before it ends. A bucket is "due" when its time window has run
out (or no partner is expected within it): that is the window's end, never a deadline.
Texts carry their caller too (`service.callers`): each caller's texts wait in buckets of their own, the caller the
model has served least seeds the next batch (start-time fair queueing, `service.fairness`), and the batch fills with
every caller's texts of similar length, so one caller's flood delays another's text by about a batch, not the flood.
"""

import bisect
import dataclasses
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from service.fairness import RecentCallers, Usage, VirtualTime
from service.moving_average import MovingAverage

FlushReason = Literal["budget", "size", "window"]
Padding = Literal["dynamic", "fixed"]
Batching = Literal["buckets", "arrival"]


@dataclass(slots=True)
class QueuedText:
    """One text waiting for inference: its token count, when it arrived, an opaque handle for the caller, the
    time after which nobody waits for its answer, and who sent it (`service.callers`; "" for one anonymous caller)."""

    tokens: int
    arrived_at: float
    handle: Any = None
    deadline: float = math.inf
    caller: str = ""


@dataclass(frozen=True)
class BatchingPolicy:
    """The limits that shape batches: bucket bounds, token budget, size cap, time window, padding granularity, and
    the strategy: `padding` dynamic (each batch to its own longest text) or fixed (to the last bucket bound), and
    `batching` buckets (texts of similar length together) or arrival (arrival order, one queue)."""

    bucket_bounds: tuple[int, ...]
    max_batch_tokens: int
    max_batch_size: int
    window: float
    pad_multiple: int = 1
    merge_min_efficiency: float = 0.9
    padding: Padding = "dynamic"
    batching: Batching = "buckets"

    def __post_init__(self) -> None:
        check_bucket_bounds(self.bucket_bounds)
        if self.padding not in ("dynamic", "fixed") or self.batching not in ("buckets", "arrival"):
            raise ValueError(f"unknown strategy: padding {self.padding!r}, batching {self.batching!r}")
        longest = self.padded_length(self.bucket_bounds[-1])
        if self.max_batch_tokens < longest:  # one text of the longest bucket must fit in a batch
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) is below the model's maximum length ({longest})")

    def padded_length(self, longest: int) -> int:
        """The length a batch whose longest text has `longest` tokens is padded to (under fixed padding, always
        the last bucket bound)."""
        return padded_length(self.bucket_bounds[-1] if self.padding == "fixed" else longest, self.pad_multiple)

    def padded_length_of(self, items: list[QueuedText]) -> int:
        """The length a batch of `items` is padded to."""
        return self.padded_length(max(item.tokens for item in items))


def padded_length(longest: int, pad_multiple: int) -> int:
    """`longest` rounded up to a multiple of `pad_multiple`: the length a batch with that longest text is padded to."""
    return math.ceil(longest / pad_multiple) * pad_multiple


def check_bucket_bounds(bounds: Iterable[int]) -> None:
    """Raises ValueError unless `bounds` is a non-empty, strictly ascending sequence of positive token counts."""
    bounds = list(bounds)
    if not bounds or bounds[0] <= 0 or bounds != sorted(set(bounds)):
        raise ValueError("bucket_bounds must be a non-empty, strictly ascending list of positive token counts")


@dataclass
class Batch:
    """Texts to run together, the length they are padded to, and why they were flushed."""

    items: list[QueuedText]
    padded_length: int
    reason: FlushReason

    @property
    def real_tokens(self) -> int:
        return sum(item.tokens for item in self.items)

    @property
    def padded_tokens(self) -> int:
        return len(self.items) * self.padded_length

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens


def deadline_passed(deadline: float, now: float) -> bool:
    """Whether an answer still to be computed at `now` comes too late for `deadline`: the one definition every
    deadline check uses (at admission, in the queue, at a batch's start, and the caller's own wait)."""
    return deadline <= now


def missed_deadlines(items: list[QueuedText], now: float, tokens_per_second: float | None = None, delivery_lag: float = 0.0) -> list[QueuedText]:
    """The texts of `items` whose answer cannot reach its caller by its deadline, earliest deadline first: those
    whose deadline has passed at `now`, and, for `items` about to start as one batch at `now` running at
    `tokens_per_second` real tokens (none before any measurement), those whose deadline would pass before the batch
    ends and its answers reach the event loop `delivery_lag` seconds later. Nobody waits for such an answer, so the
    model should not run them. Each text dropped shortens the batch for the rest.
    """
    by_deadline = sorted(items, key=lambda item: item.deadline)
    late = [item for item in by_deadline if deadline_passed(item.deadline, now)]
    if not tokens_per_second:
        return late
    tokens = sum(item.tokens for item in by_deadline[len(late) :])
    for item in by_deadline[len(late) :]:
        if item.deadline >= now + delivery_lag + tokens / tokens_per_second:
            break
        late.append(item)
        tokens -= item.tokens
    return late


def default_bucket_bounds(max_length: int, pad_multiple: int = 1) -> tuple[int, ...]:
    """Bounds about 10% apart (at least 4 tokens, a multiple of the padding granularity), up to max_length.

    Narrow buckets keep padding under ~10% within a bucket; merging neighbours keeps batches large.
    """
    step = max(4, pad_multiple)
    bounds: list[int] = []
    bound = min(16, max_length)
    while bound < max_length:
        bounds.append(bound)
        bound = math.ceil(max(bound + step, bound * 1.1) / step) * step
    bounds.append(max_length)
    return tuple(bounds)


class Place(NamedTuple):
    """Where a new text would wait: the queued text it would follow into its bucket's batch (None: it would open a
    batch of its own, behind every other bucket), and the queued tokens that run before it."""

    follows: QueuedText | None
    tokens_ahead: int


@dataclass
class _Draft:
    """A batch being assembled within `budget` tokens (padding included): its texts and its longest text. Its first
    text always fits (the policy's own budget holds one text of any length; a shared budget may be smaller)."""

    policy: BatchingPolicy
    budget: int
    items: list[QueuedText] = field(default_factory=list)
    longest: int = 0
    real_tokens: int = 0

    def room_for(self, item: QueuedText) -> FlushReason | None:
        """None when `item` fits; otherwise the limit it would break."""
        if not self.items:
            return None
        if len(self.items) >= self.policy.max_batch_size:
            return "size"
        padded = self.policy.padded_length(max(self.longest, item.tokens))
        if (len(self.items) + 1) * padded > self.budget:
            return "budget"
        return None

    def efficiency_with(self, item: QueuedText) -> float:
        padded = self.policy.padded_length(max(self.longest, item.tokens))
        return (self.real_tokens + item.tokens) / ((len(self.items) + 1) * padded)

    def add(self, item: QueuedText) -> None:
        self.items.append(item)
        self.longest = max(self.longest, item.tokens)
        self.real_tokens += item.tokens


class _CallerTexts:
    """One caller's queued texts, in length buckets, each in arrival order."""

    def __init__(self, bucket_count: int) -> None:
        self.buckets: list[deque[QueuedText]] = [deque() for _ in range(bucket_count)]
        self.bucket_tokens = [0] * bucket_count  # tokens waiting in each bucket
        self.texts = 0
        self.tokens = 0


class BatchQueue:
    """Length-bucketed queue, fair between callers. It alone owns the waiting texts: callers `append` and ask for the
    `next_batch`. With `batching="arrival"` it holds one bucket, so batches take texts strictly in arrival order.

    Each caller's texts wait in buckets of their own; the next batch is seeded from the ready caller that the model
    has served least (`fairness.VirtualTime`), and fills its room with the other callers' texts of similar length, so
    a caller that floods the queue runs only in the capacity the others leave. With one caller it is one bucketed
    queue, as before.

    It also keeps a smoothed gap between arrivals: a bucket stops waiting for partners once, at that rate, the
    next text is not expected before its window runs out. At light load a text then starts at once instead of
    idling through the window; under load the window still gathers full batches.
    """

    GAP_SMOOTHING = 0.2  # weight of the newest gap between arrivals
    SHARING_SECONDS = 5.0  # callers that queued texts this recently share the model (`sharing`)
    # Emptied callers' buckets kept for reuse: a caller whose every text has left is forgotten, and under load one
    # comes back with the next request, when making its buckets anew cost a twentieth of an admission.
    SPARE_CALLERS = 4

    def __init__(self, policy: BatchingPolicy) -> None:
        self.policy = policy
        self._bucket_count = len(policy.bucket_bounds) if policy.batching == "buckets" else 1
        self._callers: dict[str, _CallerTexts] = {}  # the callers with texts queued
        self._spare: list[_CallerTexts] = []  # emptied ones, for the next callers to arrive
        self._virtual = VirtualTime()
        self._texts = 0
        self._tokens = 0
        self._last_arrival: float | None = None
        self._mean_gap = MovingAverage(self.GAP_SMOOTHING)
        self._recent = RecentCallers(self.SHARING_SECONDS)  # the callers that queued texts within SHARING_SECONDS
        self._shared_batch_tokens: int | None = None
        # No queued text's deadline passes before this; it may lag behind removals (then it is early, never late),
        # and `remove_missed_deadlines` scans the queue only once it has passed.
        self._earliest_deadline = math.inf

    def __len__(self) -> int:
        return self._texts

    def set_max_batch_tokens(self, tokens: int) -> None:
        """Batches from now on stay within `tokens` (the batcher lowers it after an out-of-memory, then restores it)."""
        self.policy = dataclasses.replace(self.policy, max_batch_tokens=tokens)

    def set_shared_batch_tokens(self, tokens: int | None) -> None:
        """While callers share the model (`sharing`), batches stay within `tokens` (None: no other limit), so one
        caller's full batches hold up another's text only as long as a batch of that size runs. A batch still holds
        at least one text, however long."""
        self._shared_batch_tokens = tokens

    def _budget(self, now: float) -> int:
        """The tokens a batch taken at `now` may hold: the policy's, or less while callers share the model."""
        shared = self._shared_batch_tokens
        if shared is not None and shared < self.policy.max_batch_tokens and self.sharing(now):
            return shared
        return self.policy.max_batch_tokens

    def sharing(self, now: float) -> bool:
        """Whether more than one caller has texts queued, or queued texts within the last SHARING_SECONDS (an
        interactive caller's text leaves with the next batch, but its next one is on its way)."""
        if len(self._callers) > 1:
            return True
        recent = self._recent.callers(now)
        return len(recent) + sum(1 for caller in self._callers if caller not in recent) > 1

    @property
    def tokens(self) -> int:
        """Tokens of all waiting texts."""
        return self._tokens

    @property
    def callers(self) -> int:
        """Callers with texts queued."""
        return len(self._callers)

    def usage(self, caller: str) -> Usage:
        """The queued tokens in all and `caller`'s, and the callers with texts queued, `caller` counted in."""
        own = self._callers.get(caller)
        return Usage(self._tokens, own.tokens if own else 0, len(self._callers) + (own is None))

    def bucket_of(self, tokens: int) -> int:
        """Index of the narrowest bucket whose bound holds `tokens` (longer texts go to the last bucket)."""
        if self._bucket_count == 1:
            return 0
        return min(bisect.bisect_left(self.policy.bucket_bounds, tokens), len(self.policy.bucket_bounds) - 1)

    def place(self, tokens: int, caller: str = "") -> Place:
        """Where `caller`'s new text of `tokens` tokens would wait. Under a backlog each batch sweeps its bucket whole,
        oldest first text first: a text joining one of its caller's buckets leaves with it, after that caller's
        buckets whose first text is older, while the bucket and the new text fit one batch (counting every text at
        the bucket's bound); a text opening an empty bucket, or one that would not fit, waits for every token its
        caller has queued. Other callers' texts run before it only as far as their fair share (`tokens_ahead_of`)."""
        own = self._callers.get(caller)
        if own is None:
            return Place(None, self.tokens_ahead_of(caller, tokens))
        index = self.bucket_of(tokens)
        bucket = own.buckets[index]
        if not bucket:
            return Place(None, self.tokens_ahead_of(caller, tokens))
        # In arrival order the one bucket holds every length, up to the last bound.
        bound = self.policy.bucket_bounds[index if self._bucket_count > 1 else -1]
        texts = len(bucket) + 1
        if texts > self.policy.max_batch_size or texts * self.policy.padded_length(bound) > self.policy.max_batch_tokens:
            return Place(None, self.tokens_ahead_of(caller, tokens))
        first = bucket[0].arrived_at
        ahead = sum(queued for other, queued in zip(own.buckets, own.bucket_tokens) if other and other[0].arrived_at <= first)
        return Place(bucket[-1], self._with_other_callers(caller, ahead, tokens))

    def tokens_ahead_of(self, caller: str, tokens: int) -> int:
        """The queued tokens that run before `tokens` more of `caller`'s opening a batch: all of its own, and of each
        other caller's as many as it runs of its own by then (each caller gets its share in turn), at most all."""
        own = self._callers.get(caller)
        return self._with_other_callers(caller, own.tokens if own else 0, tokens)

    def _with_other_callers(self, caller: str, own_ahead: int, tokens: int) -> int:
        return own_ahead + sum(min(other.tokens, own_ahead + tokens) for name, other in self._callers.items() if name != caller)

    def append(self, item: QueuedText) -> None:
        own = self._callers.get(item.caller)
        if own is None:
            own = self._callers[item.caller] = self._spare.pop() if self._spare else _CallerTexts(self._bucket_count)
            self._virtual.activated(item.caller)
        index = self.bucket_of(item.tokens)
        own.buckets[index].append(item)
        own.bucket_tokens[index] += item.tokens
        own.texts += 1
        own.tokens += item.tokens
        self._texts += 1
        self._tokens += item.tokens
        self._earliest_deadline = min(self._earliest_deadline, item.deadline)
        self._record_arrival(item.arrived_at)
        self._recent.arrived(item.caller, item.arrived_at)

    def remove_missed_deadlines(self, now: float) -> list[QueuedText]:
        """Remove and return the texts whose deadline has passed at `now`: nobody would receive their answer."""
        if not deadline_passed(self._earliest_deadline, now):
            return []
        queued = [item for own in self._callers.values() for bucket in own.buckets for item in bucket]
        missed = {id(item) for item in missed_deadlines(queued, now)}
        every_bucket = range(self._bucket_count)
        removed = self._remove_where(lambda item: id(item) in missed, {caller: every_bucket for caller in self._callers})
        self._earliest_deadline = min(
            (item.deadline for own in self._callers.values() for bucket in own.buckets for item in bucket),
            default=math.inf,
        )
        return removed

    def remove(self, items: list[QueuedText]) -> list[QueuedText]:
        """Remove those of `items` still queued (their caller has gone) and return them; the others already left."""
        wanted = {id(item) for item in items}
        buckets: dict[str, set[int]] = {}
        for item in items:
            buckets.setdefault(item.caller, set()).add(self.bucket_of(item.tokens))
        return self._remove_where(lambda item: id(item) in wanted, buckets)

    def _remove_where(self, matches: Callable[[QueuedText], bool], bucket_indexes: Mapping[str, Iterable[int]]) -> list[QueuedText]:
        removed: list[QueuedText] = []
        for caller, indexes in bucket_indexes.items():
            own = self._callers.get(caller)
            if own is None:
                continue
            for index in sorted(indexes):
                bucket = own.buckets[index]
                if not any(matches(item) for item in bucket):
                    continue
                kept: list[QueuedText] = []
                for item in bucket:
                    (removed if matches(item) else kept).append(item)
                bucket.clear()
                bucket.extend(kept)
                own.bucket_tokens[index] = sum(item.tokens for item in kept)
            own.texts = sum(map(len, own.buckets))
            own.tokens = sum(own.bucket_tokens)
        self._texts -= len(removed)
        self._tokens -= sum(item.tokens for item in removed)
        self._forget_idle_callers()
        return removed

    def _forget_idle_callers(self) -> None:
        for caller in [caller for caller, own in self._callers.items() if not own.texts]:
            own = self._callers.pop(caller)
            if len(self._spare) < self.SPARE_CALLERS:
                self._spare.append(own)  # empty: every bucket, and with them every count
        self._virtual.forget_idle(set(self._callers))

    def _record_arrival(self, at: float) -> None:
        # Texts of one request arrive at the same instant: they are one arrival, not a zero gap.
        if self._last_arrival is not None and at > self._last_arrival:
            self._mean_gap.add(at - self._last_arrival)
        if self._last_arrival is None or at > self._last_arrival:
            self._last_arrival = at

    def _due_at(self, bucket: deque[QueuedText]) -> float:
        """When a bucket is due (stops waiting for partners): its window's end, less the expected wait for the next
        arrival."""
        return bucket[0].arrived_at + self.policy.window - (self._mean_gap.value or 0.0)

    def wake_at(self) -> float | None:
        """When the queue next needs attention: a bucket falls due, or a text's deadline may pass (None when the
        queue is empty)."""
        due = [self._due_at(bucket) for own in self._callers.values() for bucket in own.buckets if bucket]
        return min(min(due), self._earliest_deadline) if due else None

    def next_batch(self, now: float) -> Batch | None:
        """The batch to run now, removed from the queue; None when every batch should keep filling.

        Of the callers with a bucket ready, the one the model has served least seeds it. Within a caller, buckets
        that are due (window run out, or no partner expected within it) go first, oldest first, so no text starves
        behind a stream of full batches; otherwise the longest-waiting full bucket goes. While callers share the
        model (`sharing`), batches stay within the shared budget (`set_shared_batch_tokens`).
        """
        budget = self._budget(now)
        chosen: tuple[tuple[float, bool, float], str, int] | None = None
        for caller, own in self._callers.items():
            ready = self._ready_bucket(own, now, budget)
            if ready is None:
                continue
            due, index = ready
            key = (self._virtual.tag(caller), not due, own.buckets[index][0].arrived_at)
            if chosen is None or key < chosen[0]:
                chosen = (key, caller, index)
        if chosen is None:
            return None
        return self._take(chosen[1], chosen[2], budget)

    def _ready_bucket(self, own: _CallerTexts, now: float, budget: int) -> tuple[bool, int] | None:
        """The caller's bucket to seed a batch now, and whether it is due (else full); None when none is ready."""
        due, full = [], []
        for index, bucket in enumerate(own.buckets):
            if not bucket:
                continue
            if now >= self._due_at(bucket):  # the same sum as wake_at, so waking on time finds it due
                due.append(index)
            elif self._fills_a_batch(bucket, budget):
                full.append(index)
        ready = due or full
        if not ready:
            return None
        return bool(due), min(ready, key=lambda i: own.buckets[i][0].arrived_at)

    def _fills_a_batch(self, bucket: deque[QueuedText], budget: int) -> bool:
        draft = _Draft(self.policy, budget)
        for item in bucket:
            if draft.room_for(item) is not None:
                return True
            draft.add(item)
        return False

    def _take(self, caller: str, seed: int, budget: int) -> Batch:
        """Assemble a batch from `caller`'s bucket `seed` (oldest first), then from the other callers' same bucket
        (least served first), then from the neighbouring buckets, and dequeue it; flushed by its window unless a limit
        filled it. The seeding caller moves the virtual time up to its tag; each caller is charged its texts' tokens."""
        others = sorted((name for name in self._callers if name != caller), key=self._virtual.tag)
        callers = [self._callers[name] for name in (caller, *others)]
        draft = _Draft(self.policy, budget)
        reason: FlushReason | None = None
        for own in callers:
            reason = self._fill_from_seed(draft, own.buckets[seed])
            if reason is not None:
                break
        if reason is None:
            reason = self._fill_from_neighbours(draft, seed, callers)
        self._virtual.seeded(caller)
        for item in draft.items:
            own = self._callers[item.caller]
            own.bucket_tokens[self.bucket_of(item.tokens)] -= item.tokens
            own.texts -= 1
            own.tokens -= item.tokens
            self._virtual.served(item.caller, item.tokens)
        self._texts -= len(draft.items)
        self._tokens -= draft.real_tokens
        self._forget_idle_callers()
        return Batch(draft.items, self.policy.padded_length(draft.longest), reason or "window")

    def _fill_from_seed(self, draft: _Draft, bucket: deque[QueuedText]) -> FlushReason | None:
        while bucket:
            limit = draft.room_for(bucket[0])
            if limit is not None:
                return limit
            draft.add(bucket.popleft())
        return None

    def _fill_from_neighbours(self, draft: _Draft, seed: int, callers: list[_CallerTexts]) -> FlushReason | None:
        """Take texts from adjacent buckets (each caller's, in `callers`' order), nearest first, while padding
        efficiency stays above the floor.

        Returns the limit that stopped the batch, or None when the neighbours simply ran out.
        """
        below, above = seed - 1, seed + 1
        while below >= 0 or above < self._bucket_count:
            for index in (below, above):
                if not 0 <= index < self._bucket_count:
                    continue
                merged_all = True
                for own in callers:
                    limit, merged = self._merge_bucket(draft, own.buckets[index])
                    merged_all = merged_all and merged
                    if limit is not None:
                        return limit
                if not merged_all:  # texts further out would pad even worse
                    if index == below:
                        below = -1
                    else:
                        above = self._bucket_count
            below = below - 1 if below >= 0 else below
            above = above + 1 if above < self._bucket_count else above
        return None

    def _merge_bucket(self, draft: _Draft, bucket: deque[QueuedText]) -> tuple[FlushReason | None, bool]:
        """Move the texts of `bucket` that keep the draft above the efficiency floor into it, oldest first.

        Returns the limit that filled the draft (or None), and whether every text of the bucket was taken.
        """
        kept: list[QueuedText] = []
        limit = None
        while bucket:
            item = bucket.popleft()
            if limit is None:
                limit = draft.room_for(item)
            # Under fixed padding every batch costs the same whichever texts join it.
            pads_the_same = self.policy.padding == "fixed"
            if limit is None and (pads_the_same or draft.efficiency_with(item) >= self.policy.merge_min_efficiency):
                draft.add(item)
            else:
                kept.append(item)
        bucket.extend(kept)
        return limit, not kept
