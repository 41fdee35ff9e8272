"""`--workers N` (N > 1): N API processes in front of one engine process, under one supervising process.

- The **engine process** loads the model once and builds only the back half of the engine (queue, scheduler,
  batcher, device: `service.loading.build_backend`), served over `service.ipc` to every API process, so batches
  form across all callers. It publishes the facts it was built with (`EngineFacts`) and how it batches.
- Each **API process** runs the HTTP server on the shared listening socket with the engine's front half: request
  validation, tokenization, ranking into results, built from the facts the engine process publishes. Its back half
  is `service.ipc.RemoteBackend`, which sends token ids to the engine process; the façade (`service.engine.Engine`)
  is the same object as in one process.
- The **supervisor** (the process started as `python -m service`) binds the socket, starts the others, forwards
  SIGTERM and SIGINT, and exits with a status that tells the orchestrator what happened: 0 after a clean drain;
  1 when the model cannot load, when the engine process dies (the API processes answer 503 meanwhile), when an
  API process dies, or when a shutdown outlasts its grace period.

Shutdown: the supervisor sends SIGTERM to the API processes, which drain as a single process does (`/ready` 503 for
the drain delay, listener closed, open requests answered by the engine, still running); once they have all exited,
the engine process gets SIGTERM and answers whatever is still queued, then exits.

Metrics: every process writes its samples to `PROMETHEUS_MULTIPROC_DIR` (a private temporary directory unless set),
and every API process serves the sum over all processes at /metrics (`service.metrics.EXPOSITION_REGISTRY`).
"""

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, MutableSequence
from multiprocessing.connection import wait as wait_for_exit
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvloop

from service import request_ids
from service.engine import Engine, EngineFacts
from service.errors import LoadFailed, NotReady
from service.ipc import Call, EngineServer, EngineState, EngineStatus, Outcome
from service.loading import build_backend, load_engine, load_failure_reason
from service.scorer import Scorer
from service.server import freeze_loaded_heap
from service.settings import Settings
from service.thread_names import name_this_thread

log = logging.getLogger(__name__)


def worker_count(settings: Settings) -> int:
    """`CLASSIFIER_WORKERS`, or the per-device default: 1 on a CPU, where inference needs every core; on CUDA, one
    API process per core up to 4, since the device then waits on the CPU side."""
    if settings.workers is not None:
        return settings.workers
    import torch

    on_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    return min(4, os.cpu_count() or 1) if on_cuda else 1


# --- the API processes' side ---

# One byte per API process in shared memory: 1 once it has loaded (a multiprocessing RawArray).
LoadedFlags = MutableSequence[int]


def _serve_api(settings: Settings, address: str, listener: socket.socket, index: int, loaded: LoadedFlags) -> None:
    """An API process: the HTTP server on the shared socket, its engine in the engine process. `loaded`: a flag per
    API process, set once it has loaded; /ready answers 200 once every flag is set."""
    from service.api import create_app
    from service.server import ClassifierServer

    _become(f"clf-api-{index}", settings)

    async def load(settings: Settings) -> Engine:
        engine = await load_engine(settings, engine_address=address)
        loaded[index] = 1
        return engine

    server = ClassifierServer(create_app(settings, load, replica_loaded=lambda: all(loaded)), settings)
    server.run(sockets=[listener])
    raise SystemExit(1 if server.failure is not None else 0)


# --- the engine process ---


def _serve_engine(settings: Settings, address: str) -> None:
    _become("clf-engine", settings)
    # uvloop, as uvicorn runs the API processes: asyncio's pure-Python loop cost the engine a third more per request.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        raise SystemExit(runner.run(_engine_main(settings, address)))


class _EngineProcess:
    """What the engine process knows of itself: its status, why loading failed, and once loaded, its back half."""

    def __init__(self) -> None:
        self.status: EngineStatus = "loading"
        self.failure: str | None = None
        self.backend: Scorer | None = None
        self.facts: EngineFacts | None = None

    def begin(self, token_ids: list[list[int]], deadline: float, caller: str, on_done: Callable[[Outcome], None]) -> Call:
        if self.backend is None:  # API processes ask only once it is ready; refused as in one process
            raise LoadFailed(self.failure) if self.failure is not None else NotReady()
        return self.backend.begin(token_ids, deadline, caller, on_done)

    def together(self) -> contextlib.AbstractContextManager:
        """What `EngineServer` holds while it starts one frame's requests: the queue's lock, once loaded."""
        return contextlib.nullcontext() if self.backend is None else self.backend.together()

    def state(self) -> EngineState:
        """For the API processes: why it failed, or once loaded, its facts and how it batches now."""
        if self.backend is None:
            return EngineState(self.status, self.failure)
        return EngineState(self.status, facts=self.facts, batching=self.backend.info())


