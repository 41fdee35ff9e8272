"""loadtest/probe.py, the load-test harness: /metrics parsed and diffed as Prometheus would, the one percentile, the
one readiness wait."""

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loadtest.probe import (
    Client,
    Interval,
    Scrape,
    ServerProcess,
    ServiceNotReady,
    histogram_quantile,
    is_ready,
    open_loop,
    percentile,
    poisson_requests,
    server_summary,
    wait_for,
    wait_until_ready,
)


def test_interval_diffs_counters_and_histograms_of_a_real_exposition():
    registry = CollectorRegistry()
    requests = Counter("app_requests", "requests", ["route", "status"], registry=registry)
    latency = Histogram("app_latency_seconds", "latency", ["route"], buckets=(0.1, 0.2, 0.4), registry=registry)
    queue = Gauge("app_queue_texts", "queue", registry=registry)
    requests.labels("/a", "200").inc(5)
    latency.labels("/a").observe(0.05)  # before the interval: must not count
    before = Scrape.parse(generate_latest(registry).decode())

    requests.labels("/a", "200").inc(3)
    requests.labels("/a", "429").inc(2)
    requests.labels("/b", "200").inc(7)
    for seconds in (0.15, 0.15, 0.3, 0.3, 1.0):
        latency.labels("/a").observe(seconds)
    latency.labels("/b").observe(0.01)
    queue.set(4)
    after = Scrape.parse(generate_latest(registry).decode())
    change = Interval(before, after)

    assert change.delta("app_requests_total") == 12
    assert change.delta("app_requests_total", route="/a") == 5
    assert change.delta_by("app_requests_total", "status", route="/a") == {"200": 3, "429": 2}
    assert change.delta_by("app_requests_total", "route", status="429") == {"/a": 2}  # zero increases left out
    assert change.delta("app_missing_total") == 0
    assert after.value("app_queue_texts") == 4 == after.exported("app_queue_texts")
    assert after.value("app_queue_texts_typo") == 0
    with pytest.raises(KeyError, match="app_queue_texts_typo"):
        after.exported("app_queue_texts_typo")

    histogram = change.histogram("app_latency_seconds", route="/a")
    assert histogram.count == 5 and histogram.sum == pytest.approx(1.9) and histogram.mean == pytest.approx(0.38)
    assert histogram.buckets == {0.1: 0, 0.2: 2, 0.4: 4, float("inf"): 5}
    assert histogram.quantile(0.5) == pytest.approx(0.2 + 0.2 * 0.5 / 2)  # rank 2.5 of 5, inside (0.2, 0.4]
    assert change.histogram("app_latency_seconds").count == 6  # both routes
    assert change.histogram("app_latency_seconds", route="/c").quantile(0.5) is None


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 0.0, 0.2: 50.0, 0.4: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 4.0}) == 0.1  # open-ended bucket: its lower bound
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None  # no observations


def test_percentile_is_the_nearest_rank_from_above_as_wrk_and_locust_count():
    values = [0.013, 0.2, 0.011, 5.0, 0.4, 0.09, 0.3]
    for p in (1, 50, 90, 99):  # p% of 7 values is never a whole number of them: numpy's inverted_cdf agrees
        assert percentile(values, p) == pytest.approx(numpy.percentile(values, p, method="inverted_cdf"))
    assert percentile([4, 1, 3, 2], 50) == 3  # rank floor(0.5 * 4) = 2 of 0..3: the higher middle, and still an int
    assert percentile(list(range(100)), 99) == 99 and percentile(list(range(100)), 100) == 99
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_wait_for_returns_the_condition_s_value_and_names_what_timed_out():
    attempts = iter([None, 0, "ready"])
    assert wait_for(lambda: next(attempts), timeout=5, what="the third try", interval=0) == "ready"
    with pytest.raises(TimeoutError, match=r"timed out after 0.2 s waiting for the queue to empty"):
        wait_for(lambda: False, timeout=0.2, what="the queue to empty", interval=0.01)


