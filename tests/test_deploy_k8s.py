"""deploy/k8s: the kustomization renders, every manifest passes its schema, and the pieces fit together.

Core kinds are validated with the Kubernetes OpenAPI schemas shipped by `kubernetes-validate` (strict: unknown
fields are errors). KEDA's ScaledObject and the ServiceMonitor are CRDs those schemas do not cover: they are
validated against the upstream CRDs vendored in deploy/schemas/ (see its README for their pinned versions), as
kubeconform would: each CRD's openAPIV3Schema, with unknown fields refused.
"""

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service import metrics

pytestmark = pytest.mark.integration  # service processes or external programs (see pyproject's markers)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
# The oldest Kubernetes still commonly run, and the newest the package ships schemas for.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor"}


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    """The JSON Schema of `kind` at `api_version` from the vendored upstream CRD that defines it."""
    group, version = api_version.split("/")
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            served = next(v for v in crd["spec"]["versions"] if v["name"] == version and v["served"])
            return strict(served["schema"]["openAPIV3Schema"])
    raise LookupError(f"no CRD for {kind} in {api_version} in {SCHEMAS}")


def strict(schema):
    """Refuse unknown fields, as kubeconform -strict does: every object that lists its properties and neither allows
    others nor preserves unknown fields gets additionalProperties: false."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    open_to_unknown = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and not open_to_unknown:
        schema["additionalProperties"] = False
    return schema


def validate_custom(doc: dict) -> None:
    schema = crd_schema(doc["apiVersion"], doc["kind"])
    jsonschema.validate(doc, schema, cls=jsonschema.Draft4Validator)  # OpenAPI 3.0 schemas are draft-4 style


def tool(name: str, hint: str) -> str:
    """Path of a required binary: missing fails the test under CI, and skips it elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"`{name}` is not installed ({hint})")
    pytest.skip(f"`{name}` is not installed ({hint})")


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    """`kubectl kustomize deploy/k8s`, by kind (each kind appears once)."""
    kubectl = tool("kubectl", "Debian package kubernetes-client")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents)
    return by_kind


def pod_labels(rendered) -> dict:
    return rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]


def container(rendered) -> dict:
    return rendered["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_kustomization_renders_every_resource_into_its_namespace(rendered):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(rendered) == {
        "Namespace", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "ScaledObject"
    }  # fmt: skip
    namespace = kustomization["namespace"]
    assert rendered["Namespace"]["metadata"]["name"] == namespace
    for kind, doc in rendered.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, kind
    assert container(rendered)["image"] == "classifier-service:gpu"  # the kustomization's image tag applied


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_pass_the_kubernetes_schemas(rendered, version):
    for kind, doc in rendered.items():
        if kind not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_custom_resources_pass_their_upstream_schemas(rendered, kind):
    validate_custom(rendered[kind])


def test_schemas_catch_mistakes(rendered):
    scaled_object = copy.deepcopy(rendered["ScaledObject"])
    scaled_object["spec"]["maxReplicas"] = 8  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        validate_custom(scaled_object)
    scaled_object = copy.deepcopy(rendered["ScaledObject"])
    scaled_object["spec"]["triggers"][0]["metadata"]["threshold"] = 0.5  # KEDA wants every metadata value a string
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(scaled_object)
    monitor = copy.deepcopy(rendered["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "10s"  # Prometheus' spelling; the operator's is interval
    with pytest.raises(jsonschema.ValidationError, match="scrapeInterval"):
        validate_custom(monitor)
    deployment = copy.deepcopy(rendered["Deployment"])
    probed = deployment["spec"]["template"]["spec"]["containers"][0]
    probed["readinesProbe"] = probed.pop("readinessProbe")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_hpa_keda_creates_passes_the_kubernetes_schema(rendered, version):
    # KEDA turns the ScaledObject into this HPA; its `behavior` block is copied verbatim.
    spec = rendered["ScaledObject"]["spec"]
    trigger = spec["triggers"][0]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-classifier"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec["scaleTargetRef"]["name"]},
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": "s0-prometheus"},
                        "target": {"type": trigger["metricType"], "averageValue": trigger["metadata"]["threshold"]},
                    },
                }
            ],
        },
    }
    kubernetes_validate.validate(hpa, version, strict=True)


def test_deployment_requests_a_gpu_probes_and_drains(rendered):
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    main = container(rendered)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    # /health is 200 while the model still loads: the startup probe must wait for /ready to protect anything.
    assert main["startupProbe"]["httpGet"]["path"] == "/ready"
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load and warm up
    port_names = {port["name"] for port in main["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"]["port"] in port_names
    # The service itself keeps serving with /ready at 503 for the drain delay (no preStop sleep, which would keep
    # /ready at 200), long enough for the readiness probe to take the pod out; it then drains within its own
    # grace period, which must end before the kubelet's SIGKILL.
    env = {item["name"]: item["value"] for item in main["env"]}
    readiness = main["readinessProbe"]
    assert "lifecycle" not in main
    assert float(env["CLASSIFIER_DRAIN_DELAY_SECONDS"]) >= readiness["periodSeconds"] * readiness["failureThreshold"]
    assert float(env["CLASSIFIER_SHUTDOWN_GRACE_SECONDS"]) >= float(env["CLASSIFIER_DRAIN_DELAY_SECONDS"]) + 60
    assert pod["terminationGracePeriodSeconds"] > float(env["CLASSIFIER_SHUTDOWN_GRACE_SECONDS"])
    assert "replicas" not in rendered["Deployment"]["spec"]  # the autoscaler owns it
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}" in dockerfile


def test_selectors_and_ports_connect(rendered):
    labels = pod_labels(rendered)
    service = rendered["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert rendered["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert rendered["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = rendered["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["port"] in service_ports
    assert monitor["endpoints"][0]["path"] == "/metrics"
    container_ports = {port["name"] for port in container(rendered)["ports"]}
    assert all(port["targetPort"] in container_ports for port in service_ports.values())
    assert rendered["ScaledObject"]["spec"]["scaleTargetRef"]["name"] == rendered["Deployment"]["metadata"]["name"]


def test_autoscaler_scales_on_the_exported_queue_drain_gauge(rendered):
    trigger = rendered["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    gauge = metrics.QUEUE_DRAIN.describe()[0]
    assert gauge.type == "gauge" and gauge.name in query
    # The labels the Prometheus Operator adds must select this deployment's pods.
    selectors = dict(re.findall(r'(\w+)="([^"]*)"', query))
    assert selectors == {
        "namespace": rendered["ScaledObject"]["metadata"]["namespace"],
        "service": rendered["Service"]["metadata"]["name"],
    }
