"""Throughput and latency benchmark: the service against the model alone and against a plain server.

    python loadtest/benchmark.py [--model DIR] [--duration 40] [--concurrency 256] [--multi 8] [--rates 5,20]

Runs, one after another on the same texts (a long-tailed mix of real texts from `loadtest/corpus.py`):
  1. the model alone, offline: texts pre-sorted by length into batches under the token budget (no HTTP),
     and single texts one at a time (the single-text latency);
  2. the service (micro-batching) at saturation (closed loop: N concurrent clients, one text per request, driven
     by wrk, so the load generator costs the 2 cores little), again with several texts per request, and at fixed
     Poisson rates (a small asyncio client);
  3. the same service with batching off (max batch size 1), same loads;
  4. a plain FastAPI server doing one forward per text in a thread pool, at the same loads.
Prints texts/s, p50/p99 latency and, from the service's own /metrics, padding efficiency, batch sizes and
queue wait; writes everything to loadtest/results/benchmark.json. Every process gets the same torch threads.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = ROOT / "loadtest" / "wrk_classify.lua"
sys.path.insert(0, str(ROOT))

from loadtest.corpus import load_texts  # noqa: E402
from loadtest.probe import Interval, ServerProcess, percentile, scrape, wait_for  # noqa: E402
from service.default_model import ensure_default_model  # noqa: E402
from service.runner import load_classifier  # noqa: E402


# --- a small HTTP/1.1 client: the load generator shares 2 cores with the server, so it must be cheap ---


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a Content-Length response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def request_body(text: str) -> bytes:
    return json.dumps({"texts": text}).encode()


def saturate(url: str, bodies: Path, concurrency: int, duration: float, texts_per_request: int = 1) -> dict:
    """`concurrency` keep-alive clients, each sending its next request as soon as the last is answered, driven by
    wrk: a C load generator, so the 2 cores go to the server under test rather than to the client."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "60s", "-s", str(WRK_SCRIPT), url, "--", str(bodies)]
    try:
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit("the saturation runs need wrk: apt-get install wrk") from None
    summary = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    answered = (summary["requests"] - summary["non_2xx"]) * texts_per_request
    return {
        "texts": answered,
        "failures": summary["non_2xx"] + summary["socket_errors"],
        "texts_per_second": answered / (summary["duration_us"] / 1e6),
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
    }


def write_bodies(texts: list[str], texts_per_request: int) -> Path:
    """One JSON request body per line, for wrk."""
    path = ROOT / "loadtest" / "results" / f"bodies-{texts_per_request}.jsonl"
    groups = [texts[i : i + texts_per_request] for i in range(0, len(texts) - texts_per_request + 1, texts_per_request)]
    path.write_text("".join(json.dumps({"texts": group}) + "\n" for group in groups))
    return path


async def open_loop(url: str, texts: list[str], rate: float, duration: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s for `duration` s, whatever the server's speed."""
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(seed)
    idle: list[tuple[Connection, float]] = []  # with when each was last used, most recent last
    latencies, failures = [], 0

    async def send(body: bytes) -> None:
        nonlocal failures
        # Servers close keep-alive connections idle for 5 s (uvicorn's default): leave those behind.
        while idle and idle[-1][1] < time.perf_counter() - 4:
            idle.pop()[0].close()
        connection = idle.pop()[0] if idle else Connection(host, int(port))
        started = time.perf_counter()
        status, _ = await connection.post("/classify", body)
        if status == 200:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
        idle.append((connection, time.perf_counter()))

    tasks, index = [], 0
    started = time.perf_counter()
    next_at = started
    while next_at < started + duration:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(send(request_body(texts[index % len(texts)]))))
        index += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    for connection, _ in idle:
        connection.close()
    return summarize(latencies, failures, time.perf_counter() - started)


def summarize(latencies: list[float], failures: int, elapsed: float) -> dict:
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {
        "texts": len(latencies),
        "failures": failures,
        "texts_per_second": len(latencies) / elapsed,
        "p50_ms": 1000 * p50 if p50 is not None else None,
        "p99_ms": 1000 * p99 if p99 is not None else None,
    }


# --- the server's side of the story, from its /metrics ---


def server_view(change: Interval) -> dict:
    """Padding efficiency, batch sizes, queue wait and flush reasons over the interval between two scrapes."""
    batch_size = change.histogram("classifier_batch_size")
    queue_wait = change.histogram("classifier_queue_wait_seconds")
    inference = change.histogram("classifier_batch_inference_seconds")
    flushes = change.delta_by("classifier_batch_flushes_total", "reason")
    return {
        "padding_efficiency": change.delta("classifier_real_tokens_total")
        / max(1.0, change.delta("classifier_padded_tokens_total")),
        "mean_batch_size": batch_size.sum / max(1.0, batch_size.count),
        "batches": batch_size.count,
        "mean_queue_wait_ms": 1000 * queue_wait.sum / max(1.0, queue_wait.count),
        "mean_batch_inference_ms": 1000 * inference.sum / max(1.0, batch_size.count),
        "flushes": {reason: flushes.get(reason, 0.0) for reason in ("budget", "size", "window")},
    }


