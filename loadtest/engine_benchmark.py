"""Engine process capacity: requests per second and CPU per request of one engine process, fed faster than this
machine's API processes can feed it.

    python -m loadtest.engine_benchmark [--duration 10] [--rounds 3] [--in-flight 64,512] [--clients 2] [--multi 1]
                                        [--baseline DIR ...] [--env NAME=VALUE ...] [--profile SECONDS]

The front-end benchmark (`loadtest.frontend_benchmark`) drives the whole service over HTTP, so on a small machine the
API processes, not the engine, set the rate, and the engine is measured at whatever rate they reach (about 1,000-2,000
single-text requests/s on 2 cores). Here the engine process (`service.workers`' own, with the near-zero-cost model of
the front-end benchmark, tuning off, one torch thread) is started alone, and a driver process stands in for
`--clients` API processes: one `service.ipc.EngineClient` each, as an API process holds, keeping `--in-flight`
requests of `--multi` token-id sequences outstanding in all (each answer sends the next request, in the same turn of
the loop), the sequences being the corpus mix tokenized once beforehand. What is measured over `--duration` seconds
after a 2 s warm-up: answered requests/s, latency, texts per batch (from the engine's own metrics), and the CPU time
of each of the engine process's threads (`/proc/<pid>/task`): its event loop (`clf-engine`: the IPC, admission, the
queue, answers: the bookkeeping), the collation thread, the inference thread (`clf-inference`, the model) and
ZeroMQ's I/O thread. The driver's CPU per request is reported too: it is what the API processes' side of the IPC
costs.

Each configuration (this tree, and each `--baseline DIR` holding an older `service` package whose `EngineClient`
speaks to its own engine) runs in its own pair of processes, round by round, alternating, so ratios come from runs
made back to back. `--profile N` records N seconds of py-spy of the engine process under the first configuration and
the largest `--in-flight` instead. Results go to loadtest/results/engine.json.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.corpus import load_texts
from loadtest.frontend_benchmark import ENGINE_PROCESS, INFERENCE_THREAD, build_near_zero_cost_model, cpu_seconds, record_py_spy, thread_cpu_seconds
from loadtest.probe import ROOT, machine, percentile

RESULTS = ROOT / "loadtest" / "results"
READY_TIMEOUT = 120  # seconds for the engine process to load and warm up

# The driver, run with `python -c` in the tree under test, so it imports that tree's `service.ipc`. Its arguments:
# the engine's address, a JSON file of token-id sequences, clients, requests in flight, texts per request, warm-up and
# measured seconds. It prints MEASURING and MEASURED as the measured seconds begin and end (the benchmark reads the
# processes' CPU time then), and last one JSON line: what it saw over those seconds.
DRIVER = r"""
import asyncio, itertools, json, sys, time
import uvloop
from service.ipc import EngineClient

address, ids_file = sys.argv[1], sys.argv[2]
clients_n, in_flight, per_request = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
warm_up, duration = float(sys.argv[6]), float(sys.argv[7])
sequences = json.loads(open(ids_file).read())

