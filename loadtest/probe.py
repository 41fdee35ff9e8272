"""The load-test harness: how every script in loadtest/ (and the tests) drives a running service and reads it from
outside. One of each thing:

    with ServerProcess(service_command(model, port), port, log_path, env) as server: ...   # the one server starter
    saturate(server.url, bodies, concurrency=256, duration=30)     # the one wrk runner (closed loop)
    python_saturate(server.url, bodies, 256, 30, processes=4)     # the same closed loop in Python, where wrk is not
    await poisson_requests(server.url, bodies, rate=20, duration=30, rng=random.Random(0))  # open loop, one client
    before = scrape(url); ...; summary = server_summary(Interval(before, scrape(url)))      # what /metrics said
    change.histogram("classifier_queue_wait_seconds").quantile(0.99)  # as Prometheus' histogram_quantile would
    percentile(latencies, 99)                                         # the one percentile of client measurements
    wait_until_ready(url, timeout=90, process=process, log=log)       # one polling loop, one clear error
    machine()                                                         # CPU, flags, cores, memory, versions

It imports only the standard library, httpx and prometheus_client (none of the loadtest extra's heavy packages;
machine() imports torch when called), so the tests use it too.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]  # the tree holding the service package
WRK_SCRIPT = Path(__file__).with_name("wrk_classify.lua")
Series = tuple[str, frozenset[tuple[str, str]]]  # a sample's name and its labels
T = TypeVar("T")
Number = TypeVar("Number", int, float)


# ---------------------------------------------------------------- /metrics


@dataclass(frozen=True)
class Scrape:
    """One reading of a /metrics page: every sample's value by series."""

    samples: dict[Series, float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(
            {
                (sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
        )

    def matching(self, name: str, labels: dict[str, str]) -> dict[Series, float]:
        """The series called `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return {key: value for key, value in self.samples.items() if key[0] == name and wanted <= key[1]}

    def value(self, name: str, **labels: str) -> float:
        """Sum over the series called `name` with these labels (0 when there is none): a gauge's current value."""
        return sum(self.matching(name, labels).values())

    def exported(self, name: str, **labels: str) -> float:
        """Like value, but raises KeyError when no series matches (a metric renamed or never exported)."""
        series = self.matching(name, labels)
        if not series:
            raise KeyError(f"no series {name} with labels {labels} in /metrics")
        return sum(series.values())


def scrape(url: str, timeout: float = 10) -> Scrape:
    """Read `url`/metrics."""
    response = httpx.get(f"{url}/metrics", timeout=timeout)
    response.raise_for_status()
    return Scrape.parse(response.text)


@dataclass(frozen=True)
class HistogramChange:
    """The observations a histogram made between two scrapes."""

    count: float
    sum: float
    buckets: dict[float, float]  # cumulative count per upper bound, +Inf included

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)


@dataclass(frozen=True)
class Interval:
    """What the service counted between two scrapes (counters and histograms only: gauges do not add up)."""

    before: Scrape
    after: Scrape

    def _increases(self, name: str, labels: dict[str, str]) -> dict[Series, float]:
        return {key: value - self.before.samples.get(key, 0.0) for key, value in self.after.matching(name, labels).items()}

    def delta(self, name: str, **labels: str) -> float:
        """Increase of a counter (e.g. `classifier_real_tokens_total`), summed over the series matching labels."""
        return sum(self._increases(name, labels).values())

    def delta_by(self, name: str, by: str, **labels: str) -> dict[str, float]:
        """Non-zero increases of a counter per value of the label `by`, over the series matching labels."""
        totals: dict[str, float] = defaultdict(float)
        for (_, series_labels), increase in self._increases(name, labels).items():
            totals[dict(series_labels)[by]] += increase
        return {value: total for value, total in sorted(totals.items()) if total}

    def histogram(self, name: str, **labels: str) -> HistogramChange:
        """The histogram `name` (without suffix) over the interval, summed over the series matching labels."""
        buckets: dict[float, float] = defaultdict(float)
        for (_, series_labels), increase in self._increases(f"{name}_bucket", labels).items():
            buckets[float(dict(series_labels)["le"])] += increase
        return HistogramChange(self.delta(f"{name}_count", **labels), self.delta(f"{name}_sum", **labels), dict(buckets))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' estimate from cumulative bucket counts {upper bound: count}: linear within a bucket, the highest
    finite bound for a rank in the open-ended bucket, None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (buckets[bound] - below)
        lower, below = bound, buckets[bound]
    return lower


@dataclass(frozen=True)
class ServerSummary:
    """What the service's /metrics counted over a run window (two scrapes): the one server-side summary, which
    each script writes out in its own words."""

    texts_classified: float
    requests_by_status: dict[str, float]  # /classify responses, non-zero counts only
    request_seconds: HistogramChange  # time in the service per /classify request
    real_tokens: float
    padded_tokens: float
    unanswered_tokens: float  # model tokens spent on texts whose client was gone or past its deadline
    batch_size: HistogramChange  # texts per batch; its count is the number of batches
    batch_padding_efficiency: HistogramChange
    padded_length: HistogramChange
    queue_wait: HistogramChange
    batch_inference: HistogramChange
    input_tokens: HistogramChange
    flushes: dict[str, float]  # batches started, by reason
    truncated_texts: float
    rejected_texts: dict[str, float]  # by reason
    cancelled_texts: dict[str, float]  # queued texts dropped, by reason
    text_latency_by_length: dict[str, HistogramChange]  # per length class that had texts

    @property
    def batches(self) -> float:
        return self.batch_size.count

    @property
    def padding_efficiency(self) -> float | None:
        """Real over computed (padded) tokens; None without a batch."""
        return self.real_tokens / self.padded_tokens if self.padded_tokens else None


def server_summary(change: Interval, route: str = "/classify") -> ServerSummary:
    lengths = change.delta_by("classifier_text_latency_seconds_count", "length")
    return ServerSummary(
        texts_classified=change.delta("classifier_classified_texts_total"),
        requests_by_status=change.delta_by("classifier_requests_total", "status", route=route),
        request_seconds=change.histogram("classifier_request_duration_seconds", route=route),
        real_tokens=change.delta("classifier_real_tokens_total"),
        padded_tokens=change.delta("classifier_padded_tokens_total"),
        unanswered_tokens=change.delta("classifier_unanswered_tokens_total"),
        batch_size=change.histogram("classifier_batch_size"),
        batch_padding_efficiency=change.histogram("classifier_batch_padding_efficiency"),
        padded_length=change.histogram("classifier_batch_padded_length"),
        queue_wait=change.histogram("classifier_queue_wait_seconds"),
        batch_inference=change.histogram("classifier_batch_inference_seconds"),
        input_tokens=change.histogram("classifier_input_tokens"),
        flushes=change.delta_by("classifier_batch_flushes_total", "reason"),
        truncated_texts=change.delta("classifier_truncated_texts_total"),
        rejected_texts=change.delta_by("classifier_rejected_texts_total", "reason"),
        cancelled_texts=change.delta_by("classifier_cancelled_texts_total", "reason"),
        text_latency_by_length={name: change.histogram("classifier_text_latency_seconds", length=name) for name in lengths},
    )


# ---------------------------------------------------------------- percentiles


def percentile(values: Sequence[Number], p: float) -> Number | None:
    """The p-th percentile (0 <= p <= 100) of client-side measurements, the nearest rank from above: the value at
    0-based rank floor(p/100 * n) of the n sorted values, i.e. the smallest measurement with more than p% of them at
    or below it (the median of an even count is the higher middle value); one of the values, so integers stay
    integers; None when there are none.
    The one definition of the scripts: wrk's latency:percentile() (wrk_classify.lua) and locust's
    get_response_time_percentile() count ranks the same way. (A quantile of a histogram in /metrics is
    histogram_quantile's estimate, interpolated within a bucket as Prometheus does.)"""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(len(ordered) * p / 100))]


