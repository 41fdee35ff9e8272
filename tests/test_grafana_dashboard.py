"""deploy/grafana: the provisioned dashboard is valid and queries only metrics the service exports."""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service import metrics

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "classifier.json"
SERIES_SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def exported_series() -> set[str]:
    """Every series name service/metrics.py exposes, e.g. classifier_batch_size_bucket."""
    families = [
        family
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    ]
    return {family.name + suffix for family in families for suffix in SERIES_SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # matchers and ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", expr):  # not inside a number like 1e3
        is_function = expr[match.end() :].lstrip().startswith("(")
        if not is_function and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    panel_exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    variable_exprs = [
        re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"]).group(1)
        for variable in board["templating"]["list"]
        if variable["type"] == "query"
    ]
    return panel_exprs + variable_exprs


def test_metric_name_extraction():
    expr = 'histogram_quantile(0.99, sum by (le) (rate(classifier_x_bucket{job=~"$job", route="/a"}[5m]))) / on (job) y'
    assert metric_names(expr) == {"classifier_x_bucket", "y"}
    assert metric_names("sum(rate(classifier_reqeusts_total[1m])) > 1e3") == {"classifier_reqeusts_total"}


def test_dashboard_is_valid_and_covers_what_operators_watch():
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for topic in ("throughput", "latency", "queue depth", "batch size", "padding efficiency", "errors"):
        assert topic in titles
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job"]


def test_dashboard_queries_only_metrics_the_service_exports():
    exported = exported_series()
    assert "classifier_queue_drain_seconds" in exported and "classifier_batch_size_bucket" in exported
    for expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} uses {names - exported}, which the service does not export"


@pytest.mark.parametrize("name", ["datasources/prometheus.yml", "dashboards/classifier.yml"])
def test_provisioning_files_are_valid(name):
    config = yaml.safe_load((GRAFANA / "provisioning" / name).read_text())
    assert config["apiVersion"] == 1


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "classifier.yml").read_text())
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
