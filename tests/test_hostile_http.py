"""Hostile HTTP (issue 22): bounded request lines and headers, the parser's refusals in the JSON error format and
counted, pathological JSON bodies, the Content-Type, trusted hosts, no slash redirects, and /docs offline.

The protocol (service.server.bounded_http_protocol) is tested in process: an asyncio server on a loopback port
speaks it to a small ASGI app, and raw sockets send it what clients send. The API's checks go through httpx's ASGI
transport, as in tests/test_http.py. One integration test checks the real server process end to end.
"""

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator

import pytest
import uvicorn
from prometheus_client import REGISTRY
from uvicorn.server import ServerState

from loadtest.probe import scrape
from service import api
from service.api import create_app
from service.server import bounded_http_protocol
from service.settings import Settings
from tests.conftest import start_service
from tests.fakes import FakeScorer
from tests.test_http import JSON, RawClient, error_body, fake_engine, run, serving, settings

# --------------------------------------------------------------------------- the protocol, in process


async def echo_app(scope, receive, send) -> None:
    """Reads the whole body and answers its length: what a route that reads its body does."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    answer = str(size).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@contextlib.asynccontextmanager
async def protocol_server(**overrides) -> AsyncIterator[int]:
    """A loopback server speaking the bounded protocol (settings `overrides`) to echo_app; yields its port."""
    config = uvicorn.Config(echo_app, http=bounded_http_protocol(Settings(**overrides)), log_level="warning")
    config.load()
    state = ServerState()
    protocol = config.http_protocol_class
    server = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,  # type: ignore[call-arg]
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for connection in list(state.connections):
            connection.transport.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """What the server sent until it closed (a reset after the answer ends it too), and when it began to come."""
    received, first = b"", 0.0
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            first = first or time.monotonic()
            received += chunk
    return received, first


async def exchange(port: int, *parts: bytes, pause: float = 0.0) -> tuple[bytes, float]:
    """Sends `parts` (pausing between them) while reading, until the server closes; the answer and how long it took
    to begin, from the connection's opening. A client that sends past the server's limit sends until it is reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = asyncio.create_task(read_answer(reader))
    with contextlib.suppress(ConnectionError):
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
    received, first = await asyncio.wait_for(answer, 30)
    writer.close()
    return received, first - started


def parsed(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def unparsed(status: int) -> float:
    return REGISTRY.get_sample_value("classifier_requests_total", {"route": "unparsed", "status": str(status)}) or 0.0


def in_protocol(scenario, **overrides):
    async def main():
        async with protocol_server(**overrides) as port:
            return await scenario(port)

    return asyncio.run(main())


REQUEST = b"GET /health HTTP/1.1\r\nHost: test\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "fragment"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: test\r\n\r\n", 414, "request line is longer than 8192 bytes"),
        (REQUEST + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "line and headers are larger than 65536 bytes"),
        (REQUEST + b"X-A: 1\r\n" * 100 + b"\r\n", 431, "more than 100 header lines"),
        (b"G\x01T / HTTP/1.1\r\nHost: test\r\n\r\n", 400, "not valid HTTP/1.1 (Invalid method encountered)"),
        (REQUEST + b"X-Bad: a\x01b\r\n\r\n", 400, "not valid HTTP/1.1 (Invalid header value char)"),
        (  # request smuggling: both lengths
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            400,
            "Transfer-Encoding can't be present with Content-Length",
        ),
    ],
    ids=["long request line", "large headers", "many headers", "bad method", "bad header value", "smuggling"],
)
def test_what_cannot_be_parsed_is_answered_as_json_counted_and_logged_once(request_bytes, status, fragment, caplog):
    before = unparsed(status)
    with caplog.at_level(logging.INFO):
        answer, _ = in_protocol(lambda port: exchange(port, request_bytes))
    code, headers, body = parsed(answer)
    assert (code, headers["content-type"], headers["connection"]) == (status, "application/json", "close")
    assert fragment in body["error"] and body["request_id"] == headers["x-request-id"]
    assert unparsed(status) == before + 1
    [logged] = caplog.records  # one line, ours (uvicorn's own WARNING for a parser error is gone)
    assert logged.name == "service.server" and logged.levelno == logging.INFO and logged.exc_info is None
    assert fragment in logged.getMessage() and logged.request_id == body["request_id"]


