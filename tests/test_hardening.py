"""Hardening against slow or vanishing clients, shutdown and start-up failure (issue 11), where a real server process
is what is tested: its sockets, signals and exit. Malformed input, the concurrency cap and the other statuses are
tested in process, in tests/test_http.py."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from loadtest.probe import scrape, wait_for
from tests.conftest import ROOT, free_port, run_service, start_service

pytestmark = pytest.mark.integration  # service processes or external programs (see pyproject's markers)

STALLED_UPLOAD = b'POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"texts": ["part of a body'


def requests_counted(url: str, route: str, status: str) -> float:
    return scrape(url).value("classifier_requests_total", route=route, status=status)


@contextlib.contextmanager
def raw_connection(url: str, data: bytes) -> Iterator[socket.socket]:
    """A client that sends `data` and then stalls, until the block ends."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        yield sock


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.fixture(scope="module")
def limited_url(tiny_model_dir) -> Iterator[str]:
    """A service with short client time limits."""
    env = {
        "CLASSIFIER_HEADER_TIMEOUT_SECONDS": "1",
        "CLASSIFIER_BODY_TIMEOUT_SECONDS": "2",
    }
    with start_service(tiny_model_dir, env) as url:
        yield url


def test_a_client_that_never_finishes_its_headers_gets_a_408_and_is_closed(limited_url):
    started = time.monotonic()
    with raw_connection(limited_url, b"POST /classify HTTP/1.1\r\nHost: test\r\n") as sock:
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "the request headers did not arrive within 1 s; send them without pausing"
    assert body["request_id"] and f"x-request-id: {body['request_id']}".encode() in answer
    assert time.monotonic() - started < 20  # closed by the server, well before the socket's own 30 s timeout


def test_a_stalled_upload_gets_a_408_and_is_closed(limited_url):
    before = requests_counted(limited_url, "/classify", "408")
    with raw_connection(limited_url, STALLED_UPLOAD) as sock:
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 2 s" in answer and b"connection: close" in answer.lower()
    assert requests_counted(limited_url, "/classify", "408") == before + 1


def _gauge(url: str, name: str) -> float:
    return scrape(url).exported(name)


def test_an_aborted_upload_is_counted_as_499_not_500(limited_url):
    before = {status: requests_counted(limited_url, "/classify", status) for status in ("499", "500")}
    with raw_connection(limited_url, STALLED_UPLOAD):
        wait_for(lambda: _gauge(limited_url, "classifier_requests_in_flight") == 1, what="the upload to start")
    wait_for(lambda: requests_counted(limited_url, "/classify", "499") == before["499"] + 1, what="a 499")
    assert requests_counted(limited_url, "/classify", "500") == before["500"]


