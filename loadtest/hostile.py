"""Hostile clients against a real service process (issue 22): what one client can make the replica pay.

    flock /tmp/bench.lock python -m loadtest.hostile [--model DIR] [--scenario header_flood|deep_json|all]

Starts the service itself (tuning off, as the audit ran it), then runs each scenario chosen, one function each:

- header_flood: --connections (20) clients each send --flood-mb (50) MB of one unterminated header value, as fast
  as the server reads it, opening a new connection whenever one is answered or closed, while --trickle (5) more
  send a header a byte every 100 ms, and a separate thread polls /health every 50 ms. It prints /health's
  p50/p99/max and any failed poll, the server's RSS before, at its peak and after, and when the answers came
  (408s, 431s, seconds from each connection's opening) and how many bytes the flood wrote.
- deep_json: `[[[...]]]` 100,000 deep, as the body and as `texts`, to /classify and /predict: the status, the
  body, and whether a traceback reached the server log.
- greedy: an interactive caller sends single texts at --rate (5) requests/s, first on an idle service (its
  baseline: the same texts at the same moments, for --duration unless --idle-seconds), then beside a greedy caller
  that sends --greedy-requests (200) requests of --greedy-texts (256) texts at once, each with timeout_ms=600000,
  reading its answers --read-after (2) s late and sending a refused request again after a second. It prints the
  interactive caller's status counts and p50/p99 idle and beside the greedy one, the greedy caller's status counts
  and texts answered per second, and the fair-share refusals /metrics counted. The callers name themselves with
  X-Client-Id (both come from one address); the interactive caller runs in
  a process of its own, so the greedy caller's requests do not delay its event loop.

It prints numbers as JSON; it is not a test (they depend on the machine): run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

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

FLOOD_HEAD = b"GET /health HTTP/1.1\r\nHost: hostile\r\nX-Flood: "
FLOOD_CHUNK = b"a" * 65536
TRICKLE_HEAD = b"GET /health HTTP/1.1\r\nHost: hostile\r\nX-Trickle: " + b"a" * 10_000
GREEDY_TIMEOUT_MS = 600_000
SLOWEST = 6  # the interactive caller's slowest answers beside the flood reported with when they were sent
FLOOD_START_SECONDS = 10  # the interactive caller's latency is reported for these first seconds of the flood apart


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def _read_status(reader: asyncio.StreamReader) -> tuple[str, float | None]:
    """The status of the answer on a connection ("none" if it closed without one, "reset" if it was reset first),
    and when its first bytes came (monotonic)."""
    try:
        head = await reader.read(64)
    except ConnectionError:
        return "reset", None
    if not head.startswith(b"HTTP/1.1 "):
        return "none", None
    arrived = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return head.split()[1].decode(), arrived


# A sender writes to a connection until it is answered (the task) or done, adding what it wrote to sent[0]: a reset
# ends it with an exception, and what it got through still counts.
Sender = Callable[[asyncio.StreamWriter, asyncio.Task, list[int]], Awaitable[None]]


async def _one_connection(url: str, send: Sender) -> dict:
    """Opens a connection, runs `send` while reading the answer; what it got, when, and the bytes sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    opened = time.monotonic()
    answer = asyncio.create_task(_read_status(reader))
    sent = [0]
    with contextlib.suppress(ConnectionError):
        await send(writer, answer, sent)
    status, arrived = await answer
    writer.close()
    return {"status": status, "after_s": None if arrived is None else arrived - opened, "sent": sent[0]}


async def _flood_sender(writer: asyncio.StreamWriter, answer: asyncio.Task, sent: list[int], budget: int) -> None:
    writer.write(FLOOD_HEAD)
    sent[0] += len(FLOOD_HEAD)
    while sent[0] < budget and not answer.done():
        writer.write(FLOOD_CHUNK)
        await writer.drain()
        sent[0] += len(FLOOD_CHUNK)


