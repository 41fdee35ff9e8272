"""Wires the stages together for one model: tokenization -> queue/batcher -> model runner -> post-processing."""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from service import metrics
from service.autotune import Tuner, TuningReport, calibration_texts
from service.batcher import Batcher, DeadlineExceeded, OutOfMemory, Submission, ThroughputMeter
from service.default_model import ensure_default_model, read_build_report
from service.postprocess import ProblemType, activate
from service.runner import (
    LoadedModel,
    ModelRunner,
    cpu_has_native_bf16,
    cuda_supports_bf16,
    load_classifier,
    release_cached_memory,
    resolve_device,
    resolve_precision,
)
from service.scheduler import BatchingPolicy, BatchQueue, default_bucket_bounds
from service.settings import Settings
from service.tokenization import EncodedText, EncoderPool, model_max_length
from service.tuning import Choice, precision_candidates

log = logging.getLogger(__name__)

# Token budgets per batch when tuning is off. On the 2-core AMX Xeon this project first ran on, MiniLM-L6 on
# length-sorted batches peaked near 1-2k tokens (287 texts/s at 1024, 304 at 2048, 242 at 8192: bigger attention
# tensors stop fitting in cache); a GPU wants far more work per launch.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}
# Precision candidates are timed at this budget (or the forced one): near the CPU's best, and small enough for
# any GPU at the model's maximum length.
PRECISION_TRIAL_BUDGET = 2048


def _names_a_directory(model: str) -> bool:
    """A path, not a hub id: hub ids are `name` or `org/name`, never absolute, dotted-relative or deeper."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


@dataclass(frozen=True)
class Classified:
    """One text's answer from the engine: how it was encoded and its fp32 scores per label."""

    encoded: EncodedText
    scores: list[float]


