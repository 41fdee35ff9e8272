"""Names the calling OS thread, as ps, top, py-spy and /proc/<pid>/task/<tid>/comm show it: on a process's main thread
that is the process's name. loadtest/frontend_benchmark.py splits the engine process's CPU by these names."""

import contextlib
import ctypes

PR_SET_NAME = 15
MAX_LENGTH = 15  # bytes the kernel keeps


def name_this_thread(name: str) -> None:
    """Name the calling OS thread (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:MAX_LENGTH], 0, 0, 0)
