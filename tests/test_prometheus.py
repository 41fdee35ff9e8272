"""deploy/prometheus: promtool checks and rule unit tests, then a real Prometheus scraping a real service."""

import contextlib
import itertools
import math
import os
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from loadtest.corpus import load_texts
from loadtest.probe import wait_for
from tests.conftest import free_port
from tests.test_grafana_dashboard import dashboard, queries

pytestmark = pytest.mark.integration  # service processes or external programs (see pyproject's markers)

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS_DIR / "recording_rules.yml", PROMETHEUS_DIR / "alerting_rules.yml"]


def tool(name: str) -> str:
    """Path of a required binary: missing fails the test under CI, and skips it elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    message = f"`{name}` is not installed (Debian package `prometheus`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def promtool(*args: str) -> None:
    result = subprocess.run([tool("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config_and_its_rule_files():
    promtool("check", "config", "prometheus.yml")  # also checks the rule files it names


def test_promtool_rule_unit_tests_pass():
    promtool("test", "rules", "tests/rules_test.yml")


def test_every_rule_is_covered_by_a_unit_test():
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests" / "rules_test.yml").read_text())["tests"]
    checked_exprs = {case["expr"] for test in tests for case in test.get("promql_expr_test", [])}
    alert_cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    assert {rule["record"] for rule in rules(RULE_FILES[0])} <= checked_exprs
    for alert in (rule["alert"] for rule in rules(RULE_FILES[1])):
        outcomes = {bool(case["exp_alerts"]) for case in alert_cases if case["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert} needs a firing and a quiet case"


# ---------------------------------------------------------------- a real Prometheus


@pytest.fixture(scope="module")
def prometheus(service_url, tmp_path_factory):
    """A Prometheus server on loopback scraping the service every second and evaluating our rules."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [{"job_name": "classifier", "static_configs": [{"targets": [service_url.removeprefix("http://")]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w+")
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30, "Prometheus ready", 0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


def value_of(prometheus: str, expr: str, timeout: float = 20) -> float:
    """The first sample of `expr` once it has a number (not NaN), polling while scrapes and rules run."""

    def number():
        values = [float(sample["value"][1]) for sample in query(prometheus, expr)]
        return next(([v] for v in values if not math.isnan(v)), None)

    return wait_for(number, timeout, expr, interval=0.25)[0]


@contextlib.contextmanager
def traffic(service_url: str):
    """Keep sending real texts, one to eight per request, until the block ends."""
    texts, stop = load_texts(400), threading.Event()

    def send():
        with httpx.Client(base_url=service_url, timeout=10) as client:
            for i in itertools.count():
                if stop.is_set():
                    return
                batch = texts[i % 50 * 8 : i % 50 * 8 + 1 + i % 8]
                client.post("/classify", json={"texts": batch}).raise_for_status()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(timeout=10)


def test_prometheus_scrapes_the_service_and_evaluates_the_rules(prometheus, service_url):
    with traffic(service_url):
        efficiency = value_of(
            prometheus,
            "sum(rate(classifier_real_tokens_total[1m])) / sum(rate(classifier_padded_tokens_total[1m]))",
        )
        request_rate = value_of(prometheus, 'sum(rate(classifier_requests_total{route="/classify"}[1m]))')
        recorded = {rule["record"]: value_of(prometheus, rule["record"]) for rule in rules(RULE_FILES[0])}
    assert 0 < efficiency <= 1
    assert request_rate > 0
    assert 0 < recorded["job:classifier_padding_efficiency:ratio_rate5m"] <= 1
    assert recorded["job:classifier_texts:rate5m"] > 0
    assert recorded["job:classifier_requests_5xx:ratio_rate5m"] == 0
    assert recorded["job:classifier_batch_size:mean_5m"] >= 1
    assert recorded["job:classifier_request_duration_seconds:p99_5m"] > 0

    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    unhealthy = [(rule["name"], rule.get("lastError")) for group in groups for rule in group["rules"] if rule["health"] != "ok"]
    assert not unhealthy
    assert {rule["name"] for group in groups for rule in group["rules"]} == {
        rule.get("record") or rule["alert"] for path in RULE_FILES for rule in rules(path)
    }


def test_dashboard_and_autoscaler_queries_run_in_prometheus(prometheus):
    scaled_object = yaml.safe_load((ROOT / "deploy" / "k8s" / "scaledobject.yaml").read_text())
    autoscaler_query = scaled_object["spec"]["triggers"][0]["metadata"]["query"]
    for expr in [*queries(dashboard()), autoscaler_query]:
        query(prometheus, expr)  # a parse or evaluation error fails here
    # Once scraped, the dashboard's queue panel has data.
    assert value_of(prometheus, 'sum(classifier_queue_texts{job=~".*"})') >= 0
