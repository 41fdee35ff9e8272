"""The one moving average every smoothed measurement uses (drain rates, the answers' delivery lag, the gap between
arrivals): exponential smoothing, so the newest samples count most and old ones fade without a window to keep."""


class MovingAverage:
    """Exponentially weighted: each sample moves `value` `weight` of the way towards itself. It starts at `initial`;
    None means no value until the first sample, which is then taken whole."""

    def __init__(self, weight: float, initial: float | None = None) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"the newest sample's weight must be in (0, 1], not {weight}")
        self.weight = weight
        self.value = initial

    def add(self, sample: float) -> float:
        """Fold `sample` in and return the new value."""
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)
        return self.value
