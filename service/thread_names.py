"""Names the calling OS thread, as ps, top, py-spy and /proc/<pid>/task/<tid>/comm show it: on a process's main thread
that is the process's name. loadtest/frontend_benchmark.py splits the engine process's CPU by these names. And lowers
a thread's CPU priority, for work that should take only the cores the others leave."""

import contextlib
import ctypes
import os
import sys
import threading

PR_SET_NAME = 15
MAX_LENGTH = 15  # bytes the kernel keeps


def name_this_thread(name: str) -> None:
    """Name the calling OS thread (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:MAX_LENGTH], 0, 0, 0)


def lower_this_threads_priority(niceness: int) -> None:
    """Raise the calling OS thread's nice value by `niceness` (Linux, where each thread has its own; elsewhere, or
    where the OS refuses, nothing happens): the scheduler then gives the process's other threads the cores first."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + niceness))
