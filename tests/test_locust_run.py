"""loadtest/run_locust.py: a short headless locust run against a real service process, and its gate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run_locust import verdict
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(url: str, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loadtest.run_locust", "--host", url, "--out-dir", str(out_dir), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_short_run_reports_client_and_server_side_and_passes(service_url, tmp_path):
    result = run(service_url, tmp_path, "-u", "4", "-r", "4", "-t", "5s", "--max-p99-ms", "10000")
    assert result.returncode == 0, result.stdout + result.stderr
    for report in ("locust.html", "locust_stats.csv", "summary.md"):
        assert (tmp_path / report).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["problems"] == []
    client, server = summary["client"], summary["server"]
    assert set(client) == {"/classify [1 text]", "/classify [batch]", "Aggregated"}  # both kinds of user ran
    assert client["Aggregated"]["requests"] > 10 and client["Aggregated"]["failures"] == 0
    # The server saw exactly the client's requests, and says how it batched them.
    assert server["requests_by_status"] == {"200": client["Aggregated"]["requests"]}
    assert server["texts_classified"] > client["Aggregated"]["requests"]  # batch users send several texts
    assert 0 < server["padding_efficiency"] <= 1
    assert server["batch_size"]["count"] > 0 and server["batch_size"]["mean"] >= 1
    assert server["queue_wait_seconds"]["p99"] is not None
    assert sum(server["batch_flushes_by_reason"].values()) == server["batch_size"]["count"]
    assert "padding efficiency" in (tmp_path / "summary.md").read_text()
    assert server["cancelled_texts_by_reason"] == {} and server["unanswered_tokens"] == 0
    assert "| overloaded (429) / past their deadline (504) requests | 0 / 0 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.integration
def test_gate_fails_the_run_when_p99_is_over_the_threshold(service_url, tmp_path):
    result = run(service_url, tmp_path, "-u", "2", "-r", "2", "-t", "2s", "--max-p99-ms", "0.001",
                 "--batch-weight", "0")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["problems"] and "exceeds the 0.001 ms threshold" in summary["problems"][0]
    assert set(summary["client"]) == {"/classify [1 text]", "Aggregated"}  # weight 0 leaves batch users out


@pytest.mark.integration
def test_refuses_to_run_against_a_service_that_is_not_up(tmp_path):
    result = run(f"http://127.0.0.1:{free_port()}", tmp_path, "-t", "1s", "--max-p99-ms", "100")
    assert result.returncode == 2 and "start the service first" in result.stderr


@pytest.mark.parametrize(
    ("client", "locust_exit", "problems"),
    [
        ({"Aggregated": {"requests": 10, "failures": 0, "p99_ms": 80}}, 0, []),
        ({"Aggregated": {"requests": 10, "failures": 2, "p99_ms": 80}}, 1, ["2 of 10 requests failed"]),
        (
            {"Aggregated": {"requests": 10, "failures": 0, "p99_ms": 150}},
            0,
            ["p99 150 ms exceeds the 100 ms threshold"],
        ),
        ({"Aggregated": {"requests": 10, "failures": 0, "p99_ms": 80}}, 2, ["locust exited with 2"]),
        ({}, 0, ["no request completed"]),
    ],
)
def test_verdict(client, locust_exit, problems):
    assert verdict(client, locust_exit, max_p99_ms=100) == problems