def test_a_request_within_every_limit_is_served_with_its_body():
    headers = b"X-A: " + b"a" * 60_000 + b"\r\n" + b"X-B: 1\r\n" * 90
    body = b"x" * 500_000  # a body far beyond the header limit, in the same reads as the end of the headers

    async def scenario(port):
        request = b"POST / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n" + headers + b"Content-Length: 500000\r\n\r\n"
        return await exchange(port, request + body)

    answer, _ = in_protocol(scenario)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n500000")


def test_pipelined_requests_each_get_their_own_head_limit():
    one = b"GET / HTTP/1.1\r\nHost: test\r\nX-A: " + b"a" * 40_000 + b"\r\n\r\n"

    async def scenario(port):
        return await exchange(port, one + one + one[:-2] + b"Connection: close\r\n\r\n")

    answer, _ = in_protocol(scenario)
    assert answer.count(b"HTTP/1.1 200 ") == 3


def test_an_endless_header_is_refused_after_the_limit_without_reading_the_rest():
    chunk = b"a" * 1_000_000

    async def scenario(port):
        return await exchange(port, REQUEST + b"X-Endless: ", *[chunk] * 20)

    answer, seconds = in_protocol(scenario, max_header_bytes=16384)
    assert parsed(answer)[0] == 431
    assert seconds < 5  # answered once 16 KiB had come, not after the 20 MB


def test_the_header_timeout_counts_from_the_connection_however_the_bytes_trickle_in():
    """A byte every 0.1 s, the first 1 s after connecting: 408 at the timeout counted from the connection (1.5 s),
    not from the first byte (2.5 s)."""

    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        answer = asyncio.create_task(read_answer(reader))
        await asyncio.sleep(1.0)
        with contextlib.suppress(ConnectionError):
            for byte in REQUEST + b"X-Slow: " + b"a" * 100:
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        received, first = await asyncio.wait_for(answer, 30)
        writer.close()
        return received, first - started

    before = unparsed(408)
    answer, seconds = in_protocol(scenario, header_timeout_seconds=1.5)
    code, _, body = parsed(answer)
    assert code == 408 and body["error"] == "the request headers did not arrive within 1.5 s; send them without pausing"
    assert 1.4 < seconds < 2.2
    assert unparsed(408) == before + 1


def test_a_connection_left_idle_is_closed_with_a_408_at_once_but_counts_no_request():
    async def scenario(port):
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        answer, _ = await asyncio.wait_for(read_answer(reader), 30)
        return answer, time.monotonic() - started

    before = unparsed(408)
    answer, closed_after = in_protocol(scenario, header_timeout_seconds=0.5)
    assert parsed(answer)[0] == 408 and closed_after < 0.9  # closed with the answer: no bytes came to drop
    assert unparsed(408) == before


# --------------------------------------------------------------------------- pathological JSON, in process


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


DEEP_BODIES = {
    "body 1,000 deep": nested(1000),
    "body 100,000 deep": nested(100_000),
    "texts 1,000 deep": b'{"texts": ' + nested(1000, b'"a"') + b"}",
    "texts 100,000 deep": b'{"texts": ' + nested(100_000, b'"a"') + b"}",
    "object 100,000 deep": b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    "texts 500 deep": b'{"texts": ' + nested(500, b'"a"') + b"}",  # parsed, then refused by validation (422)
}


