"""Building an engine: the back half (load the model, building the default one first if needed; tune; choose the
batching policy; warm up; start batching), the front from the facts the back half published, and the one choice of
where the back half runs (`make_backend`).

In one process, `load_engine` builds both halves here. With --workers, the engine process builds only the back half
(`build_backend`) and serves it over `service.ipc`; each API process builds its front and reaches the back half
through `RemoteBackend`.
"""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from service import metrics
from service.default_model import ensure_default_model, read_build_report
from service.engine import Backend, Engine, EngineFacts, Front
from service.ipc import connect_backend
from service.live_tuning import Arm, LiveTuner, LiveTuning
from service.measuring import Tuner, TuningReport, calibration_texts
from service.postprocess import score_differences
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
from service.tokenization import EncoderPool, TextEncoder, model_max_length
from service.tuning import (
    BudgetTrial,
    Choice,
    PrecisionTrial,
    budget_ladder,
    live_budgets,
    live_precisions,
    precision_candidates,
)

log = logging.getLogger(__name__)

# Token budgets per batch when tuning is off. On the 2-core AMX Xeon this project first ran on, MiniLM-L6 on
# length-sorted batches peaked near 1-2k tokens (287 texts/s at 1024, 304 at 2048, 242 at 8192: bigger attention
# tensors stop fitting in cache); a GPU wants far more work per launch.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}
# Precision candidates are timed at this budget (or the forced one): near the CPU's best, and small enough for
# any GPU at the model's maximum length.
PRECISION_TRIAL_BUDGET = 2048
# Shares of the tuning time limit: the paired precision rounds end by the first, the budget ladder stops climbing at
# the second, and no trial starts that would end after the third (the rest is margin for the last trial's overrun);
# scoring the calibration set in each precision may take until the third (it decides what may be chosen at all).
PRECISION_SHARE, CLIMB_SHARE, LAST_TRIAL_SHARE = 0.6, 0.75, 0.9


async def load_engine(settings: Settings, engine_address: str | None = None) -> Engine:
    """A complete engine for the settings: its back half built here, or, given the engine process's `ipc://`
    address, reached there (`make_backend`), and its front built from the back half's facts. Raises when it cannot."""
    backend, facts = await make_backend(settings, engine_address)
    try:
        front = await build_front(settings, facts)
    except BaseException:
        await backend.stop()
        raise
    batching = backend.info()
    metrics.MODEL_INFO.info({"model": facts.model_id, "device": facts.device, "precision": facts.precision})
    metrics.BATCHING_INFO.info({"padding": batching["padding"], "batching": batching["batching"]})
    return Engine(front, backend, facts)


async def make_backend(settings: Settings, engine_address: str | None) -> tuple[Backend, EngineFacts]:
    """The back half and its facts: built in this process (`Scorer`), or with an engine process's address, that
    process's (`RemoteBackend`, once it has loaded)."""
    if engine_address is None:
        return await build_backend(settings)
    return await connect_backend(engine_address)


async def build_front(settings: Settings, facts: EngineFacts) -> Front:
    """The front half for the back half's model: its own tokenizers (from the model's path) and labels."""
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, facts.model_path, use_fast=True)
    return Front(EncoderPool(tokenizer, facts.max_length, settings.tokenizer_workers), facts.labels, facts.problem_type)


