"""Wires the stages together for one model: tokenization -> queue/batcher -> model runner -> post-processing."""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from service import metrics
from service.batcher import Batcher, ThroughputMeter
from service.default_model import ensure_default_model, read_build_report
from service.postprocess import activate
from service.runner import LoadedModel, ModelRunner, load_classifier, resolve_device, resolve_precision
from service.scheduler import BatchingPolicy, BatchQueue, default_bucket_bounds
from service.settings import Settings
from service.tokenization import EncodedText, TextEncoder, model_max_length

log = logging.getLogger(__name__)

# Default token budgets per batch. On the 2-core CPU measured here, MiniLM-L6 on length-sorted batches peaked near
# 1-2k tokens (287 texts/s at 1024, 304 at 2048, 242 at 8192: bigger attention tensors stop fitting in cache);
# a GPU wants far more work per launch.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}


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
        self.loaded: LoadedModel | None = None
        self.encoder: TextEncoder | None = None
        self.policy: BatchingPolicy | None = None
        self.runner: ModelRunner | None = None
        self.batcher: Batcher | None = None
        # Tokenization runs off the event loop, in one thread: a fast tokenizer's truncation setting is shared
        # state, so two threads encoding at once can each get the other's truncation.
        self._tokenize_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
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
        log.info("ready: %s on %s (%s)", self.model_id, self.device, self.precision)

    async def stop(self) -> None:
        """Stop admitting and finish every queued text before returning."""
        self.ready = False
        if self.batcher is not None:
            self.batcher.drain()
            await self.batcher.drained()
        self._tokenize_executor.shutdown(wait=False)
        self._inference_thread.shutdown(wait=False)

    async def encode(self, texts: list[str], truncate: bool) -> list[EncodedText]:
        """Token ids for the texts, computed off the event loop; raises TextTooLong."""
        encoded = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_executor, self.encoder.encode, texts, truncate
        )
        for text in encoded:
            metrics.INPUT_TOKENS.observe(len(text.ids))
            if text.truncated:
                metrics.TRUNCATED_TEXTS.inc()
        return encoded

    async def classify(self, encoded: list[EncodedText]) -> list[Classified]:
        """Queue the texts and wait for all their scores; raises QueueFull or NotAccepting."""
        scores = await asyncio.gather(*self.batcher.submit(encoded))
        metrics.CLASSIFIED_TEXTS.inc(len(encoded))
        return [Classified(text, text_scores) for text, text_scores in zip(encoded, scores)]

    def _load(self) -> None:
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
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
        self.encoder = TextEncoder(self.loaded.tokenizer, max_length)
        self.policy = self._batching_policy(max_length)
        self.runner = ModelRunner(self.loaded.model, self.device, self.precision, self.loaded.tokenizer.pad_token_id or 0)
        metrics.MODEL_INFO.info({"model": self.model_id, "device": str(self.device), "precision": self.precision})

    def _batching_policy(self, max_length: int) -> BatchingPolicy:
        settings = self.settings
        # Tensor cores want sequence lengths in multiples of 8; the CPU gains nothing from extra padding.
        pad_multiple = 8 if self.device.type == "cuda" else 1
        bounds = tuple(settings.bucket_bounds or default_bucket_bounds(max_length, pad_multiple))
        if bounds[-1] < max_length:
            bounds = bounds + (max_length,)
        max_batch_tokens = settings.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS.get(self.device.type, 2048)
        longest = -(-max_length // pad_multiple) * pad_multiple
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
        return activate(self.runner.run(sequences, padded_length), self.loaded.problem_type)

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
                max_length=self.encoder.max_length,
                device=str(self.device),
                precision=self.precision,
            )
        if self.policy is not None:
            policy = self.policy
            info["batching"] = {
                "bucket_bounds": list(policy.bucket_bounds),
                "max_batch_tokens": policy.max_batch_tokens,
                "max_batch_size": policy.max_batch_size,
                "window_seconds": policy.window,
                "pad_multiple": policy.pad_multiple,
                "merge_min_efficiency": policy.merge_min_efficiency,
            }
        if self.build_report is not None:
            info["default_model_build"] = self.build_report
        return info