# --- processes under test ---


def service(model: str, port: int, threads: int, **settings: str) -> ServerProcess:
    env = {"CLASSIFIER_TORCH_THREADS": str(threads), "CLASSIFIER_LOG_LEVEL": "warning"}
    env.update({f"CLASSIFIER_{name.upper()}": str(value) for name, value in settings.items()})
    return server_process([sys.executable, "-m", "service", "--model", model, "--port", str(port)], port, env)


def server_process(command: list[str], port: int, env: dict[str, str]) -> ServerProcess:
    """A server subprocess on a loopback port, its log in loadtest/results/."""
    log_path = ROOT / "loadtest" / "results" / f"server-{port}.log"
    return ServerProcess(command, port, log_path, {**os.environ, **env}, cwd=ROOT)


# --- the model alone ---


def offline(model_dir: str, texts: list[str], budgets: list[int], threads: int, light_rate: float) -> dict:
    """The model's own throughput on the texts pre-sorted by length into batches under each token budget, and its
    median latency on single texts; both without HTTP, in fp32, on the same threads as the servers."""
    torch.set_num_threads(threads)
    loaded = load_classifier(model_dir, torch.device("cpu"))
    encoded = loaded.tokenizer(texts, truncation=True)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    by_budget = {budget: sorted_batches_throughput(loaded, encoded, budget) for budget in budgets}
    best = max(by_budget, key=lambda budget: by_budget[budget]["texts_per_second"])
    return {
        **by_budget[best],
        "best_budget": best,
        "by_budget": by_budget,
        "single_text_p50_ms": single_text_latency(loaded, encoded[:200], gap=0.0),
        # A lightly loaded server idles between texts, and an idle CPU runs the next forward pass ~2.5x slower
        # (caches and clocks cool down), so the light-load target compares against texts spaced the same way.
        "single_text_spaced_p50_ms": single_text_latency(loaded, encoded[:60], gap=1 / light_rate),
        "token_p50": percentile(lengths, 50),
        "token_p99": percentile(lengths, 99),
    }


def single_text_latency(loaded, encoded: list[list[int]], gap: float) -> float:
    """Median milliseconds of one unpadded forward pass per text, `gap` seconds apart."""
    latencies = []
    with torch.inference_mode():
        for ids in encoded:
            time.sleep(gap)
            started = time.perf_counter()
            loaded.model(input_ids=torch.tensor([ids]))
            latencies.append(time.perf_counter() - started)
    return 1000 * statistics.median(latencies)


def sorted_batches(encoded: list[list[int]], budget: int) -> list[list[list[int]]]:
    """The texts sorted by length and cut into consecutive batches of at most `budget` padded tokens (a text longer
    than the budget goes alone): the model alone at its best, for comparison with the service's batches."""
    batches, current = [], []
    for ids in sorted(encoded, key=len):
        if current and (len(current) + 1) * len(ids) > budget:
            batches.append(current)
            current = []
        current.append(ids)
    batches.append(current)
    return batches


def sorted_batches_throughput(loaded, encoded: list[list[int]], budget: int) -> dict:
    real = padded = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in sorted_batches(encoded, budget):
            inputs = loaded.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            loaded.model(**inputs)
            real += sum(len(ids) for ids in batch)
            padded += inputs["input_ids"].numel()
    return {"texts_per_second": len(encoded) / (time.perf_counter() - started), "padding_efficiency": real / padded}


def wait_for_empty_queue(url: str, has_metrics: bool) -> None:
    if not has_metrics:
        time.sleep(5)  # the plain server has no queue gauge: give its thread pool time to finish
        return
    wait_for(lambda: scrape(url).value("classifier_queue_texts") == 0, 120, f"{url}'s queue to empty", interval=0.2)