async def build_backend(settings: Settings) -> tuple[Scorer, EngineFacts]:
    """Load the model (building the default one first if needed), tune, warm up and start batching; raises when it
    cannot."""
    # Every torch call (load, warm-up, batches) runs on this one thread. Each thread that runs torch ops gets
    # its own OpenMP team; with more team threads than cores, libgomp stops spin-waiting between parallel
    # regions, and the model ran 30% slower at saturation with 0.4 of 2 cores idle.
    inference_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    try:
        prepared = await asyncio.get_running_loop().run_in_executor(inference_thread, _prepare, settings)
        scoring = BatchModelAdapter(prepared.runner, prepared.live_runners)
        live = None
        if prepared.live_tuner is not None:
            problem_type = prepared.facts.problem_type
            live = LiveTuning(prepared.live_tuner, scoring.use_precision, lambda answered, shadow: score_differences(answered, shadow, problem_type))
        scorer = await Scorer.start(
            scoring,
            prepared.policy,
            settings.max_queue_tokens,
            inference_thread,
            live,
            settings.fair_share_headroom,
            settings.shared_batch_ms / 1000,
        )
    except BaseException:
        inference_thread.shutdown(wait=False)
        raise
    facts = prepared.facts
    log.info(
        "ready: %s on %s (%s, max_batch_tokens %d, %s)",
        facts.model_id,
        facts.device,
        facts.precision,
        prepared.policy.max_batch_tokens,
        "traced" if facts.traced else "run operator by operator",
    )
    return scorer, facts


def load_failure_reason(error: Exception) -> str:
    """Why the model could not be loaded, in one line an operator can act on; logged (the traceback only at debug
    level: it only helps when debugging)."""
    reason = f"{type(error).__name__}: {error}"
    log.error("the model could not be loaded: %s", reason)
    log.debug("model loading failed", exc_info=error)
    return reason


@dataclass(frozen=True)
class _Prepared:
    """What the inference thread prepared for batching: the runner, the policy, the facts, and for live tuning, its
    decisions and the runners of the other precisions it may try."""

    runner: ModelRunner
    policy: BatchingPolicy
    facts: EngineFacts
    live_tuner: LiveTuner | None
    live_runners: dict[str, ModelRunner]


def _prepare(settings: Settings) -> _Prepared:
    """The steps before batching starts, on the inference thread: each takes what the previous produced."""
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
    # Tensor cores want sequence lengths in multiples of 8; the CPU gains nothing from extra padding.
    pad_multiple = 8 if device.type == "cuda" else 1
    longest = padded_length(max_length, pad_multiple)  # what one text can take
    tuning, tuner, live_tuner = None, None, None
    if settings.tune and "auto" in (settings.precision, settings.max_batch_tokens):
        tuning, tuner = _tune(settings, loaded, device, max_length, longest)
        log.info(tuning.summary())
        if note := tuning.disturbance_note():
            log.warning(note)
        precision, max_batch_tokens = str(tuning.precision.value), int(tuning.max_batch_tokens.value)
        metrics.TUNING_SECONDS.set(tuning.seconds)
        live_tuner = LiveTuner(
            Arm(precision, max_batch_tokens),
            tuning.live_precisions,
            tuning.live_budgets,
            time.monotonic(),
            unchecked=tuning.unchecked_precisions,
            tolerance=settings.precision_tolerance,
        )
    else:
        precision = resolve_precision(settings.precision, device)
        forced = settings.max_batch_tokens
        max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS.get(device.type, 2048) if forced == "auto" else int(forced)
    policy = _batching_policy(settings, max_length, pad_multiple, max_batch_tokens)
    pad_token_id = loaded.tokenizer.pad_token_id or 0
    trace = traces(settings, device)
    # The tuner's runners are built already.
    runner = tuner.runner(precision) if tuner is not None else ModelRunner(loaded.model, device, precision, pad_token_id, trace)
    if live_tuner is None or not live_tuner.exploring:
        live_tuner, live_runners = None, {}
    else:
        assert tuner is not None, "live tuning follows start-up tuning"
        live_runners = {other: tuner.runner(other) for other in [*live_tuner.precisions, *live_tuner.unchecked] if other != precision}
    metrics.MAX_BATCH_TOKENS.set(max_batch_tokens)
    off_reason = "CLASSIFIER_TUNE=false" if not settings.tune else "precision and budget both forced"
    facts = EngineFacts(
        model_id=settings.model or "default",
        model_path=model_path,
        labels=loaded.labels,
        problem_type=loaded.problem_type,
        max_length=max_length,
        device=str(device),
        precision=precision,
        traced=runner.traced,
        tuning=tuning.as_dict() if tuning else {"enabled": False, "reason": off_reason},
        default_model_build=build_report,
    )
    return _Prepared(runner, policy, facts, live_tuner, live_runners)


