"""What each batching strategy buys, measured on real service processes and written up as a report with plots.

    python -m loadtest.report [--out report/] [--model DIR] [--texts FILE [--column NAME]] [--duration 30]

Starts, one after another, each strategy as its own server process on a loopback port, on the same texts (the
packaged long-tailed corpus of `loadtest/corpus.py` by default, or a file: one text per line, or a CSV column):

  the ladder, each rung changing one thing (the first three in fp32, tuning off, batches of at most
  `--classic-batch-size` texts under a token budget that never binds, as a classic server batches):
    1. fixed padding: arrival order, every batch padded to the maximum length (CLASSIFIER_PADDING=fixed,
       CLASSIFIER_BATCHING=arrival);
    2. dynamic padding: arrival order, each batch padded to its own longest text (CLASSIFIER_BATCHING=arrival);
    3. dynamic padding + length buckets (the service's batching, in fp32);
    4. the service as it ships: buckets, with the precision and token budget start-up tuning measures (reduced
       precision where the device gains from it);
  and two baselines: the service with batching off (CLASSIFIER_MAX_BATCH_SIZE=1) and a plain one-forward-per-request
  server (`python -m loadtest.plain_server`).

Each is saturated by wrk (a closed loop of `--concurrency` clients, one text per request, in `--repeats` runs, so
every number has a spread); the service, batching off and the plain server are then driven by Poisson arrivals at
fractions of their own saturation rate (the knee). Padding, padded lengths and latency by length class come from
the service's /metrics; peak RSS from /proc. Writes report.md, results.json (every number), plots.json (the data
each plot draws) and PNG plots to --out, and prints where. Latency percentiles, client-side, are those of
loadtest/probe.py's percentile() (the nearest rank from above), wrk's included.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

from loadtest.probe import (
    Interval,
    ServerProcess,
    free_port,
    latency_ms,
    machine,
    plain_server_command,
    poisson_requests,
    saturate,
    scrape,
    server_summary,
    service_command,
    wait_until_idle,
)
from service.metrics import LENGTH_CLASSES, length_class

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.85, 1.0, 1.15)


# --- the texts ---


def read_texts(path: Path, column: str | None = None) -> list[str]:
    """Texts from a user's file: a CSV column (`column`, default `text`) for .csv files, else one text per line."""
    if path.suffix.lower() == ".csv":
        column = column or "text"
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if column not in (reader.fieldnames or []):
                raise SystemExit(f"{path} has no column {column!r} (columns: {reader.fieldnames}); pass --column")
            texts = [row[column].strip() for row in reader]
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [text for text in texts if text]
    if not texts:
        raise SystemExit(f"{path} holds no non-empty text")
    return texts


def load_report_texts(path: str | None, column: str | None, count: int) -> tuple[list[str], str]:
    """The texts to measure on, and a sentence saying where they came from."""
    if path:
        texts = read_texts(Path(path), column)[:count]
        return texts, f"{len(texts)} texts from `{path}`" + (f", column `{column}`" if column else "")
    from loadtest.corpus import load_texts

    return load_texts(count), f"{count} texts of the packaged long-tailed corpus (`loadtest/corpus.py`, seed 0)"


# --- the server's own view, from /metrics ---


def per_bucket(cumulative: dict[float, float]) -> list[tuple[float, float]]:
    """(upper bound, observations in that bucket alone), ascending, +Inf last: what the padded-length plot draws."""
    bounds = sorted(cumulative)
    below = [0.0] + [cumulative[bound] for bound in bounds[:-1]]
    return [(bound, cumulative[bound] - previous) for bound, previous in zip(bounds, below)]


def server_view(change: Interval) -> dict:
    """Padding, batch shapes, padded lengths and latency by length class between two scrapes of the service."""
    summary = server_summary(change)
    by_length = {}
    for name in LENGTH_CLASSES:
        if name in summary.text_latency_by_length:
            latency = summary.text_latency_by_length[name]
            by_length[name] = {
                "texts": latency.count,
                "p50_ms": 1000 * latency.quantile(0.5),
                "p99_ms": 1000 * latency.quantile(0.99),
            }
    return {
        "padding_efficiency": summary.padding_efficiency,
        "batches": summary.batches,
        "mean_batch_size": summary.batch_size.mean,
        "padded_length_histogram": per_bucket(summary.padded_length.buckets),
        "latency_by_length": by_length,
    }


# --- load: the open loop (Poisson arrivals) ---


