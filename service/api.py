"""HTTP in and out: routes, request validation, error responses, connection limits and request metrics."""

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import pydantic
import pydantic_core
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import loading, metrics, request_ids
from service.callers import CallerIdentity, class_of
from service.errors import ClassifierError, LoadFailed, NotReady, Overloaded, internal_error_message
from service.fairness import RetryAfterBook, Usage, exceeded, fair_share
from service.postprocess import Activation
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    LabelScoreOut,
    PredictRequest,
    TeiErrorResponse,
)
from service.settings import Settings
from service.slot import EngineLoader, EngineSlot
from service.tokenization import TextInput, TruncationSide

log = logging.getLogger(__name__)

# nginx's status for a client that closed its connection before the response: not a server error, not a success.
CLIENT_CLOSED_REQUEST = 499
# FastAPI's OpenTelemetry hooks (recent FastAPI) ask the global providers on every request whether to trace: 3.7% of
# the event loop's busy profile samples at saturation, for nothing when no provider is configured.
WITHOUT_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}} if "telemetry" in inspect.signature(FastAPI).parameters else {}
)
# An oversized body is read and dropped up to this many times the limit before the 413, so the client sees it.
DISCARD_FACTOR = 16
# What FastAPI's header parameter declares: the body's timeout_ms, as a header.
TIMEOUT_HEADER = b"x-request-timeout-ms"
MAX_TIMEOUT_MS = 600_000
REQUEST_ID_HEADER = b"x-request-id"
# TEI's routes (its root route answers /predict for classifiers): their errors come in TEI's shape and statuses.
TEI_PATHS = frozenset({"/predict", "/"})
CLASSIFY_PATH = "/classify"
# Where the /classify fast path leaves a body it parsed but does not take, in the scope's state, for the declared route.
PARSED_BODY = "parsed_body"
# Our status -> TEI's status and error_type; any other 4xx is a "validation" error with its own status.
TEI_ERRORS = {
    429: (429, "overloaded"),
    503: (503, "unhealthy"),
    504: (504, "backend"),
    500: (424, "backend"),
}

T = TypeVar("T")
# Answers a validated /classify request: its body, its ASGI scope and receive, and the timeout header's value.
Answer = Callable[[ClassifyRequest, Scope, Receive, int | None], Awaitable[Response]]


