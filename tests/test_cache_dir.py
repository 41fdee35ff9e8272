"""The cache directory's checks before a default-model build, and the build lock across real processes (a fake build
of a second or so stands in for the real one's minutes)."""

import calendar
import errno
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Not from tests.conftest, which imports torch: the spawned children import this module, and start in well under a
# second without it.
from loadtest.probe import ROOT, free_port
from service import cache_dir
from service.cache_dir import (
    CacheDirUnusable,
    build_lock,
    build_once,
    check_space,
    check_writable,
    describe_holder,
    free_bytes,
    remove_stale_builds,
    staging_prefix,
)

MODEL = "default-model-v1"
BOUND = 60  # seconds any wait may take on a loaded machine
SPAWN = multiprocessing.get_context("spawn")  # children start clean: no torch, no threads inherited


def assert_one_actionable_line(error: CacheDirUnusable, directory: Path, problem: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"cache directory {directory} {problem}"), message
    assert "CLASSIFIER_CACHE_DIR" in message and "MiB free" in message


# ---------------------------------------------------------------- checks


def test_a_missing_cache_directory_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "cache"
    check_writable(target)
    assert target.is_dir()
    assert list(target.iterdir()) == []  # the write check leaves nothing behind


def test_a_cache_directory_that_cannot_be_created_is_named_with_the_reason(tmp_path):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "cache"  # below a regular file: refused even to root
    with pytest.raises(CacheDirUnusable) as caught:
        check_writable(target)
    assert_one_actionable_line(caught.value, target, "cannot be created (Not a directory)")


def test_a_file_in_place_of_the_cache_directory_is_named(tmp_path):
    target = tmp_path / "cache"
    target.write_text("")
    with pytest.raises(CacheDirUnusable) as caught:
        check_writable(target)
    assert_one_actionable_line(caught.value, target, "is not a directory")


