"""The HTTP server: uvicorn, plus what it lacks here: bounds on request lines and headers (time, bytes, count) with
JSON answers for what cannot be parsed, visible draining on SIGTERM, a hard grace period, and stopping (for a
non-zero exit) when the model cannot load."""

import asyncio
import gc
import json
import logging
import os
import threading
import time
from http import HTTPStatus

import httptools
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import memory, metrics, request_ids
from service.settings import Settings
from service.slot import EngineSlot

log = logging.getLogger(__name__)


# The route label under which requests refused before they could be parsed are counted (one bounded value).
UNPARSED_ROUTE = "unparsed"
# After such a refusal the connection is read, and what comes dropped, up to this many times max_header_bytes or for
# this long, before it closes: closing a socket with unread bytes resets it, and a client still sending (most send
# their whole request before they read) would lose the answer. The same reason as the body limit's DISCARD_FACTOR.
DISCARD_FACTOR = 16
LINGER_SECONDS = 1.0


class TooManyHeaders(Exception):
    """Raised from the parser's header callback once a request has more header lines than allowed."""


def bounded_http_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with bounds on what a request's line and headers may take, and one error format.

    - A deadline for each request's line and headers (`header_timeout_seconds`): uvicorn bounds idle keep-alive
      connections but not a request whose headers trickle in (or never come). The clock starts when the connection
      opens (for a later request on it, at its first byte) and is not restarted by the bytes that arrive; when it
      runs out the client gets a 408 and the connection closes. A request's first byte's time (monotonic) is also its
      `request.state.arrived_at`, where its deadline starts.
    - Byte and line bounds, counted in `data_received` before the bytes reach the parser: httptools appends each
      piece of a header value to the bytes it holds so far (a copy of the whole value each time), so an unbounded
      header cost time quadratic in its size, all of it on the event loop (an 80 MB value: 4.6 s of CPU; 20 such
      uploads starved /health and the header timers for 25 s). A request line over `max_request_line_bytes` is
      answered 414, a head (line and headers) over `max_header_bytes` or with more than `max_header_count` header
      lines 431; no more of it is read.
    - The parser's own refusals (a malformed request line or header, a request smuggling attempt such as both
      Content-Length and Transfer-Encoding) are answered 400, in the service's JSON error format, instead of
      uvicorn's plain text.

    Each of these answers carries `{"error", "request_id"}`, closes the connection (a moment later if bytes still
    come, see DISCARD_FACTOR), is counted in classifier_requests_total under the route "unparsed", and is logged in
    one INFO line.
    """
    header_timeout = settings.header_timeout_seconds
    max_line, max_head, max_headers = settings.max_request_line_bytes, settings.max_header_bytes, settings.max_header_count

    class BoundedHttpProtocol(HttpToolsProtocol):
        header_timer: asyncio.TimerHandle | None = None
        # Bytes of the current request's line and headers received so far, whether its line has ended, and how many
        # heads the parser has completed on this connection (to tell whether a head ended within the bytes fed).
        head_bytes = 0
        in_head = True
        line_ended = False
        heads_completed = 0
        # Bytes still to read and drop once the request was refused (None until then).
        discard_bytes: int | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_clock()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # A request's deadline counts from its first bytes, not from when its handler runs: under load the
            # event loop may reach the handler much later, and the client has been waiting since.
            self.scope["state"]["arrived_at"] = time.monotonic()
            if self.header_timer is None:  # a later request on the connection; the first one's clock already runs
                self._start_header_clock()

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(self.headers) >= max_headers:
                raise TooManyHeaders
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._stop_header_clock()
            self.in_head = False
            self.heads_completed += 1
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            # The next bytes begin the next request's head. (The rest of the chunk being parsed now is not counted
            # for it: at most one read, 256 KiB, and uvicorn stops reading while a pipelined request waits.)
            self.in_head, self.line_ended, self.head_bytes = True, False, 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_clock()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._unset_keepalive_if_required()
            if self.discard_bytes is not None:
                self.discard_bytes -= len(data)
                if self.discard_bytes < 0:
                    self.transport.close()
                return
            if not self.in_head:
                self._parse(data)
                return
            if not self.line_ended:
                line_end = data.find(b"\n")
                line_bytes = self.head_bytes + (len(data) if line_end < 0 else line_end)
                if line_bytes > max_line:
                    self._refuse(414, f"the request line is longer than {max_line} bytes; shorten the URL")
                    return
                self.line_ended = line_end >= 0
            room = max_head - self.head_bytes
            if len(data) <= room:
                self.head_bytes += len(data)
                self._parse(data)
                return
            # Parse what the limit allows: the head may end within it (the rest is then body or the next request).
            heads_completed = self.heads_completed
            self.head_bytes = max_head
            self._parse(data[:room])
            if self.discard_bytes is not None or self.transport.is_closing():
                return
            if self.heads_completed == heads_completed:
                self._refuse(431, f"the request line and headers are larger than {max_head} bytes; send fewer or shorter headers")
                return
            self._parse(data[room:])

        def _parse(self, data: bytes) -> None:
            """uvicorn's feeding of the parser, with its refusals in the service's error format."""
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError as error:
                if isinstance(error.__context__, TooManyHeaders):
                    self._refuse(431, f"the request has more than {max_headers} header lines; send fewer headers")
                else:
                    self._refuse(400, f"the request is not valid HTTP/1.1 ({error}); fix the client's request line and headers")

        def _start_header_clock(self) -> None:
            self._stop_header_clock()
            self.header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _stop_header_clock(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.discard_bytes is not None or self.transport.is_closing():
                return
            metrics.CLIENT_TIMEOUTS.labels("headers").inc()
            message = f"the request headers did not arrive within {header_timeout:g} s; send them without pausing"
            # A connection opened and left idle is closed too, at once: it sent no request to count, nor bytes to drop.
            self._refuse(408, message, request_began=self.head_bytes > 0)

        def _refuse(self, status: int, message: str, request_began: bool = True) -> None:
            """Answer `status` with the JSON error body and close the connection; nothing more of it is parsed (what
            still comes of a request is dropped for a moment first, see DISCARD_FACTOR)."""
            if self.discard_bytes is not None or self.transport.is_closing():
                return
            self._stop_header_clock()
            self.discard_bytes = DISCARD_FACTOR * max_head
            self.loop.call_later(LINGER_SECONDS if request_began else 0, self.transport.close)
            request_id = request_ids.from_header(None)
            body = json.dumps({"error": message, "request_id": request_id}).encode()
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            if request_began:
                metrics.REQUESTS.labels(UNPARSED_ROUTE, str(status)).inc()
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("refused a request from %s before parsing it: %d %s", client, status, message, extra={"request_id": request_id})

    return BoundedHttpProtocol


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
                http=bounded_http_protocol(settings),
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
