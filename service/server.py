"""The HTTP server: uvicorn, plus what it lacks here: a time limit on request headers, visible draining on SIGTERM,
a hard grace period, and stopping (for a non-zero exit) when the model cannot load."""

import asyncio
import gc
import json
import logging
import os
import threading
import time

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import memory, metrics
from service.settings import Settings
from service.slot import EngineSlot

log = logging.getLogger(__name__)


def header_timeout_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline for each request's line and headers.

    uvicorn bounds idle keep-alive connections but not a request whose headers trickle in (or never come), so a
    stalled client holds its connection and memory forever. The clock starts when the connection opens and at each
    request's first byte; when it runs out the client gets a 408 and the connection closes. That first byte's time
    (monotonic) is also the request's `request.state.arrived_at`, where its deadline starts.
    """

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_clock()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # A request's deadline counts from its first bytes, not from when its handler runs: under load the
            # event loop may reach the handler much later, and the client has been waiting since.
            self.scope["state"]["arrived_at"] = time.monotonic()
            self._start_header_clock()

        def on_headers_complete(self) -> None:
            self._stop_header_clock()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_clock()
            super().connection_lost(exc)

        def _start_header_clock(self) -> None:
            self._stop_header_clock()
            self.header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _stop_header_clock(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            metrics.CLIENT_TIMEOUTS.labels("headers").inc()
            body = json.dumps({"error": f"the request headers did not arrive within {seconds:g} s"}).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.close()

    return HeaderTimeoutProtocol


def freeze_loaded_heap() -> None:
    """Exempt every object alive once the model is loaded (torch, transformers, the model: about a million objects)
    from garbage collection. The collector's full passes otherwise walk them all every few thousand requests: with a
    near-zero-cost model at saturation they took 26% of the event loop's profile samples, nearly as much as all its
    Python work (loadtest/frontend_benchmark.py --profile); 7% after."""
    gc.collect()
    gc.freeze()


class ClassifierServer(uvicorn.Server):
    """uvicorn's server with this service's start and stop.

    - The model fails to load: the server stops, and `failure` says why (the command then exits 1).
    - First SIGTERM or SIGINT: /ready answers 503 for `drain_delay_seconds` while every request is still served, so
      load balancers take the replica out before its listener closes. Then uvicorn's graceful shutdown: the listener
      closes, idle connections close, open requests finish (their texts are still run), and the queue drains.
    - A second signal, or `shutdown_grace_seconds` after the first: exit 1 at once, whatever is still open.
    - After `idle_heap_trim_seconds` without requests, glibc's free heap pages go back to the OS (`memory`).
    """

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                access_log=False,
                http=header_timeout_protocol(settings.header_timeout_seconds),
                # Open requests get most of what the grace period leaves after the delay; the rest is for the
                # lifespan's shutdown (texts of requests cut off here are still in the queue).
                # Declared int, but uvicorn only passes it to asyncio.wait_for, which takes fractions of a second.
                timeout_graceful_shutdown=0.8 * (settings.shutdown_grace_seconds - settings.drain_delay_seconds),  # type: ignore[arg-type]
            )
        )
        self.slot: EngineSlot = app.state.slot
        self.draining: threading.Event = app.state.draining
        self.settings = settings
        self.drain_ends: float | None = None
        self.idle_trim = memory.IdleTrim(settings.idle_heap_trim_seconds)
        self.heap_frozen = False

    @property
    def failure(self) -> str | None:
        """Why the model could not be loaded, if it could not."""
        return self.slot.failure

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in `_captured_signals`: uvicorn would re-raise it at the end, and a clean drain exits 0.
        if self.drain_ends is not None:
            log.warning("second signal %d: exiting at once, without draining", sig)
            os._exit(1)
        delay = self.settings.drain_delay_seconds if self.slot.ready else 0.0
        log.info("signal %d: /ready answers 503 for %g s, then the listener closes and the queue drains", sig, delay)
        self.draining.set()
        self.drain_ends = time.monotonic() + delay
        watchdog = threading.Timer(self.settings.shutdown_grace_seconds, self._grace_period_over)
        watchdog.daemon = True
        watchdog.start()

    async def on_tick(self, counter: int) -> bool:
        if not self.heap_frozen and self.slot.ready:
            freeze_loaded_heap()
            self.heap_frozen = True
        if self.slot.failure is not None:
            self.should_exit = True
        if self.drain_ends is not None and time.monotonic() >= self.drain_ends:
            self.should_exit = True
        state = self.server_state
        if self.idle_trim.due(time.monotonic(), state.total_requests, len(state.tasks)):
            asyncio.get_running_loop().run_in_executor(None, self._release_free_heap)
        return await super().on_tick(counter)

    @staticmethod
    def _release_free_heap() -> None:
        # Off the event loop: trimming walks every heap (a few milliseconds after a burst).
        log.debug("released free heap pages in %.1f ms", 1000 * memory.release_free_heap())

    def _grace_period_over(self) -> None:
        log.error(
            "shutdown took longer than the %g s grace period: exiting with %d connections still open",
            self.settings.shutdown_grace_seconds,
            len(self.server_state.connections),
        )
        os._exit(1)