async def _engine_main(settings: Settings, address: str) -> int:
    """Build the back half, serve scores until SIGTERM, then answer everything queued. Returns the exit status."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    engine = _EngineProcess()
    server = EngineServer(address, engine.begin, engine.state, together=engine.together)
    try:
        try:
            engine.backend, engine.facts = await build_backend(settings)
        except Exception as error:
            engine.status, engine.failure = "failed", load_failure_reason(error)
            await _tell_clients(server)
            return 1
        freeze_loaded_heap()
        engine.status = "ready"
        await server.publish_state()
        await stop.wait()
        engine.status = "draining"
        await server.publish_state()
        await engine.backend.stop()
        async with asyncio.timeout(settings.shutdown_grace_seconds):
            await server.all_answered()  # the last answers are on their way out
        engine.status = "stopped"
        return 0
    finally:
        await server.close()


async def _tell_clients(server: EngineServer) -> None:
    """Give connected API processes a moment to hear the final state before the socket closes."""
    await server.publish_state()
    await asyncio.sleep(2 * server.heartbeat)
    await server.publish_state()


def _become(name: str, settings: Settings) -> None:
    """Set up a child process: its own process group (a terminal's Ctrl-C reaches the supervisor alone, which then
    signals each child once), its name in ps and /proc (comm), and logging."""
    os.setpgrp()
    name_this_thread(name)  # the main thread's name is the process's
    request_ids.configure_logging(settings.log_level, name)


# --- the supervisor ---


class Supervisor:
    """Starts the engine process and the API processes, and ends them together; `run` returns the exit status."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.runtime = Path(tempfile.mkdtemp(prefix="classifier-service-"))
        self.address = f"ipc://{self.runtime}/engine.sock"
        self.stopping_since: float | None = None
        self.signals = 0

    def run(self) -> int:
        settings = self.settings
        try:
            listener = socket.create_server((settings.host, settings.port), reuse_port=False, backlog=2048)
        except OSError as error:
            log.error("could not listen on %s:%d: %s", settings.host, settings.port, error)
            return 1
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(self.runtime / "metrics"))
        Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
        spawn = multiprocessing.get_context("spawn")
        self.engine = spawn.Process(target=_serve_engine, args=(settings, self.address), name="engine")
        self.engine.start()
        # Any API process may accept a connection from the shared listener, so the replica is ready once all are.
        loaded = spawn.RawArray("b", self.workers)
        self.apis = [
            spawn.Process(target=_serve_api, args=(settings, self.address, listener, index, loaded), name=f"api-{index}")
            for index in range(self.workers)
        ]
        for process in self.apis:
            process.start()
        listener.close()  # the API processes hold their own copies
        log.info("serving on http://%s:%d with %d API processes and one engine process", settings.host, settings.port, self.workers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            return self._watch()
        finally:
            for process in [*self.apis, self.engine]:
                if process.is_alive():
                    process.kill()
                process.join()
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _on_signal(self, sig: int, frame) -> None:
        self.signals += 1
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        if self.signals > 1:
            log.warning("second signal %d: stopping every process at once, without draining", sig)
            self.engine.kill()  # its queue belongs to API processes that exit now
        for process in self.apis:
            if process.is_alive():
                process.terminate()  # SIGTERM; a second one makes each exit at once, as in one process

    def _watch(self) -> int:
        failed = False
        running = {process.sentinel: process for process in [*self.apis, self.engine]}
        while any(process.is_alive() for process in self.apis):
            if self._grace_period_over():
                return 1
            exited = wait_for_exit(list(running), timeout=0.2)
            for process in [process for sentinel, process in running.items() if sentinel in exited]:
                del running[process.sentinel]
                process.join()
                _forget(process)
                if self.stopping_since is None or process is self.engine:
                    failed = failed or process.exitcode != 0 or process is self.engine
                    self._stop_after_death(process)
                elif process.exitcode != 0:
                    failed = True
        if self.engine.is_alive():  # every API process has drained: the engine answers what is left, then stops
            self.engine.terminate()
            while self.engine.is_alive():
                if self._grace_period_over():
                    return 1
                self.engine.join(0.2)
            _forget(self.engine)
        return 1 if failed or self.engine.exitcode != 0 else 0

    def _stop_after_death(self, process: BaseProcess) -> None:
        """One process ended on its own: stop the rest, so the orchestrator restarts the whole replica."""
        if self.stopping_since is None:
            log.error("the %s process exited with status %s: stopping the service", process.name, process.exitcode)
            self.stopping_since = time.monotonic()
            for api in self.apis:
                if api.is_alive():
                    api.terminate()

    def _grace_period_over(self) -> bool:
        if self.stopping_since is None or time.monotonic() - self.stopping_since < self.settings.shutdown_grace_seconds:
            return False
        log.error("shutdown took longer than the %g s grace period: stopping every process", self.settings.shutdown_grace_seconds)
        return True


def _forget(process: BaseProcess) -> None:
    """Drop a dead process's live gauges (requests in flight, queue depth) from the summed metrics."""
    from prometheus_client import multiprocess

    if process.pid is not None:  # it was started
        with contextlib.suppress(OSError, KeyError):
            multiprocess.mark_process_dead(process.pid)
