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
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.corpus import load_texts
from loadtest.probe import (
    Client,
    Interval,
    ServerProcess,
    ServerSummary,
    ServiceNotReady,
    open_loop,
    percentile,
    scrape,
    server_summary,
    service_command,
)

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


# RSS is read this long after the last answer (and after the warm-up), once the service has had its idle second
# to give free heap pages back (CLASSIFIER_IDLE_HEAP_TRIM_SECONDS); the reading at once is printed too.
SETTLE_SECONDS = 3.0


def rss_mib(server: ServerProcess) -> float:
    return round(server.rss_mib(), 1)


def growth(rss: float, baseline: float) -> str:
    return f"{100 * (rss - baseline) / baseline:+.1f}%"


async def timed(client: Client, body: dict, leave_after: float | None = None) -> tuple[str, float]:
    answer = await client.request("/classify", json.dumps(body).encode(), leave_after)
    return answer.status, answer.seconds


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
    status, seconds = await timed(client, body, leave_after)
    outcomes.append(Outcome(kind, sent_at, status, seconds))


async def overload(
    client: Client, texts: list[str], rate: float, duration: float, sigterm: Callable[[], None] | None, tail: float
) -> tuple[list[Outcome], float | None]:
    """Poisson arrivals at `rate`/s for `duration` s, then `sigterm()`, while `tail` more seconds of arrivals go on.
    Returns every outcome and when the SIGTERM went (seconds into the run)."""
    rng = random.Random(1)
    kinds, shares = list(KINDS), [share for share, _, _ in KINDS.values()]
    outcomes: list[Outcome] = []
    signalled: list[float] = []
    started = time.perf_counter()

    def signal_now(send: Callable[[], None]) -> None:
        signalled.append(time.perf_counter() - started)
        send()

    if sigterm is not None:
        asyncio.get_running_loop().call_later(duration, signal_now, sigterm)

    def arrive(_: int) -> Awaitable[None]:
        kind = rng.choices(kinds, shares)[0]  # drawn in turn with the arrival gaps, from the same generator
        return one_arrival(client, kind, texts, outcomes, started)

    await open_loop(rate, duration + tail, arrive, rng, wait=120)
    return outcomes, signalled[0] if signalled else None


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
            "late_sent_at_s": sorted(round(o.sent_at, 1) for o in mine if o.status in ("200", "504") and o.seconds * 1000 > timeout_ms)[:20]
            if timeout_ms
            else None,
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


def chaos(args: argparse.Namespace) -> dict:
    log_path = Path(tempfile.gettempdir()) / f"chaos-service-{args.port}.log"
    with ServerProcess(service_command(args.model, args.port), args.port, log_path, ready_timeout=600) as server:
        model = httpx.get(f"{server.url}/info").json()["model"]
        return asyncio.run(measure(server, model, args))


async def measure(server: ServerProcess, model: str, args: argparse.Namespace) -> dict:
    client = Client.of(server.url)
    texts = load_texts()
    result: dict = {"model": model}
    await saturation_rate(client, texts, 5)  # warm-up: allocator, caches, the throughput meter
    await asyncio.sleep(SETTLE_SECONDS)
    warm = rss_mib(server)
    rss = result["rss_mib"] = {"after_warm_up": warm}
    alone = await short_text_latencies(client, 30, beside_huge=False)
    beside = await short_text_latencies(client, 30, beside_huge=True)
    result["short_text_ms"] = {
        "alone_p50": _ms(percentile(alone, 50)),
        "alone_max": _ms(max(alone)),
        "beside_2mb_text_p50": _ms(percentile(beside, 50)),
        "beside_2mb_text_max": _ms(max(beside)),
    }
    rate = args.saturation_rps or await saturation_rate(client, texts, 10)
    result["saturation_requests_per_second"] = round(rate, 1)
    result["arrival_rate"] = round(rate * args.overload, 1)
    before = scrape(server.url)
    outcomes, _ = await overload(client, texts, rate * args.overload, args.duration, None, 0.0)
    change = Interval(before, scrape(server.url))  # every request has its answer by now: the queue is empty
    rss["at_once_after_run"] = rss_mib(server)
    await asyncio.sleep(SETTLE_SECONDS)
    rss["after_run"] = rss_mib(server)
    rss["growth_after_run"] = growth(rss["after_run"], warm)
    result["overload"] = report_overload(outcomes, args.duration)
    result["server_counters"] = server_counters(server_summary(change))
    for run in range(2, args.runs + 1):
        outcomes, _ = await overload(client, texts, rate * args.overload, args.duration, None, 0.0)
        await asyncio.sleep(SETTLE_SECONDS)
        rss[f"after_run_{run}"] = rss_mib(server)
        rss[f"growth_after_run_{run}"] = growth(rss[f"after_run_{run}"], warm)
        result[f"overload_run_{run}"] = report_overload(outcomes, args.duration)
    signalled: list[float] = []

    def sigterm() -> None:
        signalled.append(time.perf_counter())
        server.process.send_signal(signal.SIGTERM)

    outcomes, signalled_at = await overload(client, texts, rate * args.overload, 5.0, sigterm, 3.0)
    result["sigterm_under_load"] = report_overload(outcomes, signalled_at)
    try:
        result["exit_code"] = await asyncio.to_thread(server.process.wait, args.grace)
        result["exit_seconds_after_sigterm"] = round(time.perf_counter() - signalled[0], 1)
    except subprocess.TimeoutExpired:
        server.process.kill()
        result["exit_seconds_after_sigterm"] = f"> {args.grace} (killed)"
    return result


def server_counters(summary: ServerSummary) -> dict:
    real, unanswered, batches = round(summary.real_tokens), round(summary.unanswered_tokens), summary.batches
    return {
        # How the backlog batched: texts and real tokens per batch, and the share of computed tokens that were real.
        "batches": round(batches),
        "texts_per_batch": round(summary.batch_size.sum / batches, 1) if batches else None,
        "real_tokens_per_batch": round(real / batches) if batches else None,
        "padding_efficiency": round(summary.padding_efficiency, 3) if summary.padding_efficiency is not None else None,
        "model_tokens": real,
        "model_tokens_on_answers_nobody_received": unanswered,
        "share_wasted": round(unanswered / real, 4) if real else None,
        "texts_dropped_client_gone": round(summary.cancelled_texts.get("client_gone", 0)),
        "texts_dropped_deadline": round(summary.cancelled_texts.get("deadline", 0)),
        "texts_refused_predicted_wait": round(summary.rejected_texts.get("predicted_wait", 0)),
        "texts_refused_queue_full": round(summary.rejected_texts.get("queue_full", 0)),
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
    try:
        result = chaos(parse_args(argv))
    except ServiceNotReady as error:
        raise SystemExit(str(error)) from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
