"""Every Prometheus metric the service exports, declared in one place.

Names follow Prometheus conventions: one `classifier_` prefix, base units (`_seconds`), `_total` on
counters. Padding is exported as two counters (real and padded tokens) so PromQL can compute the
padding efficiency over any window, plus a per-batch histogram for its distribution.

With several processes (`--workers`), each writes its samples under PROMETHEUS_MULTIPROC_DIR and /metrics serves
their sum: counters and histograms add up; each gauge says how processes combine (`multiprocess_mode`, ignored in
one process): requests in flight add up, the engine process's gauges are its own (the largest of live processes,
since the API processes never set them).
"""

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

# `_created` series only double what Prometheus already knows from counter resets.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 384, 512, 1024, 2048, 4096, 8192)

REQUESTS = Counter(
    "classifier_requests_total",
    "HTTP requests handled, by route and status code (499: the client left before its response started).",
    ["route", "status"],
)
REQUESTS_IN_FLIGHT = Gauge(
    "classifier_requests_in_flight",
    "Requests being handled now (counted against max_concurrent_requests).",
    multiprocess_mode="livesum",
)
CLIENT_TIMEOUTS = Counter(
    "classifier_client_timeouts_total",
    "Requests closed with 408 because the client was too slow to send them, by phase (headers, body).",
    ["phase"],
)
REQUEST_DURATION = Histogram(
    "classifier_request_duration_seconds",
    "Time from receiving a request to sending its response, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "classifier_queue_wait_seconds",
    "Time each text waited in the queue before its batch started.",
    buckets=LATENCY_BUCKETS,
)
ANSWER_DELIVERY = Histogram(
    "classifier_answer_delivery_seconds",
    "Time from a batch's end to its answers reaching the event loop: the loop's lag, which deadlines allow for.",
    buckets=LATENCY_BUCKETS,
)
BATCH_INFERENCE = Histogram(
    "classifier_batch_inference_seconds",
    "Time the model took to run one batch (forward pass and activation).",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("classifier_batch_size", "Texts per batch.", buckets=BATCH_SIZE_BUCKETS)
BATCH_PADDING_EFFICIENCY = Histogram(
    "classifier_batch_padding_efficiency",
    "Real tokens divided by padded tokens, per batch.",
    buckets=RATIO_BUCKETS,
)
REAL_TOKENS = Counter("classifier_real_tokens_total", "Tokens of real text sent to the model.")
PADDED_TOKENS = Counter("classifier_padded_tokens_total", "Tokens the model computed, padding included (batch size x padded length).")
CLASSIFIED_TEXTS = Counter("classifier_classified_texts_total", "Texts classified and answered.")
BATCH_FLUSHES = Counter(
    "classifier_batch_flushes_total",
    "Batches started, by why they were flushed (budget, size, window).",
    ["reason"],
)
QUEUE_TEXTS = Gauge("classifier_queue_texts", "Texts waiting in the queue.", multiprocess_mode="livemax")
QUEUE_TOKENS = Gauge("classifier_queue_tokens", "Tokens of the texts waiting in the queue.", multiprocess_mode="livemax")
QUEUE_DRAIN = Gauge(
    "classifier_queue_drain_seconds",
    "Estimated time to clear the current queue at the token throughput measured while batches ran back to back.",
    multiprocess_mode="livemax",
)
INPUT_TOKENS = Histogram("classifier_input_tokens", "Tokens per text after truncation, special tokens included.", buckets=TOKEN_BUCKETS)
TRUNCATED_TEXTS = Counter("classifier_truncated_texts_total", "Texts cut to the model's maximum length.")
REJECTED_TEXTS = Counter(
    "classifier_rejected_texts_total",
    "Texts refused at admission, by reason (queue_full; fair_share: the queue is full and their caller holds more than "
    "its share; predicted_wait: the queue would not reach them in time).",
    ["reason"],
)
CANCELLED_TEXTS = Counter(
    "classifier_cancelled_texts_total",
    "Queued texts dropped before the model ran them, by reason (client_gone; deadline: passed, or would pass before their batch ended).",
    ["reason"],
)
LATE_ANSWERS = Counter(
    "classifier_late_answers_total",
    "Requests whose scores were ready only after their deadline (their texts were already running): missed SLOs.",
)
ADMISSION_WAIT_FACTOR = Gauge(
    "classifier_admission_wait_factor",
    "How much longer texts that opened a batch really waited than the whole queue's plain prediction (a high "
    "quantile over recent ones, at least 1): admission scales such predictions by it.",
    multiprocess_mode="livemax",
)
UNANSWERED_TOKENS = Counter(
    "classifier_unanswered_tokens_total",
    "Real tokens the model ran for texts whose caller had left or given up by the time their batch finished.",
)
# Fair share between callers: by caller class (key, client_id, peer, none; `callers.CALLER_CLASSES`), never by caller,
# so the series stay few whatever the traffic.
FAIR_SHARE_REFUSALS = Counter(
    "classifier_fair_share_refusals_total",
    "Requests refused because their caller held more than its fair share of a full limit, by resource (queue: queued "
    "tokens; slots: requests in flight) and caller class.",
    ["resource", "caller"],
)
EARLY_RETRY_REFUSALS = Counter(
    "classifier_early_retry_refusals_total",
    "Requests refused before their texts were tokenized because their caller came back before the Retry-After (2 s or "
    "more) the queue had told it, or had more waiting to be tokenized when told, by caller class.",
    ["caller"],
)
ADMITTED_TEXTS = Counter("classifier_admitted_texts_total", "Texts admitted to the queue, by caller class.", ["caller"])
ACTIVE_CALLERS = Gauge("classifier_active_callers", "Callers with texts in the queue now, sharing it fairly.", multiprocess_mode="livemax")
MODEL_INFO = Info("classifier_model", "The served model, its device and precision.")
BATCHING_INFO = Info("classifier_batching", "How batches are formed: padding (dynamic, fixed) and batching (buckets, arrival).")

# Latency by text length. The label is a length class from a small fixed set (powers of two, model-independent), so
# its cardinality never grows with traffic: 7 series per histogram.
LENGTH_CLASS_BOUNDS = (16, 32, 64, 128, 256, 512)
LENGTH_CLASSES = (*(f"<={bound}" for bound in LENGTH_CLASS_BOUNDS), f">{LENGTH_CLASS_BOUNDS[-1]}")


def length_class(tokens: int) -> str:
    """The `length` label of a text of `tokens` tokens: `<=16`, `<=32`, ... `<=512`, or `>512`."""
    for bound, name in zip(LENGTH_CLASS_BOUNDS, LENGTH_CLASSES):
        if tokens <= bound:
            return name
    return LENGTH_CLASSES[-1]


TEXT_QUEUE_WAIT = Histogram(
    "classifier_text_queue_wait_seconds",
    "Time each text waited in the queue before its batch started, by length class (tokens, special ones included).",
    ["length"],
    buckets=LATENCY_BUCKETS,
)
TEXT_LATENCY = Histogram(
    "classifier_text_latency_seconds",
    "Time from a text's queueing to its scores (queue wait and its batch's inference), by length class.",
    ["length"],
    buckets=LATENCY_BUCKETS,
)
BATCH_PADDED_LENGTH = Histogram(
    "classifier_batch_padded_length",
    "Length in tokens every text of a batch is padded to, per batch.",
    buckets=TOKEN_BUCKETS,
)

# Start-up tuning and run-time out-of-memory handling.
MAX_BATCH_TOKENS = Gauge(
    "classifier_max_batch_tokens",
    "Token budget per batch chosen at start-up (measured, forced, or the default).",
    multiprocess_mode="livemax",
)
EFFECTIVE_MAX_BATCH_TOKENS = Gauge(
    "classifier_effective_max_batch_tokens",
    "Token budget per batch in force now: below the chosen one for a while after an out-of-memory.",
    multiprocess_mode="livemax",
)
TUNING_SECONDS = Gauge("classifier_tuning_seconds", "Time start-up tuning took to measure precision and budget.", multiprocess_mode="livemax")
TUNING_SWITCHES = Counter(
    "classifier_tuning_switches_total",
    "Settings live tuning changed while serving, by what (precision, budget).",
    ["what"],
)
LIVE_TOKENS_PER_SECOND = Gauge(
    "classifier_live_tokens_per_second",
    "Real tokens/s of live batches per setting live tuning compares (smoothed), by precision and budget.",
    ["precision", "budget"],
    multiprocess_mode="livemax",
)
BATCH_SPLITS = Counter(
    "classifier_batch_splits_total",
    "Failed batches split in halves and retried, by why they failed (out_of_memory, error).",
    ["reason"],
)


def _exposition_registry() -> CollectorRegistry:
    """What /metrics serves: this process's metrics, or with PROMETHEUS_MULTIPROC_DIR set, every process's summed
    plus this process's model and batching info (an Info cannot be shared through the multiprocess files: each API
    process sets them from the facts the engine process published)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(MODEL_INFO)
    registry.register(BATCHING_INFO)
    return registry


EXPOSITION_REGISTRY = _exposition_registry()