async def main():
    clients = [EngineClient(address) for _ in range(clients_n)]
    for client in clients:  # bounded: an engine that never gets ready fails the run instead of hanging it
        await asyncio.wait_for(client.wait_for_state(lambda state: state.status == "ready"), 120)
    picks = itertools.cycle(range(len(sequences)))
    state = {"measuring": False, "answered": 0, "failed": 0, "latencies": []}

    async def caller(client):
        while True:
            texts = [sequences[next(picks)] for _ in range(per_request)]
            sent = time.perf_counter()
            try:
                await client.score(texts, time.monotonic() + 60.0)
            except Exception:
                if state["measuring"]:
                    state["failed"] += 1
                continue
            if state["measuring"]:
                state["answered"] += 1
                state["latencies"].append(time.perf_counter() - sent)

    tasks = [asyncio.create_task(caller(clients[i % clients_n])) for i in range(in_flight)]
    await asyncio.sleep(warm_up)
    print("MEASURING", flush=True)
    started = time.perf_counter()
    state["measuring"] = True
    await asyncio.sleep(duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - started
    print("MEASURED", flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    print(json.dumps({
        "answered": state["answered"], "failed": state["failed"], "seconds": elapsed,
        "latencies_ms": [round(1000 * seconds, 3) for seconds in state["latencies"]],
    }), flush=True)

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""

# The engine process alone, as `--workers` starts it, run with `python -c` in the tree under test.
ENGINE = r"""
import sys
from service.settings import Settings
from service.workers import _serve_engine
_serve_engine(Settings(), sys.argv[1])
"""


def token_ids(model_dir: Path, texts: int) -> list[list[int]]:
    """The corpus mix, tokenized as the service does (truncated to the model's maximum length)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(load_texts(texts), truncation=True, max_length=tokenizer.model_max_length)["input_ids"]


@contextlib.contextmanager
def engine_process(source: Path, model_dir: Path, env: dict[str, str], log: Path):
    """The engine process of the tree in `source` (with `env` over the benchmark's settings), serving on a fresh ipc
    address: yields its address, its pid and its metrics directory."""
    runtime = Path(tempfile.mkdtemp(prefix="engine-benchmark-"))
    address = f"ipc://{runtime}/engine.sock"
    metrics_dir = runtime / "metrics"
    metrics_dir.mkdir()
    environment = {
        **os.environ,
        "MODEL": str(model_dir),
        "CLASSIFIER_TUNE": "false",
        "CLASSIFIER_TORCH_THREADS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        **env,
    }
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-c", ENGINE, address], cwd=source, env=environment, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield address, process.pid, metrics_dir
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def batches(metrics_dir: Path) -> tuple[float, float]:
    """Texts and batches the engine has run so far (its classifier_batch_size histogram)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(metrics_dir))
    texts = registry.get_sample_value("classifier_batch_size_sum") or 0.0
    count = registry.get_sample_value("classifier_batch_size_count") or 0.0
    return texts, count


def driver_command(address: str, ids_file: Path, args: argparse.Namespace, in_flight: int, warm_up: float, seconds: float) -> list[str]:
    numbers = [args.clients, in_flight, args.multi, warm_up, seconds]
    return [sys.executable, "-c", DRIVER, address, str(ids_file), *(f"{number:g}" for number in numbers)]


def drive(source: Path, address: str, pid: int, ids_file: Path, args: argparse.Namespace, in_flight: int) -> dict:
    """One measured run of the driver against a ready engine process (`pid`): what the driver saw, with the CPU
    seconds of each engine thread and of the driver over its measured seconds."""
    command = driver_command(address, ids_file, args, in_flight, 2, args.duration)
    with tempfile.TemporaryFile("w+") as errors:
        driver = subprocess.Popen(command, cwd=source, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert driver.stdout is not None
        lines, marks = [], {}
        for line in driver.stdout:  # the driver ends on its own: its load stops after the measured seconds
            lines.append(line)
            if line.strip() in ("MEASURING", "MEASURED"):
                marks[line.strip()] = (thread_cpu_seconds(pid), cpu_seconds([driver.pid]).get(driver.pid, ("", 0.0))[1])
        if driver.wait() != 0 or len(marks) != 2:
            errors.seek(0)
            raise RuntimeError(f"the driver failed:\n{errors.read()[-3000:]}")
    run = json.loads(lines[-1])
    (engine_before, driver_before), (engine_after, driver_after) = marks["MEASURING"], marks["MEASURED"]
    run["engine_threads_cpu_seconds"] = {name: spent - engine_before.get(name, 0.0) for name, spent in engine_after.items()}
    run["driver_cpu_seconds"] = driver_after - driver_before
    return run


def measure(source: Path, model_dir: Path, ids_file: Path, args: argparse.Namespace, in_flight: int, log: Path) -> dict:
    with engine_process(source, model_dir, args.env, log) as (address, pid, metrics_dir):
        texts_before, batches_before = batches(metrics_dir)
        run = drive(source, address, pid, ids_file, args, in_flight)
        texts_after, batches_after = batches(metrics_dir)
    answered = run["answered"]
    per_request_ms = {name: 1000 * spent / answered for name, spent in run["engine_threads_cpu_seconds"].items() if answered}
    engine_ms = sum(per_request_ms.values())
    loop_ms = per_request_ms.get(ENGINE_PROCESS, 0.0)
    return {
        "in_flight": in_flight,
        "requests_per_second": answered / run["seconds"],
        "failed": run["failed"],
        "p50_ms": percentile(run["latencies_ms"], 50),
        "p99_ms": percentile(run["latencies_ms"], 99),
        # Over the warm-up and the measured run together (the metrics are cumulative): the batch shape at this load.
        "texts_per_batch": (texts_after - texts_before) / (batches_after - batches_before) if batches_after > batches_before else None,
        "engine_cpu_ms_per_request": engine_ms,
        "threads_cpu_ms_per_request": per_request_ms,
        "bookkeeping_cpu_ms_per_request": engine_ms - per_request_ms.get(INFERENCE_THREAD, 0.0),
        "loop_capacity": 1000 / loop_ms if loop_ms else None,
        "engine_capacity": 1000 / engine_ms if engine_ms else None,  # its threads share one interpreter lock
        "driver_cpu_ms_per_request": 1000 * run["driver_cpu_seconds"] / answered if answered else None,
    }


def summary_line(result: dict) -> str:
    by_thread = sorted(result["threads_cpu_ms_per_request"].items(), key=lambda item: -item[1])
    threads = ", ".join(f"{name} {ms:.3f}" for name, ms in by_thread if ms > 0.0005)
    return (
        f"{result['requests_per_second']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"failed {result['failed']}, {result['texts_per_batch'] or 0:.1f} texts/batch; engine CPU "
        f"{result['engine_cpu_ms_per_request']:.3f} ms/request (bookkeeping {result['bookkeeping_cpu_ms_per_request']:.3f}: {threads}); "
        f"driver {result['driver_cpu_ms_per_request']:.3f} ms/request"
    )


def profile(source: Path, model_dir: Path, ids_file: Path, args: argparse.Namespace, output: Path) -> None:
    """py-spy of the engine process (threads, native frames) while the driver keeps the largest --in-flight going."""
    in_flight = max(args.in_flight)
    with engine_process(source, model_dir, args.env, RESULTS / "engine-process.log") as (address, pid, metrics_dir):
        driver = subprocess.Popen(
            driver_command(address, ids_file, args, in_flight, 0, args.profile + 5),
            cwd=source,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while batches(metrics_dir)[1] < 100 and time.monotonic() < deadline:  # loaded, and serving the driver
            time.sleep(0.5)
        record_py_spy(pid, args.profile, output)
        driver.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration, alternating")
    parser.add_argument("--in-flight", type=lambda s: [int(n) for n in s.split(",")], default=[64, 512], help="requests outstanding, comma-separated")
    parser.add_argument("--clients", type=int, default=2, help="API processes the driver stands in for")
    parser.add_argument("--multi", type=int, default=1, help="token-id sequences per request")
    parser.add_argument("--texts", type=int, default=4000, help="texts drawn from the corpus mix")
    parser.add_argument("--baseline", action="append", default=[], help="another tree holding a service package, measured first (repeatable)")
    parser.add_argument("--profile", type=float, help="record this many seconds of py-spy instead of measuring")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the engine process (e.g. a larger CLASSIFIER_MAX_BATCH_TOKENS)")
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.env)
    RESULTS.mkdir(exist_ok=True)
    model_dir = build_near_zero_cost_model(Path(tempfile.mkdtemp(prefix="engine-model-")))
    ids_file = RESULTS / "engine-token-ids.json"
    ids_file.write_text(json.dumps(token_ids(model_dir, args.texts)))
    configs = [(f"baseline {Path(path).name}", Path(path).resolve()) for path in args.baseline] + [("this tree", ROOT)]

    if args.profile:
        name, source = configs[0]
        output = RESULTS / "engine-profile.txt"
        profile(source, model_dir, ids_file, args, output)
        print(f"py-spy samples of {name}'s engine process: {output}")
        return

    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in args.in_flight} for name, _ in configs}
    for round_number in range(args.rounds):
        for in_flight in args.in_flight:
            for name, source in configs:
                result = measure(source, model_dir, ids_file, args, in_flight, RESULTS / "engine-process.log")
                runs[name][in_flight].append(result)
                print(f"round {round_number + 1}, {name}, {in_flight} in flight: {summary_line(result)}", flush=True)
    (RESULTS / "engine.json").write_text(json.dumps({"args": vars(args), "machine": machine(), "runs": runs}, indent=1))
    print_summary(runs, configs, args)


def print_summary(runs: dict, configs: list, args: argparse.Namespace) -> None:
    print(f"\n{args.multi} text(s) per request, {args.clients} clients; medians over rounds (CPU: ms per request)")
    columns = ("in flight", "req/s", "min-max", "texts/batch", "engine", "bookkeeping", "loop", "model", "loop cap.", "driver")
    print(f"{'configuration':30} " + " ".join(f"{column:>11}" for column in columns))
    for name, _ in configs:
        for in_flight, results in runs[name].items():
            rates = [r["requests_per_second"] for r in results]
            medians = [
                statistics.median(value(r) or 0.0 for r in results)
                for value in (
                    lambda r: r["texts_per_batch"],
                    lambda r: r["engine_cpu_ms_per_request"],
                    lambda r: r["bookkeeping_cpu_ms_per_request"],
                    lambda r: r["threads_cpu_ms_per_request"].get(ENGINE_PROCESS),
                    lambda r: r["threads_cpu_ms_per_request"].get(INFERENCE_THREAD),
                    lambda r: r["loop_capacity"],
                    lambda r: r["driver_cpu_ms_per_request"],
                )
            ]
            spread = f"{min(rates):.0f}-{max(rates):.0f}"
            figures = [f"{medians[0]:11.1f}", *(f"{m:11.3f}" for m in medians[1:5]), f"{medians[5]:11.0f}", f"{medians[6]:11.3f}"]
            print(f"{name:30} {in_flight:11d} {statistics.median(rates):11.0f} {spread:>11} " + " ".join(figures))
    if len(configs) > 1:
        last = configs[-1][0]
        for name, _ in configs[:-1]:
            for in_flight in args.in_flight:
                pairs = list(zip(runs[name][in_flight], runs[last][in_flight]))
                speed = [b["requests_per_second"] / a["requests_per_second"] for a, b in pairs]
                loop = [b["bookkeeping_cpu_ms_per_request"] / a["bookkeeping_cpu_ms_per_request"] for a, b in pairs]
                print(
                    f"{last} / {name}, {in_flight} in flight: req/s {statistics.median(speed):.2f} (rounds {', '.join(f'{r:.2f}' for r in speed)}); "
                    f"bookkeeping CPU per request {statistics.median(loop):.2f} (rounds {', '.join(f'{r:.2f}' for r in loop)})"
                )


if __name__ == "__main__":
    main()
