"""What the batcher reports to Prometheus about each batch and the queue (`metrics` defines the metrics)."""

import bisect
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import Histogram

from service import metrics
from service.scheduler import Batch, QueuedText


def observe_start(batch: Batch, started: float) -> None:
    """A batch starts running at `started`: its texts' queue waits, its shape and its padding."""
    observe_each(metrics.QUEUE_WAIT, [started - item.arrived_at for item in batch.items])
    for length, items in _by_length_class(batch.items).items():
        observe_each(metrics.TEXT_QUEUE_WAIT.labels(length), [started - item.arrived_at for item in items])
    metrics.BATCH_FLUSHES.labels(batch.reason).inc()
    metrics.BATCH_SIZE.observe(len(batch.items))
    metrics.BATCH_PADDED_LENGTH.observe(batch.padded_length)
    metrics.REAL_TOKENS.inc(batch.real_tokens)
    metrics.PADDED_TOKENS.inc(batch.padded_tokens)
    metrics.BATCH_PADDING_EFFICIENCY.observe(batch.padding_efficiency)


def observe_end(items: list[QueuedText], started: float, ended: float) -> None:
    """A batch of `items` ran from `started` to `ended`: its inference time and its texts' latencies."""
    metrics.BATCH_INFERENCE.observe(ended - started)
    for length, texts in _by_length_class(items).items():
        observe_each(metrics.TEXT_LATENCY.labels(length), [ended - item.arrived_at for item in texts])


def publish_queue(texts: int, tokens: int, drain_seconds: float) -> None:
    """The queue now: its texts, its tokens, and the seconds it takes to drain at the measured rate."""
    metrics.QUEUE_TEXTS.set(texts)
    metrics.QUEUE_TOKENS.set(tokens)
    metrics.QUEUE_DRAIN.set(drain_seconds)


def observe_each(histogram: Histogram, amounts: Iterable[float]) -> None:
    """`histogram.observe(amount)` for each amount, with one write to its sum and one to each bucket hit.

    prometheus_client has no call for many observations, and under --workers each write is a locked write to a
    shared file: a batch's texts observed one by one cost the inference thread a tenth of a small model's batch.
    This does what `Histogram.observe` does (its sum, and the first bucket whose bound holds the amount), so it reads
    its (private, long-stable) `_upper_bounds`, `_sum` and `_buckets`; tests/test_batcher.py compares the two."""
    histogram._raise_if_not_observable()
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for amount in amounts:
        total += amount
        counts[bisect.bisect_left(bounds, amount)] += 1  # the first bound >= amount; the last is +Inf
    if not any(counts):
        return
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts):
        if count:
            bucket.inc(count)


def _by_length_class(items: list[QueuedText]) -> dict[str, list[QueuedText]]:
    groups: dict[str, list[QueuedText]] = defaultdict(list)
    for item in items:
        groups[metrics.length_class(item.tokens)].append(item)
    return groups
