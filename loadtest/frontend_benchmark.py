"""Front-end capacity: how many requests the service's CPU side answers when the model costs next to nothing.

    python -m loadtest.frontend_benchmark [--duration 15] [--rounds 3] [--workers 1,2] [--baseline DIR ...]
                                          [--model DIR] [--multi 8] [--connections 64] [--profile SECONDS]

The model is a 1-layer BERT of hidden size 16 with the real default-model tokenizer (MiniLM's WordPiece), built
locally from a config, so what is measured is HTTP, validation, tokenization, queueing, post-processing and
responses: the ceiling a fast GPU would hit. `--model DIR` measures a real checkpoint instead.

Each configuration (the service in this tree with each `--workers` count, and the service in `--baseline DIR`,
e.g. an unpacked copy of an older commit) is started as a real process and driven to saturation by wrk (64
keep-alive connections; a Lua script posting a long-tailed mix of real texts from loadtest/corpus.py), with one
text per request and with `--multi` texts per request. Configurations alternate round by round, so ratios come from
runs made back to back. Reported per run: requests/s, texts/s, and CPU seconds per request of every process of the
service (from /proc/<pid>/stat, before and after), whose sum is what one request costs the machine, of the API
processes' threads together (their event loops, their tokenizer threads `clf-tokenize`, ZeroMQ's), and of each
thread of the engine process (/proc/<pid>/task/<tid>/stat, named by service/thread_names.py): its event loop
(`clf-engine`: the IPC, admission, the queue, answers), the collation thread (`clf-collate`), the inference thread
(`clf-inference`: the model's forward passes, per batch) and ZeroMQ's I/O thread. Those threads take turns on one
interpreter lock, so the engine process tops out near one core in all: its capacity projected from this load is
1 / (its CPU per request) (`engine_capacity`), its bookkeeping's 1 / (its event loop's) (`bookkeeping_capacity`).
Per-batch costs shrink per request as the rate grows, so these projections are low; `loadtest.engine_benchmark`
measures the engine process at rates the API processes of a small machine cannot reach.
`--profile N` records N seconds of py-spy under the single-text load of the first configuration instead.
Results go to loadtest/results/frontend.json.
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
from loadtest.probe import ROOT, Interval, ServerProcess, machine, scrape, service_command, write_bodies, wrk, wrk_command

RESULTS = ROOT / "loadtest" / "results"
ENGINE_PROCESS = "clf-engine"  # the engine process's name, and its event loop thread's (service/workers.py)
INFERENCE_THREAD = "clf-inference"  # the thread that runs the model (service/batcher.py)
WRK_TIMEOUT = 30  # seconds: a request unanswered this long counts as a socket error
DEFAULT_TOKENIZER = Path.home() / ".cache" / "classifier-service" / "default-model-v1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def build_near_zero_cost_model(directory: Path, tokenizer_dir: Path = DEFAULT_TOKENIZER) -> Path:
    """A 1-layer BERT classifier of hidden size 16 with the real default-model tokenizer; random weights."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=tokenizer.model_max_length,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        problem_type="single_label_classification",
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --- CPU time of every process of the service ---


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = _stat_fields(int(entry))
            except OSError:
                continue
            children.setdefault(int(stat[1]), []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces): state, ppid, ..."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """Per process: its name (comm: clf-engine, clf-api-N, or python for the first process) and user + system CPU
    seconds so far."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            seconds[pid] = _name_and_cpu_seconds(Path(f"/proc/{pid}/stat"))
    return seconds


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of `pid`, summed by thread name (threads of one name add up)."""
    seconds: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                name, spent = _name_and_cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat"))
                seconds[name] = seconds.get(name, 0.0) + spent
    return seconds


def _name_and_cpu_seconds(stat: Path) -> tuple[str, float]:
    text = stat.read_text()
    name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# --- the load ---


def saturate(server: ServerProcess, bodies: Path, per_request: int, connections: int, seconds: float) -> dict:
    pids = process_tree(server.process.pid)
    before = cpu_seconds(pids)
    threads_before = {pid: thread_cpu_seconds(pid) for pid in before}
    metrics_before = scrape(server.url)
    started = time.perf_counter()
    run = wrk(server.url, bodies, connections, seconds, WRK_TIMEOUT)
    elapsed = time.perf_counter() - started
    after = cpu_seconds(pids)
    threads_after = {pid: thread_cpu_seconds(pid) for pid in before}
    # The engine's per-batch costs (the forward pass, collation) are shared by a batch's texts.
    batches = Interval(metrics_before, scrape(server.url))
    batch_count = batches.delta("classifier_batch_size_count")
    answered = run.answered
    per_process = [
        {"pid": pid, "role": role, "cpu_seconds": spent - before[pid][1], "cpu_utilisation": (spent - before[pid][1]) / elapsed}
        for pid, (role, spent) in after.items()
        if pid in before
    ]
    cpu_total = sum(p["cpu_seconds"] for p in per_process)
    for p in per_process:
        p["cpu_ms_per_request"] = 1000 * p["cpu_seconds"] / max(1, answered)
        if p["pid"] in threads_after and p["pid"] in threads_before:
            spent = {name: cpu - threads_before[p["pid"]].get(name, 0.0) for name, cpu in threads_after[p["pid"]].items()}
            p["threads_cpu_ms_per_request"] = {name: 1000 * cpu / max(1, answered) for name, cpu in spent.items() if cpu > 0}
    return {
        "requests_per_second": answered / run.seconds,
        "texts_per_second": answered * per_request / run.seconds,
        "failures": run.failures,
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
        "cpu_ms_per_request": 1000 * cpu_total / max(1, answered),
        "cpu_utilisation": cpu_total / elapsed,
        "texts_per_batch": batches.delta("classifier_batch_size_sum") / batch_count if batch_count else None,
        "processes": sorted(per_process, key=lambda p: -p["cpu_seconds"]),
    }


def start_service(source: Path, model: Path, port: int, env: dict[str, str]) -> ServerProcess:
    """`python -m service` from `source` (a tree holding the service package) on a loopback port."""
    log_path = RESULTS / f"frontend-server-{port}.log"
    return ServerProcess(service_command(model, port), port, log_path, {"CLASSIFIER_LOG_LEVEL": "warning", **env}, source)


def configurations(args: argparse.Namespace) -> list[tuple[str, Path, dict[str, str]]]:
    """(name, source tree, environment) of each service measured."""
    configs = []
    for baseline in args.baseline:
        configs.append((f"baseline {Path(baseline).name}", Path(baseline), {}))
    for workers in args.workers:
        configs.append((f"this tree, {workers} worker(s)", ROOT, {"CLASSIFIER_WORKERS": str(workers)}))
    return configs


def record_py_spy(pid: int, seconds: float, output: Path, *options: str) -> None:
    """py-spy's raw samples of `pid` for `seconds`, every thread, native frames included, 200 a second, into
    `output`; `options`: more of py-spy's flags (`--subprocesses`, `--idle`)."""
    command = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--threads", "--native", *options]
    command += ["--duration", f"{seconds:g}", "--rate", "200", "--format", "raw", "--output", str(output)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile(server: ServerProcess, bodies: Path, connections: int, seconds: float, output: Path) -> None:
    """py-spy, all processes and threads of the service, native frames included, under the single-text load."""
    load = subprocess.Popen(wrk_command(server.url, bodies, connections, seconds + 4, WRK_TIMEOUT), stdout=subprocess.DEVNULL)
    time.sleep(2)
    record_py_spy(server.process.pid, seconds, output, "--subprocesses", "--idle")
    load.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15, help="seconds per saturation run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration, alternating")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[1])
    parser.add_argument("--baseline", action="append", default=[], help="another tree holding a service package, measured first (repeatable)")
    parser.add_argument("--model", help="a checkpoint directory instead of the near-zero-cost model")
    parser.add_argument("--multi", type=int, default=8, help="texts per request in the multi-text runs (1: none)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--texts", type=int, default=4000, help="texts drawn from the corpus mix")
    parser.add_argument("--profile", type=float, help="record this many seconds of py-spy instead of measuring")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every service started")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    model_dir = Path(args.model) if args.model else build_near_zero_cost_model(Path(tempfile.mkdtemp(prefix="frontend-model-")))
    texts = load_texts(args.texts)
    per_request = [1, args.multi] if args.multi > 1 else [1]
    loads = [(per, write_bodies(RESULTS / f"frontend-bodies-{per}.jsonl", texts, per)) for per in per_request]
    common_env = {"CLASSIFIER_TUNE": "false"} if not args.model else {}
    common_env.update(dict(item.split("=", 1) for item in args.env))
    configs = configurations(args)

    if args.profile:
        name, source, env = configs[0]
        with start_service(source, model_dir, 8801, {**common_env, **env}) as server:
            wrk(server.url, loads[0][1], 8, 3, WRK_TIMEOUT)
            output = RESULTS / "frontend-profile.txt"
            profile(server, loads[0][1], args.connections, args.profile, output)
        print(f"py-spy samples of {name}: {output}")
        return

    runs: dict[str, dict[int, list[dict]]] = {name: {per: [] for per, _ in loads} for name, _, _ in configs}
    for round_number in range(args.rounds):
        for index, (name, source, env) in enumerate(configs):
            with start_service(source, model_dir, 8801 + index, {**common_env, **env}) as server:
                wrk(server.url, loads[0][1], 8, 3, WRK_TIMEOUT)  # warm up connections and caches
                for per_request, bodies in loads:
                    result = saturate(server, bodies, per_request, args.connections, args.duration)
                    runs[name][per_request].append(result)
                    print(f"round {round_number + 1}, {name}, {per_request} text(s)/request: " + summary_line(result), flush=True)
    report = {"args": vars(args), "machine": machine(), "runs": runs}
    (RESULTS / "frontend.json").write_text(json.dumps(report, indent=1))
    print_summary(runs, configs)


