"""Native memory the process would otherwise keep after load: oneDNN's primitive cache and glibc's free heap.

Measured under the chaos run (docs/design.md, "What holds the memory (RSS)"): bf16 matmuls on the CPU go
through oneDNN, which compiles and caches one primitive per distinct matrix shape, and batch shapes (texts x padded
length) are nearly all distinct; its default cache of 1,024 primitives held ~180 MiB of the inference thread's heap
once full. And glibc keeps the pages of freed activations and request bodies: malloc_trim gave back ~250 MiB
after an overload run. The cache is capped at start-up; free heap pages go back to the OS once requests stop.
"""

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def cap_primitive_caches(onednn: int, torch: int) -> None:
    """Cap the two caches of compiled oneDNN primitives: oneDNN's own at `onednn` (0 = none cached), and the one
    PyTorch keeps in front of it (ideep's LRU cache) at `torch` (at least 1: 0 crashes PyTorch). Both are read when
    the first primitive is created, so this must run before the model does (the command calls it at start)."""
    if torch < 1:
        raise ValueError("PyTorch's primitive cache needs a capacity of at least 1")
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(onednn)
    os.environ["LRU_CACHE_CAPACITY"] = str(torch)


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_heap() -> float:
    """Give the free pages of every glibc heap back to the OS; returns the seconds it took (0 without glibc)."""
    if _MALLOC_TRIM is None:
        return 0.0
    started = time.perf_counter()
    _MALLOC_TRIM(0)
    return time.perf_counter() - started


class IdleTrim:
    """Decides when to release free heap pages: once per quiet spell, after `idle_seconds` without a request
    arriving or running, and only when requests came since the last release (an idle server is not trimmed
    every tick). Pure: the caller passes the time and its request counts."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._requests_seen = 0
        self._quiet_since: float | None = None
        self._requests_at_release = 0

    def due(self, now: float, requests_seen: int, in_flight: int) -> bool:
        """True when the heap should be released now; `requests_seen` counts every request so far."""
        if in_flight:
            self._requests_seen, self._quiet_since = requests_seen, None
            return False
        if requests_seen != self._requests_seen or self._quiet_since is None:
            self._requests_seen, self._quiet_since = requests_seen, now
        if self.idle_seconds <= 0 or requests_seen == self._requests_at_release:
            return False
        if now - self._quiet_since < self.idle_seconds:
            return False
        self._requests_at_release = requests_seen
        return True
