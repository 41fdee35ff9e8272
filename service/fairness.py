"""Fair share between callers: pure decisions, no clock, no I/O.

Two resources are shared: the queue (its tokens, and which texts seed the next batch) and the HTTP slots
(`max_concurrent_requests`, held from a request's headers to its response, so a stalled upload holds one too).

Batches: start-time fair queueing across callers. Each caller has a virtual finish tag, the tokens the model has run
for it; the next batch is seeded by the ready caller whose tag is smallest, and a caller that becomes active starts at
the virtual time now (the smallest tag served last), so an idle caller banks no credit and a greedy one cannot run
ahead of a newcomer for longer than one batch. The batch then fills its room with other callers' texts of similar
length, so a greedy caller still gets every token of capacity the others leave.

Limits: each caller's fair share of a limit is the limit divided by the active callers (it included). A caller over
its share is held to the limit itself; a caller under it may still go `headroom` beyond, so a greedy caller that has
filled the queue (or every slot) on its own is refused first, never the newcomer under its share. One caller alone is
never over its share: alone, the limit is what it was.

Retry-After: a caller the queue refused and told to retry after some seconds is refused again at once, unread, if it
comes back sooner (`RetryAfterBook`). Its refusals otherwise cost what admission costs: the body read and parsed,
every text tokenized. A greedy caller retrying its 256-text requests every second while its own backlog held it back
for minutes spent one core tokenizing texts that were refused, and kept the event loop busy, and the interactive
caller beside it waited seconds for both.
"""

from collections import OrderedDict
from collections.abc import KeysView
from typing import Literal, NamedTuple

Exceeded = Literal["fair_share", "full"]


class Usage(NamedTuple):
    """How much of a limited resource is in use: in all, by the caller asking for more, and by how many callers
    (those holding any, the asking caller included)."""

    total: int
    caller: int
    active_callers: int


def fair_share(limit: int, active_callers: int) -> float:
    """Each active caller's share of `limit`."""
    return limit / max(1, active_callers)


def exceeded(usage: Usage, adding: int, limit: int, headroom: float) -> Exceeded | None:
    """Whether `adding` more for the asking caller breaks `limit`: "fair_share" when the caller would be over its
    share and the total over the limit (for a caller alone, that is "full"), "full" when the total would pass even the
    headroom callers under their share may use (`headroom`, a fraction of the limit), else None."""
    total = usage.total + adding
    if usage.caller + adding > fair_share(limit, usage.active_callers) and total > limit:
        return "fair_share" if usage.active_callers > 1 else "full"
    if total > limit * (1 + headroom):
        return "full"
    return None


class VirtualTime:
    """Start-time fair queueing's bookkeeping: each caller's virtual finish tag (the tokens run for it, counted from
    when it last became active) and the virtual time now. Callers are plain strings; a caller's tag is forgotten once
    it has nothing queued and the virtual time has passed it (or nothing at all is queued), so memory follows the active
    callers."""

    def __init__(self) -> None:
        self.now = 0.0
        self._finish: dict[str, float] = {}

    def tag(self, caller: str) -> float:
        """The caller's virtual finish tag: the smaller, the sooner it seeds a batch."""
        return self._finish.get(caller, self.now)

    def activated(self, caller: str) -> None:
        """`caller` has texts queued again: it starts from the virtual time now, unless it was served past it."""
        self._finish[caller] = max(self._finish.get(caller, self.now), self.now)

    def served(self, caller: str, tokens: int) -> None:
        """The model is about to run `tokens` of `caller`'s texts."""
        self._finish[caller] = self.tag(caller) + tokens

    def seeded(self, caller: str) -> None:
        """`caller`'s tag was the smallest of the ready callers: the virtual time moves up to it."""
        self.now = max(self.now, self.tag(caller))

    def forget_idle(self, active: set[str]) -> None:
        """Drop the tags of callers outside `active` that the virtual time has passed: they restart at it anyway. Once
        no caller is active the busy period is over and every tag goes: nobody is owed anything, and a stream of
        callers each served alone (which never moves the virtual time) leaves nothing behind."""
        if not active:
            self._finish.clear()
            return
        for caller in [caller for caller, finish in self._finish.items() if caller not in active and finish <= self.now]:
            del self._finish[caller]

    def __len__(self) -> int:
        return len(self._finish)


class RecentCallers:
    """Each caller's last arrival within the last `window` seconds, the latest last (arrivals come in time order); at
    most `capacity` callers, the earliest going first. Memory follows the callers seen lately."""

    def __init__(self, window: float, capacity: int = 10_000) -> None:
        self.window = window
        self.capacity = capacity
        self._last: OrderedDict[str, float] = OrderedDict()

    def arrived(self, caller: str, now: float) -> None:
        """`caller` sent something at `now`."""
        self._last.pop(caller, None)  # to the end: the latest last
        self._last[caller] = now
        self._forget_before(now - self.window)
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def callers(self, now: float) -> KeysView[str]:
        """The callers that arrived within `window` of `now`."""
        self._forget_before(now - self.window)
        return self._last.keys()

    def any_other_than(self, caller: str, now: float) -> bool:
        """Whether a caller other than `caller` arrived within `window` of `now`."""
        recent = self.callers(now)
        return len(recent) > 1 or (len(recent) == 1 and caller not in recent)

    def _forget_before(self, moment: float) -> None:
        while self._last:
            caller, arrived_at = next(iter(self._last.items()))
            if arrived_at >= moment:
                return
            del self._last[caller]


class RetryAfterBook:
    """The callers told to retry after `HELD_FROM_SECONDS` or more, and until when, held to it while another caller
    has arrived within `OTHERS_WITHIN_SECONDS`: the hold protects the others from a caller whose refused requests cost
    them. A caller alone (one upstream service behind one address, a benchmark) is refused request by request, as
    each request fits or not; a Retry-After of a second says room comes any moment, and holds nobody.

    Times are the caller's clock's, passed in. At most `capacity` callers are kept in each record (the earliest go
    first), and a held caller's entry goes once its time has passed."""

    HELD_FROM_SECONDS = 2.0
    OTHERS_WITHIN_SECONDS = 5.0

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._until: OrderedDict[str, float] = OrderedDict()
        self._arrived = RecentCallers(self.OTHERS_WITHIN_SECONDS, capacity)

    def arrived(self, caller: str, now: float) -> None:
        """A request of `caller`'s came at `now`."""
        self._arrived.arrived(caller, now)

    def told(self, caller: str, retry_after: float, now: float) -> None:
        """`caller` was refused at `now` and told to retry after `retry_after` seconds."""
        if retry_after < self.HELD_FROM_SECONDS:
            return
        self._until.pop(caller, None)
        self._until[caller] = now + retry_after
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def seconds_left(self, caller: str, now: float) -> float:
        """How long `caller` is still held back (0: not held)."""
        until = self._until.get(caller)
        if until is None:
            return 0.0
        if until <= now:
            del self._until[caller]
            return 0.0
        return until - now if self._arrived.any_other_than(caller, now) else 0.0
