"""Each caller's turn at the event loop's intake: the requests of one caller whose bodies are being read and parsed.

A greedy caller's requests all arriving at once (200 bodies of 180 KB) were read and parsed one after the other on
the event loop, and another caller's request arriving then waited behind all of them: 0.5-0.8 s for a single text
that takes 30 ms alone. While other callers are calling, each caller has at most `per_caller` requests in intake at
once; its others wait, unread, in the order they came (the socket stops being read once its buffer fills), and count
against its share of the slots meanwhile. A request leaves intake when its texts go to the engine, or when it ends.
A caller alone is not held: it has nobody to wait for.
"""

import asyncio
from collections import deque
from collections.abc import Callable


class Intake:
    """The requests in intake by caller, and the ones waiting for a turn (see the module's docstring)."""

    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._reading: dict[str, int] = {}  # requests in intake, by caller (callers with none are absent)
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    async def enter(self, caller: str, others_calling: bool) -> Callable[[], None]:
        """Wait for `caller`'s turn (at once while it has fewer than `per_caller` in intake, or while nobody else
        calls); returns the call that ends it, which is safe to call again. Cancelled while waiting, the turn is not
        taken."""
        reading = self._reading.get(caller, 0)
        if reading < self.per_caller or not others_calling:
            self._reading[caller] = reading + 1
        else:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(caller, deque()).append(turn)
            try:
                await turn  # given by a request of the same caller leaving intake, which counted it in
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # handed over just before: pass it on
                    self._leave(caller)
                else:
                    self._forget(caller, turn)
                raise
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self._leave(caller)

        return leave

    def reading(self, caller: str) -> int:
        """How many of `caller`'s requests are in intake now."""
        return self._reading.get(caller, 0)

    def _leave(self, caller: str) -> None:
        reading = self._reading[caller] - 1
        waiting = self._waiting.get(caller)
        while waiting and reading < self.per_caller:  # the next ones in line take the turns freed
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                reading += 1
        if waiting is not None and not waiting:
            del self._waiting[caller]
        if reading:
            self._reading[caller] = reading
        else:
            del self._reading[caller]

    def _forget(self, caller: str, turn: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(caller)
        if waiting is not None and turn in waiting:
            waiting.remove(turn)
            if not waiting:
                del self._waiting[caller]
