"""Tuning under a busy neighbour, against a quiet start (issue 19's experiment), in runs of two starts each.

    python -m loadtest.tuning_contention [--model DIR] [--runs 3] [--steady-seconds 120] [--load-seconds 60]
        [--rounds 3] [--measure-seconds 10] [--neighbour-threads 2] [--stop-after 3]

Each run:
1. Quiet start: the service starts on a quiet machine, then `--steady-seconds` of saturation (wrk, `--concurrency`
   keep-alive clients, one text per request from the benchmark corpus). Reports what start-up chose and every live
   switch (at most one is expected, never to a slower setting: the live figures per setting are printed).
2. Busy start, beside the quiet one (idle meanwhile): a neighbour job (`--neighbour-threads` threads of fp32 matrix
   products, as another replica building its model) runs while the second service starts, and stops `--stop-after` s
   after its /ready; it is saturated from /ready for `--load-seconds`. Reports start-up's choice and tuning time
   (against the limit), whether it was disturbed, and what is in force when the load ends.
3. Both measured in `--rounds` interleaved rounds of `--measure-seconds` each (quiet then busy, then busy then quiet,
   ...), so the machine's drift slows both sides of a round alike: busy / quiet texts/s per round, and their median.
Per run: the median ratio (target >= 0.9) and whether the busy start ends on the quiet start's precision. Writes
loadtest/results/tuning_contention.json. Numbers mean something only on an otherwise quiet machine.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtest.benchmark import RESULTS, service
from loadtest.corpus import load_texts
from loadtest.probe import ServerProcess, free_port, machine, saturate, write_bodies
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


def info_of(server: ServerProcess) -> dict:
    return tuning_view(httpx.get(f"{server.url}/info").json())


def interleaved(servers: dict[str, ServerProcess], args: argparse.Namespace, bodies: Path) -> list[dict[str, dict]]:
    """`--rounds` rounds of saturation, each service in turn, the order reversed every round."""
    rounds = []
    for number in range(args.rounds):
        names = list(servers) if number % 2 == 0 else list(reversed(servers))
        rounds.append({name: saturate(servers[name].url, bodies, args.concurrency, args.measure_seconds) for name in names})
    return rounds


def run_pair(args: argparse.Namespace, model: str, bodies: Path) -> dict:
    """One quiet start, one busy start beside it, and both measured in interleaved rounds."""
    limit = {"tuning_time_limit": args.tuning_time_limit}
    with service(model, free_port(), args.threads, **limit) as quiet_server:
        steady = saturate(quiet_server.url, bodies, args.concurrency, args.steady_seconds)
        quiet = {**info_of(quiet_server), "steady_texts_per_second": steady["texts_per_second"]}
        job = neighbour(args.neighbour_threads)
        try:
            time.sleep(1)  # the neighbour is running before the service starts
            started = time.monotonic()
            with service(model, free_port(), args.threads, **limit) as busy_server:
                ready_seconds = time.monotonic() - started
                stopper = threading.Timer(args.stop_after, stop, (job,))
                stopper.start()
                load = saturate(busy_server.url, bodies, args.concurrency, args.load_seconds)
                stopper.join()
                busy = {**info_of(busy_server), "ready_seconds": ready_seconds, "load_texts_per_second": load["texts_per_second"]}
                busy["in_force_after_load"] = busy["in_force"]
                rounds = interleaved({"quiet": quiet_server, "busy": busy_server}, args, bodies)
                busy.update(info_of(busy_server))
        finally:
            stop(job)
        quiet_after = info_of(quiet_server)
    # A quiet round that answered nothing (a machine far too busy) has no ratio.
    ratios = [one["busy"]["texts_per_second"] / one["quiet"]["texts_per_second"] if one["quiet"]["texts_per_second"] else math.nan for one in rounds]
    return {
        "quiet": quiet,
        "quiet_switches_by_the_end": quiet_after["switches"],
        "busy": busy,
        "rounds": rounds,
        "ratios": ratios,
        "ratio": statistics.median(ratios),
        "same_precision": busy["in_force_after_load"]["precision"] == quiet["in_force"]["precision"],
    }


def describe(name: str, start: dict, limit: float) -> str:
    """One start, on one line: what start-up chose and in how long against the limit, whether it was disturbed, the
    live switches, and what is in force with each setting's live figures."""
    force = start["in_force"]
    switches = "; ".join(f"{s['what']} {s['from']} -> {s['to']} ({s['median_ratio']}x over {s['pairs']} pairs)" for s in start["switches"])
    figures = ", ".join(f"{label} {c['tokens_per_second']} tok/s ({c['batches']} batches)" for label, c in start["live_candidates"].items())
    disturbed = f"yes ({'; '.join(start['disturbed'])})" if start["disturbed"] else "no"
    return (
        f"  {name}: start-up chose {start['startup_precision']}/{start['startup_max_batch_tokens']} in "
        f"{start['tuning_seconds']} s (limit {limit}); disturbed: {disturbed}; "
        f"switches: {len(start['switches'])}{f' ({switches})' if switches else ''}; "
        f"in force {force['precision']}/{force['max_batch_tokens']}; live: {figures or '-'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steady-seconds", type=float, default=120, help="quiet start: saturation before the busy start")
    parser.add_argument("--load-seconds", type=float, default=60, help="busy start: saturation from /ready on")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measuring rounds of both services")
    parser.add_argument("--measure-seconds", type=float, default=10, help="saturation of each service in each round")
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
        run = run_pair(args, model, bodies)
        report["runs"].append(run)
        quiet, busy = run["quiet"], run["busy"]
        rounds = "; ".join(" ".join(f"{name} {one[name]['texts_per_second']:.1f}" for name in one) for one in run["rounds"])
        print(f"run {number}:\n{describe('quiet', quiet, args.tuning_time_limit)}\n{describe('busy', busy, args.tuning_time_limit)}", flush=True)
        print(
            f"  texts/s per round: {rounds}\n"
            f"  busy / quiet per round {', '.join(f'{ratio:.2f}' for ratio in run['ratios'])}, median {run['ratio']:.2f} "
            f"(target >= 0.9); busy start's precision after {args.load_seconds:.0f} s of load: "
            f"{busy['in_force_after_load']['precision']} (quiet start's: {quiet['in_force']['precision']}, same: {run['same_precision']}); "
            f"quiet start switched {len(quiet['switches'])} times in {args.steady_seconds:.0f} s of saturation, "
            f"{len(run['quiet_switches_by_the_end'])} by the end (target <= 1)",
            flush=True,
        )
    (RESULTS / "tuning_contention.json").write_text(json.dumps(report, indent=1))
    print(
        "\nbusy / quiet per run (medians of the rounds): "
        + ", ".join(f"{run['ratio']:.2f}" for run in report["runs"])
        + "; tuning seconds (busy): "
        + ", ".join(str(run["busy"]["tuning_seconds"]) for run in report["runs"])
        + f" (limit {args.tuning_time_limit})"
    )


if __name__ == "__main__":
    main()