async def _trickle_sender(writer: asyncio.StreamWriter, answer: asyncio.Task, sent: list[int], deadline: float) -> None:
    for byte in TRICKLE_HEAD:
        if answer.done() or time.monotonic() > deadline:
            break
        writer.write(bytes([byte]))
        await writer.drain()
        sent[0] += 1
        await asyncio.sleep(0.1)


def _poll_health(url: str, stop: threading.Event, interval: float, latencies: list[float], failures: list[str]) -> None:
    """GET /health every `interval` s until `stop`, from this thread: each answer's latency, or why there was none."""
    with httpx.Client(base_url=url, timeout=5) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = client.get("/health").status_code
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    failures.append(f"status {status}")
            except httpx.HTTPError as error:
                failures.append(f"{type(error).__name__} after {_ms(time.perf_counter() - started)} ms")
            stop.wait(interval)


def header_flood(server: ServerProcess, args: argparse.Namespace) -> dict:
    """20 clients sending 50 MB of unterminated header each, and a few trickling, while /health is polled."""
    budget = int(args.flood_mb * 1024 * 1024)
    rss_before = server.rss_mib()
    server.reset_peak_rss()
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(server.url, stop, 0.05, latencies, failures), daemon=True)

    async def flooder() -> list[dict]:
        """One client: new connections until its budget is sent or the time is up."""
        connections, left = [], budget
        deadline = time.monotonic() + args.flood_seconds
        while left > 0 and time.monotonic() < deadline:
            got = await _one_connection(server.url, functools.partial(_flood_sender, budget=left))
            connections.append(got)
            left -= max(got["sent"], 1)
        return connections

    async def trickler() -> dict:
        deadline = time.monotonic() + args.flood_seconds
        return await _one_connection(server.url, functools.partial(_trickle_sender, deadline=deadline))

    async def run() -> tuple[list[list[dict]], list[dict]]:
        floods = asyncio.gather(*(flooder() for _ in range(args.connections)))
        trickles = asyncio.gather(*(trickler() for _ in range(args.trickle)))
        return await floods, await trickles

    poller.start()
    started = time.monotonic()
    floods, trickles = asyncio.run(run())
    flood_seconds = time.monotonic() - started
    time.sleep(1)  # /health polled a moment after, too
    stop.set()
    poller.join()
    connections = [connection for flood in floods for connection in flood]
    flood_after = [c["after_s"] for c in connections if c["after_s"] is not None]
    trickle_after = [c["after_s"] for c in trickles if c["after_s"] is not None]
    return {
        "flood": {
            "clients": args.connections,
            "connections": len(connections),
            "statuses": dict(Counter(c["status"] for c in connections)),
            "answered_after_ms": {"p50": _ms(percentile(flood_after, 50)), "max": _ms(max(flood_after, default=None))},
            # written into the sockets: the kernel buffers megabytes of each before the server's reset is seen
            "mib_written": round(sum(c["sent"] for c in connections) / 2**20, 1),
            "seconds": round(flood_seconds, 1),
        },
        "trickle": {
            "connections": len(trickles),
            "statuses": dict(Counter(c["status"] for c in trickles)),
            "answered_after_s": sorted(round(seconds, 2) for seconds in trickle_after),
        },
        "health": {
            "polls": len(latencies) + len(failures),
            "failures": failures[:10],
            "p50_ms": _ms(percentile(latencies, 50)),
            "p99_ms": _ms(percentile(latencies, 99)),
            "max_ms": _ms(max(latencies, default=None)),
        },
        "rss_mib": {"before": round(rss_before, 1), "peak": round(server.peak_rss_mib(), 1), "after": round(server.rss_mib(), 1)},
    }


