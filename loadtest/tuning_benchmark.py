"""Start-up tuning against the old fixed defaults, back to back, on the benchmark's corpus.

    python -m loadtest.tuning_benchmark [--model DIR] [--rounds 2] [--duration 30] [--offline-texts 2000]

1. Saturation (wrk, 256 keep-alive clients, one text per request) of the service with every default (tuning on:
   precision and budget measured at start-up) and of the service with today's fixed defaults (fp32, 2048 tokens,
   tuning off), alternating for `--rounds` rounds, so a busy spell on a shared machine hits both; reports each
   round's ratio. Also records each tuned start's /info tuning report (choices, deviations, tuning time).
2. Offline: the model alone in the tuned precision on other corpus texts, length-sorted into batches under each
   budget of the CPU ladder (512..8192); each round's chosen budget's throughput against the best.
Writes loadtest/results/tuning_benchmark.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import httpx
import torch

from loadtest.benchmark import RESULTS, service, sorted_batches
from loadtest.corpus import load_texts
from loadtest.probe import machine, saturate, wait_until_idle, write_bodies
from service.default_model import ensure_default_model
from service.runner import ModelRunner, load_classifier
from service.tuning import budget_ladder

FIXED = {"precision": "fp32", "max_batch_tokens": 2048, "tune": "false"}


def saturation_run(model: str, threads: int, bodies: Path, concurrency: int, duration: float, **settings) -> dict:
    started = time.monotonic()
    with service(model, 8711, threads, **settings) as server:
        ready_seconds = time.monotonic() - started
        info = httpx.get(f"{server.url}/info").json()
        saturate(server.url, bodies, concurrency=8, duration=3)  # warm connections and caches
        wait_until_idle(server.url)
        result = saturate(server.url, bodies, concurrency, duration)
    return {
        **result,
        "ready_seconds": ready_seconds,
        "precision": info["precision"],
        "max_batch_tokens": info["batching"]["max_batch_tokens"],
        "tuning": info["tuning"],
    }


def offline_ladder(model: str, texts: list[str], precision: str, budgets: list[int], threads: int) -> dict[int, float]:
    """Texts/s of the model alone on length-sorted batches under each budget, in `precision`."""
    torch.set_num_threads(threads)
    loaded = load_classifier(model, torch.device("cpu"))
    runner = ModelRunner(loaded.model, torch.device("cpu"), precision, loaded.tokenizer.pad_token_id or 0)
    encoded = loaded.tokenizer(texts, truncation=True)["input_ids"]
    speeds = {}
    for budget in budgets:
        batches = sorted_batches(encoded, budget)
        runner.run(batches[len(batches) // 2], len(batches[len(batches) // 2][-1]))  # warm this precision's kernels
        started = time.perf_counter()
        for batch in batches:
            runner.run(batch, len(batch[-1]))
        speeds[budget] = len(encoded) / (time.perf_counter() - started)
        print(f"  offline {precision} budget {budget}: {speeds[budget]:.1f} texts/s", flush=True)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=30, help="seconds per saturation run")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--texts", type=int, default=4000, help="texts drawn from the corpus mix for the load")
    parser.add_argument("--offline-texts", type=int, default=2000, help="texts for the offline ladder")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    model = args.model or str(ensure_default_model())
    texts = load_texts(args.texts)
    bodies = write_bodies(RESULTS / "bodies-1.jsonl", texts, 1)
    report = {"machine": machine(), "args": vars(args), "rounds": []}
    for round_number in range(args.rounds):
        runs = {}
        for name, settings in (("tuned", {}), ("fixed", FIXED)):
            runs[name] = saturation_run(model, args.threads, bodies, args.concurrency, args.duration, **settings)
            print(f"round {round_number + 1} {name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'tuning'})}", flush=True)
        runs["ratio"] = runs["tuned"]["texts_per_second"] / runs["fixed"]["texts_per_second"]
        print(f"round {round_number + 1}: tuned / fixed = {runs['ratio']:.2f}", flush=True)
        report["rounds"].append(runs)

    last = report["rounds"][-1]["tuned"]
    speeds = offline_ladder(model, load_texts(args.offline_texts, seed=1), last["precision"], budget_ladder(512, "cpu"), args.threads)
    best = max(speeds, key=speeds.get)
    chosen = [runs["tuned"]["max_batch_tokens"] for runs in report["rounds"]]
    report["offline"] = {
        "precision": last["precision"],
        "texts_per_second": speeds,
        "best": best,
        "chosen": chosen,
        "chosen_over_best": [speeds[budget] / speeds[best] for budget in chosen],
    }
    (RESULTS / "tuning_benchmark.json").write_text(json.dumps(report, indent=1))

    ratios = [r["ratio"] for r in report["rounds"]]
    print(f"\nsaturation tuned / fixed per round: {', '.join(f'{r:.2f}' for r in ratios)} (target >= 1.3 with native bf16)")
    for number, runs in enumerate(report["rounds"], 1):
        tuning = runs["tuned"]["tuning"]
        trials = {t["precision"]: t for t in tuning["precision_trials"]}
        print(
            f"round {number}: tuned {runs['tuned']['texts_per_second']:.1f} texts/s ({runs['tuned']['precision']}, "
            f"{runs['tuned']['max_batch_tokens']} tokens; tuning {tuning['seconds']:.1f} s, ready in "
            f"{runs['tuned']['ready_seconds']:.1f} s), fixed {runs['fixed']['texts_per_second']:.1f} texts/s; "
            f"deviations { ({p: t['max_deviation'] for p, t in trials.items()}) }, "
            f"label changes { ({p: t['label_changes'] for p, t in trials.items()}) }"
        )
    print(
        f"offline in {last['precision']}: "
        + ", ".join(f"{budget}: {speed:.1f}" for budget, speed in speeds.items())
        + " texts/s; chosen budgets per round at "
        + ", ".join(f"{budget} -> {ratio:.3f}" for budget, ratio in zip(chosen, report["offline"]["chosen_over_best"]))
        + f" of the best ({best}) (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
