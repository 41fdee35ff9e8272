"""The GPU check (loadtest/gpu_check.py) and what travels with it (loadtest/gpu_travel.py): the wheel list, the
device command and the travel size offline, and the whole check's dry run on the CPU (integration), so that it
cannot rot while no GPU is around."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.test_cuda
from loadtest import gpu_travel
from loadtest.gpu_check import STAGES, GpuSampler, cpu_by_role, junit_results, render_summary, selected_stages
from tests.conftest import ROOT

CUDA_TESTS = [name for name in dir(tests.test_cuda) if name.startswith("test_")]


def test_every_runtime_dependency_the_host_lacks_travels_as_a_wheel_at_the_version_tested_here():
    carried = gpu_travel.carried_packages()
    # The runtime's own requirements the host lacks, and theirs in turn (uvicorn[standard]'s extras included).
    runtime = "fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv uvicorn httptools pyzmq msgspec"
    assert set(runtime.split()) <= set(carried)
    # What the host has stays behind (typing-extensions travels anyway: pydantic needs a newer one); markers are
    # evaluated for the host (colorama is uvicorn's on Windows only).
    assert not set("torch transformers tokenizers numpy prometheus-client uvloop anyio click h11 colorama".split()) & set(carried)
    assert "typing-extensions" in carried
    pinned = gpu_travel.pinned(carried)
    assert len(pinned) == len(carried) and all(requirement.count("==") == 1 for requirement in pinned)
    command = gpu_travel.pip_download_command(Path("/tmp/wheels"), pinned)
    assert command[1:4] == ["-m", "pip", "download"] and command[-len(pinned) :] == pinned
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "manylinux2014_x86_64"):
        assert flag in command


def test_a_requirement_of_the_host_s_own_packages_is_not_walked():
    assert gpu_travel.carried_packages(["torch>=2.1", "tqdm>=4.60"]) == []
    assert gpu_travel.carried_packages(["pydantic-settings>=2.1"]) == sorted(
        ["annotated-types", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "typing-extensions", "typing-inspection"]
    )


def test_the_device_command_fits_installs_the_wheels_first_and_keeps_the_output():
    for quick in (False, True):
        command = gpu_travel.device_command(quick=quick)
        assert len(command) <= gpu_travel.COMMAND_LIMIT
        install, _, rest = command.partition(" && ")
        assert "pip install" in install and "--no-index --no-deps" in install and install.endswith(".gpu/wheels/*.whl")
        assert "PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1" in rest
        assert "python3 -m loadtest.gpu_check run --device cuda --out $OUT" in rest and rest.endswith("2>&1 | tee $OUT/console.log")
        assert command.startswith("set -o pipefail;") and ("--quick" in command) == quick
    assert gpu_travel.CARRY == [".gpu"] and gpu_travel.TRAVEL_DIR == ROOT / ".gpu"
    assert ".gpu/" in (ROOT / ".gitignore").read_text().splitlines()  # so every clone keeps it out of git


@pytest.mark.skipif(shutil.which("git") is None, reason="the travel size is what git lists: needs git")
def test_the_travel_size_counts_the_tree_without_ignored_files_and_the_carried_paths(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text(".gpu/\n")  # 6 bytes
    (tmp_path / "tracked.txt").write_text("x" * 100)
    subprocess.run(["git", "-C", str(tmp_path), "add", "tracked.txt", ".gitignore"], check=True)
    (tmp_path / "untracked.txt").write_text("y" * 10)
    (tmp_path / ".gpu" / "wheels").mkdir(parents=True)
    (tmp_path / ".gpu" / "wheels" / "a.whl").write_bytes(b"z" * 1000)
    size = gpu_travel.travel_size([".gpu"], root=tmp_path)
    assert size["tree_bytes"] == 116 and size["carried_bytes"] == {".gpu": 1000}
    assert size["total_bytes"] == 1116 and size["fits"]


def test_the_corpus_travels_as_gzipped_json_lines_and_comes_back_equal(tmp_path):
    texts = ["a review", 'a "quoted"\nline break', "naïve café ☕", "x" * 5000]
    first = gpu_travel.export_corpus(tmp_path / "a.jsonl.gz", texts)
    second = gpu_travel.export_corpus(tmp_path / "b.jsonl.gz", texts)
    assert gpu_travel.read_corpus(first) == texts
    assert first.read_bytes() == second.read_bytes()  # the same texts, the same bytes


def test_the_gpu_sampler_summarises_what_it_read_and_nothing_without_a_reader():
    readings = iter([(10.0, 100.0), (50.0, 300.0), (90.0, 200.0)] + [(30.0, 250.0)] * 1000)
    with GpuSampler(lambda: next(readings), interval=0.001) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    summary = sampler.summary()
    assert summary["gpu_samples"] >= 3 and summary["gpu_utilisation_max"] == 90.0 and summary["gpu_memory_max_mib"] == 300
    assert 10.0 <= summary["gpu_utilisation_mean"] <= 90.0
    with GpuSampler(None) as idle:
        pass
    assert idle.summary() == {"gpu_samples": 0, "gpu_utilisation_mean": None, "gpu_utilisation_max": None, "gpu_memory_max_mib": None}


def test_cpu_per_request_is_split_between_the_api_processes_and_the_engine():
    before = {1: ("python3", 1.0), 2: ("clf-api-0", 2.0), 3: ("clf-api-1", 2.0), 4: ("clf-engine", 5.0)}
    after = {1: ("python3", 1.0), 2: ("clf-api-0", 3.0), 3: ("clf-api-1", 4.0), 4: ("clf-engine", 6.5), 5: ("clf-api-2", 9.0)}
    # 1,000 requests in 2 s; a process that appeared after the first reading is not counted.
    assert cpu_by_role(before, after, requests=1000, seconds=2.0) == {
        "api": {"cpu_ms_per_request": 3.0, "cores_busy": 1.5},
        "engine": {"cpu_ms_per_request": 1.5, "cores_busy": 0.75},
        "main": {"cpu_ms_per_request": 0.0, "cores_busy": 0.0},
    }


def test_junit_results_counts_each_outcome_and_keeps_the_failure_message(tmp_path):
    xml = tmp_path / "results.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_cuda" name="test_b" time="0.1"><failure message="assert 1 == 2">...</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    results = junit_results(xml)
    assert (results["passed"], results["failed"], results["errors"], results["skipped"]) == (1, 1, 0, 1)
    assert results["tests"][1] == {"name": "test_b", "outcome": "failed", "seconds": 0.1, "message": "assert 1 == 2"}
    assert junit_results(tmp_path / "missing.xml") == {"tests": []}


def test_a_rerun_of_some_stages_keeps_their_order_and_builds_the_models_they_need():
    assert selected_stages(None) == STAGES
    assert selected_stages("cuda_tests") == ["cuda_tests"]
    assert selected_stages("memory_ladder, saturation") == ["models", "saturation", "memory_ladder"]
    with pytest.raises(ValueError, match="no such stage: warmup"):
        selected_stages("warmup,tuning")


def test_the_summary_of_a_run_cut_short_names_each_error_and_what_did_not_run():
    machine = {"gpu": "NVIDIA H100 80GB HBM3", "cpus": 16, "cpu": "x86_64", "torch": "2.11.0+cu130", "transformers": "5.17.0", "python": "3.12.3"}
    report = {
        "started_at": "2026-12-08T10:00:00Z", "device": "cuda", "plan": {"concurrency": 256}, "machine": machine,
        "source": {"commit": "abc1234", "uncommitted_changes": False},
        "stages": {
            "cuda_tests": {"seconds": 40.0, "exit_status": 1, "passed": 3, "failed": 1, "errors": 0, "skipped": 0,
                           "tests": [{"name": "test_x", "outcome": "failed", "seconds": 1.0, "message": "assert 2 <= 1"}]},
            "models": {"seconds": 9.0, "models": {}},
            "tuning": {"seconds": 30.0, "error": "failed for bert-base", "models": {"bert-base": {"error": "ServiceNotReady: exited"}}},
            "saturation": {"seconds": 50.0, "error": "failed for service, 8 worker(s)", "model": "minilm", "light_load": None, "runs": {
                "service, 8 worker(s)": {"error": "ServiceNotReady: timed out"}, "plain server": {"not_run": "out of time (--time-limit)"}}},
            "offline": {"not_run": "out of time (--time-limit)"},
            "memory_ladder": {"seconds": 3.0, "cap": 2**23, "models": {"minilm": {"precision": "fp16", "peak_gib": 60.2, "rungs": [
                {"budget": 131072, "texts": 256, "seconds": 0.1}, {"budget": 262144, "texts": 512, "out_of_memory": True}]}}},
        },
    }  # fmt: skip
    summary = render_summary(report)
    assert "NVIDIA H100 80GB HBM3" in summary and "commit abc1234;" in summary and "not finished" in summary
    assert "| tuning | 30.0 | **error**: failed for bert-base |" in summary
    assert "| offline | - | out of time (--time-limit) |" in summary
    assert "| service, 8 worker(s) | **error**: ServiceNotReady: timed out |" in summary
    assert "| plain server | out of time (--time-limit) |" in summary
    assert "| cuda_tests | 40.0 | **1 tests failed, 0 errors** |" in summary and "- failed: test_x: assert 2 <= 1" in summary
    assert "**Tuning, bert-base**: **error**: ServiceNotReady: exited" in summary
    assert "131072: 0.1 s, 262144: OOM" in summary


@pytest.mark.integration
def test_the_cpu_dry_run_runs_every_stage_of_the_gpu_check(tmp_path):
    from loadtest.corpus import load_texts

    corpus = gpu_travel.export_corpus(tmp_path / "corpus.jsonl.gz", load_texts(200))
    tokenizer = gpu_travel.export_tokenizer(tmp_path / "tokenizer")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "loadtest.gpu_check", "run", "--device", "cpu", "--quick", "--out", str(out),
               "--corpus", str(corpus), "--tokenizer", str(tokenizer)]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    report = json.loads((out / "gpu-check.json").read_text())
    stages = report["stages"]
    assert list(stages) == STAGES
    assert not [name for name, stage in stages.items() if "error" in stage or "not_run" in stage], stages
    # Without CUDA every CUDA test is collected and skipped.
    assert stages["cuda_tests"]["skipped"] == len(CUDA_TESTS) and stages["cuda_tests"]["passed"] == 0
    assert set(stages["models"]["models"]) == {"minilm", "bert-base"}
    for name, tuned in stages["tuning"]["models"].items():
        assert tuned["precision"] in ("fp32", "bf16") and tuned["max_batch_tokens"] >= 512, name
        assert tuned["tuning"]["budget_trials"] and tuned["tuning"]["precision_trials"]
    runs = stages["saturation"]["runs"]
    assert list(runs) == ["service, 1 worker(s)", "service, 2 worker(s)", "service, batching off, 1 worker(s)", "plain server"]
    for label, run in runs.items():
        assert run["texts"] > 0 and run["failures"] == 0 and run["p50_ms"] > 0, label
        assert run["gpu_samples"] == 0  # no GPU to sample
        assert ("server" in run) == (label != "plain server")
    assert set(runs["service, 2 worker(s)"]["cpu"]) == {"main", "api", "engine"}
    assert runs["service, batching off, 1 worker(s)"]["server"]["mean_batch_size"] == 1.0
    light = stages["saturation"]["light_load"]
    assert light["configuration"] == "service, 1 worker(s)" and light["failures"] == 0 and light["p99_ms"] > 0
    for name in ("minilm", "bert-base"):
        assert stages["offline"]["models"][name]["texts_per_second"] > 0
        rungs = stages["memory_ladder"]["models"][name]["rungs"]
        assert [rung["budget"] for rung in rungs] == [1024, 2048, 4096] and not any(rung.get("out_of_memory") for rung in rungs)
    summary = (out / "gpu-check.md").read_text()
    for heading in ("**CUDA tests**", "**Tuning, minilm**", "**Tuning, bert-base**", "**Saturation, minilm**", "**Light load**",
                    "**Model alone, minilm**", "**Memory ladder, bert-base**"):  # fmt: skip
        assert heading in summary
    assert "==== plain-server.log" in (out / "servers.log").read_text()
    assert (out / "cuda-tests.xml").is_file()
