"""The one drain-rate estimate, as a pure function of what the batcher reports: model and backlog rates, the wait
calibration and the answers' delivery lag."""

import pytest

from service.drain_rate import DrainRate, WaitCalibration


def test_before_any_measurement_there_is_no_rate_and_no_lag():
    rates = DrainRate()
    assert rates.tokens_per_second is None and rates.model.value is None and rates.delivery_lag == 0.0


def test_model_time_is_the_drain_rate_until_a_backlog_is_measured():
    rates = DrainRate()
    rates.model_ran(1000, 1.0)  # the warm-up
    assert rates.tokens_per_second == pytest.approx(1000)
    rates.batch_ended(100, started=0.0, ended=0.2, answered_tokens=100)  # 500 tokens/s, smoothed
    assert rates.model.value == pytest.approx(900)
    assert rates.tokens_per_second == pytest.approx(900)


def test_batches_run_back_to_back_with_texts_queued_behind_measure_the_backlog_rate():
    """The previous batch (100 tokens) started at 0.0; the next, taken at 0.3 while it ran, starts at 0.4."""
    rates = DrainRate()
    rates.model_ran(1000, 1.0)
    rates.batch_ended(100, started=0.0, ended=0.35, answered_tokens=100)
    rates.batch_started(0.4, taken_at=0.3, more_queued=True)
    assert rates.backlog.value == pytest.approx(250)
    assert rates.tokens_per_second == pytest.approx(250)  # wall time, not the model's


def test_a_batch_taken_after_the_previous_ended_or_with_nothing_behind_it_measures_no_backlog():
    rates = DrainRate()
    rates.batch_ended(8, started=0.0, ended=0.03, answered_tokens=8)
    rates.batch_started(0.04, taken_at=0.01, more_queued=False)  # one text waiting for another
    rates.batch_started(0.05, taken_at=0.04, more_queued=True)  # taken once the queue had been idle
    assert rates.backlog.value is None


def test_a_batch_that_answered_nothing_leaves_the_model_rate_alone():
    rates = DrainRate()
    rates.model_ran(1000, 1.0)
    rates.batch_ended(100, started=0.0, ended=5.0, answered_tokens=0)  # every text failed
    assert rates.model.value == pytest.approx(1000)


def test_the_delivery_lag_is_smoothed_from_none():
    rates = DrainRate()
    rates.answers_delivered(2.0)
    assert rates.delivery_lag == pytest.approx(0.4)
    rates.answers_delivered(0.0)
    assert rates.delivery_lag == pytest.approx(0.32)


def test_the_calibration_given_is_the_one_kept():
    calibration = WaitCalibration(min_samples=2)
    assert DrainRate(calibration).calibration is calibration


def test_the_wait_factor_is_a_high_quantile_of_real_over_predicted_waits():
    calibration = WaitCalibration(quantile=0.9, window=100, min_predicted=0.05, min_samples=10)
    for ratio in range(1, 10):  # 9 texts: too few to tell yet
        calibration.record(predicted=1.0, waited=ratio * 0.25)
    assert calibration.update() == 1.0
    calibration.record(predicted=1.0, waited=2.5)
    assert calibration.update() == 2.5  # the 90th percentile of 0.25, 0.5, ... 2.5
    calibration.record(predicted=0.01, waited=5.0)  # a wait too short to have predicted anything: ignored
    assert calibration.update() == 2.5


def test_the_wait_factor_never_falls_below_one_and_forgets_old_waits():
    calibration = WaitCalibration(quantile=0.9, window=20, min_samples=10)
    for _ in range(20):
        calibration.record(predicted=1.0, waited=3.0)
    assert calibration.update() == 3.0
    for _ in range(20):  # the window has moved on: texts now run sooner than predicted
        calibration.record(predicted=1.0, waited=0.5)
    assert calibration.update() == 1.0