def test_a_caller_that_leaves_after_its_text_is_queued_is_counted_as_499_not_200(tiny_model_dir):
    with start_service(tiny_model_dir, {"CLASSIFIER_BATCH_WINDOW_MS": "1500"}) as url:
        body = json.dumps({"texts": ["queued, then abandoned"]}).encode()
        request = (f"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        with raw_connection(url, request):
            wait_for(lambda: _gauge(url, "classifier_queue_texts") == 1, what="the text to be queued")
        wait_for(lambda: requests_counted(url, "/classify", "499") == 1, what="a 499")
        assert requests_counted(url, "/classify", "200") == 0


@pytest.mark.parametrize("size", [5_000_000, 20_000_000])
def test_an_oversized_body_reaches_urllib_as_a_413_with_its_message(service_url, size):
    """urllib sends the whole body before it reads; answering first and closing reset its connection."""
    import urllib.error
    import urllib.request

    body = json.dumps({"texts": ["x" * 1000] * (size // 1000)}).encode()
    request = urllib.request.Request(f"{service_url}/classify", data=body, headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    assert answer.value.code == 413
    assert "larger than 2097152 bytes" in json.loads(answer.value.read())["error"]


async def _queue_a_text_then_sigterm(client: httpx.AsyncClient, url: str, process) -> asyncio.Task:
    """Send a text, wait until the service shows it queued, then SIGTERM; the task holds its response."""
    accepted = asyncio.create_task(client.post("/classify", json={"texts": ["accepted before SIGTERM"]}))
    await asyncio.to_thread(wait_for, lambda: _gauge(url, "classifier_queue_texts") >= 1, 30, "the text queued")
    process.send_signal(signal.SIGTERM)
    return accepted


def test_sigterm_makes_ready_503_while_requests_are_still_served_then_exits_0(tiny_model_dir):
    env = {"CLASSIFIER_DRAIN_DELAY_SECONDS": "4", "CLASSIFIER_BATCH_WINDOW_MS": "500"}
    with run_service(tiny_model_dir, env) as (url, process):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                accepted = await _queue_a_text_then_sigterm(client, url, process)
                while True:  # polled: the service says nothing when its drain starts
                    ready = await client.get("/ready")
                    if ready.status_code != 200:
                        break
                    await asyncio.sleep(0.02)
                during_delay = await client.post("/classify", json={"texts": ["sent while draining"]})
                return await accepted, ready, during_delay

        accepted, ready, during_delay = asyncio.run(scenario())
        assert process.wait(timeout=30) == 0
    assert ready.status_code == 503 and "draining" in ready.json()["error"]
    assert during_delay.status_code == 200, during_delay.text
    assert accepted.status_code == 200, accepted.text


def test_sigterm_with_a_stalled_upload_exits_within_the_grace_period_and_answers_what_it_accepted(tiny_model_dir):
    grace = 4
    env = {
        "CLASSIFIER_SHUTDOWN_GRACE_SECONDS": str(grace),
        "CLASSIFIER_BODY_TIMEOUT_SECONDS": "600",  # the grace period, not the body timeout, ends this upload
        "CLASSIFIER_BATCH_WINDOW_MS": "1000",
    }
    with run_service(tiny_model_dir, env) as (url, process), raw_connection(url, STALLED_UPLOAD):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                accepted = await _queue_a_text_then_sigterm(client, url, process)
                signalled = time.monotonic()
                response = await accepted
                await asyncio.get_running_loop().run_in_executor(None, process.wait, 30)
                return response, time.monotonic() - signalled

        accepted, took = asyncio.run(scenario())
        assert process.returncode == 0
    assert accepted.status_code == 200, accepted.text
    assert took < grace + 5  # the grace period plus interpreter teardown on a loaded machine


def run_until_exit(model: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service", "--port", str(free_port()), "--model", model]
    full_env = {**os.environ, "CLASSIFIER_TORCH_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_a_missing_model_directory_exits_1_saying_so(tmp_path):
    finished = run_until_exit(str(tmp_path / "missing"))
    assert finished.returncode == 1
    errors = [line for line in finished.stderr.splitlines() if " ERROR " in line]
    assert errors == [
        f"{errors[0].split(' ERROR ')[0]} ERROR service.loading: the model could not be loaded: "
        f"FileNotFoundError: model directory {tmp_path / 'missing'} does not exist"
    ]
    assert "Traceback" not in finished.stderr and "hub" not in finished.stderr


def test_settings_that_cannot_work_with_the_model_exit_1_at_start(tiny_model_dir):
    finished = run_until_exit(str(tiny_model_dir), {"CLASSIFIER_MAX_BATCH_TOKENS": "16"})
    assert finished.returncode == 1
    assert "max_batch_tokens (16) is below the model's maximum length (64)" in finished.stderr


def test_a_second_signal_during_the_drain_delay_exits_at_once(tiny_model_dir):
    env = {"CLASSIFIER_DRAIN_DELAY_SECONDS": "60", "CLASSIFIER_SHUTDOWN_GRACE_SECONDS": "120"}
    with run_service(tiny_model_dir, env) as (url, process):
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, what="draining")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 1  # well before the 60 s delay ends