def load_phase(
    server: ServerProcess,
    texts: list[str],
    concurrency: int,
    rates: list[float],
    duration: float,
    multi: int,
    has_metrics: bool = True,
) -> dict:
    singles, groups = write_bodies(texts, 1), write_bodies(texts, multi)
    saturate(server.url, singles, concurrency=8, duration=3)  # warm up connections and caches
    wait_for_empty_queue(server.url, has_metrics)
    loads = {"saturation": lambda: saturate(server.url, singles, concurrency, duration)}
    if multi > 1:
        # Clients that send several texts per request pay the HTTP cost once per request, not once per text.
        loads[f"saturation_{multi}_per_request"] = lambda: saturate(
            server.url, groups, max(1, concurrency // multi), duration, texts_per_request=multi
        )
    loads.update({f"rate_{rate:g}": lambda rate=rate: asyncio.run(open_loop(server.url, texts, rate, duration)) for rate in rates})
    results = {}
    for name, load in loads.items():
        before = scrape(server.url) if has_metrics else None
        results[name] = load()
        wait_for_empty_queue(server.url, has_metrics)  # a backlog left over would spill into the next phase
        if before is not None:
            results[name]["server"] = server_view(Interval(before, scrape(server.url)))
        print(f"  {name}: {json.dumps(results[name])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--duration", type=float, default=40, help="seconds per load phase")
    parser.add_argument("--concurrency", type=int, default=256, help="concurrent clients at saturation")
    parser.add_argument("--multi", type=int, default=8, help="texts per request in the multi-text saturation run (1: none)")
    parser.add_argument("--rates", default="5,20", help="fixed request rates (requests/s), comma-separated")
    parser.add_argument("--texts", type=int, default=4000, help="texts drawn from the corpus mix")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every process")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="the service's token budget (its CPU default)")
    parser.add_argument("--offline-budgets", default="1024,2048,8192", help="token budgets tried for the model alone; the best counts")
    args = parser.parse_args()
    (ROOT / "loadtest" / "results").mkdir(exist_ok=True)
    model = args.model or str(ensure_default_model())
    texts = load_texts(args.texts)
    rates = [float(r) for r in args.rates.split(",") if r]
    report = {"machine": machine(), "args": vars(args)}

    print("model alone (offline) ...", flush=True)
    budgets = sorted({args.max_batch_tokens, *(int(b) for b in args.offline_budgets.split(","))})
    report["offline"] = offline(model, texts, budgets, args.threads, light_rate=rates[0] if rates else 5.0)
    print(json.dumps(report["offline"], indent=1), flush=True)
    for name, settings in (("batched", {}), ("unbatched", {"max_batch_size": 1})):
        print(f"service, {name} ...", flush=True)
        with service(model, 8701, args.threads, max_batch_tokens=args.max_batch_tokens, **settings) as server:
            report[name] = load_phase(server, texts, args.concurrency, rates, args.duration, args.multi)
    print("plain one-forward-per-request server ...", flush=True)
    plain = server_process([sys.executable, "loadtest/plain_server.py", model, "8702"], 8702, {"OMP_NUM_THREADS": str(args.threads)})
    with plain:
        report["plain"] = load_phase(plain, texts, args.concurrency, rates[:1], args.duration, args.multi, has_metrics=False)

    (ROOT / "loadtest" / "results" / "benchmark.json").write_text(json.dumps(report, indent=1))
    print_summary(report, rates)


def machine() -> dict:
    model_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"cpu": model_name, "cores": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0]}


def print_summary(report: dict, rates: list[float]) -> None:
    offline_tps = report["offline"]["texts_per_second"]
    rows = [
        (f"model alone, sorted batches of <= {budget} tokens", result["texts_per_second"], None, None, result["padding_efficiency"])
        for budget, result in report["offline"]["by_budget"].items()
    ]
    for name, label in (("batched", "service, micro-batching"), ("unbatched", "service, batching off"), ("plain", "plain server, 1 forward/request")):
        for phase, result in report[name].items():
            rows.append((f"{label}, {phase}", result["texts_per_second"], result["p50_ms"], result["p99_ms"], result.get("server", {}).get("padding_efficiency")))
    print(f"\n{'run':58} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'pad eff':>8}")
    for name, tps, p50, p99, efficiency in rows:
        cells = [format(v, ".3f" if v is efficiency else ".1f") if v is not None else "-" for v in (p50, p99, efficiency)]
        print(f"{name:58} {tps:8.1f} " + " ".join(f"{cell:>8}" for cell in cells))
    batched = report["batched"]["saturation"]
    light = report["batched"].get(f"rate_{rates[0]:g}") if rates else None
    print(f"\ntexts: token p50 {report['offline']['token_p50']}, p99 {report['offline']['token_p99']}; single-text model "
          f"latency p50 {report['offline']['single_text_p50_ms']:.1f} ms back to back, "
          f"{report['offline']['single_text_spaced_p50_ms']:.1f} ms spaced as at {rates[0] if rates else 5:g} req/s")
    print(f"saturation throughput / model alone at its best budget ({report['offline']['best_budget']}): "
          f"{batched['texts_per_second'] / offline_tps:.2f}  (target >= 0.90)")
    print(f"saturation throughput / plain server: {batched['texts_per_second'] / report['plain']['saturation']['texts_per_second']:.2f}  (target >= 1.40)")
    print(f"saturation padding efficiency:        {batched['server']['padding_efficiency']:.3f}  (target >= 0.90)")
    if light:
        print(f"p50 at {rates[0]:g} req/s minus spaced single-text latency: "
              f"{light['p50_ms'] - report['offline']['single_text_spaced_p50_ms']:.1f} ms  (target <= 10)")


if __name__ == "__main__":
    main()
