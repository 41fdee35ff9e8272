"""How fast the queue drains: the one estimate that admission, Retry-After, the queue-drain gauge and the deadline
check at a batch's start all read.

Pure (no clock, no torch): the batcher reports what happened, with its times, and reads the estimate under its lock.
Its parts measure different things, so each keeps its own name:

- `model`: real tokens per second of the model's own time per batch, seeded by the warm-up. It says how long a
  batch about to start will run, and it is the drain rate until a backlog has been measured.
- `backlog`: real tokens per second of wall time while batches run back to back: what the model, the tokenizers,
  HTTP and the rest of the process sharing the CPU together really drain. Once measured it is the drain rate (model
  time alone promised 5 s waits that took 6 under 3x overload).
- `calibration`: how much longer than their plain prediction texts that open a batch really wait (admission scales
  their prediction by it).
- `delivery_lag`: seconds from a batch's end until its answers reach the event loop: under overload the loop lags
  behind arrivals, and an answer that reaches it after the deadline is a late answer.
"""

from collections import deque
from dataclasses import dataclass

from service.moving_average import MovingAverage

SMOOTHING = 0.2  # weight of the newest batch in the rates and the delivery lag


@dataclass(frozen=True, slots=True)
class RanBatch:
    """A batch that ran: its real tokens, and when it started and ended."""

    real_tokens: int
    started: float
    ended: float


class WaitCalibration:
    """How much longer texts that open a batch really wait than their plain prediction: the `quantile` of real /
    predicted wait over the last `window` such texts predicted to wait at least `min_predicted` seconds (shorter
    waits are mostly the batch window and fixed per-batch costs, which a rate in tokens per second does not model:
    in a closed loop of 64 clients, texts predicted 50-120 ms waited 3-4x that). Never below 1, and 1 until
    `min_samples` texts have been seen. A text dropped at its deadline counts with the wait it had reached, a lower
    bound of its real one.
    """

    def __init__(self, quantile: float = 0.98, window: int = 512, min_predicted: float = 0.25, min_samples: int = 50) -> None:
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


def _rate(tokens: int, seconds: float) -> float:
    return tokens / max(seconds, 1e-6)


class DrainRate:
    """The queue's measured drain rate and what corrects predictions made from it (see the module's description)."""

    def __init__(self, calibration: WaitCalibration | None = None) -> None:
        self.model = MovingAverage(SMOOTHING)
        self.backlog = MovingAverage(SMOOTHING)
        self.calibration = calibration or WaitCalibration()
        self._delivery_lag = MovingAverage(SMOOTHING, initial=0.0)
        self._previous: RanBatch | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """The rate the queue drains at: measured back to back once it has been, else model time (None before any
        measurement)."""
        return self.backlog.value or self.model.value

    @property
    def delivery_lag(self) -> float:
        """Seconds, smoothed, from a batch's end until its answers reached the event loop."""
        return self._delivery_lag.value or 0.0

    def model_ran(self, tokens: int, seconds: float) -> None:
        """The model answered `tokens` real tokens in `seconds` of its own time (a batch, or the warm-up)."""
        self.model.add(_rate(tokens, seconds))

    def batch_started(self, started: float, taken_at: float, more_queued: bool) -> None:
        """A batch taken from the queue at `taken_at` starts at `started`, with texts still queued behind it or not.

        Taken before the previous batch ended, with texts still queued behind it, it means the queue was backlogged
        all along: the previous batch's tokens over the wall time from its start to this one's is the rate the queue
        drains at. Without texts left behind it is one text waiting for another, whose rate says nothing of a
        backlog's (an 8-token batch followed by a 512-token one measured 300 tokens/s, a twentieth of the rate, and
        a lone text was then refused as if 10 s of work were queued)."""
        previous = self._previous
        if previous is not None and more_queued and taken_at <= previous.ended:
            self.backlog.add(_rate(previous.real_tokens, started - previous.started))

    def batch_ended(self, real_tokens: int, started: float, ended: float, answered_tokens: int) -> None:
        """A batch of `real_tokens` ran from `started` to `ended` and answered `answered_tokens` of them (the rest
        failed)."""
        self._previous = RanBatch(real_tokens, started, ended)
        if answered_tokens:
            self.model_ran(answered_tokens, ended - started)

    def answers_delivered(self, lag: float) -> None:
        """A batch's answers reached the event loop `lag` seconds after it ended."""
        self._delivery_lag.add(lag)