class ApiError(ClassifierError):
    """A refusal of the HTTP layer itself (the engine's own are its ClassifierErrors): status, message, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers)
        self.status = status


def create_app(settings: Settings, load_engine: EngineLoader = loading.load_engine, replica_loaded: Callable[[], bool] = lambda: True) -> FastAPI:
    """The FastAPI application serving `settings.model`; the engine loads (`load_engine`) in the background after
    start-up. `replica_loaded`: whether every API process of the replica has loaded (`--workers`), for /ready."""
    slot = EngineSlot(settings, load_engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load = asyncio.create_task(slot.load(), name="load-model")
        yield
        await load
        await slot.stop()

    # /docs and /redoc with their scripts and styles served from the fastapi-offline package, not a CDN: a service
    # on a private network must show its docs too.
    app = FastAPIOffline(
        title="Text classification service",
        description="Length-bucketed micro-batching in front of a transformer sequence classifier.",
        lifespan=lifespan,
        **WITHOUT_TELEMETRY,
        responses={
            # 400: a body not in UTF-8, nested too deeply or with a key twice, or a missing or untrusted Host
            status: {"model": ErrorResponse}
            for status in (400, 408, 415, 422, 429, 503)
        },
        # No redirect to the path with or without its trailing slash: Starlette builds its Location from the
        # client's Host header. `POST /classify/` is a 404 that names the path.
        redirect_slashes=False,
    )
    app.state.slot = slot
    # Set on SIGTERM by service.server: /ready answers 503 so load balancers stop sending, while requests still flow.
    app.state.draining = threading.Event()
    retry_after = RetryAfterBook()
    _add_error_handlers(app)
    answer_classify = _add_routes(app, settings, slot, app.state.draining, replica_loaded, retry_after)
    classify_route = next(route for route in app.routes if isinstance(route, APIRoute) and route.path == CLASSIFY_PATH)
    # The last added is outermost: metrics see every response, the limits' 408s, 413s and 429s included; the fast
    # path, innermost, sees only what every middleware let through.
    app.add_middleware(ClassifyFastPath, answer=answer_classify, route=classify_route)
    app.add_middleware(RequestBodyLimitsMiddleware, max_bytes=settings.max_request_bytes, timeout=settings.body_timeout_seconds)
    if keys := settings.api_key_list():  # no middleware at all (and no cost) when the service is open
        protected = KEYED_PATHS | ({"/metrics"} if settings.metrics_require_key else set())
        app.add_middleware(ApiKeyMiddleware, keys=keys, protected=frozenset(protected))
    identify = CallerIdentity(bool(keys), settings.client_id_header, settings.client_id_max_length)
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        max_requests=settings.max_concurrent_requests,
        identify=identify,
        headroom=settings.fair_share_headroom,
        retry_after=retry_after,
    )
    if origins := settings.cors_origin_list():  # outside the key check: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Request-Timeout-Ms"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(HostCheckMiddleware, trusted=settings.trusted_host_list())
    app.add_middleware(RequestMetricsMiddleware)
    return app


def _add_routes(
    app: FastAPI,
    settings: Settings,
    slot: EngineSlot,
    draining: threading.Event,
    replica_loaded: Callable[[], bool],
    retry_after: RetryAfterBook,
) -> Answer:
    """Adds the routes; returns what answers a well-formed /classify request (`ClassifyFastPath`'s `answer`)."""

    async def classified(
        inputs: list[TextInput],
        scope: Scope,
        receive: Receive,
        timeouts_ms: tuple[int | None, int | None],
        *,
        top_k: int | None,
        truncate: bool,
        side: TruncationSide | None,
        activation: Activation | None,
        threshold: float,
    ) -> tuple[str, list[dict]] | None:
        """The model's id and each input's result (`Engine.classify`, which both routes answer from); None when the
        client left first. `timeouts_ms`: the body's and the header's, the smaller wins."""
        engine = slot.engine()
        if len(inputs) > settings.max_texts_per_request:
            raise ApiError(
                422,
                f"too many texts: {len(inputs)} sent, at most {settings.max_texts_per_request} per request; split them over several requests",
            )
        timeouts = [t for t in timeouts_ms if t is not None]
        # The deadline counts from the request's first bytes (set by service.server's protocol), not from now.
        state = scope["state"]  # the concurrency limit left the caller there
        arrived_at = state.get("arrived_at") or time.monotonic()
        deadline = arrived_at + (min(timeouts, default=None) or settings.request_timeout_ms) / 1000
        caller = state[CALLER]
        work = engine.classify(
            inputs,
            top_k=top_k,
            truncate=truncate,
            deadline=deadline,
            side=side,
            activation=activation,
            threshold=threshold,
            caller=caller,
        )
        try:
            results = await _unless_client_leaves(work, receive)  # raises its ClassifierError, if any
        except Overloaded as refused:  # held to its Retry-After (the header: the reason did not cross from the engine)
            now = time.monotonic()
            retry_after.told(caller, float(refused.headers["Retry-After"]), now)
            if seconds_left := retry_after.seconds_left(caller, now):  # and so are its requests not tokenized yet
                engine.refuse_waiting(caller, lambda: held_back(caller, seconds_left))
            raise
        return None if results is None else (engine.model_id, results)

    async def answer(body: ClassifyRequest, scope: Scope, receive: Receive, header_timeout_ms: int | None) -> Response:
        answered = await classified(
            body.texts,
            scope,
            receive,
            (body.timeout_ms, header_timeout_ms),
            top_k=body.top_k,
            truncate=body.truncate,
            side=body.truncation_direction,
            activation="none" if body.raw_scores else None,
            threshold=body.threshold,
        )
        if answered is None:
            return NoAnswer()  # its queued texts were dropped when the work was cancelled
        model_id, results = answered
        return JsonBytesResponse({"model": model_id, "results": results})

    async def classify(  # what the fast path does not take (`ClassifyFastPath`): FastAPI validates and answers it
        body: ClassifyRequest,
        request: Request,
        x_request_timeout_ms: Annotated[
            int | None, Header(ge=1, le=MAX_TIMEOUT_MS, description="Same as the body's timeout_ms; the smaller wins.")
        ] = None,
    ) -> ClassifyResponse | Response:
        return await answer(body, request.scope, request.receive, x_request_timeout_ms)

    app.router.add_api_route(
        CLASSIFY_PATH,
        classify,
        methods=["POST"],
        response_model=ClassifyResponse,
        responses={
            401: {"model": ErrorResponse, "description": "No valid API key (only when CLASSIFIER_API_KEYS is set)"},
            413: {"model": ErrorResponse},
            429: {"model": ErrorResponse, "description": "Overloaded: retry after the Retry-After header's seconds"},
            504: {"model": ErrorResponse, "description": "The deadline passed before the texts reached the model"},
        },
        summary="Classify texts and text pairs; each answer comes back in the order sent",
        response_model_exclude_unset=True,  # above_threshold only where the model is multi-label, as the fast path
        route_class_override=json_body_route(),
    )

    async def predict(
        body: PredictRequest,
        request: Request,
        x_request_timeout_ms: Annotated[
            int | None, Header(ge=1, le=MAX_TIMEOUT_MS, description="How long you wait for the answer, from arrival.")
        ] = None,
    ) -> list[LabelScoreOut] | list[list[LabelScoreOut]] | Response:
        parameters = body.parameters
        answered = await classified(
            body.inputs,
            request.scope,
            request.receive,
            (None, x_request_timeout_ms),
            top_k=parameters.top_k if parameters else None,
            truncate=bool(body.truncate),
            side=body.truncation_direction,
            activation="none" if body.raw_scores else parameters.function_to_apply if parameters else None,
            threshold=0.5,
        )
        if answered is None:
            return NoAnswer()
        ranked = [result["labels"] for result in answered[1]]
        return JsonBytesResponse(ranked[0] if body.one_input and parameters is None else ranked)

    tei_errors: dict[int | str, dict[str, Any]] = {status: {"model": TeiErrorResponse} for status in (400, 401, 408, 413, 422, 424, 429, 503, 504)}
    for path in sorted(TEI_PATHS, reverse=True):
        app.router.add_api_route(
            path,
            predict,
            methods=["POST"],
            response_model=list[LabelScoreOut] | list[list[LabelScoreOut]],
            responses=tei_errors,
            summary="TEI-compatible prediction" + (" (TEI's root route)" if path == "/" else ""),
            description="Text-embeddings-inference's /predict: every label and its score per input, best first; one "
            "text or pair answers one list, a list answers a list of lists. With the Hugging Face Inference API's "
            "`parameters` (huggingface_hub's InferenceClient.text_classification), every input answers a list. "
            'Errors come in TEI\'s shape, `{"error", "error_type"}`, with TEI\'s statuses (424 for a failure of '
            "the model).",
            route_class_override=json_body_route(),
        )

    @app.get("/health", summary="Alive (200), or 503 when the model failed to load")
    async def health() -> dict:
        if slot.failure:
            raise LoadFailed(slot.failure)
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model is loaded and warmed up; 503 before, and while draining")
    async def ready() -> dict:
        slot.engine()
        if not replica_loaded():  # the shared listener hands connections to every API process, loaded or not
            raise NotReady()
        if draining.is_set():
            raise ApiError(503, "draining: this replica is shutting down; send new requests elsewhere", {"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/info", summary="The model, its device and precision, and the batching settings")
    async def info() -> dict:
        return slot.info()

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.EXPOSITION_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return answer


async def _unless_client_leaves(work: Awaitable[T], receive: Receive) -> T | None:
    """`work`'s result, awaited in this task; None when the client disconnects first (`work` is cancelled then).

    One watcher task per request, which cancels this one: a task for `work` and asyncio.wait over both cost more of
    the event loop at saturation."""
    waiting = asyncio.current_task()
    assert waiting is not None, "awaited in a request's task"
    client_left = False

    async def cancel_when_client_leaves() -> None:
        nonlocal client_left
        await _disconnected(receive)
        client_left = True
        waiting.cancel()

    watcher = asyncio.create_task(cancel_when_client_leaves())
    try:
        return await work
    except asyncio.CancelledError:
        if not client_left:
            raise
        waiting.uncancel()
        return None
    finally:
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the body was read already, so the only message left is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def json_body_route() -> type[APIRoute]:
    """The route class of a route that takes a JSON body: the body is checked and parsed once, here (`json_body`),
    before FastAPI's own handling of the declared endpoint, which then reads the parsed value instead of parsing the
    body again. Malformed JSON goes on to FastAPI, which answers it with its exact 422. (Well-formed /classify
    requests do not get here: `ClassifyFastPath` answers them.)"""

    class JsonBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            declared = super().get_route_handler()

            async def handle(request: Request) -> Response:
                raw = await request.body()  # kept by the request, so FastAPI's handler reads the same bytes
                # The value is what Starlette's Request.json() returns without parsing again, as FastAPI's handler
                # reads it: the fast path's, when it parsed the body already; malformed JSON (or none) goes on
                # unparsed, and FastAPI's declared path says where.
                state = request.scope.get("state", {})
                if PARSED_BODY in state:
                    request._json = state.pop(PARSED_BODY)
                else:
                    with contextlib.suppress(ValueError):
                        request._json = json_body(request.scope["headers"], raw)
                return await declared(request)

            return handle

    return JsonBodyRoute


class ClassifyFastPath:
    """The innermost middleware: answers a well-formed `POST /classify` itself (its JSON body validates as
    ClassifyRequest, and its timeout header is plain digits in range, or absent: `_well_formed`), with `answer`; any
    other request, and a /classify request that is not well-formed, goes on to FastAPI, whose declared route answers
    it with its exact errors.

    The middlewares outside it (request ids and metrics, host check, CORS, concurrency limit, API keys, body limits)
    serve both paths alike. What the fast path leaves out is FastAPI's own layers inside them (its exception
    middleware, exit stack, router, Request objects, dependency solving, response validation): a quarter of the event
    loop's busy profile samples at saturation with the near-zero-cost model (loadtest/frontend_benchmark.py
    --profile). Refusals found on the way (415, 400, the engine's ClassifierErrors) are answered as the route's
    exception handler answers them (`classifier_error_response`). Its requests are counted under `route`, as those
    the router matches to it."""

    def __init__(self, app: ASGIApp, answer: Answer, route: APIRoute) -> None:
        self.app = app
        self.answer = answer
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != CLASSIFY_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # as the router notes the route it matched (`_route_template`)
        message = await receive()  # the whole body: the body limits read it and replay it as one message
        if message["type"] != "http.request" or message.get("more_body", False):
            await self.app(scope, _replay(message, receive), send)
            return
        response = await self._answer(scope, receive, message.get("body", b""))
        if response is None:  # not a well-formed request: FastAPI's declared path says why
            await self.app(scope, _replay(message, receive), send)
            return
        await response(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, raw: bytes) -> Response | None:
        """The answer to a well-formed request, or to one refused before FastAPI would read it (415, 400); None for
        the others: malformed JSON, or a body or timeout header that does not validate."""
        headers = scope["headers"]
        try:
            try:
                value = json_body(headers, raw)
            except ValueError:  # malformed JSON (or none)
                return None
            well_formed = _well_formed(value, headers)
            if well_formed is None:
                scope.setdefault("state", {})[PARSED_BODY] = value  # the declared route reads it, not the body again
                return None
            body, header_timeout_ms = well_formed
            return await self.answer(body, scope, receive, header_timeout_ms)
        except ClassifierError as error:
            return classifier_error_response(scope["path"], error)


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that returns `first`, then whatever `receive` returns."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return first

    return replay


def json_body(headers: Sequence[tuple[bytes, bytes]], raw: bytes) -> Any:
    """The JSON value of a request body (`parse_json_body`), after its Content-Type.

    Refused (ApiError), as FastAPI would let them through or answer them vaguely: a Content-Type other than JSON
    (415, naming it), and what `parse_json_body` refuses (400). Raises ValueError for malformed JSON, which FastAPI
    answers with its exact 422."""
    # Starlette's Headers.get: the first such header, in Latin-1.
    content_type = next((value for name, value in headers if name == b"content-type"), b"").decode("latin-1")
    if not _is_json(content_type):
        raise ApiError(
            415,
            f"the body must be JSON, sent with the header Content-Type: application/json "
            f"(this request's Content-Type: {content_type[:100] or 'none'})",
        )
    return parse_json_body(raw)


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/<anything>+json."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class _DuplicateKey(ValueError):
    """A JSON object names a key twice (raised from inside the parser, then answered 400)."""


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, unless it has a key twice: json.loads would keep the last value silently, so
    `{"texts": [...], "texts": [...]}` would classify half of what the client meant. One call per JSON object: a
    request body has one or two."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


_JSON = json.JSONDecoder(object_pairs_hook=_object_without_duplicate_keys)


def parse_json_body(raw: bytes) -> Any:
    """A request body's JSON value.

    Raises ApiError (400) for a body json.loads would take though the API does not: UTF-16 or UTF-32 (json.loads
    detects and decodes them), bytes that are not UTF-8 (json.loads decodes UTF-8 with surrogates passed through), a
    key twice in one object; and for nesting too deep for the parser (its RecursionError: a request needs 3 levels).
    Raises ValueError (json.JSONDecodeError) for malformed JSON or an empty body."""
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):  # utf-8-sig: a UTF-8 byte order mark, which json.loads accepts too
        raise ApiError(400, f"the body is {encoding.upper()}, not UTF-8; send the JSON encoded as UTF-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise ApiError(
            400, f"the body is not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start}); send the JSON encoded as UTF-8"
        ) from None
    try:
        return _JSON.decode(text)
    except RecursionError:
        raise ApiError(400, "the JSON body nests arrays or objects too deeply to parse; a request needs at most 3 levels") from None
    except _DuplicateKey as duplicate:
        raise ApiError(400, f"the JSON body has the key {str(duplicate)[:100]!r} twice in one object; send each key once") from None


def _well_formed(value: Any, headers: Sequence[tuple[bytes, bytes]]) -> tuple[ClassifyRequest, int | None] | None:
    """A /classify request's body and timeout header as FastAPI would validate them, or None when it might not.

    The body: the model (lax), as FastAPI validates it. The header: FastAPI reads its first value; taken here only
    when it is plain ASCII digits within the declared range.
    """
    header = next((header for name, header in headers if name == TIMEOUT_HEADER), None)
    timeout_ms = None
    if header is not None:
        if not header.isdigit() or not 1 <= int(header) <= MAX_TIMEOUT_MS:  # bytes.isdigit: ASCII only
            return None
        timeout_ms = int(header)
    try:
        return ClassifyRequest.model_validate(value), timeout_ms
    except pydantic.ValidationError:  # not a valid request: FastAPI's declared path says why
        return None


class JsonBytesResponse(Response):
    """JSON of plain data (dicts, lists, strings, numbers) in the bytes FastAPI's response model serialisation
    writes (pydantic-core's JSON, NaN and infinities as null), without validating the data again."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return pydantic_core.to_json(content, inf_nan_mode="null")


class NoAnswer(Response):
    """Nobody is left to answer: send nothing."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


def error_response(path: str, status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An error's JSON answer: its message and the request's id; on TEI's routes in TEI's shape and statuses
    (`error_type` beside the message)."""
    body: dict[str, Any] = {"error": message, "request_id": request_ids.current.get() or None, **extra}
    if path in TEI_PATHS:
        status, body["error_type"] = TEI_ERRORS.get(status, (status, "validation" if status < 500 else "backend"))
    return JSONResponse(body, status, headers=headers)


def classifier_error_response(path: str, error: ClassifierError) -> JSONResponse:
    """A ClassifierError's answer (any route's, and the /classify fast path's)."""
    if error.status == 500:  # the model failed on a text: worth a line the request's id finds
        log.warning("%s answered 500: %s", path, error.message)
    return error_response(path, error.status, error.message, error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClassifierError)
    async def classifier_error(request: Request, error: ClassifierError) -> JSONResponse:
        return classifier_error_response(request.scope["path"], error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own answers (404, 405 with its Allow header) in the documented error body."""
        return error_response(request.scope["path"], error.status_code, _http_error_message(request, error), error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        """A bug: a JSON 500 for the client; Starlette re-raises the error afterwards, so it is logged once. Sent
        from outside the middlewares, so it names its request id itself."""
        headers = {"X-Request-Id": request_ids.current.get()}
        return error_response(request.scope["path"], 500, internal_error_message(error), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request.scope["path"], 422, _describe(error.errors()), detail=_jsonable(error.errors()))


def _http_error_message(request: Request, error: HTTPException) -> str:
    if error.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}; use {(error.headers or {}).get('Allow', 'another method')}"
    if error.status_code == 404:
        return f"no such endpoint: {request.url.path}; see /docs"
    return str(error.detail)


def _describe(errors: Sequence[dict]) -> str:
    """One readable sentence per problem, e.g. `texts.1: Input should be a valid string`."""
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _jsonable(errors: Sequence[dict]) -> list[dict]:
    return [{key: value for key, value in error.items() if key in ("loc", "msg", "type")} for error in errors]


class UploadAbandoned(Exception):
    """The client disconnected before its request body arrived."""


class RequestBodyLimitsMiddleware:
    """Bounds each request body in size (413) and in the time the client takes to send it (408).

    The body is read here and replayed to the app: the app would read it all anyway, and an error raised while the
    app reads would reach the client as a vague 400. An oversized body is still read, and dropped, up to
    `discard_bytes`, before the 413 goes out: a client that sends its whole body before reading the answer (urllib,
    requests) would otherwise see its connection reset instead of the message.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.discard_bytes = DISCARD_FACTOR * max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.discard_bytes:
            await self._too_large(scope, send)
            return
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._receive_body(receive)
        except UploadAbandoned:
            return
        except TimeoutError:
            metrics.CLIENT_TIMEOUTS.labels("body").inc()
            message = f"the request body did not arrive within {self.timeout:g} s; send it without pausing"
            await _error_response(scope, send, 408, message, {"Connection": "close"})
            return
        if body is None:
            await self._too_large(scope, send)
            return
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)

    async def _receive_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when it is over `max_bytes` (then read on and dropped up to `discard_bytes`)."""
        chunks, size, more = [], 0, True
        while more and size <= self.discard_bytes:
            message = await receive()
            if message["type"] != "http.request":
                raise UploadAbandoned
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks) if size <= self.max_bytes else None

    async def _too_large(self, scope: Scope, send: Send) -> None:
        message = f"request body is larger than {self.max_bytes} bytes; send fewer or shorter texts per request"
        await _error_response(scope, send, 413, message, {"Connection": "close"})


# The routes that need a key when keys are set (/metrics too with metrics_require_key); probes and docs stay open.
KEYED_PATHS = frozenset({CLASSIFY_PATH, *TEI_PATHS})


class ApiKeyMiddleware:
    """Answers 401 (with `WWW-Authenticate: Bearer`) to a request for a `protected` path without an
    `Authorization: Bearer <key>` header naming one of `keys`. Every key is compared, each in constant time, so the
    time taken says nothing about how much of a key matched, nor which key did; keys are never logged."""

    def __init__(self, app: ASGIApp, keys: list[bytes], protected: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.protected and not self._authorized(scope):
            message = "a valid API key is required: send it as the header `Authorization: Bearer <key>`"
            await _error_response(scope, send, 401, message, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = header.partition(b" ")
        matched = False
        for accepted in self.keys:
            matched |= hmac.compare_digest(key.strip(), accepted)
        return matched and scheme.lower() == b"bearer"


class HostCheckMiddleware:
    """Answers 400 to a request without exactly one Host header (HTTP/1.1 requires it), and, when `trusted` names
    hosts, to one whose Host (its port aside) is none of them (`*.example.com` matches any subdomain). Probes and
    /metrics answer any Host: Kubernetes probes and Prometheus address the pod by its IP."""

    def __init__(self, app: ASGIApp, trusted: list[str] | None) -> None:
        self.app = app
        self.exact = frozenset(host for host in trusted or () if not host.startswith("*."))
        self.suffixes = tuple(host[1:] for host in trusted or () if host.startswith("*."))  # ".example.com"
        self.any_host = trusted is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hosts = [value for name, value in scope["headers"] if name == b"host"]
            if len(hosts) != 1 or not hosts[0]:
                message = "the request needs exactly one Host header, naming this service's host"
                await _error_response(scope, send, 400, message, {})
                return
            if not self._trusted(scope["path"], hosts[0].decode("latin-1").lower()):
                message = "the Host header names a host this service does not answer to (CLASSIFIER_TRUSTED_HOSTS)"
                await _error_response(scope, send, 400, message, {})
                return
        await self.app(scope, receive, send)

    def _trusted(self, path: str, host: str) -> bool:
        if self.any_host or path in ConcurrencyLimitMiddleware.EXEMPT_PATHS:
            return True
        # The port aside: "example.com:8000" -> "example.com", "[::1]:8000" -> "[::1]".
        name = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rpartition(":")[0] or host
        return name in self.exact or name.endswith(self.suffixes)


# Where the concurrency limit leaves the request's caller (`service.callers`), in the scope's state.
CALLER = "caller"


class ConcurrencyLimitMiddleware:
    """Answers 429 with Retry-After while `max_requests` requests are in flight (TEI's max_concurrent_requests),
    shared fairly between callers (`identify` names each request's caller, left in its scope's state for the routes):
    once the limit is reached, a caller holding more than its fair share of the slots is refused, while callers under
    theirs may still take `headroom` (a fraction of the limit) more (`fairness.exceeded`). A caller that sends texts
    again before the Retry-After the queue told it, while others are calling too (`retry_after`: the routes tell it
    what the queue said), is refused at once, unread.

    A request counts from its headers to its response, so stalled uploads count too, against their caller's share.
    Probes and /metrics are exempt: an overloaded replica must still say how it is.
    """

    EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, app: ASGIApp, max_requests: int, identify: Callable[[Scope], str], headroom: float, retry_after: RetryAfterBook) -> None:
        self.app = app
        self.max_requests = max_requests
        self.identify = identify
        self.headroom = headroom
        self.retry_after = retry_after
        self.in_flight = 0
        self.held: dict[str, int] = {}  # requests in flight by caller, for the callers holding any

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        caller = scope.setdefault("state", {})[CALLER] = self.identify(scope)
        now = time.monotonic()
        self.retry_after.arrived(caller, now)
        if scope["method"] == "POST" and (seconds_left := self.retry_after.seconds_left(caller, now)):
            refused = held_back(caller, seconds_left)
            await _error_response(scope, send, refused.status, refused.message, refused.headers)
            return
        held = self.held.get(caller, 0)
        usage = Usage(self.in_flight, held, len(self.held) + (held == 0))
        limit = exceeded(usage, 1, self.max_requests, self.headroom)
        if limit is not None:
            if limit == "fair_share":
                metrics.FAIR_SHARE_REFUSALS.labels("slots", class_of(caller)).inc()
                share = fair_share(self.max_requests, usage.active_callers)
                message = (
                    f"the server is handling {self.in_flight} requests, {held} of them this caller's, more than its fair "
                    f"share ({share:.0f} of {self.max_requests}, {usage.active_callers} callers); retry shortly"
                )
            else:
                message = f"the server is handling {self.in_flight} requests already; retry shortly"
            await _error_response(scope, send, 429, message, {"Retry-After": "1"})
            return
        self.in_flight += 1
        self.held[caller] = held + 1
        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.held[caller] == 1:
                del self.held[caller]
            else:
                self.held[caller] -= 1
            metrics.REQUESTS_IN_FLIGHT.dec()


def held_back(caller: str, seconds_left: float) -> ApiError:
    """The 429 for a request of `caller`'s refused before its texts are tokenized: the queue told it to retry after a
    time of which `seconds_left` remain (`fairness.RetryAfterBook`)."""
    metrics.EARLY_RETRY_REFUSALS.labels(class_of(caller)).inc()
    retry_in = math.ceil(seconds_left)
    return ApiError(
        429,
        f"this caller was told to retry after a while, and {retry_in} s of it are left: until then its requests are "
        "refused unread (its texts already queued are still answered)",
        {"Retry-After": str(retry_in)},
    )


async def _error_response(scope: Scope, send: Send, status: int, message: str, headers: dict[str, str]) -> None:
    await error_response(scope["path"], status, message, headers)(scope, _no_body, send)


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
    """Counts requests by route and status and times them, by the route's template (not the raw path); and, being
    the outermost middleware, gives each request its id (`request_ids`): the client's X-Request-Id or a new one, set
    for the request's task (its log lines and error bodies) and echoed in the response's X-Request-Id header. One
    middleware for both: each wraps the response's start, and a layer more costs the event loop at saturation.

    A client that went away before its response started is counted as 499 (nginx's "client closed request"), not
    as 500 or 200: it is not the server's failure, and nobody received an answer. The disconnect is seen in the
    messages the app receives: the body limits read the body, and /classify, the one route that waits, watches for
    the disconnect itself.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The labelled series by (route, status) and by route: a lookup per request instead of `labels()`.
        self._requests: dict[tuple[str, int], Counter] = {}
        self._durations: dict[str, Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None
        client_gone = False
        sent_id = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), None)
        request_id = request_ids.from_header(sent_id)
        request_ids.current.set(request_id)
        id_header = (REQUEST_ID_HEADER, request_id.encode())

        async def noting_receive() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = CLIENT_CLOSED_REQUEST if client_gone else message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, noting_receive, recording_send)
        finally:
            if status is None:
                status = CLIENT_CLOSED_REQUEST if client_gone else 500
            self._record(_route_template(scope), status, time.perf_counter() - started)

    def _record(self, route: str, status: int, seconds: float) -> None:
        requests = self._requests.get((route, status))
        if requests is None:
            requests = self._requests[route, status] = metrics.REQUESTS.labels(route, str(status))
        duration = self._durations.get(route)
        if duration is None:
            duration = self._durations[route] = metrics.REQUEST_DURATION.labels(route)
        requests.inc()
        duration.observe(seconds)
