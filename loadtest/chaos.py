"""Chaos run: overload, impatient and vanishing clients, huge texts, then SIGTERM under load.

    flock /tmp/bench.lock python -m loadtest.chaos [--model DIR] [--duration 60] [--overload 3]

Starts the service itself, then:
1. measures RSS after a warm-up, and the latency of a short text alone and while a 2 MB text is being tokenized;
2. measures the saturation rate (a closed loop of single-text requests on keep-alive connections);
3. sends Poisson arrivals at --overload x that rate for --duration seconds: patient clients (5 s deadline),
   impatient ones (500 ms), clients that leave 50 ms after sending, and 2 MB texts; waits for every answer and
   measures RSS again, at once and after a few idle seconds;
4. runs the same arrivals a second time (--runs 2, the default) and measures RSS again: a cache or a fragmented
   heap levels off, a leak grows again by about as much;
5. resumes the same arrivals, sends SIGTERM 5 s in while arrivals go on for 3 more seconds, and times the exit.
It prints status counts per kind of client, p50/p99 of answered requests against their deadline, model tokens
spent on answers nobody received (against all model tokens), RSS after warm-up and after each run, and whether
every request accepted before SIGTERM got its answer. Not a test: numbers depend on the machine; run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from corpus import load_texts  # noqa: E402  (the loadtest directory is not a package for locust either)
from probe import Interval, ServiceNotReady, percentile, scrape, wait_until_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HUGE_TEXT = "This film goes on and on. " * 80_000  # 2.08 MB of text, about 560,000 tokens when read whole
KINDS = {  # name: (share of arrivals, timeout_ms sent, seconds after which the client leaves)
    "patient": (0.55, 5000, None),
    "impatient": (0.25, 500, None),
    "leaving": (0.195, None, 0.05),
    "huge": (0.005, 5000, None),
}


@dataclass
class Outcome:
    """What one request of the chaos run got."""

    kind: str
    sent_at: float
    status: str  # an HTTP status, "left" (the client hung up on purpose) or "error: ..."
    seconds: float


@dataclass
class Client:
    """A minimal HTTP/1.1 client on asyncio streams with a pool of keep-alive connections (cheap on 2 cores)."""

    host: str
    port: int
    idle: list = field(default_factory=list)

    # uvicorn closes connections idle for 5 s; one reused just as it closes would read as a lost answer.
    MAX_IDLE_SECONDS = 2.0

    async def post(self, body: bytes, leave_after: float | None = None) -> tuple[str, bytes]:
        reader, writer = await self._connection(fresh=leave_after is not None)
        try:
            writer.write(
                b"POST /classify HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            if leave_after is not None:
                await asyncio.sleep(leave_after)
                writer.close()
                return "left", b""
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


# RSS is read this long after the last answer (and after the warm-up), once the service has had its idle second
# to give free heap pages back (CLASSIFIER_IDLE_HEAP_TRIM_SECONDS); the reading at once is printed too.
SETTLE_SECONDS = 3.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def growth(rss: float, baseline: float) -> str:
    return f"{100 * (rss - baseline) / baseline:+.1f}%"


async def timed(client: Client, body: dict, leave_after: float | None = None) -> tuple[str, float]:
    started = time.perf_counter()
    status, _ = await client.post(json.dumps(body).encode(), leave_after)
    return status, time.perf_counter() - started


async def short_text_latencies(client: Client, rounds: int, beside_huge: bool) -> list[float]:
    """Latency of one short text, alone or sent just after a 2 MB text (so it meets it in the tokenizer)."""
    latencies = []
    huge_client = Client(client.host, client.port)
    for _ in range(rounds):
        huge = asyncio.create_task(timed(huge_client, {"texts": [HUGE_TEXT]})) if beside_huge else None
        if huge:
            await asyncio.sleep(0.01)  # the 2 MB body has been sent and is being parsed or tokenized
        _, seconds = await timed(client, {"texts": ["What a waste of two hours"]})
        latencies.append(seconds)
        if huge:
            status, _ = await huge
            assert status == "200", status
    return latencies


async def saturation_rate(client: Client, texts: list[str], seconds: float, clients: int = 64) -> float:
    answered = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal answered
        while time.perf_counter() < stop:
            status, _ = await timed(client, {"texts": [random.choice(texts)], "timeout_ms": 60_000})
            answered += status == "200"

    await asyncio.gather(*(loop() for _ in range(clients)))
    return answered / seconds


async def one_arrival(client: Client, kind: str, texts: list[str], outcomes: list[Outcome], started: float) -> None:
    _, timeout_ms, leave_after = KINDS[kind]
    body: dict = {"texts": [HUGE_TEXT if kind == "huge" else random.choice(texts)]}
    if timeout_ms:
        body["timeout_ms"] = timeout_ms
    sent_at = time.perf_counter() - started
    try:
        status, seconds = await timed(client, body, leave_after)
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as error:
        status, seconds = f"error: {type(error).__name__}", time.perf_counter() - started - sent_at
    outcomes.append(Outcome(kind, sent_at, status, seconds))


async def overload(client: Client, texts: list[str], rate: float, duration: float, sigterm, tail: float):
    """Poisson arrivals at `rate`/s for `duration` s, then `sigterm()`, then `tail` more seconds of arrivals."""
    rng = random.Random(1)
    kinds, shares = list(KINDS), [share for share, _, _ in KINDS.values()]
    outcomes: list[Outcome] = []
    tasks = set()
    started = time.perf_counter()
    next_at, signalled_at = 0.0, None
    while next_at < duration + tail:
        now = time.perf_counter() - started
        if sigterm is not None and signalled_at is None and now >= duration:
            signalled_at = now
            sigterm()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        kind = rng.choices(kinds, shares)[0]
        task = asyncio.create_task(one_arrival(client, kind, texts, outcomes, started))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.wait(tasks, timeout=120)
    return outcomes, signalled_at


def report_overload(outcomes: list[Outcome], cut_at: float) -> dict:
    """Statuses and latencies of the requests sent before `cut_at` (the SIGTERM); statuses of those after."""
    before = [o for o in outcomes if o.sent_at < cut_at]
    after = [o for o in outcomes if o.sent_at >= cut_at]
    by_kind = {}
    for kind, (_, timeout_ms, _) in KINDS.items():
        mine = [o for o in before if o.kind == kind]
        answered = [o.seconds for o in mine if o.status == "200"]
        by_kind[kind] = {
            "requests": len(mine),
            "statuses": dict(Counter(o.status for o in mine).most_common()),
            "answered_p50_ms": _ms(percentile(answered, 50)),
            "answered_p99_ms": _ms(percentile(answered, 99)),
            "deadline_ms": timeout_ms,
            "answered_after_deadline": sum(s * 1000 > timeout_ms for s in answered) if timeout_ms else None,
            # When the late ones were sent (seconds into the run): a cluster at the start is a cold estimate.
            "late_sent_at_s": sorted(
                round(o.sent_at, 1) for o in mine if o.status in ("200", "504") and o.seconds * 1000 > timeout_ms
            )[:20] if timeout_ms else None,
        }
    answered = [o.seconds for o in before if o.status == "200"]
    return {
        "requests": len(before),
        "statuses": dict(Counter(o.status for o in before).most_common()),
        "answered_p50_ms": _ms(percentile(answered, 50)),
        "answered_p99_ms": _ms(percentile(answered, 99)),
        "by_kind": by_kind,
        # Sent before SIGTERM, not hung up on purpose, and no HTTP status back: an accepted request lost.
        "unanswered": sum(o.status.startswith("error") for o in before),
        "statuses_after_sigterm": dict(Counter(o.status for o in after).most_common()),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def start_service(model: str | None, port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ}
    if model:
        env["MODEL"] = model
    log = tempfile.NamedTemporaryFile("w+", prefix="chaos-service-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 600, process)
    except ServiceNotReady as error:
        process.kill()
        raise SystemExit(f"{error}; log in {log.name}") from None
    return process, url


async def chaos(args: argparse.Namespace) -> dict:
    process, url = start_service(args.model, args.port)
    client = Client("127.0.0.1", args.port)
    texts = load_texts()
    result: dict = {"model": httpx.get(f"{url}/info").json()["model"]}
    try:
        await saturation_rate(client, texts, 5)  # warm-up: allocator, caches, the throughput meter
        await asyncio.sleep(SETTLE_SECONDS)
        warm = rss_mib(process.pid)
        rss = result["rss_mib"] = {"after_warm_up": warm}
        alone = await short_text_latencies(client, 30, beside_huge=False)
        beside = await short_text_latencies(client, 30, beside_huge=True)
        result["short_text_ms"] = {
            "alone_p50": _ms(statistics.median(alone)),
            "alone_max": _ms(max(alone)),
            "beside_2mb_text_p50": _ms(statistics.median(beside)),
            "beside_2mb_text_max": _ms(max(beside)),
        }
        rate = args.saturation_rps or await saturation_rate(client, texts, 10)
        result["saturation_requests_per_second"] = round(rate, 1)
        result["arrival_rate"] = round(rate * args.overload, 1)
        before = scrape(url)
        outcomes, _ = await overload(client, texts, rate * args.overload, args.duration, None, 0.0)
        change = Interval(before, scrape(url))  # every request has its answer by now: the queue is empty
        rss["at_once_after_run"] = rss_mib(process.pid)
        await asyncio.sleep(SETTLE_SECONDS)
        rss["after_run"] = rss_mib(process.pid)
        rss["growth_after_run"] = growth(rss["after_run"], warm)
        result["overload"] = report_overload(outcomes, args.duration)
        result["server_counters"] = server_counters(change)
        for run in range(2, args.runs + 1):
            outcomes, _ = await overload(client, texts, rate * args.overload, args.duration, None, 0.0)
            await asyncio.sleep(SETTLE_SECONDS)
            rss[f"after_run_{run}"] = rss_mib(process.pid)
            rss[f"growth_after_run_{run}"] = growth(rss[f"after_run_{run}"], warm)
            result[f"overload_run_{run}"] = report_overload(outcomes, args.duration)
        signalled: list[float] = []

        def sigterm() -> None:
            signalled.append(time.perf_counter())
            process.send_signal(signal.SIGTERM)

        outcomes, signalled_at = await overload(client, texts, rate * args.overload, 5.0, sigterm, 3.0)
        result["sigterm_under_load"] = report_overload(outcomes, signalled_at)
        try:
            result["exit_code"] = await asyncio.to_thread(process.wait, args.grace)
            result["exit_seconds_after_sigterm"] = round(time.perf_counter() - signalled[0], 1)
        except subprocess.TimeoutExpired:
            result["exit_seconds_after_sigterm"] = f"> {args.grace} (killed)"
    finally:
        if process.poll() is None:
            process.kill()
    return result


def server_counters(change: Interval) -> dict:
    def grew(name: str, **labels: str) -> float:
        return round(change.delta(name, **labels))

    real, unanswered = grew("classifier_real_tokens_total"), grew("classifier_unanswered_tokens_total")
    batches = change.delta("classifier_batch_size_count")
    return {
        # How the backlog batched: texts and real tokens per batch, and the share of computed tokens that were real.
        "batches": round(batches),
        "texts_per_batch": round(change.delta("classifier_batch_size_sum") / batches, 1) if batches else None,
        "real_tokens_per_batch": round(real / batches) if batches else None,
        "padding_efficiency": round(real / grew("classifier_padded_tokens_total"), 3) if batches else None,
        "model_tokens": real,
        "model_tokens_on_answers_nobody_received": unanswered,
        "share_wasted": round(unanswered / real, 4) if real else None,
        "texts_dropped_client_gone": grew("classifier_cancelled_texts_total", reason="client_gone"),
        "texts_dropped_deadline": grew("classifier_cancelled_texts_total", reason="deadline"),
        "texts_refused_predicted_wait": grew("classifier_rejected_texts_total", reason="predicted_wait"),
        "texts_refused_queue_full": grew("classifier_rejected_texts_total", reason="queue_full"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--overload", type=float, default=3, help="arrival rate as a multiple of saturation")
    parser.add_argument("--saturation-rps", type=float, help="skip measuring it")
    parser.add_argument("--runs", type=int, default=2, help="overload runs before the SIGTERM one (RSS after each)")
    parser.add_argument("--grace", type=float, default=30, help="seconds the process may take to exit after SIGTERM")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(asyncio.run(chaos(parse_args(argv))), indent=2))


if __name__ == "__main__":
    main()
