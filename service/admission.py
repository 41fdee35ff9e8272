"""Admission: whether the queue can take a request's texts and answer them before their deadline.

Pure logic (no clock, no torch): the batcher passes in what it knows now. The predicted wait counts all the work
ahead of a request: the queued texts, the rest of the batch running now (it left the queue when it started, but
a new text still waits for it), and the request's own texts, at the measured drain rate. Without the running batch
the prediction ran short by up to one batch, and under 3x overload 3 of 21 admitted 500 ms requests came back late.

The work ahead is not the whole queue for every text, though: under a backlog each batch sweeps its bucket whole,
oldest first text first. A text joining a queued bucket leaves with it, after only the buckets whose first text is
older; a text opening an empty bucket waits for every other, and for the texts that join them after it arrived.
Measured under 3x overload (chaos run, 9,744 texts), real waits were 0.19-2.04x a prediction from the whole queue
(p5-p99, median 0.74), in every length class alike. So a text that joins a queued batch is predicted to end right
after the text it follows there, and a text that opens one waits for the whole queue, scaled by how much longer
than predicted such texts have really waited (`WaitCalibration`, a high quantile). Scaling every prediction instead
halved the queue, and with it the batches: 28-29% fewer answers in the same run, on the same CPU.
"""

import math
from collections import deque
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


class WaitCalibration:
    """How much longer texts that open a batch really wait than their plain prediction: the `quantile` of real /
    predicted wait over the last `window` such texts predicted to wait at least `min_predicted` seconds (shorter
    waits are mostly the batch window and fixed per-batch costs, which a rate in tokens per second does not model:
    in a closed loop of 64 clients, texts predicted 50-120 ms waited 3-4x that). Never below 1, and 1 until
    `min_samples` texts have been seen. A text dropped at its deadline counts with the wait it had reached, a lower
    bound of its real one.
    """

    def __init__(
        self, quantile: float = 0.98, window: int = 512, min_predicted: float = 0.25, min_samples: int = 50
    ) -> None:
        self.quantile, self.min_predicted, self.min_samples = quantile, min_predicted, min_samples
        self._ratios: deque[float] = deque(maxlen=window)
        self.factor = 1.0

    def record(self, predicted: float, waited: float) -> None:
        """One text's predicted wait at admission and its real wait (until its answer, or its drop at the deadline)."""
        if predicted >= self.min_predicted:
            self._ratios.append(waited / predicted)

    def update(self) -> float:
        """Recompute `factor` from the texts recorded so far (once per batch: it sorts the window) and return it."""
        if len(self._ratios) >= self.min_samples:
            ratios = sorted(self._ratios)
            self.factor = max(1.0, ratios[min(len(ratios) - 1, int(self.quantile * len(ratios)))])
        return self.factor


def predicted_ends(
    now: float,
    backlog: Backlog,
    own_tokens: int,
    tokens_ahead: list[int],
    follows: list[float | None],
    tokens_per_second: float | None,
    wait_factor: float,
) -> list[float]:
    """When each text of a request (`own_tokens` in all) is predicted to have its answer.

    A text opening a batch of its own (`follows[i]` None) waits for all of `backlog`, its plain wait scaled by
    `wait_factor`. A text joining a queued batch ends after the text it follows (`follows[i]`: when that one's answer
    is predicted), but not before the `tokens_ahead[i]` that run before it have run: a batch still queued near its
    predicted time is likely one running late (the punctual ones have gone). Everything is now before the rate is
    measured."""
    if not tokens_per_second:
        return [now] * len(follows)
    opening = now + wait_factor * plain_wait(backlog, own_tokens, tokens_per_second)
    return [
        opening
        if after is None
        else max(
            after + own_tokens / tokens_per_second,
            now + plain_wait(Backlog(ahead, backlog.running_tokens, backlog.running_for), own_tokens, tokens_per_second),
        )
        for ahead, after in zip(tokens_ahead, follows)
    ]


def plain_wait(backlog: Backlog, own_tokens: int, tokens_per_second: float | None) -> float:
    """Seconds until `own_tokens` more, queued behind all of `backlog`, are done (what `WaitCalibration` corrects)."""
    return seconds_ahead(
        Backlog(backlog.queued_tokens + own_tokens, backlog.running_tokens, backlog.running_for), tokens_per_second
    )


def refusal(
    backlog: Backlog,
    own_tokens: int,
    time_left: float,
    max_queue_tokens: int,
    tokens_per_second: float | None,
    predicted: float | None = None,
) -> Refusal | None:
    """None when `own_tokens` more can be queued and, answered `predicted` seconds from now (by default their plain
    wait behind all of `backlog`), meet the `time_left`; else why not, with a Retry-After from the plain time the
    work ahead takes."""
    retry_after = max(1.0, math.ceil(seconds_ahead(backlog, tokens_per_second)))
    if backlog.queued_tokens + own_tokens > max_queue_tokens:
        return Refusal("queue_full", "the queue is full", retry_after)
    if predicted is None:
        predicted = plain_wait(backlog, own_tokens, tokens_per_second)
    if predicted > time_left:
        return Refusal(
            "predicted_wait",
            f"the queue would take about {predicted:.1f} s to reach these texts, longer than the "
            f"{time_left:.1f} s left before their deadline",
            retry_after,
        )
    return None
