"""The engine façade for one model: texts in, finished per-text results out.

It is two halves, wired here: the front (tokenization, then ranking into results) and the back, `Scorer` (queue,
scheduler, batcher and model runner), which takes token ids and returns activated scores. Only plain data and
`service.errors` cross between them, so the back can move into its own process. `Engine.load` builds a complete
engine or raises; `EngineSlot` is the app's view of it while it loads.
"""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from service import metrics
from service.autotune import Tuner, TuningReport, calibration_texts
from service.default_model import ensure_default_model, read_build_report
from service.errors import LoadFailed, NotAccepting, NotReady
from service.postprocess import text_result
from service.runner import (
    BatchModelAdapter,
    LoadedModel,
    ModelRunner,
    cpu_has_native_bf16,
    cuda_supports_bf16,
    load_classifier,
    resolve_device,
    resolve_precision,
)
from service.scheduler import BatchingPolicy, default_bucket_bounds, padded_length
from service.scorer import Scorer
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


class Front:
    """The engine's front half: texts to token ids (on tokenizer threads), scores to ranked per-text results."""

    def __init__(self, encoders: EncoderPool, labels: tuple[str, ...]) -> None:
        self.encoders = encoders
        self.labels = labels

    async def encode(self, texts: list[str], truncate: bool) -> list[EncodedText]:
        """Token ids for the texts, computed off the event loop by a free tokenizer worker; raises TextTooLong."""
        encoded = await asyncio.wrap_future(self.encoders.submit(texts, truncate))
        for text in encoded:
            metrics.INPUT_TOKENS.observe(len(text.ids))
            if text.truncated:
                metrics.TRUNCATED_TEXTS.inc()
        return encoded

    def results(self, encoded: list[EncodedText], scores: list[list[float]], top_k: int | None) -> list[dict]:
        """Each text's `schemas.TextResult`, as plain data."""
        return [
            text_result(text_scores, self.labels, top_k, len(text.ids), text.truncated)
            for text, text_scores in zip(encoded, scores)
        ]


class Engine:
    """A loaded, warmed-up model behind its queue: `classify` texts, `stop` to drain. Built by `Engine.load`."""

    def __init__(self, model_id: str, front: Front, scorer: Scorer, facts: dict) -> None:
        """`facts`: what loading decided and /info shows (problem type, max length, device, precision, tuning)."""
        self.model_id = model_id
        self.front = front
        self.scorer = scorer
        self.facts = facts

    @classmethod
    async def load(cls, settings: Settings) -> "Engine":
        """Load the model (building the default one first if needed), tune, warm up and start batching; raises
        when it cannot."""
        # Every torch call (load, warm-up, batches) runs on this one thread. Each thread that runs torch ops gets
        # its own OpenMP team; with more team threads than cores, libgomp stops spin-waiting between parallel
        # regions, and the model ran 30% slower at saturation with 0.4 of 2 cores idle.
        inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(inference_thread, _Loading(settings).load)
            scoring = BatchModelAdapter(loaded.runner, loaded.model.problem_type)
            scorer = await Scorer.start(scoring, loaded.policy, settings.max_queue_tokens, inference_thread)
        except BaseException:
            inference_thread.shutdown(wait=False)
            raise
        log.info(
            "ready: %s on %s (%s, max_batch_tokens %d)", loaded.model_id, loaded.runner.device,
            loaded.runner.precision, loaded.policy.max_batch_tokens,
        )
        return cls(loaded.model_id, Front(loaded.encoders, loaded.model.labels), scorer, loaded.facts())

    @property
    def labels(self) -> tuple[str, ...]:
        return self.front.labels

    @property
    def ready(self) -> bool:
        """Whether it takes new texts (false once stopping)."""
        return self.scorer.ready

    async def classify(
        self, texts: list[str], *, top_k: int | None, truncate: bool, deadline: float
    ) -> list[dict]:
        """Each text's result (a `schemas.TextResult` as plain data), in order, once all have run by `deadline`
        (`time.monotonic()` seconds).

        Raises a ClassifierError: TextTooLong, Overloaded, NotAccepting, DeadlineExceeded, TextTooLargeForDevice or
        InferenceFailed. Cancelling the caller (its client left) drops its texts still queued.
        """
        encoded = await self.front.encode(texts, truncate)
        scores = await self.scorer.score([text.ids for text in encoded], deadline)
        metrics.CLASSIFIED_TEXTS.inc(len(encoded))
        return self.front.results(encoded, scores, top_k)

    def info(self) -> dict:
        """What /info shows of the loaded model: labels, how and where it runs, and how it batches."""
        return {"labels": list(self.labels), **self.facts, "batching": self.scorer.info()}

    async def stop(self) -> None:
        """Stop admitting, answer every queued text, then release the threads."""
        await self.scorer.stop()
        self.front.encoders.shutdown()


