"""Throughput and latency benchmark: the service against the model alone and against a plain server.

    python -m loadtest.benchmark [--model DIR] [--duration 40] [--concurrency 256] [--multi 8] [--rates 5,20]

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
Latency percentiles are those of loadtest/probe.py's percentile() (the nearest rank from above), wrk's included.
"""

import argparse
import asyncio
import json
import os
import random
import time

import torch

from loadtest.corpus import load_texts
from loadtest.probe import (
    ROOT,
    Interval,
    ServerProcess,
    ServerSummary,
    machine,
    percentile,
    plain_server_command,
    poisson_requests,
    saturate,
    scrape,
    server_summary,
    service_command,
    wait_until_idle,
    write_bodies,
)
from service.default_model import ensure_default_model
from service.runner import load_classifier

RESULTS = ROOT / "loadtest" / "results"


def open_loop_run(url: str, texts: list[str], rate: float, duration: float, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s for `duration` s, one text per request, whatever the server's speed."""
    bodies = [json.dumps({"texts": text}).encode() for text in texts]
    return asyncio.run(poisson_requests(url, bodies, rate, duration, random.Random(seed))).summary()


# --- the server's side of the story, from its /metrics ---


def server_view(summary: ServerSummary) -> dict:
    """Padding efficiency, batch sizes, queue wait and flush reasons over a phase."""
    return {
        "padding_efficiency": summary.padding_efficiency,
        "mean_batch_size": summary.batch_size.mean,
        "batches": summary.batches,
        "mean_queue_wait_ms": _ms(summary.queue_wait.mean),
        "mean_batch_inference_ms": _ms(summary.batch_inference.mean),
        "flushes": {reason: summary.flushes.get(reason, 0.0) for reason in ("budget", "size", "window")},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


# --- processes under test ---


def service(model: str, port: int, threads: int, **settings: str) -> ServerProcess:
    env = {"CLASSIFIER_TORCH_THREADS": str(threads), "CLASSIFIER_LOG_LEVEL": "warning"}
    env.update({f"CLASSIFIER_{name.upper()}": str(value) for name, value in settings.items()})
    return ServerProcess(service_command(model, port), port, RESULTS / f"server-{port}.log", env)


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
    return 1000 * percentile(latencies, 50)


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


def load_phase(
    server: ServerProcess,
    texts: list[str],
    concurrency: int,
    rates: list[float],
    duration: float,
    multi: int,
    has_metrics: bool = True,
) -> dict:
    singles = write_bodies(RESULTS / "bodies-1.jsonl", texts, 1)
    groups = write_bodies(RESULTS / f"bodies-{multi}.jsonl", texts, multi)
    saturate(server.url, singles, concurrency=8, duration=3)  # warm up connections and caches
    wait_until_idle(server.url, has_metrics)
    loads = {"saturation": lambda: saturate(server.url, singles, concurrency, duration)}
    if multi > 1:
        # Clients that send several texts per request pay the HTTP cost once per request, not once per text.
        loads[f"saturation_{multi}_per_request"] = lambda: saturate(
            server.url, groups, max(1, concurrency // multi), duration, texts_per_request=multi
        )
    loads.update({f"rate_{rate:g}": lambda rate=rate: open_loop_run(server.url, texts, rate, duration) for rate in rates})
    results = {}
    for name, load in loads.items():
        before = scrape(server.url) if has_metrics else None
        results[name] = load()
        wait_until_idle(server.url, has_metrics)  # a backlog left over would spill into the next phase
        if before is not None:
            results[name]["server"] = server_view(server_summary(Interval(before, scrape(server.url))))
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
    RESULTS.mkdir(exist_ok=True)
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
    plain = ServerProcess(plain_server_command(model, 8702), 8702, RESULTS / "server-8702.log", {"OMP_NUM_THREADS": str(args.threads)})
    with plain:
        report["plain"] = load_phase(plain, texts, args.concurrency, rates[:1], args.duration, args.multi, has_metrics=False)

    (RESULTS / "benchmark.json").write_text(json.dumps(report, indent=1))
    print_summary(report, rates)


def print_summary(report: dict, rates: list[float]) -> None:
    offline_tps = report["offline"]["texts_per_second"]
    rows = [
        (f"model alone, sorted batches of <= {budget} tokens", result["texts_per_second"], None, None, result["padding_efficiency"])
        for budget, result in report["offline"]["by_budget"].items()
    ]
    for name, label in (("batched", "service, micro-batching"), ("unbatched", "service, batching off"), ("plain", "plain server, 1 forward/request")):
        for phase, result in report[name].items():
            efficiency = result.get("server", {}).get("padding_efficiency")
            rows.append((f"{label}, {phase}", result["texts_per_second"], result["p50_ms"], result["p99_ms"], efficiency))
    print(f"\n{'run':58} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'pad eff':>8}")
    for name, tps, p50, p99, efficiency in rows:
        cells = [format(v, ".3f" if v is efficiency else ".1f") if v is not None else "-" for v in (p50, p99, efficiency)]
        print(f"{name:58} {tps:8.1f} " + " ".join(f"{cell:>8}" for cell in cells))
    batched = report["batched"]["saturation"]
    light = report["batched"].get(f"rate_{rates[0]:g}") if rates else None
    print(
        f"\ntexts: token p50 {report['offline']['token_p50']}, p99 {report['offline']['token_p99']}; single-text model "
        f"latency p50 {report['offline']['single_text_p50_ms']:.1f} ms back to back, "
        f"{report['offline']['single_text_spaced_p50_ms']:.1f} ms spaced as at {rates[0] if rates else 5:g} req/s"
    )
    print(
        f"saturation throughput / model alone at its best budget ({report['offline']['best_budget']}): "
        f"{batched['texts_per_second'] / offline_tps:.2f}  (target >= 0.90)"
    )
    plain = report["plain"]["saturation"]["texts_per_second"]
    print(f"saturation throughput / plain server: {batched['texts_per_second'] / plain:.2f}  (target >= 1.40)")
    print(f"saturation padding efficiency:        {batched['server']['padding_efficiency']:.3f}  (target >= 0.90)")
    if light:
        print(
            f"p50 at {rates[0]:g} req/s minus spaced single-text latency: "
            f"{light['p50_ms'] - report['offline']['single_text_spaced_p50_ms']:.1f} ms  (target <= 10)"
        )


if __name__ == "__main__":
    main()
