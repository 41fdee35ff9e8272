"""Admission by predicted wait, as a pure function of the backlog, the request and the measured drain rate."""

import asyncio
import math
import threading

import pytest

from service.admission import Admitted, Backlog, Refusal, admit, plain_wait, predicted_ends, refusal, seconds_ahead
from service.drain_rate import DrainRate
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


def rates(tokens_per_second: float | None = RATE, delivered_after: float = 0.0, factor: float = 1.0) -> DrainRate:
    """A drain-rate estimate that has measured `tokens_per_second` (model time), one batch's answers reaching the
    event loop `delivered_after` seconds after it ended, and a wait `factor`."""
    measured = DrainRate()
    if tokens_per_second is not None:
        measured.model_ran(round(tokens_per_second), 1.0)
    measured.answers_delivered(delivered_after)
    measured.calibration.factor = factor
    return measured


def test_admitted_texts_carry_their_predicted_answer_and_only_openers_their_plain_wait():
    """300 queued, 100 own tokens: the opener waits 0.4 s plainly, 0.6 s at factor 1.5; the joiner follows 10.2 s."""
    admitted = admit(10.0, Backlog(300), 100, [50, 300], [10.2, None], 5.0, 10_000, rates(factor=1.5))
    assert admitted == [Admitted(pytest.approx(10.3), None), Admitted(pytest.approx(10.6), pytest.approx(0.4))]


def test_admission_refuses_a_full_queue_and_a_wait_past_the_time_left():
    full = admit(10.0, Backlog(4_000), 100, [4_000], [None], 60.0, 4_050, rates())
    assert isinstance(full, Refusal) and (full.reason, full.retry_after) == ("queue_full", 4)
    late = admit(10.0, Backlog(300), 100, [300], [None], 0.5, 10_000, rates(factor=1.5))  # 0.6 s > 0.5 s
    assert isinstance(late, Refusal) and late.reason == "predicted_wait" and "about 0.6 s" in late.message


def test_admission_counts_the_answers_delivery_lag_against_the_time_left():
    """0.4 s of work fits 0.5 s, but not once answers take 0.2 s more to reach the event loop (one batch's 1 s lag,
    smoothed from none)."""
    assert not isinstance(admit(10.0, Backlog(300), 100, [300], [None], 0.5, 10_000, rates()), Refusal)
    refused = admit(10.0, Backlog(300), 100, [300], [None], 0.5, 10_000, rates(delivered_after=1.0))
    assert isinstance(refused, Refusal) and refused.reason == "predicted_wait"


def test_before_any_measurement_everything_fits_and_is_predicted_now():
    assert admit(10.0, Backlog(10_000), 100, [10_000], [None], 0.001, 1_000_000, rates(None)) == [Admitted(10.0, 0.0)]


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
