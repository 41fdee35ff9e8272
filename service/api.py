"""HTTP in and out: routes, request validation, error responses and request metrics."""

import asyncio
import contextlib
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.batcher import DeadlineExceeded, InferenceFailed, NotAccepting, Overloaded, TextTooLargeForDevice
from service.engine import Classified, Engine
from service.postprocess import rank
from service.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, LabelScoreOut, TextResult
from service.settings import Settings
from service.tokenization import TextTooLong


class ApiError(Exception):
    """An error answered with its status code, a message, and optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application serving `settings.model`; the model loads in the background after start-up."""
    engine = Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(engine.start(), name="load-model")
        yield
        await loading
        await engine.stop()

    app = FastAPI(
        title="Text classification service",
        description="Length-bucketed micro-batching in front of a transformer sequence classifier.",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.state.engine = engine
    # The last added is outermost: metrics see every response, the body limit's 413s included.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetricsMiddleware)
    _add_error_handlers(app)
    _add_routes(app, engine)
    return app


def _add_routes(app: FastAPI, engine: Engine) -> None:
    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses={
            413: {"model": ErrorResponse},
            429: {"model": ErrorResponse, "description": "Overloaded: retry after the Retry-After header's seconds"},
            504: {"model": ErrorResponse, "description": "The deadline passed before the texts reached the model"},
        },
        summary="Classify texts; each answer comes back in the order sent",
    )
    async def classify(
        body: ClassifyRequest,
        request: Request,
        x_request_timeout_ms: Annotated[
            int | None, Header(ge=1, le=600_000, description="Same as the body's timeout_ms; the smaller wins.")
        ] = None,
    ) -> ClassifyResponse | Response:
        _require_ready(engine)
        if len(body.texts) > engine.settings.max_texts_per_request:
            raise ApiError(
                422,
                f"too many texts: {len(body.texts)} sent, at most {engine.settings.max_texts_per_request} "
                "per request; split them over several requests",
            )
        timeouts = [t for t in (body.timeout_ms, x_request_timeout_ms) if t is not None]
        deadline = engine.deadline_after(min(timeouts, default=None))
        work = asyncio.create_task(_encode_and_classify(engine, body, deadline))
        if not await _finished_before_client_left(work, request.receive):
            return ClientGone()  # its queued texts were dropped when `work` was cancelled
        labels = engine.loaded.labels
        return ClassifyResponse(
            model=engine.model_id,
            results=[_text_result(item.scores, labels, body.top_k, item.encoded) for item in work.result()],
        )

    @app.get("/health", summary="Alive (200), or 503 when the model failed to load")
    async def health() -> dict:
        if engine.failure:
            raise ApiError(503, f"model failed to load: {engine.failure}")
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model is loaded and warmed up, 503 before")
    async def ready() -> dict:
        _require_ready(engine)
        return {"status": "ready"}

    @app.get("/info", summary="The model, its device and precision, and the batching settings")
    async def info() -> dict:
        return engine.info()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _encode_and_classify(engine: Engine, body: ClassifyRequest, deadline: float) -> list[Classified]:
    try:
        encoded = await engine.encode(body.texts, body.truncate)
        return await engine.classify(encoded, deadline)
    except TextTooLong as error:
        raise ApiError(413, str(error)) from error
    except Overloaded as error:
        raise ApiError(429, str(error), {"Retry-After": f"{error.retry_after:.0f}"}) from error
    except DeadlineExceeded as error:
        raise ApiError(
            504, "the request's deadline passed before the model reached its texts; retry later or allow more time "
            "(timeout_ms)"
        ) from error
    except NotAccepting as error:
        raise ApiError(503, "the service is shutting down; retry on another replica", {"Retry-After": "1"}) from error
    except TextTooLargeForDevice as error:  # even alone, the text ran the device out of memory
        raise ApiError(413, str(error)) from error
    except InferenceFailed as error:  # the model raised on this text alone; its batch's other texts got answers
        raise ApiError(500, str(error)) from error


async def _finished_before_client_left(work: asyncio.Task, receive: Receive) -> bool:
    """Wait for `work`; if the client disconnects first, cancel it and return False."""
    watch = asyncio.create_task(_disconnected(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return False
    return True


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the body was read already, so the only message left is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Response):
    """Nobody is left to answer: send nothing."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


def _text_result(scores: list[float], labels: tuple[str, ...], top_k: int | None, encoded) -> TextResult:
    ranked = rank(scores, labels, top_k)
    return TextResult(
        label=ranked[0].label,
        score=ranked[0].score,
        labels=[LabelScoreOut(label=item.label, score=item.score) for item in ranked],
        tokens=len(encoded.ids),
        truncated=encoded.truncated,
    )


def _require_ready(engine: Engine) -> None:
    if engine.failure:
        raise ApiError(503, f"model failed to load: {engine.failure}")
    if not engine.ready:
        raise ApiError(503, "the model is still loading; retry shortly", {"Retry-After": "5"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _describe(error.errors()), "detail": _jsonable(error.errors())}, status_code=422)


def _describe(errors: list[dict]) -> str:
    """One readable sentence per problem, e.g. `texts.1: Input should be a valid string`."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _jsonable(errors: list[dict]) -> list[dict]:
    return [{key: value for key, value in error.items() if key in ("loc", "msg", "type")} for error in errors]


class BodySizeLimitMiddleware:
    """Answers 413 to request bodies over `max_bytes`, whether declared in Content-Length or streamed.

    The body is read here, up to the limit, and replayed to the app: the app would read it all anyway, and an
    error raised while the app reads would reach the client as a vague 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        response = JSONResponse(
            {"error": f"request body is larger than {self.max_bytes} bytes; send fewer or shorter texts per request"},
            status_code=413,
        )
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _route_template(scope: Scope) -> str:
    """The matched route's path template; requests refused before routing count under their path if it is a route."""
    matched = scope.get("route")
    if matched is not None:
        return matched.path
    path = scope["path"]
    return path if any(getattr(route, "path", None) == path for route in scope["app"].routes) else "unmatched"


class RequestMetricsMiddleware:
    """Counts requests by route and status and times them, by the route's template (not the raw path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _route_template(scope)
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(time.perf_counter() - started)