def traces(settings: Settings, device: torch.device) -> bool:
    """Whether the model runs as a TorchScript trace: on a CPU unless turned off. On CUDA a trace has not been measured
    yet (TorchScript's fusers and shape specialisation there could cost more than the interpreter lock it saves)."""
    return settings.trace_model and device.type == "cpu"


def _names_a_directory(model: str) -> bool:
    """A path, not a hub id: hub ids are `name` or `org/name`, never absolute, dotted-relative or deeper."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def _batching_policy(settings: Settings, max_length: int, pad_multiple: int, max_batch_tokens: int) -> BatchingPolicy:
    """The policy for this model; its own checks refuse a budget that cannot hold one longest text."""
    bounds = tuple(settings.bucket_bounds or default_bucket_bounds(max_length, pad_multiple))
    if bounds[-1] < max_length:
        bounds = (*bounds, max_length)
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


def _tune(settings: Settings, loaded: LoadedModel, device: torch.device, max_length: int, longest: int) -> tuple[TuningReport, Tuner]:
    """Measure what is `auto` (precision, budget) on this model and device, within the time limit however busy the
    machine; keep what was forced. The tuner holds the runners it built, one per precision."""
    started = time.perf_counter()
    limit = settings.tuning_time_limit
    calibration = [text.ids for text in TextEncoder(loaded.tokenizer, max_length).encode(calibration_texts(), True)]
    tuner = Tuner(
        loaded.model,
        device,
        loaded.tokenizer.pad_token_id or 0,
        loaded.problem_type,
        calibration,
        settings.max_batch_size,
        floor=longest,
        deadline=started + LAST_TRIAL_SHARE * limit,
        make_runner=lambda precision: ModelRunner(loaded.model, device, precision, loaded.tokenizer.pad_token_id or 0, traces(settings, device)),
    )
    precision_trials: list[PrecisionTrial] = []
    budget_trials: list[BudgetTrial] = []
    if settings.precision == "auto":
        candidates = precision_candidates(
            device.type,
            cpu_native_bf16=device.type == "cpu" and cpu_has_native_bf16(),
            cuda_bf16=cuda_supports_bf16(device),
            regression=loaded.problem_type == "regression",
        )
        forced_budget = settings.max_batch_tokens
        trial_budget = max(longest, PRECISION_TRIAL_BUDGET) if forced_budget == "auto" else int(forced_budget)
        precision, precision_trials = tuner.precision(candidates, settings.precision_tolerance, trial_budget, until=started + PRECISION_SHARE * limit)
    else:
        precision = Choice(resolve_precision(settings.precision, device), "forced by CLASSIFIER_PRECISION")
    if settings.max_batch_tokens == "auto":
        budget, budget_trials = tuner.budget(
            str(precision.value),
            climb_until=started + CLIMB_SHARE * limit,
            until=started + LAST_TRIAL_SHARE * limit,
            fallback=max(longest, DEFAULT_MAX_BATCH_TOKENS.get(device.type, 2048)),
        )
    else:
        budget = Choice(settings.max_batch_tokens, "forced by CLASSIFIER_MAX_BATCH_TOKENS")
    disturbed = tuner.disturbed()
    chosen_precision, chosen_budget = str(precision.value), int(budget.value)
    report = TuningReport(
        precision,
        budget,
        precision_trials,
        budget_trials,
        len(calibration),
        time.perf_counter() - started,
        disturbed=disturbed,
        # Forced settings are not tuned live.
        live_precisions=live_precisions(precision_trials, chosen_precision, settings.precision_tolerance, bool(disturbed))
        if settings.precision == "auto"
        else [chosen_precision],
        live_budgets=live_budgets(budget_trials, chosen_budget, bool(disturbed), budget_ladder(longest, device.type))
        if settings.max_batch_tokens == "auto"
        else [chosen_budget],
        unchecked_precisions=tuner.unchecked,
    )
    return report, tuner
