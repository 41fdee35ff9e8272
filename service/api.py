"""HTTP in and out: routes, request validation, error responses and request metrics."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.batcher import NotAccepting, QueueFull
from service.engine import Engine
from service.postprocess import rank
from service.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, LabelScoreOut, TextResult
from service.settings import Settings
from service.tokenization import TextTooLong

log = logging.getLogger(__name__)


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
        responses={413: {"model": ErrorResponse}},
        summary="Classify texts; each answer comes back in the order sent",
    )
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        _require_ready(engine)
        if len(body.texts) > engine.settings.max_texts_per_request:
            raise ApiError(
                422,
                f"too many texts: {len(body.texts)} sent, at most {engine.settings.max_texts_per_request} "
                "per request; split them over several requests",
            )
        try:
            encoded = await engine.encode(body.texts, body.truncate)
            classified = await engine.classify(encoded)
        except TextTooLong as error:
            raise ApiError(413, str(error)) from error
        except QueueFull as error:
            raise ApiError(503, str(error), {"Retry-After": f"{error.retry_after:.0f}"}) from error
        except NotAccepting as error:
            raise ApiError(503, "the service is shutting down; retry on another replica", {"Retry-After": "1"}) from error
        labels = engine.loaded.labels
        return ClassifyResponse(
            model=engine.model_id,
            results=[_text_result(item.scores, labels, body.top_k, item.encoded) for item in classified],
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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own answers (404, 405 with its Allow header) in the documented error body."""
        return JSONResponse({"error": _http_error_message(request, error)}, error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        """A bug: a JSON 500 for the client; Starlette re-raises the error afterwards, so it is logged once."""
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the server log has the details"}, 500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _describe(error.errors()), "detail": _jsonable(error.errors())}, status_code=422)


def _http_error_message(request: Request, error: HTTPException) -> str:
    if error.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}; use {error.headers.get('Allow', 'another method')}"
    if error.status_code == 404:
        return f"no such endpoint: {request.url.path}; see /docs"
    return str(error.detail)


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