def deep_json(server: ServerProcess, args: argparse.Namespace) -> dict:
    """`[[[...]]]` 100,000 deep as the body and as `texts`: status, body, and whether the log got a traceback."""
    depth = args.depth
    deep = "[" * depth + '"a"' + "]" * depth
    bodies = {"body": "[" * depth + "]" * depth, "texts": '{"texts": ' + deep + "}", "inputs": '{"inputs": ' + deep + "}"}
    cases = [("/classify", "body"), ("/classify", "texts"), ("/predict", "body"), ("/predict", "inputs")]
    results = {}
    with httpx.Client(base_url=server.url, timeout=30, headers={"content-type": "application/json"}) as client:
        for route, kind in cases:
            logged_before = server.log_path.read_text()
            started = time.perf_counter()
            response = client.post(route, content=bodies[kind].encode())
            seconds = time.perf_counter() - started
            time.sleep(0.2)  # for the log to be written
            logged = server.log_path.read_text()[len(logged_before) :]
            results[f"{route} {kind}"] = {
                "status": response.status_code,
                "body": response.text[:300],
                "ms": _ms(seconds),
                "traceback_logged": "Traceback" in logged,
                "log_lines": len(logged.splitlines()),
            }
    return {"depth": depth, "answers": results}


def _statuses(answers: list[Answer]) -> dict[str, int]:
    return dict(Counter(answer.status for answer in answers))


def _latency(answers: list[Answer]) -> dict[str, float | None]:
    answered = [answer.seconds for answer in answers if answer.status == "200"]
    return {"p50_ms": _ms(percentile(answered, 50)), "p99_ms": _ms(percentile(answered, 99))}


async def _interactive(url: str, texts: list[str], rate: float, duration: float, rng: random.Random) -> list[tuple[float, Answer]]:
    """Single texts at Poisson arrivals of `rate` per second for `duration` seconds, as the caller `interactive`: each
    answer with when its request was sent (seconds from the first)."""
    client = Client.of(url, {"X-Client-Id": "interactive"})
    answers: list[tuple[float, Answer]] = []
    started = time.perf_counter()

    async def send(index: int) -> None:
        body = json.dumps({"texts": [texts[index % len(texts)]]}).encode()
        sent = time.perf_counter() - started
        answers.append((sent, await client.request("/classify", body, give_up_after=120)))

    await open_loop(rate, duration, send, rng)
    client.close()
    return answers


def _interactive_in_a_process(url: str, seed: int, rate: float, duration: float) -> list[tuple[float, Answer]]:
    """`_interactive` run in a process of its own: beside the greedy caller's hundreds of requests in one event loop,
    its timings would count that loop's delays too."""
    return asyncio.run(_interactive(url, load_texts(seed=seed), rate, duration, random.Random(seed)))