def _never_well_formed(value, headers) -> None:
    return None


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast path", "declared path"])
@pytest.mark.parametrize("route", ["/classify", "/predict"])
def test_deeply_nested_json_is_a_400_or_422_without_a_traceback(monkeypatch, caplog, route, fast_path):
    if not fast_path:
        monkeypatch.setattr(api, "_well_formed", _never_well_formed)

    async def scenario(client):
        return {name: await client.post(route, content=body, headers=JSON) for name, body in DEEP_BODIES.items()}

    with caplog.at_level(logging.DEBUG):
        answers = run(scenario)
    for name, response in answers.items():
        assert response.status_code in (400, 422), (name, response.text)
        assert response.json()["error"], name
        if response.status_code == 400:
            assert "nests arrays or objects too deeply" in response.json()["error"], name
    assert answers["body 100,000 deep"].status_code == answers["texts 100,000 deep"].status_code == 400
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"texts": ["a"], "texts": ["b", "c"]}', "the key 'texts' twice in one object"),
        (b'{"texts": ["a"], "top_k": 1, "top_k": 2}', "the key 'top_k' twice"),
        (b'{"texts": ["a"], "parameters": {"x": 1, "x": 2}}', "the key 'x' twice"),
        ('{"texts": ["café"]}'.encode("utf-16-le"), "the body is UTF-16-LE, not UTF-8"),
        ('{"texts": ["café"]}'.encode("utf-16"), "the body is UTF-16, not UTF-8"),  # with its byte order mark
        ('{"texts": ["café"]}'.encode("utf-16-be"), "the body is UTF-16-BE, not UTF-8"),
        ('{"texts": ["café"]}'.encode("utf-32"), "the body is UTF-32, not UTF-8"),
        (b'{"texts": ["caf\xe9"]}', "the body is not UTF-8 (byte 0xe9 at offset 15)"),
        (b'{"texts": ["\xed\xa0\x80"]}', "the body is not UTF-8 (byte 0xed at offset 12)"),  # an encoded surrogate
    ],
    ids=["texts twice", "top_k twice", "nested key twice", "utf-16-le", "utf-16 bom", "utf-16-be", "utf-32", "latin-1", "cesu"],
)
def test_bodies_that_json_loads_would_take_are_400s_naming_the_problem(body, fragment):
    async def scenario(client):
        return await client.post("/classify", content=body, headers=JSON), await client.post("/predict", content=body, headers=JSON)

    back = FakeScorer()
    classify, predict = run(scenario, back)
    assert classify.status_code == 400 and fragment in error_body(classify)["error"]
    assert predict.status_code == 400 and fragment in predict.json()["error"]
    assert predict.json()["error_type"] == "validation"
    assert back.deadlines == []


def test_a_utf8_byte_order_mark_is_still_taken():
    async def scenario(client):
        return await client.post("/classify", content='{"texts": ["café"]}'.encode("utf-8-sig"), headers=JSON)

    assert run(scenario).status_code == 200


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({}, "none"),
        ({"content-type": "text/plain"}, "text/plain"),
        ({"content-type": "application/x-www-form-urlencoded"}, "application/x-www-form-urlencoded"),
    ],
    ids=["missing", "text/plain", "form"],
)
def test_a_body_that_is_not_declared_json_is_a_415_naming_the_content_type(headers, named):
    async def scenario(client):
        body = b'{"texts": ["fine"]}'
        return await client.post("/classify", content=body, headers=headers), await client.post("/predict", content=body, headers=headers)

    classify, predict = run(scenario)
    expected = f"the body must be JSON, sent with the header Content-Type: application/json (this request's Content-Type: {named})"
    assert classify.status_code == 415 and error_body(classify) == {"error": expected}
    assert predict.status_code == 415 and predict.json()["error"] == expected


def test_a_json_subtype_is_taken_as_json():
    async def scenario(client):
        return await client.post("/classify", content=b'{"texts": ["fine"]}', headers={"content-type": "application/vnd.api+json"})

    assert run(scenario).status_code == 200


# --------------------------------------------------------------------------- hosts and redirects, in process


def test_a_request_without_a_host_header_is_a_400():
    async def main():
        app = create_app(settings(), fake_engine(FakeScorer()))
        async with serving(app):
            client = RawClient([b'{"texts": ["fine"]}'])
            scope = client.scope(JSON)
            scope["headers"] = [header for header in scope["headers"] if header[0] != b"host"]
            await app(scope, client.receive, client.send)
            return client.answer

    status, headers, body = asyncio.run(main())
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "the request needs exactly one Host header, naming this service's host"