def open_loop(url: str, bodies: list[bytes], lengths: list[int], rate: float, duration: float, seed: int) -> dict:
    """Poisson arrivals at `rate` requests/s for `duration` s, one text per request, whatever the server's speed,
    from a random text on. Returns throughput, p50/p99 and, per length class, p50/p99 of the answered requests."""
    rng = random.Random(seed)
    first = rng.randrange(len(bodies))
    run = asyncio.run(poisson_requests(url, bodies, rate, duration, rng, first))
    by_length = {}
    for name in LENGTH_CLASSES:
        latencies = [seconds for index, seconds in run.answered if length_class(lengths[index]) == name]
        if latencies:
            by_length[name] = {"texts": len(latencies), **latency_ms(latencies)}
    return {
        "offered_rps": rate,
        "sent": run.sent,
        "answered": len(run.answered),
        "failures": run.failures,
        "texts_per_second": len(run.answered) / run.seconds,
        **latency_ms([seconds for _, seconds in run.answered]),
        "latency_by_length": by_length,
    }


# --- what is measured ---


@dataclass(frozen=True)
class Strategy:
    """One server configuration: its key and title, its service settings (None: the plain server), and whether it is
    a rung of the ladder and gets a latency-against-load curve."""

    key: str
    title: str
    env: dict[str, str] | None
    ladder: bool
    load_curve: bool


def strategies(classic_batch_size: int, max_length: int) -> list[Strategy]:
    classic = {
        "CLASSIFIER_TUNE": "false",
        "CLASSIFIER_PRECISION": "fp32",
        "CLASSIFIER_MAX_BATCH_SIZE": str(classic_batch_size),
        "CLASSIFIER_MAX_BATCH_TOKENS": str(classic_batch_size * max_length),
    }
    return [
        Strategy("fixed", "fixed padding", {**classic, "CLASSIFIER_PADDING": "fixed", "CLASSIFIER_BATCHING": "arrival"}, True, False),
        Strategy("dynamic", "dynamic padding", {**classic, "CLASSIFIER_BATCHING": "arrival"}, True, False),
        Strategy("buckets", "dynamic + buckets", classic, True, False),
        Strategy("service", "dynamic + buckets + tuned (the service)", {}, True, True),
        Strategy("batching_off", "service, batching off", {"CLASSIFIER_MAX_BATCH_SIZE": "1"}, False, True),
        Strategy("plain", "plain server (one forward per request)", None, False, True),
    ]


def model_max_length_of(model_dir: str) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from service.tokenization import model_max_length

    config = AutoConfig.from_pretrained(model_dir)
    return model_max_length(AutoTokenizer.from_pretrained(model_dir), config.max_position_embeddings)


def token_lengths(model_dir: str, texts: list[str], max_length: int) -> list[int]:
    """Tokens per text as the service counts them (special tokens included, truncated to the maximum length)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


@dataclass
class Run:
    """Everything one report run needs: options, texts, where files go, and the progress bar."""

    args: argparse.Namespace
    model_dir: str
    texts: list[str]
    lengths: list[int]
    bodies_path: Path
    work_dir: Path
    progress: tqdm

    def step(self, what: str) -> None:
        self.progress.set_description(what)

    def done(self) -> None:
        self.progress.update(1)


def command_for(strategy: Strategy, model_dir: str, port: int) -> list[str]:
    return plain_server_command(model_dir, port) if strategy.env is None else service_command(model_dir, port)


def env_for(strategy: Strategy, args: argparse.Namespace) -> dict[str, str]:
    if strategy.env is None:
        return {"TORCH_THREADS": str(args.threads)}
    return {
        "CLASSIFIER_TORCH_THREADS": str(args.threads),
        "CLASSIFIER_LOG_LEVEL": "warning",
        # A closed loop sends only as fast as it is answered: no admission refusal for the slow rungs.
        "CLASSIFIER_REQUEST_TIMEOUT_MS": "120000",
        "CLASSIFIER_DRAIN_DELAY_SECONDS": "0",
        **dict(setting.split("=", 1) for setting in args.service_env),
        **strategy.env,
    }


def measure(strategy: Strategy, run: Run) -> dict:
    """Start the strategy's server, saturate it `repeats` times, then (if it has one) trace its latency curve."""
    args = run.args
    has_metrics = strategy.env is not None
    run.step(f"{strategy.title}: starting")
    started = time.monotonic()
    port = free_port()
    command, log_path = command_for(strategy, run.model_dir, port), run.work_dir / f"{strategy.key}.log"
    with ServerProcess(command, port, log_path, env_for(strategy, args), ready_timeout=600) as server:
        ready_seconds = time.monotonic() - started
        info = httpx.get(f"{server.url}/info").json() if has_metrics else {}
        run.done()
        run.step(f"{strategy.title}: warming up")
        saturate(server.url, run.bodies_path, concurrency=8, duration=args.warmup)
        wait_until_idle(server.url, has_metrics)
        rss_ready = server.rss_mib()
        peak_reset = server.reset_peak_rss()
        before = scrape(server.url) if has_metrics else None
        saturation = []
        for repeat in range(args.repeats):
            run.step(f"{strategy.title}: saturation {repeat + 1}/{args.repeats}")
            saturation.append(saturate(server.url, run.bodies_path, args.concurrency, args.duration))
            wait_until_idle(server.url, has_metrics)
            run.done()
        after = scrape(server.url) if has_metrics else None
        result = {
            "key": strategy.key,
            "title": strategy.title,
            "settings": strategy.env,
            "ready_seconds": ready_seconds,
            "precision": info.get("precision", "fp32"),
            "max_batch_tokens": info.get("batching", {}).get("max_batch_tokens"),
            "tuning": _tuning_summary(info),
            "saturation": saturation,
            "texts_per_second": [entry["texts_per_second"] for entry in saturation],
            "rss_ready_mib": rss_ready,
            # The idle heap trim may give pages back between the ready reading and the peak count's reset (then
            # the peak, from a lower start, can stay below it); the reading is itself a point of the window.
            "peak_rss_mib": max(server.peak_rss_mib(), rss_ready),
            "peak_rss_scope": "during saturation" if peak_reset else "since start (clear_refs not allowed)",
            "server": server_view(Interval(before, after)) if has_metrics else None,
        }
        if strategy.load_curve:
            result["load_curve"] = latency_curve(server, strategy, run, statistics.median(result["texts_per_second"]))
    return result