@dataclass(frozen=True)
class _Loaded:
    """What loading produced: the model, its tokenizer pool, the runner and the batching policy, and the choices."""

    model_id: str
    model: LoadedModel
    encoders: EncoderPool
    runner: ModelRunner
    policy: BatchingPolicy
    tuning: TuningReport | None
    tuning_off_reason: str
    build_report: dict | None

    def facts(self) -> dict:
        facts = {
            "problem_type": self.model.problem_type,
            "max_length": self.encoders.max_length,
            "device": str(self.runner.device),
            "precision": self.runner.precision,
            "tuning": self.tuning.as_dict() if self.tuning else {"enabled": False, "reason": self.tuning_off_reason},
        }
        if self.build_report is not None:
            facts["default_model_build"] = self.build_report
        return facts


class _Loading:
    """The steps of loading, on the inference thread: each takes what the previous produced."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load(self) -> _Loaded:
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        model_path, build_report = settings.model, None
        if model_path is None:
            default_dir = ensure_default_model(Path(settings.cache_dir) if settings.cache_dir else None)
            build_report = read_build_report(default_dir)
            model_path = str(default_dir)
        elif _names_a_directory(model_path) and not Path(model_path).is_dir():
            raise FileNotFoundError(f"model directory {model_path} does not exist")
        loaded = load_classifier(model_path, device)
        max_length = settings.max_length or model_max_length(loaded.tokenizer, loaded.max_position_embeddings)
        if settings.max_queue_tokens < settings.max_texts_per_request * max_length:
            raise ValueError("max_queue_tokens must hold at least one largest request (max_texts_per_request x max length)")
        encoders = EncoderPool(loaded.tokenizer, max_length, settings.tokenizer_workers)
        # Tensor cores want sequence lengths in multiples of 8; the CPU gains nothing from extra padding.
        pad_multiple = 8 if device.type == "cuda" else 1
        longest = padded_length(max_length, pad_multiple)  # what one text can take
        tuning = None
        if settings.tune and "auto" in (settings.precision, settings.max_batch_tokens):
            tuning = self._tune(loaded, device, encoders, longest)
            log.info(tuning.summary())
            precision, max_batch_tokens = tuning.precision.value, tuning.max_batch_tokens.value
            metrics.TUNING_SECONDS.set(tuning.seconds)
        else:
            precision = resolve_precision(settings.precision, device)
            forced = settings.max_batch_tokens
            max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS.get(device.type, 2048) if forced == "auto" else forced
        policy = self._batching_policy(max_length, pad_multiple, max_batch_tokens)
        runner = ModelRunner(loaded.model, device, precision, loaded.tokenizer.pad_token_id or 0)
        model_id = settings.model or "default"
        metrics.MODEL_INFO.info({"model": model_id, "device": str(device), "precision": precision})
        metrics.MAX_BATCH_TOKENS.set(max_batch_tokens)
        metrics.BATCHING_INFO.info({"padding": policy.padding, "batching": policy.batching})
        off_reason = "CLASSIFIER_TUNE=false" if not settings.tune else "precision and budget both forced"
        return _Loaded(model_id, loaded, encoders, runner, policy, tuning, off_reason, build_report)

    def _batching_policy(self, max_length: int, pad_multiple: int, max_batch_tokens: int) -> BatchingPolicy:
        """The policy for this model; its own checks refuse a budget that cannot hold one longest text."""
        settings = self.settings
        bounds = tuple(settings.bucket_bounds or default_bucket_bounds(max_length, pad_multiple))
        if bounds[-1] < max_length:
            bounds = bounds + (max_length,)
        return BatchingPolicy(
            bucket_bounds=bounds,
            max_batch_tokens=max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            window=settings.batch_window_ms / 1000,
            pad_multiple=pad_multiple,
            merge_min_efficiency=settings.merge_min_efficiency,
            padding=settings.padding,
            batching=settings.batching,
        )

    def _tune(self, loaded: LoadedModel, device: torch.device, encoders: EncoderPool, longest: int) -> TuningReport:
        """Measure what is `auto` (precision, budget) on this model and device; keep what was forced."""
        settings = self.settings
        started = time.perf_counter()
        calibration = [text.ids for text in encoders.submit(calibration_texts(), True).result()]
        tuner = Tuner(
            loaded.model, device, loaded.tokenizer.pad_token_id or 0, loaded.problem_type,
            calibration, settings.max_batch_size, floor=longest,
        )
        precision_trials, budget_trials = [], []
        if settings.precision == "auto":
            candidates = precision_candidates(
                device.type,
                cpu_native_bf16=device.type == "cpu" and cpu_has_native_bf16(),
                cuda_bf16=cuda_supports_bf16(device),
                regression=loaded.problem_type == "regression",
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


@dataclass(frozen=True)
class Failed:
    """Loading failed: why, in one line an operator can act on."""

    reason: str


class Loading:
    """The model is still loading."""


# Builds a complete Engine for the settings, or raises.
EngineLoader = Callable[[Settings], Awaitable[Engine]]


class EngineSlot:
    """The app's engine through its life: Loading, then a ready Engine or Failed. /health, /ready and /classify
    answer 503 until it holds a ready Engine."""

    def __init__(self, settings: Settings, load: EngineLoader = Engine.load) -> None:
        """`load`: how to get the engine; `service.workers` passes one that connects to the engine process."""
        self.settings = settings
        self._load = load
        self.state: Loading | Failed | Engine = Loading()

    async def load(self) -> None:
        """Load the engine; a failure is kept (and logged), not raised."""
        try:
            self.state = await self._load(self.settings)
        except Exception as error:
            self.state = Failed(f"{type(error).__name__}: {error}")
            # One line an operator can act on; the traceback only helps when debugging.
            log.error("the model could not be loaded: %s", self.state.reason)
            log.debug("model loading failed", exc_info=True)

    @property
    def failure(self) -> str | None:
        """Why the model could not be loaded, if it could not."""
        return self.state.reason if isinstance(self.state, Failed) else None

    @property
    def ready(self) -> bool:
        return not isinstance(self.state, (Loading, Failed)) and self.state.ready

    def engine(self) -> Engine:
        """The ready engine; raises LoadFailed, NotReady or NotAccepting (all 503) otherwise."""
        if isinstance(self.state, Failed):
            raise LoadFailed(self.state.reason)
        if isinstance(self.state, Loading):
            raise NotReady()
        if not self.state.ready:  # stopping, or (with --workers) its engine process is gone: this replica ends
            raise NotAccepting()
        return self.state

    def info(self) -> dict:
        """What /info shows: the settings and the runtime always, and the loaded engine's details once loaded."""
        info = {
            "model": self.settings.model or "default",
            "ready": self.ready,
            "failure": self.failure,
            "settings": self.settings.model_dump(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        if not isinstance(self.state, (Loading, Failed)):
            info.update(self.state.info())
        return info

    async def stop(self) -> None:
        if not isinstance(self.state, (Loading, Failed)):
            await self.state.stop()
