"""Admission: whether the queue can take a request's texts and answer them before their deadline.

Pure logic (no clock, no torch): the batcher passes in what it knows now, and the drain rate it measured
(`drain_rate.DrainRate`). The predicted wait counts all the work
ahead of a request: the queued texts, the rest of the batch running now (it left the queue when it started, but
a new text still waits for it), and the request's own texts, at the measured drain rate. Without the running batch
the prediction ran short by up to one batch, and under 3x overload 3 of 21 admitted 500 ms requests came back late.

The work ahead is not the whole queue for every text, though: under a backlog each batch sweeps its bucket whole,
oldest first text first. A text joining a queued bucket leaves with it, after only the buckets whose first text is
older; a text opening an empty bucket waits for every other, and for the texts that join them after it arrived.
Measured under 3x overload (chaos run, 9,744 texts), real waits were 0.19-2.04x a prediction from the whole queue
(p5-p99, median 0.74), in every length class alike. So a text that joins a queued batch is predicted to end right
after the text it follows there, and a text that opens one waits for the whole queue, scaled by how much longer
than predicted such texts have really waited (`drain_rate.WaitCalibration`, a high quantile). Scaling every
prediction instead halved the queue, and with it the batches: 28-29% fewer answers in the same run, on the same CPU.

Between callers the queue is shared fairly (`fairness`): the backlog ahead of a caller's text is its own queued
tokens and, of every other caller's, only as many as it runs of its own by then (`BatchQueue.tokens_ahead_of`); and
when the queue is full, a caller over its fair share of it is refused ("fair_share"), while callers under theirs may
still use the headroom beyond the limit.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

from service.drain_rate import DrainRate
from service.fairness import Usage, exceeded, fair_share


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why texts are refused (`queue_full`, `fair_share` or `predicted_wait`), what to tell the client, and when to
    retry."""

    reason: str
    message: str
    retry_after: float


class Admitted(NamedTuple):
    """An admitted text: when its answer is predicted and, if it opens a batch of its own, its plain predicted wait
    (None when it joins a queued batch), which calibrates later predictions once its real wait is known. (A
    NamedTuple, as are the other values made for each text admitted: a frozen dataclass costs three times as much
    to make.)"""

    answer_at: float
    opening_wait: float | None


class Backlog(NamedTuple):
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
    return seconds_ahead(Backlog(backlog.queued_tokens + own_tokens, backlog.running_tokens, backlog.running_for), tokens_per_second)


def refusal(
    backlog: Backlog,
    own_tokens: int,
    time_left: float,
    max_queue_tokens: int,
    tokens_per_second: float | None,
    predicted: float | None = None,
    usage: Usage | None = None,
    headroom: float = 0.0,
) -> Refusal | None:
    """None when `own_tokens` more can be queued and, answered `predicted` seconds from now (by default their plain
    wait behind all of `backlog`), meet the `time_left`; else why not, with a Retry-After from the plain time the
    work ahead takes. The queue's `usage` (None: one caller, whose backlog is the whole queue) decides, with
    `headroom`, whether it is full for this caller (`fairness.exceeded`)."""
    retry_after = max(1.0, math.ceil(seconds_ahead(backlog, tokens_per_second)))
    if usage is None:
        usage = Usage(backlog.queued_tokens, backlog.queued_tokens, 1)
    limit = exceeded(usage, own_tokens, max_queue_tokens, headroom)
    if limit == "fair_share":
        share = fair_share(max_queue_tokens, usage.active_callers)
        return Refusal(
            "fair_share",
            f"the queue is full and this caller holds more than its fair share of it: {usage.caller + own_tokens:,} "
            f"tokens with these texts, its share {share:,.0f} of {max_queue_tokens:,} ({usage.active_callers} callers "
            "waiting); the others' texts go first",
            retry_after,
        )
    if limit == "full":
        return Refusal("queue_full", "the queue is full", retry_after)
    if predicted is None:
        predicted = plain_wait(backlog, own_tokens, tokens_per_second)
    if predicted > time_left:
        return Refusal(
            "predicted_wait",
            f"the queue would take about {predicted:.1f} s to reach these texts, longer than the {time_left:.1f} s left before their deadline",
            retry_after,
        )
    return None


def admit(
    now: float,
    backlog: Backlog,
    own_tokens: int,
    tokens_ahead: list[int],
    follows: list[float | None],
    time_left: float,
    max_queue_tokens: int,
    rates: DrainRate,
    usage: Usage | None = None,
    headroom: float = 0.0,
) -> list[Admitted] | Refusal:
    """Admit a request's texts (`own_tokens` in all; per text, the tokens that run before it and when the text it
    follows is predicted, as in `predicted_ends`) or refuse them at once rather than let them time out later: when
    the queue is full for their caller (its `usage` of the queue and the `headroom`, as in `refusal`), or their
    predicted answer, plus the time answers take to reach the event loop, comes after the `time_left`."""
    rate = rates.tokens_per_second
    ends = predicted_ends(now, backlog, own_tokens, tokens_ahead, follows, rate, rates.calibration.factor)
    refused = refusal(backlog, own_tokens, time_left - rates.delivery_lag, max_queue_tokens, rate, max(ends) - now, usage, headroom)
    if refused is not None:
        return refused
    opening_wait = plain_wait(backlog, own_tokens, rate)
    return [Admitted(end, opening_wait if after is None else None) for end, after in zip(ends, follows)]
