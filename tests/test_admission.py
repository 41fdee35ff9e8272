"""Admission by predicted wait, as a pure function of the backlog, the request and the measured drain rate."""

import asyncio
import math
import threading

import pytest

from service.admission import Admitted, Backlog, Refusal, admit, plain_wait, predicted_ends, refusal, seconds_ahead
from service.drain_rate import DrainRate, WaitCalibration
from service.errors import Overloaded
from service.scheduler import BatchingPolicy
from tests.test_batcher import run, texts

RATE = 1000.0  # tokens per second


def test_the_batch_running_now_counts_for_what_it_has_left():
    # 300 queued tokens: 0.3 s; a 200-token batch started 0.05 s ago has 0.15 s left.
    assert seconds_ahead(Backlog(300, 200, 0.05), RATE) == pytest.approx(0.45)
    assert seconds_ahead(Backlog(300), RATE) == pytest.approx(0.3)


def test_a_batch_running_past_its_estimate_is_expected_to_end_now():
    assert seconds_ahead(Backlog(300, 200, 5.0), RATE) == pytest.approx(0.3)


def test_nothing_is_predicted_before_the_drain_rate_is_measured():
    assert seconds_ahead(Backlog(10_000, 500, 0.0), None) == 0.0
    assert refusal(Backlog(10_000, 500), 100, 0.001, 1_000_000, None) is None


def test_a_request_that_only_the_running_batch_makes_late_is_refused():
    """0.2 s queued + 0.1 s own work fits 0.35 s; with 0.1 s left of a running batch it does not."""
    assert refusal(Backlog(200), 100, 0.35, 10_000, RATE) is None
    refused = refusal(Backlog(200, 150, 0.05), 100, 0.35, 10_000, RATE)
    assert refused is not None and refused.reason == "predicted_wait"
    assert "about 0.4 s" in refused.message


def test_a_full_queue_is_refused_with_retry_after_from_the_work_ahead():
    refused = refusal(Backlog(4_000, 500, 0.0), 100, 60.0, 4_050, RATE)
    assert (refused.reason, refused.retry_after) == ("queue_full", 5)  # 4.5 s ahead, rounded up


def test_retry_after_is_at_least_one_second():
    refused = refusal(Backlog(10), 100, 0.001, 10_000, RATE)
    assert (refused.reason, refused.retry_after) == ("predicted_wait", 1.0)


def test_a_patient_request_is_admitted_while_the_work_ahead_fits_its_deadline():
    assert refusal(Backlog(4_000, 1_000, 0.5), 100, 5.0, 1_000_000, RATE) is None  # 4.0 + 0.5 + 0.1 s
    assert refusal(Backlog(4_000, 1_000, 0.0), 100, 5.0, 1_000_000, RATE) is not None  # 4.0 + 1.0 + 0.1 s


def test_a_text_opening_a_batch_waits_for_everything_queued_scaled_by_the_factor():
    """300 tokens queued, 100 own, at 1000 tokens/s: 0.4 s plainly, 0.6 s if such texts have waited 1.5x that."""
    assert predicted_ends(10.0, Backlog(300), 100, [300], [None], RATE, wait_factor=1.5) == [pytest.approx(10.6)]


def test_a_text_joining_a_queued_batch_ends_right_after_the_text_it_follows():
    """The text it follows is predicted at 10.2 s; its own 100 tokens add 0.1 s, whatever the factor and the 5,000
    tokens queued behind; its request's other text opens a batch of its own behind all of them."""
    ends = predicted_ends(10.0, Backlog(5_000), 100, [50, 5_000], [10.2, None], RATE, wait_factor=2.0)
    assert ends == [pytest.approx(10.3), pytest.approx(10.0 + 2.0 * 5.1)]


def test_a_joined_batch_still_waits_for_the_batches_ahead_of_it():
    """Predicted at 10.2 s, but 900 tokens still run before it: a batch queued past its time is running late."""
    ends = predicted_ends(10.0, Backlog(5_000), 100, [900], [10.2], RATE, wait_factor=2.0)
    assert ends == [pytest.approx(11.0)]


def test_nothing_is_predicted_to_wait_before_the_rate_is_measured():
    assert predicted_ends(10.0, Backlog(5_000), 100, [50, 5_000], [12.0, None], None, 2.0) == [10.0, 10.0]


def test_the_predicted_wait_decides_and_retry_after_stays_the_plain_work_ahead():
    assert plain_wait(Backlog(300, 200, 0.05), 100, RATE) == pytest.approx(0.55)
    assert refusal(Backlog(300), 100, 0.5, 10_000, RATE) is None  # plainly 0.4 s
    refused = refusal(Backlog(300), 100, 0.5, 10_000, RATE, predicted=0.6)
    assert refused.reason == "predicted_wait" and "about 0.6 s" in refused.message
    assert refused.retry_after == 1.0
    assert refusal(Backlog(5_000), 100, 0.5, 10_000, RATE, predicted=0.3) is None  # joins a batch that leaves soon


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


def test_admission_counts_the_batch_running_now():
    """A 100-token batch takes 0.4 s (250 tokens/s measured); while it runs, a new text waits for it too."""

    async def scenario(batcher, clock, ran):
        # Measures the drain rate, 250 tokens/s: the second text is taken while the first runs, the third behind it.
        warm = batcher.submit(texts(100, 100, 100), deadline=math.inf)
        await asyncio.wait(warm.futures, timeout=30)
        assert batcher.rates.backlog.value == pytest.approx(250)
        release = threading.Event()
        started = threading.Event()
        batcher.model.run = blocking_run(batcher.model.run, started, release)
        running = batcher.submit(texts(100), deadline=math.inf)
        assert await asyncio.to_thread(started.wait, 30)
        try:
            # Its own 100 tokens take 0.4 s, which fits 0.6 s; the running batch's 0.4 s more does not.
            with pytest.raises(Overloaded) as refused:
                batcher.submit(texts(100), deadline=clock.now + 0.6)
            assert refused.value.reason == "predicted_wait"
        finally:
            release.set()
        await asyncio.wait(running.futures, timeout=30)
        batcher.submit(texts(100), deadline=clock.now + 0.6)  # nothing runs now: admitted

    one_text_batches = BatchingPolicy(bucket_bounds=(128,), max_batch_tokens=128, max_batch_size=1, window=0.0)
    run(scenario, one_text_batches, batch_seconds=0.4)


def blocking_run(run_batch, started: threading.Event, release: threading.Event):
    def run_when_released(inputs):
        started.set()
        release.wait(30)
        return run_batch(inputs)

    return run_when_released
