"""Hostile and greedy clients against a running service, one scenario at a time (issue 22).

    flock /tmp/bench.lock python -m loadtest.hostile --scenario greedy [--model DIR | --url URL] [--duration 60]

Scenarios (one function each):
- greedy: an interactive caller sends single texts at 5 requests/s, first on an idle service (its baseline), then
  beside a greedy caller that sends 200 requests of 256 texts at once, each with timeout_ms=600000, reading its
  answers slowly and sending a refused request again after a second. Prints the interactive caller's status counts
  and p50/p99 on the idle service and beside the greedy one, the greedy caller's status counts and texts answered per
  second, and the fair-share refusals /metrics counted. The callers name themselves with X-Client-Id (both come from
  one address).

Starts the service itself unless --url names one. Not a test: numbers depend on the machine; run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from loadtest.corpus import load_texts
from loadtest.probe import (
    Answer,
    Client,
    Interval,
    ServerProcess,
    ServiceNotReady,
    free_port,
    machine,
    open_loop,
    percentile,
    scrape,
    service_command,
)

GREEDY_TIMEOUT_MS = 600_000


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _statuses(answers: list[Answer]) -> dict[str, int]:
    return dict(Counter(answer.status for answer in answers))


def _latency(answers: list[Answer]) -> dict[str, float | None]:
    answered = [answer.seconds for answer in answers if answer.status == "200"]
    return {"p50_ms": _ms(percentile(answered, 50)), "p99_ms": _ms(percentile(answered, 99))}


async def _interactive(url: str, texts: list[str], rate: float, duration: float, rng: random.Random) -> list[Answer]:
    """Single texts at Poisson arrivals of `rate` per second for `duration` seconds, as the caller `interactive`."""
    client = Client.of(url, {"X-Client-Id": "interactive"})
    answers: list[Answer] = []

    async def send(index: int) -> None:
        body = json.dumps({"texts": [texts[index % len(texts)]]}).encode()
        answers.append(await client.request("/classify", body, give_up_after=120))

    await open_loop(rate, duration, send, rng)
    client.close()
    return answers


async def greedy(url: str, args: argparse.Namespace) -> dict:
    """The interactive caller alone, then beside the greedy one (see the module's docstring)."""
    texts = load_texts(seed=args.seed)
    rng = random.Random(args.seed)
    idle = await _interactive(url, texts, args.rate, args.idle_seconds, rng)

    greedy_client = Client.of(url, {"X-Client-Id": "greedy"})
    greedy_answers: list[Answer] = []
    answered_texts = 0
    run_ends = time.perf_counter() + args.duration

    async def greedy_request(index: int) -> None:
        nonlocal answered_texts
        chunk = [texts[(index * args.greedy_texts + i) % len(texts)] for i in range(args.greedy_texts)]
        body = json.dumps({"texts": chunk, "timeout_ms": GREEDY_TIMEOUT_MS}).encode()
        while True:
            answer = await greedy_client.request(
                "/classify", body, give_up_after=GREEDY_TIMEOUT_MS / 1000, read_after=args.read_after
            )
            greedy_answers.append(answer)
            if answer.status == "200":
                answered_texts += len(chunk)
                return
            if time.perf_counter() >= run_ends:  # refused and the run is over: it gives up
                return
            await asyncio.sleep(1.0)  # refused (429): again after a second

    before = scrape(url)
    started = time.perf_counter()
    flood = [asyncio.create_task(greedy_request(i)) for i in range(args.greedy_requests)]
    beside = await _interactive(url, texts, args.rate, args.duration, rng)
    await asyncio.gather(*flood)
    greedy_seconds = time.perf_counter() - started
    change = Interval(before, scrape(url))
    greedy_client.close()
    return {
        "interactive_idle": {"statuses": _statuses(idle), **_latency(idle)},
        "interactive_beside_greedy": {"statuses": _statuses(beside), **_latency(beside)},
        "greedy": {
            "statuses": _statuses(greedy_answers),
            "texts_answered": answered_texts,
            "seconds": round(greedy_seconds, 1),
            "texts_per_second": round(answered_texts / greedy_seconds, 1),
        },
        "fair_share_refusals": change.delta_by("classifier_fair_share_refusals_total", "resource"),
        "rejected_texts": change.delta_by("classifier_rejected_texts_total", "reason"),
    }


SCENARIOS = {"greedy": greedy}


def run(args: argparse.Namespace) -> dict:
    scenario = SCENARIOS[args.scenario]
    if args.url:
        result = asyncio.run(scenario(args.url, args))
    else:
        port = args.port or free_port()
        log_path = Path(tempfile.gettempdir()) / f"hostile-service-{port}.log"
        with ServerProcess(service_command(args.model, port), port, log_path, ready_timeout=600) as server:
            result = asyncio.run(scenario(server.url, args))
    return {"scenario": args.scenario, **result, "machine": machine()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--url", help="a running service to use instead of starting one")
    parser.add_argument("--port", type=int, help="port of the service it starts (default: a free one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=60, help="seconds the interactive caller runs beside")
    parser.add_argument("--idle-seconds", type=float, default=20, help="seconds of the idle baseline")
    parser.add_argument("--rate", type=float, default=5, help="interactive requests per second")
    parser.add_argument("--greedy-requests", type=int, default=200)
    parser.add_argument("--greedy-texts", type=int, default=256, help="texts per greedy request")
    parser.add_argument("--read-after", type=float, default=2.0, help="seconds the greedy caller waits to read")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        result = run(parse_args(argv))
    except ServiceNotReady as error:
        raise SystemExit(str(error)) from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
