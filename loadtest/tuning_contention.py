"""Tuning under a busy neighbour, against a quiet start (issue 19's experiment), in runs of two starts each.

    python -m loadtest.tuning_contention [--model DIR] [--runs 3] [--steady-seconds 120] [--load-seconds 60]
        [--measure-seconds 30] [--neighbour-threads 2] [--stop-after 3]

Each run:
1. Quiet start: the service starts on a quiet machine; `--steady-seconds` of saturation (wrk, `--concurrency` keep-alive
   clients, one text per request from the benchmark corpus); then `--measure-seconds` more, measured. Reports what
   start-up chose, what is in force after, every live switch (at most one is expected, never to a slower setting:
   the live figures per setting are printed), and the measured texts/s.
2. Busy start: a neighbour job (`--neighbour-threads` threads of fp32 matrix products, as another replica building its
   model) runs while the service starts, and stops `--stop-after` s after /ready; the service is saturated from /ready
   for `--load-seconds`, then `--measure-seconds` more, measured. Reports start-up's choice and tuning time (against
   the limit), whether it was disturbed, the switches, what is in force at the end, and the measured texts/s.
Per run: busy / quiet saturation throughput (target >= 0.9) and whether the busy start ends on the quiet start's
precision. Writes loadtest/results/tuning_contention.json. Numbers mean something only on an otherwise quiet machine.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtest.benchmark import RESULTS, service
from loadtest.corpus import load_texts
from loadtest.probe import free_port, machine, saturate, write_bodies
from service.default_model import ensure_default_model

# The neighbour: fp32 matrix products on its own threads until stopped (as another replica's model build, or a
# training job, would keep the cores busy).
NEIGHBOUR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
while True:
    a = (a @ b).tanh()
"""


def neighbour(threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(threads)])


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


def tuning_view(info: dict) -> dict:
    """What start-up chose and measured, and what live tuning has in force, from /info."""
    tuning, live = info["tuning"], info["batching"].get("live_tuning")
    return {
        "startup_precision": info["precision"],
        "startup_max_batch_tokens": tuning["max_batch_tokens"]["value"] if "max_batch_tokens" in tuning else info["batching"]["max_batch_tokens"],
        "tuning_seconds": tuning.get("seconds"),
        "disturbed": tuning.get("disturbed", []),
        "precision_trials": tuning.get("precision_trials", []),
        "in_force": live["in_force"] if live else {"precision": info["precision"], "max_batch_tokens": info["batching"]["max_batch_tokens"]},
        "switches": live["switches"] if live else [],
        "live_candidates": live["candidates"] if live else {},
    }


def quiet_start(args: argparse.Namespace, model: str, bodies: Path) -> dict:
    with service(model, free_port(), args.threads, tuning_time_limit=args.tuning_time_limit) as server:
        saturate(server.url, bodies, args.concurrency, args.steady_seconds)
        measured = saturate(server.url, bodies, args.concurrency, args.measure_seconds)
        info = httpx.get(f"{server.url}/info").json()
    return {**tuning_view(info), **measured}


def busy_start(args: argparse.Namespace, model: str, bodies: Path) -> dict:
    job = neighbour(args.neighbour_threads)
    try:
        time.sleep(1)  # the neighbour is running before the service starts
        started = time.monotonic()
        with service(model, free_port(), args.threads, tuning_time_limit=args.tuning_time_limit) as server:
            ready_seconds = time.monotonic() - started
            stopper = threading.Timer(args.stop_after, stop, (job,))
            stopper.start()
            load = saturate(server.url, bodies, args.concurrency, args.load_seconds)
            stopper.join()
            measured = saturate(server.url, bodies, args.concurrency, args.measure_seconds)
            info = httpx.get(f"{server.url}/info").json()
    finally:
        stop(job)
    return {**tuning_view(info), **measured, "ready_seconds": ready_seconds, "load_texts_per_second": load["texts_per_second"]}


def describe(name: str, run: dict, limit: float) -> str:
    """One start, on one line: what start-up chose and in how long against the limit, whether it was disturbed, the
    live switches, what is in force at the end with each setting's live figures, and the measured throughput."""
    force = run["in_force"]
    switches = "; ".join(f"{s['what']} {s['from']} -> {s['to']} ({s['median_ratio']}x over {s['pairs']} pairs)" for s in run["switches"])
    figures = ", ".join(f"{label} {c['tokens_per_second']} tok/s ({c['batches']} batches)" for label, c in run["live_candidates"].items())
    disturbed = f"yes ({'; '.join(run['disturbed'])})" if run["disturbed"] else "no"
    return (
        f"  {name}: start-up chose {run['startup_precision']}/{run['startup_max_batch_tokens']} in "
        f"{run['tuning_seconds']} s (limit {limit}); disturbed: {disturbed}; "
        f"switches: {len(run['switches'])}{f' ({switches})' if switches else ''}; "
        f"in force {force['precision']}/{force['max_batch_tokens']}; live: {figures or '-'}; "
        f"measured {run['texts_per_second']:.1f} texts/s (p99 {run['p99_ms']} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steady-seconds", type=float, default=120, help="quiet start: saturation before measuring")
    parser.add_argument("--load-seconds", type=float, default=60, help="busy start: saturation from /ready on")
    parser.add_argument("--measure-seconds", type=float, default=30, help="saturation measured at the end of each")
    parser.add_argument("--neighbour-threads", type=int, default=2)
    parser.add_argument("--stop-after", type=float, default=3, help="the neighbour stops this long after /ready")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--texts", type=int, default=4000, help="texts drawn from the corpus mix for the load")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tuning-time-limit", type=float, default=20.0)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    model = args.model or str(ensure_default_model())
    bodies = write_bodies(RESULTS / "bodies-1.jsonl", load_texts(args.texts), 1)
    report: dict = {"machine": machine(), "args": vars(args), "runs": []}
    for number in range(1, args.runs + 1):
        quiet = quiet_start(args, model, bodies)
        busy = busy_start(args, model, bodies)
        run = {
            "quiet": quiet,
            "busy": busy,
            # A quiet start that answered nothing (a machine far too busy) has no ratio.
            "ratio": busy["texts_per_second"] / quiet["texts_per_second"] if quiet["texts_per_second"] else math.nan,
            "same_precision": busy["in_force"]["precision"] == quiet["in_force"]["precision"],
        }
        report["runs"].append(run)
        print(f"run {number}:\n{describe('quiet', quiet, args.tuning_time_limit)}\n{describe('busy', busy, args.tuning_time_limit)}", flush=True)
        print(
            f"  busy / quiet = {run['ratio']:.2f} (target >= 0.9); busy start ends on the quiet start's precision: "
            f"{run['same_precision']}; quiet start switched {len(quiet['switches'])} times (target <= 1)",
            flush=True,
        )
    (RESULTS / "tuning_contention.json").write_text(json.dumps(report, indent=1))
    print(
        "\nbusy / quiet per run: "
        + ", ".join(f"{run['ratio']:.2f}" for run in report["runs"])
        + "; tuning seconds (busy): "
        + ", ".join(str(run["busy"]["tuning_seconds"]) for run in report["runs"])
        + f" (limit {args.tuning_time_limit})"
    )


if __name__ == "__main__":
    main()
