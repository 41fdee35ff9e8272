"""Admission by predicted wait, as a pure function of the backlog, the request and the measured drain rate."""

import asyncio
import math
import threading

import pytest

from service.admission import Backlog, refusal, seconds_ahead
from service.batcher import Overloaded
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


def test_admission_counts_the_batch_running_now():
    """A 100-token batch takes 0.4 s (250 tokens/s measured); while it runs, a new text waits for it too."""

    async def scenario(batcher, clock, ran):
        warm = batcher.submit(texts(100, 100), deadline=math.inf)  # measures the drain rate: 250 tokens/s
        await asyncio.wait(warm.futures, timeout=30)
        assert batcher.backlog_meter.tokens_per_second == pytest.approx(250)
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