class Engine:
    """A loaded model behind its queue: `classify` texts; `start` loads and warms up; `stop` drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = False
        self.failure: str | None = None
        self.model_id = settings.model or "default"
        self.build_report: dict | None = None
        self.device: torch.device | None = None
        self.precision: str | None = None
        self.tuning: TuningReport | None = None
        self.loaded: LoadedModel | None = None
        self.encoders: EncoderPool | None = None
        self.policy: BatchingPolicy | None = None
        self.runner: ModelRunner | None = None
        self.batcher: Batcher | None = None
        # Every torch call (load, warm-up, batches) runs on this one thread. Each thread that runs torch ops gets
        # its own OpenMP team; with more team threads than cores, libgomp stops spin-waiting between parallel
        # regions, and the model ran 30% slower at saturation with 0.4 of 2 cores idle.
        self._inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def start(self) -> None:
        """Load the model (building the default one first if needed), warm it up and start batching."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._inference_thread, self._load)
            self.batcher = Batcher(
                BatchQueue(self.policy), self._infer, self.settings.max_queue_tokens, ThroughputMeter()
            )
            await loop.run_in_executor(self._inference_thread, self._warm_up)
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            # One line an operator can act on; the traceback only helps when debugging.
            log.error("the model could not be loaded: %s", self.failure)
            log.debug("model loading failed", exc_info=True)
            return
        self.batcher.start(self._inference_thread)
        self.ready = True
        log.info(
            "ready: %s on %s (%s, max_batch_tokens %d)", self.model_id, self.device, self.precision,
            self.policy.max_batch_tokens,
        )

    async def stop(self) -> None:
        """Stop admitting and finish every queued text before returning."""
        self.ready = False
        if self.batcher is not None:
            self.batcher.drain()
            await self.batcher.drained()
        if self.encoders is not None:
            self.encoders.shutdown()
        self._inference_thread.shutdown(wait=False)

    def deadline_after(self, timeout_ms: float | None, arrived_at: float | None = None) -> float:
        """The deadline, on the batcher's clock, of a request that arrived at `arrived_at` (now when unknown), with
        the server default when `timeout_ms` is unset."""
        start = self.batcher.clock() if arrived_at is None else arrived_at
        return start + (timeout_ms or self.settings.request_timeout_ms) / 1000

    async def encode(self, texts: list[str], truncate: bool) -> list[EncodedText]:
        """Token ids for the texts, computed off the event loop by a free tokenizer worker; raises TextTooLong."""
        encoded = await asyncio.wrap_future(self.encoders.submit(texts, truncate))
        for text in encoded:
            metrics.INPUT_TOKENS.observe(len(text.ids))
            if text.truncated:
                metrics.TRUNCATED_TEXTS.inc()
        return encoded

    async def classify(self, encoded: list[EncodedText], deadline: float) -> list[Classified]:
        """Queue the texts and wait for all their scores, until `deadline`.

        Raises Overloaded or NotAccepting (refused at admission) and DeadlineExceeded (texts still queued at the
        deadline, now dropped). When the caller is cancelled (its client left), its queued texts are dropped too.
        """
        submission = self.batcher.submit(encoded, deadline)
        try:
            scores = await self._scores(submission, deadline)
        except asyncio.CancelledError:
            self._give_up(submission, "client_gone")
            raise
        except DeadlineExceeded:
            self._give_up(submission, "deadline")
            raise
        metrics.CLASSIFIED_TEXTS.inc(len(encoded))
        return [Classified(text, text_scores) for text, text_scores in zip(encoded, scores)]

    async def _scores(self, submission: Submission, deadline: float) -> list[list[float]]:
        futures = submission.futures
        timeout = max(0.0, deadline - self.batcher.clock())
        done, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        failed = any(not future.cancelled() and future.exception() is not None for future in done)
        if pending and not failed:
            if self.batcher.cancel(submission, "deadline"):
                raise DeadlineExceeded()
            # Nothing of it is queued any more: the rest is in a running batch, which finishes.
            await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        return [future.result() for future in futures]

    def _give_up(self, submission: Submission, reason: str) -> None:
        """Drop what is still queued; answers of texts in a running batch are discarded (and counted) when it ends."""
        self.batcher.cancel(submission, reason)
        for future in submission.futures:
            future.cancel()

    def _load(self) -> None:
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        model_path = settings.model
        if model_path is None:
            default_dir = ensure_default_model(Path(settings.cache_dir) if settings.cache_dir else None)
            self.build_report = read_build_report(default_dir)
            model_path = str(default_dir)
        elif _names_a_directory(model_path) and not Path(model_path).is_dir():
            raise FileNotFoundError(f"model directory {model_path} does not exist")
        self.loaded = load_classifier(model_path, self.device)
        max_length = settings.max_length or model_max_length(
            self.loaded.tokenizer, self.loaded.max_position_embeddings
        )
        self.encoders = EncoderPool(self.loaded.tokenizer, max_length, settings.tokenizer_workers)
        # Tensor cores want sequence lengths in multiples of 8; the CPU gains nothing from extra padding.
        pad_multiple = 8 if self.device.type == "cuda" else 1
        longest = -(-max_length // pad_multiple) * pad_multiple
        if settings.tune and "auto" in (settings.precision, settings.max_batch_tokens):
            self.tuning = self._tune(longest)
            log.info(self.tuning.summary())
            self.precision, max_batch_tokens = self.tuning.precision.value, self.tuning.max_batch_tokens.value
            metrics.TUNING_SECONDS.set(self.tuning.seconds)
        else:
            self.precision = resolve_precision(settings.precision, self.device)
            max_batch_tokens = self._untuned_budget()
        self.policy = self._batching_policy(max_length, longest, pad_multiple, max_batch_tokens)
        pad_token_id = self.loaded.tokenizer.pad_token_id or 0
        self.runner = ModelRunner(self.loaded.model, self.device, self.precision, pad_token_id)
        metrics.MODEL_INFO.info({"model": self.model_id, "device": str(self.device), "precision": self.precision})
        metrics.MAX_BATCH_TOKENS.set(max_batch_tokens)

    def _untuned_budget(self) -> int:
        forced = self.settings.max_batch_tokens
        return DEFAULT_MAX_BATCH_TOKENS.get(self.device.type, 2048) if forced == "auto" else forced

    def _tune(self, longest: int) -> TuningReport:
        """Measure what is `auto` (precision, budget) on this model and device; keep what was forced."""
        settings, device = self.settings, self.device
        started = time.perf_counter()
        calibration = [text.ids for text in self.encoders.submit(calibration_texts(), True).result()]
        tuner = Tuner(
            self.loaded.model, device, self.loaded.tokenizer.pad_token_id or 0, self.loaded.problem_type,
            calibration, settings.max_batch_size, floor=longest,
        )
        precision_trials, budget_trials = [], []
        if settings.precision == "auto":
            candidates = precision_candidates(
                device.type,
                cpu_native_bf16=device.type == "cpu" and cpu_has_native_bf16(),
                cuda_bf16=cuda_supports_bf16(device),
                regression=self.loaded.problem_type == "regression",
            )
            trial_budget = max(longest, PRECISION_TRIAL_BUDGET) if settings.max_batch_tokens == "auto" else settings.max_batch_tokens
            precision, precision_trials = tuner.precision(candidates, settings.precision_tolerance, trial_budget)
        else:
            precision = Choice(resolve_precision(settings.precision, device), "forced by CLASSIFIER_PRECISION")
        if settings.max_batch_tokens == "auto":
            # The ladder climbs until half the time limit has passed; timing its rungs again takes about as long.
            climb_until = started + settings.tuning_time_limit / 2
            budget, budget_trials = tuner.budget(precision.value, climb_until)
        else:
            budget = Choice(settings.max_batch_tokens, "forced by CLASSIFIER_MAX_BATCH_TOKENS")
        return TuningReport(
            precision, budget, precision_trials, budget_trials, len(calibration), time.perf_counter() - started
        )

    def _batching_policy(
        self, max_length: int, longest: int, pad_multiple: int, max_batch_tokens: int
    ) -> BatchingPolicy:
        """`longest`: the model's maximum length padded to `pad_multiple`, what one text can take."""
        settings = self.settings
        bounds = tuple(settings.bucket_bounds or default_bucket_bounds(max_length, pad_multiple))
        if bounds[-1] < max_length:
            bounds = bounds + (max_length,)
        if max_batch_tokens < longest:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) is below the model's maximum length ({longest})")
        if settings.max_queue_tokens < settings.max_texts_per_request * max_length:
            raise ValueError("max_queue_tokens must hold at least one largest request (max_texts_per_request x max length)")
        return BatchingPolicy(
            bucket_bounds=bounds,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            window=settings.batch_window_ms / 1000,
            pad_multiple=pad_multiple,
            merge_min_efficiency=settings.merge_min_efficiency,
        )

    def _infer(self, sequences: list[list[int]], padded_length: int) -> list[list[float]]:
        return batch_scores(self.runner, self.loaded.problem_type, sequences, padded_length)

    def _warm_up(self) -> None:
        """One batch per bucket, so first requests do not pay for lazy initialisation (and CUDA OOMs show now).

        On the CPU one text per bucket is enough; on a GPU each batch is as big as the budget allows.
        """
        started = self.batcher.clock()
        tokens = 0
        for bound in self.policy.bucket_bounds:
            length = self.policy.padded_length(bound)
            count = 1 if self.device.type == "cpu" else max(1, min(self.policy.max_batch_size, self.policy.max_batch_tokens // length))
            self._infer([[self.runner.pad_token_id] * length] * count, length)
            tokens += count * length
        self.batcher.meter.record(tokens, self.batcher.clock() - started)
        log.info("warmed up %d buckets in %.1f s", len(self.policy.bucket_bounds), self.batcher.clock() - started)

    def info(self) -> dict:
        """What /info shows: the model, where and how it runs, and how it batches."""
        info = {
            "model": self.model_id,
            "ready": self.ready,
            "failure": self.failure,
            "settings": self.settings.model_dump(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        if self.loaded is not None:
            info.update(
                labels=list(self.loaded.labels),
                problem_type=self.loaded.problem_type,
                max_length=self.encoders.max_length,
                device=str(self.device),
                precision=self.precision,
            )
            info["tuning"] = self.tuning.as_dict() if self.tuning is not None else {
                "enabled": False,
                "reason": "CLASSIFIER_TUNE=false" if not self.settings.tune else "precision and budget both forced",
            }
        if self.policy is not None:
            policy = self.policy
            info["batching"] = {
                "bucket_bounds": list(policy.bucket_bounds),
                "max_batch_tokens": policy.max_batch_tokens,
                "effective_max_batch_tokens": self.batcher.memory_budget.current if self.batcher else None,
                "max_batch_size": policy.max_batch_size,
                "window_seconds": policy.window,
                "pad_multiple": policy.pad_multiple,
                "merge_min_efficiency": policy.merge_min_efficiency,
            }
        if self.build_report is not None:
            info["default_model_build"] = self.build_report
        return info


def batch_scores(
    runner: ModelRunner, problem_type: ProblemType, sequences: list[list[int]], padded_length: int
) -> list[list[float]]:
    """Scores for one batch. The framework's out-of-memory becomes the batcher's OutOfMemory (after the allocator's
    cache is released), so the batcher can split the batch without knowing torch."""
    try:
        logits = runner.run(sequences, padded_length)
    except torch.cuda.OutOfMemoryError as error:
        release_cached_memory(runner.device)
        raise OutOfMemory(str(error)) from error
    return activate(logits, problem_type)