def engine_split(result: dict) -> dict | None:
    """The engine process's CPU ms per request: in all, by thread, the API processes' together, and the projected
    capacities (requests/s) of one engine process at this load: where its threads together, which share one
    interpreter lock, top out at one core, and where its event loop (the bookkeeping every request passes through)
    does. None without an engine process (--workers 1)."""
    engine = next((p for p in result["processes"] if p["role"] == ENGINE_PROCESS), None)
    if engine is None:
        return None
    threads = engine["threads_cpu_ms_per_request"]
    loop = threads.get(ENGINE_PROCESS, 0.0)
    return {
        "engine": engine["cpu_ms_per_request"],
        "threads": threads,
        "bookkeeping": engine["cpu_ms_per_request"] - threads.get(INFERENCE_THREAD, 0.0),
        "api": sum(p["cpu_ms_per_request"] for p in result["processes"] if p["role"].startswith("clf-api")),
        "engine_capacity": 1000 / engine["cpu_ms_per_request"],
        "bookkeeping_capacity": 1000 / loop if loop else None,
    }


def summary_line(result: dict) -> str:
    processes = ", ".join(f"{p['role']} {p['cpu_ms_per_request']:.3f}" for p in result["processes"] if p["cpu_seconds"] > 0.05)
    line = (
        f"{result['requests_per_second']:.0f} req/s, {result['texts_per_second']:.0f} texts/s, p50 {result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms, failures {result['failures']}, CPU {result['cpu_ms_per_request']:.3f} ms/request "
        f"({processes}), {result['cpu_utilisation']:.2f} cores busy"
    )
    if result.get("texts_per_batch") is not None:
        line += f", {result['texts_per_batch']:.1f} texts/batch"
    if (split := engine_split(result)) is not None:
        threads = ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(split["threads"].items(), key=lambda item: -item[1]))
        line += f"; engine threads ms/request: {threads}"
        api_threads: dict[str, float] = {}
        for process in result["processes"]:
            if process["role"].startswith("clf-api"):
                for name, ms in process.get("threads_cpu_ms_per_request", {}).items():
                    name = "event loops" if name.startswith("clf-api") else name  # each API process's main thread
                    api_threads[name] = api_threads.get(name, 0.0) + ms
        line += "; API processes' threads together: " + ", ".join(
            f"{name} {ms:.3f}" for name, ms in sorted(api_threads.items(), key=lambda item: -item[1]) if ms >= 0.001
        )
    return line


