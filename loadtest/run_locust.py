"""Headless locust run against a running service, joined with the service's own /metrics, as a gate.

    python -m loadtest.run_locust --host http://127.0.0.1:8000 --users 16 --spawn-rate 4 \
        --run-time 2m --max-p99-ms 1000 --out-dir loadtest-report

Writes to --out-dir: locust's own report (locust.html, locust_*.csv), its final numbers (client.json),
and summary.json / summary.md, which put what the client felt (requests/s, latency percentiles, failures)
next to why, from the server's metrics over the same window (queue wait, batch sizes, padding efficiency,
batch flush reasons, truncations, refusals (429), deadlines (504) and dropped texts). Exits 1 when any request
failed or the overall p99 exceeds --max-p99-ms, 2 when the service is not ready, so it can gate a deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.probe import ROOT, HistogramChange, Interval, is_ready, scrape, server_summary

LOCUSTFILE = Path(__file__).with_name("locustfile.py")

# ---------------------------------------------------------------- server metrics


def counts(increases: dict[str, float]) -> dict[str, int]:
    return {key: round(value) for key, value in increases.items()}


def histogram(change: HistogramChange) -> dict:
    """Count, mean, p50 and p99 of the observations made between two scrapes."""
    return {"count": round(change.count), "mean": change.mean, "p50": change.quantile(0.5), "p99": change.quantile(0.99)}


def server_report(change: Interval, seconds: float) -> dict:
    """The server's side of the run, for summary.json."""
    summary = server_summary(change)
    return {
        "texts_classified": round(summary.texts_classified),
        "texts_per_second": summary.texts_classified / seconds if seconds else None,
        "requests_by_status": counts(summary.requests_by_status),
        "request_seconds": histogram(summary.request_seconds),
        "queue_wait_seconds": histogram(summary.queue_wait),
        "batch_inference_seconds": histogram(summary.batch_inference),
        "batch_size": histogram(summary.batch_size),
        "batch_padding_efficiency": histogram(summary.batch_padding_efficiency),
        "padding_efficiency": summary.padding_efficiency,
        "input_tokens": histogram(summary.input_tokens),
        "batch_flushes_by_reason": counts(summary.flushes),
        "truncated_texts": round(summary.truncated_texts),
        "rejected_texts_by_reason": counts(summary.rejected_texts),
        "cancelled_texts_by_reason": counts(summary.cancelled_texts),
        "unanswered_tokens": round(summary.unanswered_tokens),
        "real_tokens": round(summary.real_tokens),
    }


# ---------------------------------------------------------------- locust


def run_locust(args: argparse.Namespace, out_dir: Path) -> int:
    # The locustfile imports loadtest.corpus: this tree goes on the path, wherever the command runs from.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", args.host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.run_time, "--stop-timeout", "10",
        "--csv", str(out_dir / "locust"), "--html", str(out_dir / "locust.html"),
        "--single-weight", str(args.single_weight), "--batch-weight", str(args.batch_weight),
        "--batch-size", str(args.batch_size), "--summary-json", str(out_dir / "client.json"),
    ]  # fmt: skip
    return subprocess.run(command, env=env, check=False).returncode


def load_seconds(client: dict) -> float:
    """How long locust sent load: its request count over its requests/s (the scrapes also span its start-up)."""
    overall = client.get("Aggregated", {})
    return overall["requests"] / overall["requests_per_second"] if overall.get("requests_per_second") else 0.0


def verdict(client: dict, locust_exit: int, max_p99_ms: float) -> list[str]:
    """Why the run fails; empty when it passes."""
    overall = client.get("Aggregated")
    if not overall or overall["requests"] == 0:
        return ["no request completed"]
    problems = []
    if overall["failures"] > 0:
        problems.append(f"{overall['failures']} of {overall['requests']} requests failed")
    if overall["p99_ms"] > max_p99_ms:
        problems.append(f"p99 {overall['p99_ms']:.0f} ms exceeds the {max_p99_ms:g} ms threshold")
    if locust_exit != 0 and not problems:
        problems.append(f"locust exited with {locust_exit}")
    return problems


# ---------------------------------------------------------------- report


