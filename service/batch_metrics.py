"""What the batcher reports to Prometheus about each batch and the queue (`metrics` defines the metrics)."""

from service import metrics
from service.scheduler import Batch, QueuedText


def observe_start(batch: Batch, started: float) -> None:
    """A batch starts running at `started`: its texts' queue waits, its shape and its padding."""
    for item in batch.items:
        metrics.QUEUE_WAIT.observe(started - item.arrived_at)
        metrics.TEXT_QUEUE_WAIT.labels(metrics.length_class(item.tokens)).observe(started - item.arrived_at)
    metrics.BATCH_FLUSHES.labels(batch.reason).inc()
    metrics.BATCH_SIZE.observe(len(batch.items))
    metrics.BATCH_PADDED_LENGTH.observe(batch.padded_length)
    metrics.REAL_TOKENS.inc(batch.real_tokens)
    metrics.PADDED_TOKENS.inc(batch.padded_tokens)
    metrics.BATCH_PADDING_EFFICIENCY.observe(batch.padding_efficiency)


def observe_end(items: list[QueuedText], started: float, ended: float) -> None:
    """A batch of `items` ran from `started` to `ended`: its inference time and its texts' latencies."""
    metrics.BATCH_INFERENCE.observe(ended - started)
    for item in items:
        metrics.TEXT_LATENCY.labels(metrics.length_class(item.tokens)).observe(ended - item.arrived_at)


def publish_queue(texts: int, tokens: int, drain_seconds: float) -> None:
    """The queue now: its texts, its tokens, and the seconds it takes to drain at the measured rate."""
    metrics.QUEUE_TEXTS.set(texts)
    metrics.QUEUE_TOKENS.set(tokens)
    metrics.QUEUE_DRAIN.set(drain_seconds)