# ---------------------------------------------------------------- waiting


class ServiceNotReady(RuntimeError):
    """The service exited, or did not answer 200 on /ready, before the timeout; or its port was served already."""


def wait_for(condition: Callable[[], T], timeout: float = 30, what: str = "the condition", interval: float = 0.05) -> T:
    """Poll `condition()` until it returns something true, and return that; an httpx error counts as not yet (the
    server may still be starting). Raises TimeoutError naming `what` after `timeout` seconds. Events are ordered by
    what the service shows, never by sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := condition():
                return result
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def is_ready(url: str, timeout: float = 2) -> bool:
    """Whether `url`/ready answers 200 now."""
    try:
        return httpx.get(f"{url}/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_ready(url: str, timeout: float, process: subprocess.Popen | None = None, log: IO[str] | Path | None = None) -> None:
    """Wait until `url`/ready answers 200. Raises ServiceNotReady, with the log's text when given (a readable file
    or a path), if `process` exits first or the timeout passes."""

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise ServiceNotReady(f"{url}: the service exited with status {process.returncode}{_log_text(log)}")
        return is_ready(url)

    try:
        wait_for(ready, timeout, f"{url}/ready to answer 200", interval=0.1)
    except TimeoutError as error:
        raise ServiceNotReady(f"{error}{_log_text(log)}") from None


def _log_text(log: IO[str] | Path | None) -> str:
    if log is None:
        return ""
    if isinstance(log, Path):
        return f"; log in {log}:\n{log.read_text(errors='replace')[-20_000:]}"
    log.flush()
    log.seek(0)
    return f"; log:\n{log.read()[-20_000:]}"


def wait_until_idle(url: str, has_metrics: bool = True, timeout: float = 300) -> None:
    """Let the backlog a closed loop left behind finish, so it spills neither into the next measurement nor into
    the scrape that ends this one: for the service, until its queue is empty and every batch it started has ended;
    for a server without metrics (the plain server), until a short text is answered within half a second."""

    def idle() -> bool:
        if has_metrics:
            samples = scrape(url)
            started = samples.value("classifier_batch_flushes_total")
            ended = samples.value("classifier_batch_inference_seconds_count")
            return samples.value("classifier_queue_texts") == 0 and started <= ended
        began = time.monotonic()
        httpx.post(f"{url}/classify", json={"texts": "ready?"}, timeout=timeout)
        return time.monotonic() - began < 0.5

    wait_for(idle, timeout, f"{url} to be idle", interval=0.2)


# ---------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answering(port: int) -> bool:
    """Whether something accepts connections on the loopback `port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def service_command(model: str | Path | None, port: int) -> list[str]:
    """`python -m service` on `port`, with `model` (None: the service's default: MODEL, else the embedded model)."""
    return [sys.executable, "-m", "service", *(["--model", str(model)] if model else []), "--port", str(port)]


def plain_server_command(model: str | Path, port: int) -> list[str]:
    """The baseline server of loadtest/plain_server.py."""
    return [sys.executable, "-m", "loadtest.plain_server", str(model), str(port)]


def _proc_status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(f"no {name} in /proc/{pid}/status")


class ServerProcess:
    """A server started as a child process on a loopback port, in `cwd` (default: this tree), with `env` over this
    process's environment, its output in `log_path`: `with` waits until its /ready answers 200 (stopping it and
    raising ServiceNotReady, with its log, when it does not), and stops it after (SIGTERM, then SIGKILL after a
    minute). The one way the scripts start servers."""

    def __init__(
        self,
        command: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        ready_timeout: float = 300,
    ) -> None:
        if _answering(port):  # its /ready would pass for this server's, and the run would measure the wrong one
            raise ServiceNotReady(f"port {port} is already served by another process (a server left from an earlier run?)")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self._log = log_path.open("w")
        environment = {**os.environ, **(env or {})}
        if "--model" in command:
            environment.pop("MODEL", None)  # the flag says which model: an inherited MODEL would only confuse a reader
        self.process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> ServerProcess:
        try:
            wait_until_ready(self.url, self.ready_timeout, self.process, self.log_path)
        except ServiceNotReady:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def rss_mib(self) -> float:
        """The process's resident memory now (its own, not its children's)."""
        return _proc_status_kib(self.process.pid, "VmRSS") / 1024

    def reset_peak_rss(self) -> bool:
        """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs); False where that is not allowed."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_rss_mib(self) -> float:
        return _proc_status_kib(self.process.pid, "VmHWM") / 1024


# ---------------------------------------------------------------- load: the client and the open loop


@dataclass(frozen=True)
class Answer:
    """What one request got: its HTTP status ("200"), "left" (the client hung up on purpose) or "error: <what>"
    (no answer: the connection failed or closed, or the timeout passed), and the seconds it took."""

    status: str
    seconds: float


@dataclass
class Client:
    """Keep-alive HTTP/1.1 POSTs of JSON on asyncio streams, with a pool of idle connections: cheap enough that the
    load generator leaves the cores to the server under test. `headers` go with every request (an `X-Client-Id`)."""

    host: str
    port: int
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    # uvicorn closes connections idle for 5 s; one reused just as it closes would read as a lost answer.
    MAX_IDLE_SECONDS = 2.0

    @classmethod
    def of(cls, url: str, headers: dict[str, str] | None = None) -> Client:
        host, _, port = url.removeprefix("http://").partition(":")
        return cls(host, int(port), headers=headers or {})

    async def post(self, path: str, body: bytes, leave_after: float | None = None, read_after: float | None = None) -> tuple[str, bytes]:
        """POST `body` to `path`: (status, response body); with `leave_after`, hang up that many seconds after
        sending (on a connection of its own) and return ("left", b""); with `read_after`, start reading the answer
        only that many seconds after sending (a slow reader)."""
        reader, writer = await self._connection(fresh=leave_after is not None)
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            if leave_after is not None:
                await asyncio.sleep(leave_after)
                writer.close()
                return "left", b""
            if read_after is not None:
                await asyncio.sleep(read_after)
            status, headers = await self._head(reader)
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return status, payload

    async def request(
        self,
        path: str,
        body: bytes,
        leave_after: float | None = None,
        give_up_after: float | None = None,
        read_after: float | None = None,
    ) -> Answer:
        """post, timed, with a failure (no answer within `give_up_after` seconds among them) as an Answer rather
        than an exception."""
        started = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(self.post(path, body, leave_after, read_after), give_up_after)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            status = f"error: {type(error).__name__}"
        return Answer(status, time.perf_counter() - started)

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].close()

    async def _connection(self, fresh: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle and not fresh:
            reader, writer, since = self.idle.pop()
            if time.monotonic() - since < self.MAX_IDLE_SECONDS and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status_line.split()[1].decode(), headers


async def open_loop(
    rate: float,
    duration: float,
    arrive: Callable[[int], Awaitable[object]],
    rng: random.Random,
    wait: float | None = None,
) -> tuple[int, float]:
    """Poisson arrivals at `rate` per second for `duration` seconds, whatever the server's speed: the i-th calls
    `arrive(i)` at once (so it may draw from `rng`, in turn with the gaps) and runs what it returns as a task. Then
    waits for every task (at most `wait` seconds; a task's exception is raised here). Returns how many arrived and
    the seconds from the first arrival to the last task's end."""
    tasks: list[asyncio.Task] = []
    started = time.perf_counter()
    offset = 0.0
    while offset < duration:
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        tasks.append(asyncio.ensure_future(arrive(len(tasks))))
        offset += rng.expovariate(rate)
    if tasks:
        done, _ = await asyncio.wait(tasks, timeout=wait)
        for task in done:
            task.result()
    return len(tasks), time.perf_counter() - started


@dataclass(frozen=True)
class OpenLoopRun:
    """The requests of a poisson_requests run."""

    sent: int
    seconds: float
    answered: list[tuple[int, float]]  # (index of the body, seconds) of each request answered 200
    failures: int  # any other status, or no answer

    def summary(self, texts_per_request: int = 1) -> dict:
        latencies = [seconds for _, seconds in self.answered]
        return {
            "texts": len(self.answered) * texts_per_request,
            "failures": self.failures,
            "texts_per_second": len(self.answered) * texts_per_request / self.seconds,
            **latency_ms(latencies),
        }


async def poisson_requests(
    url: str,
    bodies: Sequence[bytes],
    rate: float,
    duration: float,
    rng: random.Random,
    first: int = 0,
    give_up_after: float = 120,
) -> OpenLoopRun:
    """POST /classify the bodies in turn from `first`, at Poisson arrivals (open_loop); a request not answered
    within `give_up_after` seconds is a failure."""
    client = Client.of(url)
    answered: list[tuple[int, float]] = []
    failures = 0

    async def send(index: int) -> None:
        nonlocal failures
        answer = await client.request("/classify", bodies[index], give_up_after=give_up_after)
        if answer.status == "200":
            answered.append((index, answer.seconds))
        else:
            failures += 1

    sent, seconds = await open_loop(rate, duration, lambda i: send((first + i) % len(bodies)), rng)
    client.close()
    return OpenLoopRun(sent, seconds, answered, failures)


def latency_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds (None without a measurement)."""
    p50, p99 = percentile(seconds, 50), percentile(seconds, 99)
    return {"p50_ms": None if p50 is None else 1000 * p50, "p99_ms": None if p99 is None else 1000 * p99}


# ---------------------------------------------------------------- load: wrk, the closed loop


def write_bodies(path: Path, texts: Sequence[str], texts_per_request: int) -> Path:
    """One JSON request body per line, for wrk: consecutive texts, `texts_per_request` to a body."""
    groups = [texts[i : i + texts_per_request] for i in range(0, len(texts) - texts_per_request + 1, texts_per_request)]
    path.write_text("".join(json.dumps({"texts": list(group)}) + "\n" for group in groups))
    return path


@dataclass(frozen=True)
class WrkRun:
    """wrk's summary of one run (wrk_classify.lua prints it)."""

    requests: int  # all answers
    non_2xx: int
    socket_errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def answered(self) -> int:
        return self.requests - self.non_2xx

    @property
    def failures(self) -> int:
        return self.non_2xx + self.socket_errors


def wrk_command(url: str, bodies: Path, connections: int, seconds: float, timeout: float = 60) -> list[str]:
    """`connections` keep-alive clients on one wrk thread, each sending the bodies in `bodies` (one a line) in
    turn, the next as soon as the last is answered."""
    return [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", f"{timeout:g}s", "-s", str(WRK_SCRIPT), url,
        "--", str(bodies),
    ]  # fmt: skip


def wrk(url: str, bodies: Path, connections: int, seconds: float, timeout: float = 60) -> WrkRun:
    """A closed loop driven by wrk: a C load generator, so the cores go to the server under test, not the client."""
    try:
        output = subprocess.run(wrk_command(url, bodies, connections, seconds, timeout), capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit("the saturation runs need wrk: apt-get install wrk") from None
    summary = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    return WrkRun(
        summary["requests"],
        summary["non_2xx"],
        summary["socket_errors"],
        summary["duration_us"] / 1e6,
        summary["p50_us"] / 1000,
        summary["p99_us"] / 1000,
    )


def saturate(url: str, bodies: Path, concurrency: int, duration: float, texts_per_request: int = 1) -> dict:
    """Texts answered, failures, texts/s and p50/p99 of `concurrency` wrk clients for `duration` seconds."""
    run = wrk(url, bodies, concurrency, duration)
    return {
        "texts": run.answered * texts_per_request,
        "failures": run.failures,
        "texts_per_second": run.answered * texts_per_request / run.seconds,
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
    }


# ---------------------------------------------------------------- load: a closed loop in Python, where wrk is not


def python_saturate(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration: float,
    processes: int = 1,
    texts_per_request: int = 1,
    give_up_after: float = 60,
) -> dict:
    """What `saturate` reports (texts, failures, texts/s, p50/p99), from `concurrency` keep-alive clients in Python
    (each sends the next body as soon as its last is answered) spread over `processes` client processes, for hosts
    without wrk (a bare GPU host). Each process is one asyncio loop (uvloop when installed); it costs the machine
    more CPU per request than wrk, so use several processes where one cannot keep up with the server."""
    import multiprocessing

    shares = [concurrency // processes + (index < concurrency % processes) for index in range(processes)]
    jobs = [(url, list(bodies), share, duration, index * len(bodies) // processes, give_up_after) for index, share in enumerate(shares) if share]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        runs = pool.starmap(_closed_loop_process, jobs)
    latencies = [seconds for answered, _, _ in runs for seconds in answered]
    failures = sum(failed for _, failed, _ in runs)
    return {
        "texts": len(latencies) * texts_per_request,
        "failures": failures,
        # Each process counts over its own window (they start a few ms apart): the rates add up.
        "texts_per_second": sum(len(answered) / seconds for answered, _, seconds in runs) * texts_per_request,
        **latency_ms(latencies),
    }


def _closed_loop_process(
    url: str, bodies: list[bytes], connections: int, duration: float, first: int, give_up_after: float
) -> tuple[list[float], int, float]:
    """One client process of python_saturate: (seconds of each request answered 200, failures, seconds run)."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(_closed_loop(url, bodies, connections, duration, first, give_up_after))


async def _closed_loop(
    url: str, bodies: list[bytes], connections: int, duration: float, first: int, give_up_after: float
) -> tuple[list[float], int, float]:
    client = Client.of(url)
    answered: list[float] = []
    failures = 0
    started = time.perf_counter()
    stop_at = started + duration

    async def connection(index: int) -> None:
        nonlocal failures
        while time.perf_counter() < stop_at:
            answer = await client.request("/classify", bodies[index % len(bodies)], give_up_after=give_up_after)
            if answer.status == "200":
                answered.append(answer.seconds)
            else:
                failures += 1
            index += connections

    await asyncio.gather(*(connection(first + offset) for offset in range(connections)))
    client.close()
    return answered, failures, time.perf_counter() - started


# ---------------------------------------------------------------- the machine


def machine() -> dict:
    """What the numbers were measured on: CPU model and the flags that matter to torch, logical CPUs, memory, GPU,
    versions, commit, and the load average now (anything else running shows there)."""
    import torch
    import transformers

    cpu, flags = platform.processor() or "unknown", set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name") and cpu in ("unknown", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as meminfo:
        memory_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the machine (a bare GPU host): the tree travelled without its history
        commit = ""
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "memory_gib": round(memory_kib / 2**20, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "load_average": os.getloadavg(),
    }