def test_a_read_only_cache_directory_is_refused(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    target.chmod(0o555)
    try:
        try:
            (target / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("permission bits do not stop this user's writes (root)")
        with pytest.raises(CacheDirUnusable) as caught:
            check_writable(target)
        assert_one_actionable_line(caught.value, target, "is not writable (Permission denied)")
    finally:
        target.chmod(0o755)


def test_a_write_the_filesystem_refuses_is_named_with_the_reason(tmp_path, monkeypatch):
    # A read-only mount refuses root too; the file system's refusal is what the check meets.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cache_dir.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(CacheDirUnusable) as caught:
        check_writable(tmp_path)
    assert_one_actionable_line(caught.value, tmp_path, "is not writable (Read-only file system)")


def test_too_little_free_space_names_what_is_free_and_what_the_build_needs(tmp_path):
    check_space(tmp_path, needed_bytes=1)
    needed = free_bytes(tmp_path) + 2**30
    with pytest.raises(CacheDirUnusable) as caught:
        check_space(tmp_path, needed_bytes=needed)
    assert_one_actionable_line(caught.value, tmp_path, "has ")
    assert f"needs {needed / 2**20:.0f} MiB" in str(caught.value)
    assert f"with {-(-needed // 2**20)} MiB free" in str(caught.value)


def test_stale_builds_are_removed_and_nothing_else(tmp_path):
    for name in (f"{staging_prefix(MODEL)}abc", f".{MODEL}.old-def", MODEL, f"{staging_prefix('other-model')}x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
    removed = remove_stale_builds(tmp_path, MODEL)
    assert sorted(path.name for path in removed) == [f".{MODEL}.building-abc", f".{MODEL}.old-def"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{staging_prefix('other-model')}x", MODEL]


def test_the_holder_is_described_from_the_lock_file():
    since = calendar.timegm((2026, 12, 7, 6, 30, 1, 0, 0, 0))
    assert describe_holder(f'{{"pid": 12, "host": "web-1", "since": {since}}}') == "pid 12 on host web-1 (since 06:30:01 UTC)"
    for unwritten in ("", "{", '{"pid": 12}', "[]"):
        assert describe_holder(unwritten) == "a process that has not said who it is yet"


# ---------------------------------------------------------------- the lock, across processes


def _is_built(model_dir: Path) -> bool:
    return (model_dir / "built").exists()


def _fake_build(model_dir: Path) -> None:
    """What a build does to the cache, in about a second: a staging directory renamed into place."""
    staging = model_dir.parent / f"{staging_prefix(model_dir.name)}{os.getpid()}"
    staging.mkdir()
    time.sleep(1.0)
    (staging / "built").write_text(str(os.getpid()))
    with (model_dir.parent / "builds.log").open("a") as builds:
        builds.write(f"{os.getpid()}\n")
    os.replace(staging, model_dir)


def _build_in_child(model_dir: Path, log_path: Path, start: "multiprocessing.synchronize.Barrier") -> None:
    """build_once, both children at once; the log says what it did, and last whether this process built."""
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(message)s")
    start.wait(BOUND)
    built = build_once(model_dir, _is_built, _fake_build)
    logging.info("built by this process: %s", built)


def _crash_while_building(model_dir: Path) -> None:
    def build_then_die(target: Path) -> None:
        (target.parent / f"{staging_prefix(target.name)}{os.getpid()}").mkdir()
        os.kill(os.getpid(), signal.SIGKILL)

    build_once(model_dir, _is_built, build_then_die)


def _hold_lock(directory: Path, held: "multiprocessing.synchronize.Event") -> None:
    with build_lock(directory, MODEL):
        held.set()
        time.sleep(BOUND * 2)  # until killed


def test_two_processes_sharing_a_cache_build_once_and_the_other_waits_and_loads_it(tmp_path):
    model_dir = tmp_path / "cache" / MODEL
    start = SPAWN.Barrier(2)
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    children = [SPAWN.Process(target=_build_in_child, args=(model_dir, log, start)) for log in logs]
    for child in children:
        child.start()
    for child in children:
        child.join(BOUND)
    assert [child.exitcode for child in children] == [0, 0]
    said = [log.read_text() for log in logs]
    built = [text.splitlines()[-1] == "INFO built by this process: True" for text in said]
    assert sorted(built) == [False, True], said
    [builder] = (model_dir.parent / "builds.log").read_text().split()
    assert (model_dir / "built").read_text() == builder == str(children[built.index(True)].pid)
    waiter_log = said[built.index(False)]
    assert f"waiting for pid {builder} on host {socket.gethostname()} (since " in waiter_log
    assert f"{model_dir} was built by another process meanwhile: loading it" in waiter_log
    assert sorted(path.name for path in model_dir.parent.iterdir()) == [f".{MODEL}.lock", "builds.log", MODEL]


def test_a_build_killed_while_holding_the_lock_blocks_nothing_and_its_leftovers_are_removed(tmp_path):
    model_dir = tmp_path / MODEL
    crashed = SPAWN.Process(target=_crash_while_building, args=(model_dir,))
    crashed.start()
    crashed.join(BOUND)
    assert crashed.exitcode == -signal.SIGKILL
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(staging_prefix(MODEL))]
    assert build_once(model_dir, _is_built, _fake_build) is True
    assert sorted(path.name for path in tmp_path.iterdir()) == [f".{MODEL}.lock", "builds.log", MODEL]


def test_a_waiter_says_for_whom_it_waits_and_takes_the_lock_once_the_holder_dies(tmp_path, caplog):
    held = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lock, args=(tmp_path, held))
    holder.start()
    try:
        assert held.wait(BOUND)
        taken = threading.Event()

        def wait_for_the_lock() -> None:
            with build_lock(tmp_path, MODEL, poll_seconds=0.05, reminder_seconds=0.2):
                taken.set()

        with caplog.at_level(logging.INFO, logger="service.cache_dir"):
            waiter = threading.Thread(target=wait_for_the_lock)
            waiter.start()
            deadline = time.monotonic() + BOUND
            while "still waiting" not in caplog.text:
                assert time.monotonic() < deadline and not taken.is_set(), caplog.text
                time.sleep(0.05)
            os.kill(holder.pid, signal.SIGKILL)
            waiter.join(BOUND)
        assert taken.is_set()
    finally:
        holder.kill()
        holder.join(BOUND)
    assert f"waiting for pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert f"still waiting for pid {holder.pid}" in caplog.text
    assert (tmp_path / f".{MODEL}.lock").read_text() == ""  # a finished holder is named nowhere


# ---------------------------------------------------------------- the default model


def test_an_unusable_cache_directory_is_refused_before_the_default_model_build(tmp_path, monkeypatch):
    from service import default_model  # imports torch: only this test needs it

    monkeypatch.setattr(default_model, "build_default_model", lambda *a, **k: pytest.fail("built anyway"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheDirUnusable) as caught:
        default_model.ensure_default_model(tmp_path / "file" / "cache")
    assert_one_actionable_line(caught.value, tmp_path / "file" / "cache", "cannot be created")


@pytest.mark.integration
def test_the_service_exits_1_with_one_line_naming_an_unusable_cache_directory(tmp_path):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"
    env = {**os.environ, "CLASSIFIER_CACHE_DIR": str(cache), "CLASSIFIER_TORCH_THREADS": "1"}
    env.pop("MODEL", None)
    completed = subprocess.run(
        [sys.executable, "-m", "service", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BOUND * 2,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output
    [line] = [line for line in output.splitlines() if "CacheDirUnusable" in line]
    assert "ERROR" in line and f"cache directory {cache} cannot be created" in line and "CLASSIFIER_CACHE_DIR" in line
    assert "building the default model" not in output