def test_trusted_hosts_refuse_other_hosts_except_on_probes_and_metrics():
    async def scenario(client):
        answers = {}
        for host in ("api.example.com", "api.example.com:8443", "v2.api.example.com", "example.com", "evil.test"):
            answers[host] = (await client.post("/classify", json={"texts": ["fine"]}, headers={"host": host})).status_code
        answers["probe"] = (await client.get("/health", headers={"host": "10.0.0.7:8000"})).status_code
        answers["metrics"] = (await client.get("/metrics", headers={"host": "10.0.0.7:8000"})).status_code
        refused = await client.post("/classify", json={"texts": ["fine"]}, headers={"host": "evil.test"})
        return answers, refused

    answers, refused = run(scenario, trusted_hosts="api.example.com, *.api.example.com, test")
    assert answers == {
        "api.example.com": 200, "api.example.com:8443": 200, "v2.api.example.com": 200, "example.com": 400,
        "evil.test": 400, "probe": 200, "metrics": 200,
    }  # fmt: skip
    assert "does not answer to (CLASSIFIER_TRUSTED_HOSTS)" in error_body(refused)["error"]


def test_the_limits_are_settings_shown_at_info():
    async def scenario(client):
        return (await client.get("/info")).json()["settings"]

    shown = run(scenario, max_header_bytes=32768, max_header_count=50, trusted_hosts="test")
    assert {key: shown[key] for key in ("max_request_line_bytes", "max_header_bytes", "max_header_count", "trusted_hosts")} == {
        "max_request_line_bytes": 8192, "max_header_bytes": 32768, "max_header_count": 50, "trusted_hosts": "test",
    }  # fmt: skip


@pytest.mark.parametrize("value", ["", " , ", "example.com:8000", "api.*.com"])
def test_bad_trusted_hosts_are_refused(value):
    with pytest.raises(ValueError, match="trusted_hosts"):
        Settings(trusted_hosts=value)


def test_a_trailing_slash_is_a_404_not_a_redirect_built_from_the_host():
    async def scenario(client):
        return await client.post("/classify/", json={"texts": ["fine"]}, headers={"host": "evil.test"})

    response = run(scenario)
    assert response.status_code == 404 and "location" not in response.headers
    assert error_body(response) == {"error": "no such endpoint: /classify/; see /docs"}


# --------------------------------------------------------------------------- /docs offline, in process


def test_docs_and_redoc_load_every_asset_from_the_service_itself():
    async def scenario(client):
        pages = {path: await client.get(path) for path in ("/docs", "/redoc")}
        assets = {}
        for page in pages.values():
            for reference in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""", page.text):
                url = next(part for part in reference if part)
                assets[url] = await client.get(url)
        return pages, assets

    pages, assets = run(scenario)
    assert all(page.status_code == 200 for page in pages.values())
    assert not [url for url in assets if "://" in url or url.startswith("//")], assets.keys()  # nothing from elsewhere
    assert {url.rsplit("/", 1)[-1] for url in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "openapi.json"}
    for url, response in assets.items():
        assert response.status_code == 200 and len(response.content) > 100, url


# --------------------------------------------------------------------------- the real server


@pytest.mark.integration
def test_the_real_server_answers_what_it_cannot_parse_as_counted_json(tiny_model_dir):
    limits = {"CLASSIFIER_MAX_HEADER_BYTES": "4096", "CLASSIFIER_MAX_REQUEST_LINE_BYTES": "1024"}
    with start_service(tiny_model_dir, limits) as url:
        host, port = url.removeprefix("http://").split(":")
        answers = []
        for request in (
            # over the limit, within what is read and dropped before the close (16x), so the answer is not reset
            b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 50_000 + b"\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /health HTTP/1.0\r\n\r\n",  # no Host
        ):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                with contextlib.suppress(ConnectionError):
                    sock.sendall(request)
                received = b""
                with contextlib.suppress(ConnectionError):
                    while chunk := sock.recv(65536):
                        received += chunk
            answers.append(parsed(received))
        assert [status for status, _, _ in answers] == [431, 400, 400]
        assert all(body["error"] and body["request_id"] == headers["x-request-id"] for _, headers, body in answers)
        metrics = scrape(url)
        assert metrics.value("classifier_requests_total", route="unparsed", status="431") == 1
        assert metrics.value("classifier_requests_total", route="unparsed", status="400") == 1
        assert metrics.value("classifier_requests_total", route="/health", status="400") == 1  # no Host: routed, then refused
