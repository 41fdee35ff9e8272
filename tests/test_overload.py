"""Work nobody will receive is not run: clients that leave, deadlines, huge texts. Real service processes."""

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from transformers import PreTrainedTokenizerFast

from loadtest.probe import scrape, wait_for
from service.tokenization import EncoderPool
from tests.conftest import TINY_MAX_LENGTH, build_tiny_tokenizer, run_service, start_service

LONG = "the film was long and the plot was slow " * 3


def metric(url: str, name: str, **labels: str) -> float:
    return scrape(url).value(name, **labels)


def send_and_leave(url: str, body: dict, queued_texts: int) -> None:
    """POST `body` on a raw socket, wait until its texts are queued, then close the connection unanswered."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        wait_for(lambda: metric(url, "classifier_queue_texts") >= queued_texts)


@pytest.fixture(scope="module")
def slow_window_url(tiny_model_dir):
    """Texts wait 3 s for partners, so they are still queued when their client leaves or their deadline passes."""
    with start_service(tiny_model_dir, {"CLASSIFIER_BATCH_WINDOW_MS": "3000"}) as url:
        yield url


@pytest.mark.integration
def test_texts_of_a_client_that_left_are_dropped_before_the_model(slow_window_url):
    url = slow_window_url
    real_before = metric(url, "classifier_real_tokens_total")
    gone_before = metric(url, "classifier_cancelled_texts_total", reason="client_gone")
    send_and_leave(url, {"texts": [LONG] * 5}, queued_texts=5)
    wait_for(lambda: metric(url, "classifier_cancelled_texts_total", reason="client_gone") == gone_before + 5)
    assert metric(url, "classifier_queue_texts") == 0 and metric(url, "classifier_queue_tokens") == 0
    # A later request runs alone: the model spends tokens on it and on nothing else.
    answered = httpx.post(f"{url}/classify", json={"texts": ["fine"]}, timeout=30)
    assert answered.status_code == 200
    tokens = answered.json()["results"][0]["tokens"]
    assert metric(url, "classifier_real_tokens_total") == real_before + tokens


@pytest.mark.integration
@pytest.mark.parametrize("how", ["body", "header"])
def test_texts_still_queued_at_their_deadline_are_dropped_and_the_request_gets_504(slow_window_url, how):
    url = slow_window_url
    real_before = metric(url, "classifier_real_tokens_total")
    expired_before = metric(url, "classifier_cancelled_texts_total", reason="deadline")
    body = {"texts": [LONG, "short"]}
    headers = {}
    if how == "body":
        body["timeout_ms"] = 300
    else:
        headers["X-Request-Timeout-Ms"] = "300"
    response = httpx.post(f"{url}/classify", json=body, headers=headers, timeout=30)
    assert response.status_code == 504, response.text
    assert "deadline" in response.json()["error"]
    assert metric(url, "classifier_cancelled_texts_total", reason="deadline") == expired_before + 2
    assert metric(url, "classifier_real_tokens_total") == real_before
    assert metric(url, "classifier_queue_texts") == 0


@pytest.mark.integration
def test_the_deadline_is_in_the_openapi_schema(service_url):
    operation = httpx.get(f"{service_url}/openapi.json").json()["paths"]["/classify"]["post"]
    assert any(parameter["name"] == "x-request-timeout-ms" for parameter in operation["parameters"])
    assert {"429", "504"} <= set(operation["responses"])
    schema = httpx.get(f"{service_url}/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]
    assert "timeout_ms" in schema["properties"]


@pytest.mark.integration
def test_a_2_mb_text_costs_bounded_memory_and_a_short_text_beside_it_is_answered(tiny_model_dir):
    huge = "!" * 2_000_000  # 2 million tokens when tokenized whole
    with run_service(tiny_model_dir) as (url, process):

        def memory_kib(field: str) -> int:
            status = Path(f"/proc/{process.pid}/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field)))

        httpx.post(f"{url}/classify", json={"texts": ["warm up the allocator"]}, timeout=30)
        rss_before, peak_before = memory_kib("VmRSS:"), memory_kib("VmHWM:")

        async def together():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                big = asyncio.create_task(client.post("/classify", json={"texts": [huge]}))
                small = asyncio.create_task(client.post("/classify", json={"texts": ["a short one"]}))
                return await big, await small

        for _ in range(3):
            big, small = asyncio.run(together())
            assert big.status_code == 200 and small.status_code == 200
        [result] = big.json()["results"]
        assert (result["tokens"], result["truncated"]) == (TINY_MAX_LENGTH, True)
        # Tokenized whole, one such text took the process from ~450 MB to a 1.7 GB peak and kept 1.3 GB.
        assert memory_kib("VmHWM:") - peak_before < 200_000
        assert memory_kib("VmRSS:") - rss_before < 100_000


class GatedTokenizer(PreTrainedTokenizerFast):
    """Blocks while encoding the text "block" until the test opens the gate: a request that takes forever. The gate
    is on the Rust tokenizer, which the encoder calls directly for whole texts."""

    gate = threading.Event()

    @property
    def backend_tokenizer(self):
        return GatedBackend(super().backend_tokenizer)


class GatedBackend:
    def __init__(self, backend) -> None:
        self.backend = backend

    def encode_batch(self, texts, *args, **kwargs):
        if "block" in texts:
            GatedTokenizer.gate.wait(30)
        return self.backend.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_a_slow_request_in_the_tokenizer_does_not_hold_up_the_next_one():
    tokenizer = build_tiny_tokenizer()
    tokenizer.__class__ = GatedTokenizer
    GatedTokenizer.gate.clear()
    pool = EncoderPool(tokenizer, TINY_MAX_LENGTH, workers=2)
    try:
        slow = pool.submit(["block"], truncate=True)
        quick = pool.submit(["a short text"], truncate=True)
        [encoded] = quick.result(timeout=30)  # answered while the slow one is still being tokenized
        assert len(encoded.ids) > 2 and not slow.done()
    finally:
        GatedTokenizer.gate.set()
        pool.shutdown()
    assert slow.result(timeout=30)[0].ids


def test_the_tokenizer_threads_take_callers_in_turn_so_a_flood_holds_up_no_other_caller():
    """One thread, held by a greedy caller's first request while it queues three more: another caller's request
    queued after them is the next one encoded, not the last."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.__class__ = GatedTokenizer
    GatedTokenizer.gate.clear()
    pool = EncoderPool(tokenizer, TINY_MAX_LENGTH, workers=1)
    finished: list[str] = []
    try:
        futures = {
            name: pool.submit([text], truncate=True, caller=name.split("-")[0])
            for name, text in [("greedy-1", "block"), ("greedy-2", "two"), ("greedy-3", "three"), ("greedy-4", "four"), ("interactive-1", "hi")]
        }
        for name, future in futures.items():
            future.add_done_callback(lambda _, name=name: finished.append(name))
        GatedTokenizer.gate.set()
        for future in futures.values():
            assert future.result(timeout=30)[0].ids
    finally:
        pool.shutdown()
    assert finished == ["greedy-1", "interactive-1", "greedy-2", "greedy-3", "greedy-4"]


@pytest.mark.integration
def test_a_deadline_counts_from_the_request_s_first_bytes_not_from_its_handler(service_url):
    """A client that took 1 s to upload its body has waited 1 s already: with a 300 ms deadline it gets 504 at once
    (counted from when its handler ran, the text would be answered in time)."""
    url = service_url
    parts = urlsplit(url)
    first, rest = b'{"texts": ["an upload that pauses"], ', b'"timeout_ms": 300}'
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(first) + len(rest)}\r\n\r\n".encode()
            + first
        )
        wait_for(lambda: metric(url, "classifier_requests_in_flight") >= 1)
        time.sleep(1.0)  # the slow client itself, not a wait for the service
        sock.sendall(rest)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 504 "), answer[:200]
    assert b"deadline passed" in answer
    assert httpx.post(f"{url}/classify", json={"texts": ["on time"], "timeout_ms": 2000}, timeout=30).status_code == 200
