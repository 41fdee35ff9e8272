"""The default model's cache directory: checked before a build (it exists or can be created, takes a new file, has
room for the build), and a build lock, so that processes sharing one cache (replicas on one node sharing a volume)
build the model once: the first builds, the others wait, logging for whom, and load what it built.

The lock is `flock` on a file in the cache directory. It is released when its holder's file is closed, so also when
the holder dies (SIGKILL, out of memory): a crashed build never blocks the others. Every process sharing a local
filesystem, containers included, sees it. On NFS, Linux turns `flock` into a lock held by the server: it holds
across nodes only where the server supports locking (NFSv4, or NFSv3 with the lock manager); mounted `nolock`, it
covers one node only, and replicas on two nodes could build at once (docs/operations.md says what to do).

Torch-free, so that the checks and the lock are tested quickly across real processes.
"""

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 2**20
# What a build of the default model writes, with a margin: its directory measured 91,594,752 bytes allocated
# (87.4 MiB, 2026-12-07), written into a staging directory beside it and renamed into place; TMPDIR and HF_HOME
# stayed empty. A rebuild over an existing model keeps the old one until the rename, so this is needed free either way.
BUILD_BYTES = 128 * MIB
SETTING_HINT = "set CLASSIFIER_CACHE_DIR to a writable directory with {mib} MiB free, or MODEL to a checkpoint directory"
LOCK_POLL_SECONDS = 0.2  # how often a waiting process tries the lock again
WAIT_REMINDER_SECONDS = 60.0  # how often a waiting process logs that it still waits


class CacheDirUnusable(RuntimeError):
    """The cache directory cannot take a build; the message names the directory, what is wrong and the setting."""


def staging_prefix(model_name: str) -> str:
    """The name prefix of the directory a build of `model_name` writes before renaming it into place."""
    return f".{model_name}.building-"


def retired_prefix(model_name: str) -> str:
    """The name prefix of the directory an old build of `model_name` is moved into before it is deleted."""
    return f".{model_name}.old-"


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding `directory`."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def _unusable(directory: Path, problem: str, needed_bytes: int) -> CacheDirUnusable:
    mib = -(-needed_bytes // MIB)
    return CacheDirUnusable(f"cache directory {directory} {problem}: {SETTING_HINT.format(mib=mib)}")


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def check_writable(directory: Path, needed_bytes: int = BUILD_BYTES) -> None:
    """Create `directory` if it is missing and create a file in it; raise CacheDirUnusable when either fails
    (`needed_bytes` only completes the hint)."""
    if directory.exists() and not directory.is_dir():
        raise _unusable(directory, "is not a directory", needed_bytes)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unusable(directory, f"cannot be created ({_reason(error)})", needed_bytes) from error
    try:
        # Permission bits alone do not tell: root ignores them, and a read-only mount or a full quota still refuses.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise _unusable(directory, f"is not writable ({_reason(error)})", needed_bytes) from error


def check_space(directory: Path, needed_bytes: int = BUILD_BYTES) -> None:
    """Raise CacheDirUnusable when the filesystem holding `directory` has less than `needed_bytes` free."""
    free = free_bytes(directory)
    if free < needed_bytes:
        problem = f"has {free / MIB:.0f} MiB free, and building the default model needs {needed_bytes / MIB:.0f} MiB"
        raise _unusable(directory, problem, needed_bytes)


def remove_stale_builds(directory: Path, model_name: str) -> list[Path]:
    """Delete what killed builds of `model_name` left in `directory` (staging and retired directories); only the
    holder of the build lock may call it, since no other build can be running then. Returns what it deleted."""
    stale = [entry for entry in directory.iterdir() if entry.name.startswith((staging_prefix(model_name), retired_prefix(model_name)))]
    for entry in stale:
        log.warning("removing %s, left by a build that did not finish", entry)
        shutil.rmtree(entry, ignore_errors=True)
    return stale


def _holder() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})


def describe_holder(content: str) -> str:
    """Who holds the lock, from what the holder wrote into the lock file ("pid 12 on host web-1 (since 06:30:01
    UTC)"), or "a process that has not said who it is yet" while the holder has not written it."""
    try:
        holder = json.loads(content)
        since = time.strftime("%H:%M:%S UTC", time.gmtime(holder["since"]))
        return f"pid {holder['pid']} on host {holder['host']} (since {since})"
    except (ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_holder(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


@contextmanager
def build_lock(
    directory: Path,
    model_name: str,
    *,
    poll_seconds: float = LOCK_POLL_SECONDS,
    reminder_seconds: float = WAIT_REMINDER_SECONDS,
) -> Iterator[None]:
    """Hold the lock on building `model_name` in `directory` for the block, first waiting for it as long as another
    process holds it (logging who holds it, again whenever that changes and every `reminder_seconds`)."""
    path = directory / f".{model_name}.lock"
    # The file stays: deleting it while another process waits on it would let a third lock a new file beside it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            _wait(fd, path, model_name, poll_seconds, reminder_seconds)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a finished holder is named nowhere; a killed one is overwritten by the next
    finally:
        os.close(fd)  # releases the lock


def _wait(fd: int, path: Path, model_name: str, poll_seconds: float, reminder_seconds: float) -> None:
    started = reminded = time.monotonic()
    holder = None
    while True:
        current = describe_holder(_read_holder(fd))
        now = time.monotonic()
        if current != holder:
            log.warning(
                "waiting for %s, which is building %s in %s (lock %s); this process loads the result",
                current,
                model_name,
                path.parent,
                path,
            )
            holder, reminded = current, now
        elif now - reminded >= reminder_seconds:
            log.info("still waiting for %s to build %s (%.0f s so far)", holder, model_name, now - started)
            reminded = now
        time.sleep(poll_seconds)
        if _try_lock(fd):
            log.info("build lock %s taken after %.0f s of waiting", path, time.monotonic() - started)
            return


def build_once(
    model_dir: Path,
    is_built: Callable[[Path], bool],
    build: Callable[[Path], object],
    *,
    force: bool = False,
    needed_bytes: int = BUILD_BYTES,
) -> bool:
    """Build `model_dir` (with `build`) unless it is built, once among the processes sharing its cache directory;
    with `force`, build it even if it is. The directory is checked first (CacheDirUnusable), then the build lock is
    taken (waiting while another process builds); a process that finds the model built once it holds the lock
    leaves it as it is. Returns whether this process built it."""
    cache = model_dir.parent
    check_writable(cache, needed_bytes)
    with build_lock(cache, model_dir.name):
        if not force and is_built(model_dir):
            log.info("%s was built by another process meanwhile: loading it", model_dir)
            return False
        remove_stale_builds(cache, model_dir.name)  # before the space check: what they hold is free again
        check_space(cache, needed_bytes)
        build(model_dir)
        return True