class Readiness(BaseHTTPRequestHandler):
    """/ready answers 503 until the server's `ready` event is set."""

    def do_GET(self):
        ready = self.path == "/ready" and self.server.ready.is_set()
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler], **attributes) -> Iterator[tuple[ThreadingHTTPServer, str]]:
    """A local HTTP server in a thread (no service process), with `attributes` set on it for its handler."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attributes.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def readiness_server():
    with serving(Readiness, ready=threading.Event()) as served:
        yield served


def test_wait_until_ready_waits_for_200_and_times_out_with_a_clear_error(readiness_server):
    server, url = readiness_server
    assert not is_ready(url)
    with pytest.raises(ServiceNotReady, match=r"waiting for http://127\.0\.0\.1:\d+/ready to answer 200"):
        wait_until_ready(url, timeout=0.3)
    threading.Timer(0.2, server.ready.set).start()
    wait_until_ready(url, timeout=30)
    assert is_ready(url)


def test_wait_until_ready_reports_a_process_that_exited_with_its_log(tmp_path):
    log = (tmp_path / "service.log").open("w+")
    process = subprocess.Popen([sys.executable, "-c", "print('ValueError: no model here'); raise SystemExit(3)"], stdout=log)
    process.wait(timeout=30)
    with pytest.raises(ServiceNotReady, match=r"exited with status 3(.|\n)*ValueError: no model here"):
        wait_until_ready("http://127.0.0.1:9", timeout=30, process=process, log=log)


def test_a_server_is_not_started_on_a_port_another_one_serves(readiness_server, tmp_path):
    """A server left from an earlier run would answer /ready for the new one, and the run would measure it."""
    server, _ = readiness_server
    server.ready.set()
    port = server.server_address[1]
    with pytest.raises(ServiceNotReady, match=rf"port {port} is already served by another process"):
        ServerProcess([sys.executable, "-c", "pass"], port, tmp_path / "service.log")


def test_server_summary_reads_the_service_s_metrics_over_the_window():
    registry = CollectorRegistry()
    real = Counter("classifier_real_tokens", "real", registry=registry)
    padded = Counter("classifier_padded_tokens", "padded", registry=registry)
    batch_size = Histogram("classifier_batch_size", "texts per batch", buckets=(1, 8, 32), registry=registry)
    flushes = Counter("classifier_batch_flushes", "flushes", ["reason"], registry=registry)
    rejected = Counter("classifier_rejected_texts", "refused", ["reason"], registry=registry)
    latency = Histogram("classifier_text_latency_seconds", "latency", ["length"], buckets=(0.1, 1), registry=registry)
    empty = Scrape.parse(generate_latest(registry).decode())
    assert server_summary(Interval(empty, empty)).padding_efficiency is None  # no batch, no efficiency

    real.inc(300)
    padded.inc(400)
    for texts in (4, 6):
        batch_size.observe(texts)
    flushes.labels("size").inc(2)
    rejected.labels("queue_full").inc(3)
    latency.labels("1-16").observe(0.05)
    summary = server_summary(Interval(empty, Scrape.parse(generate_latest(registry).decode())))
    assert summary.padding_efficiency == 0.75 and summary.batches == 2 and summary.batch_size.mean == 5
    assert summary.flushes == {"size": 2} and summary.rejected_texts == {"queue_full": 3}
    assert list(summary.text_latency_by_length) == ["1-16"] and summary.text_latency_by_length["1-16"].count == 1
    assert summary.queue_wait.count == 0 and summary.queue_wait.mean is None  # a metric the exposition lacks


def test_open_loop_arrivals_depend_only_on_the_seed_and_each_may_draw_from_it():
    def expected(rate: float, duration: float, seed: int) -> int:
        rng, offset, arrivals = random.Random(seed), 0.0, 0
        while offset < duration:
            arrivals += 1
            rng.random()  # what each arrival draws, in turn with the gaps
            offset += rng.expovariate(rate)
        return arrivals

    arrived: list[int] = []
    rng = random.Random(3)

    async def arrival(index: int) -> None:
        arrived.append(index)

    def arrive(index: int):
        rng.random()
        return arrival(index)

    sent, seconds = asyncio.run(open_loop(400, 0.25, arrive, rng))
    assert sent == expected(400, 0.25, 3) == len(arrived) and sorted(arrived) == list(range(sent))
    assert 0.2 < seconds < 5


class Classify(BaseHTTPRequestHandler):
    """POST answers 200 with the body back when it holds "ok", else 503; counts the connections it accepted."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.server.connections += 1

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200 if b"ok" in body else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def classify_server():
    with serving(Classify, connections=0) as served:
        yield served


def test_client_reuses_keep_alive_connections_and_hangs_up_when_asked(classify_server):
    server, url = classify_server

    async def talk() -> list:
        client = Client.of(url)
        answers = [await client.post("/classify", json.dumps({"texts": f"ok {i}"}).encode()) for i in range(3)]
        left = await client.request("/classify", b'{"texts": "ok"}', leave_after=0.01)
        client.close()
        return [*answers, left]

    *answers, left = asyncio.run(talk())
    assert answers == [("200", json.dumps({"texts": f"ok {i}"}).encode()) for i in range(3)]
    assert left.status == "left"
    assert server.connections == 2  # one kept alive for the three posts, a fresh one to hang up on


def test_poisson_requests_counts_answers_by_body_and_failures(classify_server):
    _, url = classify_server
    bodies = [b'{"texts": "ok"}', b'{"texts": "refused"}']
    run = asyncio.run(poisson_requests(url, bodies, rate=200, duration=0.3, rng=random.Random(0), first=1))
    assert run.sent == len(run.answered) + run.failures > 10
    assert {index for index, _ in run.answered} == {0} and run.failures in (run.sent // 2, (run.sent + 1) // 2)
    summary = run.summary()
    assert summary["texts"] == len(run.answered) and summary["failures"] == run.failures
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
