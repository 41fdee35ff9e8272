"""The one moving average (exponential smoothing) that the drain rates, the delivery lag and the arrival gap use."""

import pytest

from service.moving_average import MovingAverage


def test_without_a_start_the_first_sample_is_taken_whole():
    average = MovingAverage(0.2)
    assert average.value is None
    assert average.add(10.0) == 10.0


def test_each_sample_moves_the_value_its_weight_of_the_way():
    average = MovingAverage(0.2)
    average.add(10.0)
    assert average.add(20.0) == pytest.approx(12.0)
    assert average.add(12.0) == pytest.approx(12.0)
    assert average.value == pytest.approx(12.0)


def test_a_start_value_is_smoothed_from():
    average = MovingAverage(0.2, initial=0.0)
    assert average.add(2.0) == pytest.approx(0.4)


def test_old_samples_fade_geometrically():
    average = MovingAverage(0.5, initial=0.0)
    average.add(8.0)
    for _ in range(3):
        average.add(0.0)
    assert average.value == pytest.approx(0.5)  # 8 x 0.5 x 0.5^3


def test_a_weight_of_one_keeps_only_the_newest_sample():
    average = MovingAverage(1.0, initial=5.0)
    assert average.add(3.0) == 3.0


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5])
def test_a_weight_outside_zero_to_one_is_refused(weight):
    with pytest.raises(ValueError):
        MovingAverage(weight)