def _fmt(value, scale: float = 1, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _counts(counts: dict[str, float]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counts.items()) or "none"


def markdown(summary: dict) -> str:
    client, server = summary["client"], summary["server"]
    lines = [
        f"# Load test: {summary['host']}, {summary['users']} users, {summary['seconds']:.0f} s",
        "",
        f"**{'PASS' if not summary['problems'] else 'FAIL: ' + '; '.join(summary['problems'])}**"
        f" (gate: no failures, p99 <= {summary['max_p99_ms']:g} ms)",
        "",
        "## What the client felt",
        "",
        "| request | count | failures | req/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in client.items():
        lines.append(
            f"| {name} | {row['requests']} | {row['failures']} | {row['requests_per_second']:.1f} | "
            f"{_fmt(row['p50_ms'], digits=0)} | {_fmt(row['p90_ms'], digits=0)} | {_fmt(row['p99_ms'], digits=0)} | "
            f"{_fmt(row['max_ms'], digits=0)} |"
        )
    queue, infer, size = server["queue_wait_seconds"], server["batch_inference_seconds"], server["batch_size"]
    request, tokens = server["request_seconds"], server["input_tokens"]
    statuses = server["requests_by_status"]
    lines += [
        "",
        "## Why: the server over the same window",
        "",
        "| | |",
        "|---|---|",
        f"| texts classified | {server['texts_classified']} ({_fmt(server['texts_per_second'])}/s) |",
        f"| /classify responses by status | {_counts(server['requests_by_status'])} |",
        f"| server time per request p50 / p99 | {_fmt(request['p50'], 1000)} / {_fmt(request['p99'], 1000)} ms |",
        f"| queue wait per text mean / p50 / p99 | {_fmt(queue['mean'], 1000)} / {_fmt(queue['p50'], 1000)} / {_fmt(queue['p99'], 1000)} ms |",
        f"| model time per batch mean / p99 | {_fmt(infer['mean'], 1000)} / {_fmt(infer['p99'], 1000)} ms |",
        f"| batches, texts per batch mean / p99 | {size['count']}, {_fmt(size['mean'])} / {_fmt(size['p99'])} |",
        f"| batch flushes by reason | {_counts(server['batch_flushes_by_reason'])} |",
        f"| padding efficiency (real / computed tokens), median batch | {_fmt(server['padding_efficiency'], 100)} %,"
        f" {_fmt(server['batch_padding_efficiency']['p50'], 100)} % |",
        f"| tokens per text p50 / p99 | {_fmt(tokens['p50'], digits=0)} / {_fmt(tokens['p99'], digits=0)} |",
        f"| truncated texts | {server['truncated_texts']} |",
        f"| refused texts by reason | {_counts(server['rejected_texts_by_reason'])} |",
        f"| overloaded (429) / past their deadline (504) requests | {statuses.get('429', 0)} / {statuses.get('504', 0)} |",
        f"| queued texts dropped by reason (client gone, deadline) | {_counts(server['cancelled_texts_by_reason'])} |",
        f"| model tokens spent on answers nobody received | {server['unanswered_tokens']} of {server['real_tokens']} |",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("-u", "--users", type=int, default=8)
    parser.add_argument("-r", "--spawn-rate", type=float, default=4)
    parser.add_argument("-t", "--run-time", default="60s", help="locust duration, e.g. 30s, 5m")
    parser.add_argument("--max-p99-ms", type=float, required=True, help="fail when the overall p99 is above this")
    parser.add_argument("--out-dir", type=Path, default=Path("loadtest-report"))
    parser.add_argument("--single-weight", type=int, default=3, help="share of single-text users")
    parser.add_argument("--batch-weight", type=int, default=1, help="share of multi-text users")
    parser.add_argument("--batch-size", type=int, default=16, help="most texts per multi-text request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.host = args.host.rstrip("/")
    if not is_ready(args.host, timeout=10):
        print(f"{args.host}/ready does not answer 200: start the service first", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    before = scrape(args.host)
    locust_exit = run_locust(args, args.out_dir)
    after = scrape(args.host)
    client_file = args.out_dir / "client.json"
    client = json.loads(client_file.read_text()) if client_file.exists() else {}
    seconds = load_seconds(client)
    summary = {
        "host": args.host,
        "users": args.users,
        "seconds": seconds,
        "max_p99_ms": args.max_p99_ms,
        "problems": verdict(client, locust_exit, args.max_p99_ms),
        "client": client,
        "server": server_report(Interval(before, after), seconds),
    }
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = markdown(summary)
    (args.out_dir / "summary.md").write_text(report)
    print(report)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