def _median(splits: list[dict], key) -> float:
    return statistics.median(key(split) for split in splits)


def print_summary(runs: dict, configs: list) -> None:
    print(
        f"\n{'configuration':44} {'texts/req':>9} {'req/s median':>12} {'min-max':>13} {'texts/s':>8} {'CPU ms/req':>10}"
        f" {'API ms/req':>10} {'engine':>7} {'loop':>6} {'model':>6} {'engine cap.':>11} {'loop cap.':>9}"
    )
    for name, _, _ in configs:
        for per_request, results in runs[name].items():
            rates = [r["requests_per_second"] for r in results]
            cpu = statistics.median(r["cpu_ms_per_request"] for r in results)
            texts = statistics.median(r["texts_per_second"] for r in results)
            line = f"{name:44} {per_request:9d} {statistics.median(rates):12.0f} {min(rates):6.0f}-{max(rates):<6.0f} {texts:8.0f} {cpu:10.3f}"
            splits = [split for r in results if (split := engine_split(r)) is not None]
            if splits:
                line += (
                    f" {_median(splits, lambda s: s['api']):10.3f} {_median(splits, lambda s: s['engine']):7.3f}"
                    f" {_median(splits, lambda s: s['threads'].get(ENGINE_PROCESS, 0.0)):6.3f}"
                    f" {_median(splits, lambda s: s['threads'].get(INFERENCE_THREAD, 0.0)):6.3f}"
                    f" {_median(splits, lambda s: s['engine_capacity']):11.0f}"
                    f" {_median(splits, lambda s: s['bookkeeping_capacity'] or 0.0):9.0f}"
                )
            print(line)
    print(
        "(ms/req: CPU milliseconds per request; engine: the engine process, loop: its event loop thread, model: its"
        " inference thread; cap.: projected requests/s of one engine process at this load, where its threads together"
        " (one interpreter lock), or its event loop, top out at one core)"
    )
    if len(configs) > 1:
        first = configs[0][0]
        for name, _, _ in configs[1:]:
            for per_request in runs[name]:
                ratios = [b["requests_per_second"] / a["requests_per_second"] for a, b in zip(runs[first][per_request], runs[name][per_request])]
                print(
                    f"{name} / {first}, {per_request} text(s)/request: median {statistics.median(ratios):.2f} "
                    f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})"
                )


if __name__ == "__main__":
    main()
