"""Reading a running service from outside: its Prometheus /metrics, diffed between two scrapes, and its readiness.

Shared by the benchmarks in loadtest/ and by the tests, so it imports only the standard library, httpx and
prometheus_client (none of the loadtest extra's heavy packages):

    before = scrape(url); ...; change = Interval(before, scrape(url))
    change.delta("classifier_real_tokens_total")                       # a counter's increase, summed over series
    change.delta_by("classifier_requests_total", "status", route="/classify")   # {"200": 41.0, "429": 3.0}
    change.histogram("classifier_queue_wait_seconds").quantile(0.99)  # as Prometheus' histogram_quantile would
    wait_until_ready(url, timeout=90, process=process, log=log)       # one polling loop, one clear error
"""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

Series = tuple[str, frozenset[tuple[str, str]]]  # a sample's name and its labels
T = TypeVar("T")


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


def percentile(values: Sequence[float], p: int) -> float | None:
    """The p-th percentile (1..99) of client-side measurements, interpolated between closest ranks (numpy's default
    method); None when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# ---------------------------------------------------------------- waiting


class ServiceNotReady(RuntimeError):
    """The service exited, or did not answer 200 on /ready, before the timeout."""


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


def wait_until_ready(
    url: str, timeout: float, process: subprocess.Popen | None = None, log: IO[str] | Path | None = None
) -> None:
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


class ServerProcess:
    """A server started as a child process on a loopback port, its output in `log_path`: `with` waits until its
    /ready answers 200 (stopping it and raising ServiceNotReady, with its log, when it does not), and stops it
    after (SIGTERM, then SIGKILL after a minute)."""

    def __init__(
        self, command: list[str], port: int, log_path: Path, env: dict[str, str], cwd: Path | None = None,
        ready_timeout: float = 300,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self._log = log_path.open("w")
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self):
        try:
            wait_until_ready(self.url, self.ready_timeout, self.process, self.log_path)
        except ServiceNotReady:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