async def _greedy(url: str, args: argparse.Namespace) -> dict:
    """The interactive caller alone, then beside the greedy one (see the module's docstring)."""
    texts = load_texts(seed=args.seed)
    loop = asyncio.get_running_loop()
    interactive = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    # The baseline sends the same texts at the same moments as the run beside the greedy caller: a p99 of the 512-token
    # texts in one sample against none in the other compared the samples, not the service (idle p99 133-218 ms).
    idle_seconds = args.duration if args.idle_seconds is None else args.idle_seconds
    idle = await loop.run_in_executor(interactive, _interactive_in_a_process, url, args.seed, args.rate, idle_seconds)

    greedy_client = Client.of(url, {"X-Client-Id": "greedy"})
    greedy_answers: list[Answer] = []
    answered_texts = 0
    run_ends = time.perf_counter() + args.duration

    async def greedy_request(index: int) -> None:
        nonlocal answered_texts
        chunk = [texts[(index * args.greedy_texts + i) % len(texts)] for i in range(args.greedy_texts)]
        body = json.dumps({"texts": chunk, "timeout_ms": GREEDY_TIMEOUT_MS}).encode()
        while True:
            answer = await greedy_client.request("/classify", body, give_up_after=GREEDY_TIMEOUT_MS / 1000, read_after=args.read_after)
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
    beside = await loop.run_in_executor(interactive, _interactive_in_a_process, url, args.seed, args.rate, args.duration)
    interactive.shutdown()
    await asyncio.gather(*flood)
    greedy_seconds = time.perf_counter() - started
    change = Interval(before, scrape(url))
    greedy_client.close()
    beside_answers = [answer for _, answer in beside]
    return {
        "interactive_idle": {"statuses": _statuses([answer for _, answer in idle]), **_latency([answer for _, answer in idle])},
        "interactive_beside_greedy": {
            "statuses": _statuses(beside_answers),
            **_latency(beside_answers),
            # The flood's first seconds (its 200 requests read and parsed, the first ones tokenized) apart from the rest.
            f"first_{FLOOD_START_SECONDS}_s": _latency([answer for sent, answer in beside if sent < FLOOD_START_SECONDS]),
            "after": _latency([answer for sent, answer in beside if sent >= FLOOD_START_SECONDS]),
            # Where the tail lies: the slowest answers, each as [seconds into the flood it was sent, milliseconds].
            "slowest": sorted(([round(sent, 1), _ms(answer.seconds)] for sent, answer in beside), key=lambda pair: -pair[1])[:SLOWEST],
        },
        "greedy": {
            "statuses": _statuses(greedy_answers),
            "texts_answered": answered_texts,
            "seconds": round(greedy_seconds, 1),
            "texts_per_second": round(answered_texts / greedy_seconds, 1),
        },
        "fair_share_refusals": change.delta_by("classifier_fair_share_refusals_total", "resource"),
        "rejected_texts": change.delta_by("classifier_rejected_texts_total", "reason"),
    }


def greedy(server: ServerProcess, args: argparse.Namespace) -> dict:
    """A greedy caller beside an interactive one (see the module's docstring)."""
    return asyncio.run(_greedy(server.url, args))


SCENARIOS: dict[str, Callable[[ServerProcess, argparse.Namespace], dict]] = {
    "header_flood": header_flood,
    "deep_json": deep_json,
    "greedy": greedy,
}


def hostile(args: argparse.Namespace) -> dict:
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    log_path = Path(tempfile.gettempdir()) / f"hostile-service-{args.port}.log"
    env = {"CLASSIFIER_TUNE": "false", "CLASSIFIER_LOG_LEVEL": "info"}
    with ServerProcess(service_command(args.model, args.port), args.port, log_path, env, ready_timeout=600) as server:
        result: dict = {"machine": machine(), "model": httpx.get(f"{server.url}/info").json()["model"]}
        for name in chosen:
            result[name] = SCENARIOS[name](server, args)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--port", type=int, default=free_port())
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--connections", type=int, default=20, help="header_flood: flooding clients")
    parser.add_argument("--flood-mb", type=float, default=50, help="header_flood: MB each flooding client sends")
    parser.add_argument("--flood-seconds", type=float, default=30, help="header_flood: at most this long")
    parser.add_argument("--trickle", type=int, default=5, help="header_flood: clients sending a byte every 100 ms")
    parser.add_argument("--depth", type=int, default=100_000, help="deep_json: nesting depth")
    parser.add_argument("--seed", type=int, default=0, help="greedy: the corpus sample and arrival times")
    parser.add_argument("--duration", type=float, default=60, help="greedy: seconds the interactive caller runs beside")
    parser.add_argument("--idle-seconds", type=float, help="greedy: seconds of the idle baseline (default: --duration)")
    parser.add_argument("--rate", type=float, default=5, help="greedy: interactive requests per second")
    parser.add_argument("--greedy-requests", type=int, default=200)
    parser.add_argument("--greedy-texts", type=int, default=256, help="greedy: texts per greedy request")
    parser.add_argument("--read-after", type=float, default=2.0, help="greedy: seconds the greedy caller waits to read")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    try:
        result = hostile(parse_args(argv))
    except ServiceNotReady as error:
        raise SystemExit(str(error)) from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