def latency_curve(server: ServerProcess, strategy: Strategy, run: Run, saturation_rps: float) -> list[dict]:
    bodies = [json.dumps({"texts": text}).encode() for text in run.texts]
    points = []
    for index, fraction in enumerate(run.args.rate_fractions):
        rate = max(0.5, fraction * saturation_rps)
        run.step(f"{strategy.title}: {rate:.0f} requests/s")
        point = open_loop(server.url, bodies, run.lengths, rate, run.args.rate_duration, seed=index)
        points.append({"fraction_of_saturation": fraction, **point})
        run.done()
    return points


def _tuning_summary(info: dict) -> str | None:
    tuning = info.get("tuning") or {}
    if not tuning or tuning.get("enabled") is False:
        return None
    return (
        f"precision {info.get('precision')}, token budget {info.get('batching', {}).get('max_batch_tokens')} "
        f"(tuning took {tuning.get('seconds', float('nan')):.1f} s)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="report", help="directory for report.md, the plots and the data")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--texts", help="a file of texts: one per line, or a .csv with --column (default: the corpus)")
    parser.add_argument("--column", help="the CSV column holding the texts (default: text)")
    parser.add_argument("--max-texts", type=int, default=4000, help="texts used (the first N of a file)")
    parser.add_argument("--duration", type=int, default=15, help="seconds of each saturation run (wrk: whole seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="saturation runs per strategy (the spread)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of light load before measuring (whole seconds)")
    parser.add_argument("--concurrency", type=int, default=128, help="closed-loop clients at saturation")
    parser.add_argument("--rate-duration", type=float, default=10, help="seconds at each offered load")
    parser.add_argument(
        "--rate-fractions",
        type=lambda s: [float(x) for x in s.split(",")],
        default=list(DEFAULT_FRACTIONS),
        help="offered loads as fractions of each server's own saturation rate, comma-separated",
    )
    parser.add_argument("--classic-batch-size", type=int, default=32, help="batch size of the first three rungs")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every server")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="CLASSIFIER_X=VALUE",
        help="a setting for every service process (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    from loadtest.report_output import write_report

    args = parse_args(argv)
    began = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = str(Path(args.model).expanduser())
    else:
        from service.default_model import ensure_default_model

        model_dir = str(ensure_default_model())
    texts, source = load_report_texts(args.texts, args.column, args.max_texts)
    max_length = model_max_length_of(model_dir)
    lengths = token_lengths(model_dir, texts, max_length)
    plan = strategies(args.classic_batch_size, max_length)
    steps = sum(1 + args.repeats + (len(args.rate_fractions) if s.load_curve else 0) for s in plan)
    started_at = datetime.now(UTC)
    results = {
        "started": started_at.isoformat(timespec="seconds"),
        "command": "python -m loadtest.report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": model_dir,
        "max_length": max_length,
        "texts": {"source": source, "count": len(texts), "token_lengths": lengths},
        "options": {key: value for key, value in vars(args).items() if key not in ("out",)},
        "strategies": [],
    }
    with tempfile.TemporaryDirectory(prefix="report-") as work:
        work_dir = Path(work)
        bodies_path = work_dir / "bodies.jsonl"
        bodies_path.write_text("".join(json.dumps({"texts": text}) + "\n" for text in texts))
        with tqdm(total=steps, unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
            run = Run(args, model_dir, texts, lengths, bodies_path, work_dir, progress)
            for strategy in plan:
                results["strategies"].append(measure(strategy, run))
    results["machine"]["load_average_after"] = os.getloadavg()
    results["seconds"] = time.monotonic() - began
    written = write_report(results, out)
    print(f"report written to {out}:")
    for path in written:
        print(f"  {path}")
    return out


if __name__ == "__main__":
    main()
