"""deploy/grafana: the provisioned dashboard is valid and queries only metrics the service exports (and the
Prometheus rules only metrics the service exports or the rules record)."""

import json
import re
from pathlib import Path

import promql_parser
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service import metrics

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "classifier.json"
SERIES_SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
RULE_FILES = [ROOT / "deploy" / "prometheus" / name for name in ("recording_rules.yml", "alerting_rules.yml")]
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*"}  # as Grafana would fill them in


def exported_series() -> set[str]:
    """Every series name service/metrics.py exposes, e.g. classifier_batch_size_bucket."""
    families = [family for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase) for family in metric.describe()]
    return {family.name + suffix for family in families for suffix in SERIES_SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    """Metric names of the series a PromQL expression selects, from promql-parser's syntax tree."""
    names = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def as_prometheus_sees_it(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def rule_exprs() -> dict[str, str]:
    """Each recording and alerting rule's name and expression."""
    groups = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    return {rule.get("record") or rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    panel_exprs = [as_prometheus_sees_it(target["expr"]) for panel in board["panels"] for target in panel["targets"]]
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
    assert metric_names("max_over_time(x[5m:1m]) and on () vector(1) or y offset 5m") == {"x", "y"}


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


def test_rules_use_only_metrics_the_service_exports_or_the_rules_record():
    exprs = rule_exprs()
    known = exported_series() | {name for name in exprs if ":" in name}  # recorded series are named level:metric:op
    for name, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"no metric in {name}"
        assert names <= known, f"{name} uses {names - known}, which neither the service nor a rule provides"


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "classifier.yml").read_text())
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
