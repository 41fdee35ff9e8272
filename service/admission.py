"""Admission: whether the queue can take a request's texts and answer them before their deadline.

Pure logic (no clock, no torch): the batcher passes in what it knows now. The predicted wait counts all the work
ahead of a request: the queued texts, the rest of the batch running now (it left the queue when it started, but
a new text still waits for it), and the request's own texts, at the measured drain rate. Without the running batch
the prediction ran short by up to one batch, and under 3x overload 3 of 21 admitted 500 ms requests came back late.
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why texts are refused (`queue_full` or `predicted_wait`), what to tell the client, and when to retry."""

    reason: str
    message: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class Backlog:
    """The work ahead of a new request: queued tokens, and the batch running now (its real tokens and how long it
    has been running, 0 tokens when none runs)."""

    queued_tokens: int
    running_tokens: int = 0
    running_for: float = 0.0


def seconds_ahead(backlog: Backlog, tokens_per_second: float | None) -> float:
    """Seconds until the queue and the running batch are done, at `tokens_per_second` (0 before any measurement).

    The running batch is expected to take its tokens' share of the rate; what it has run already is subtracted
    (never below zero: a batch running late is expected to end any moment).
    """
    if not tokens_per_second:
        return 0.0
    running_left = max(0.0, backlog.running_tokens / tokens_per_second - backlog.running_for)
    return running_left + backlog.queued_tokens / tokens_per_second


def refusal(
    backlog: Backlog, own_tokens: int, time_left: float, max_queue_tokens: int, tokens_per_second: float | None
) -> Refusal | None:
    """None when `own_tokens` more can be queued and answered within `time_left` seconds; else why not."""
    retry_after = max(1.0, math.ceil(seconds_ahead(backlog, tokens_per_second)))
    if backlog.queued_tokens + own_tokens > max_queue_tokens:
        return Refusal("queue_full", "the queue is full", retry_after)
    predicted = seconds_ahead(
        Backlog(backlog.queued_tokens + own_tokens, backlog.running_tokens, backlog.running_for), tokens_per_second
    )
    if predicted > time_left:
        return Refusal(
            "predicted_wait",
            f"the queue would take about {predicted:.1f} s to reach these texts, longer than the "
            f"{time_left:.1f} s left before their deadline",
            retry_after,
        )
    return None
