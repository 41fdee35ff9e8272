"""The batcher's admission, cancellation and expiry, in process with a fake clock (the model is a stub)."""

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from service.admission import Backlog
from service.batch_metrics import observe_each
from service.batcher import Batcher, InFlight
from service.drain_rate import DrainRate
from service.errors import DeadlineExceeded, Overloaded
from service.scheduler import Batch, BatchingPolicy, BatchQueue, QueuedText
from tests.fakes import FakeClock, FakeModel


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def texts(*lengths: int) -> list[list[int]]:
    return [list(range(length)) for length in lengths]


def make_batcher(clock: FakeClock, model: FakeModel, policy: BatchingPolicy):
    rates = DrainRate()
    rates.model_ran(1000, 1.0)  # the model alone: 1000 tokens/s
    max_queue_tokens = 10_000

    return Batcher(BatchQueue(policy), model, max_queue_tokens, rates, clock)


WAITING = BatchingPolicy(bucket_bounds=(16, 64, 128), max_batch_tokens=512, max_batch_size=8, window=30.0)


def run(scenario, policy: BatchingPolicy = WAITING, batch_seconds: float = 0.0):
    """Run `scenario(batcher, clock, ran)` on an event loop with the batcher's inference thread started."""

    async def main():
        clock = FakeClock()
        model = FakeModel(clock, batch_seconds)  # records the lengths of the texts it runs
        batcher = make_batcher(clock, model, policy)
        with ThreadPoolExecutor(1) as thread:
            batcher.start(thread)
            try:
                return await scenario(batcher, clock, model.lengths)
            finally:
                clock.now += 3600  # every bucket's window has run out: draining runs what is left at once
                batcher.drain()
                await batcher.drained()

    return asyncio.run(main())


def test_a_request_the_queue_cannot_reach_in_time_is_refused_at_once_with_the_drain_time():
    async def scenario(batcher, clock, ran):
        batcher.submit(texts(100, 100), deadline=math.inf)  # 200 queued tokens at 1000 tokens/s: 0.2 s of work
        refused_before = counter("classifier_rejected_texts_total", reason="predicted_wait")
        with pytest.raises(Overloaded) as refused:
            batcher.submit(texts(100), deadline=clock.now + 0.25)  # 0.2 s queued + 0.1 s own work > 0.25 s
        assert refused.value.reason == "predicted_wait" and refused.value.retry_after >= 1
        assert counter("classifier_rejected_texts_total", reason="predicted_wait") == refused_before + 1
        batcher.submit(texts(100), deadline=clock.now + 0.35)  # 0.3 s fits: accepted
        assert batcher.queue.tokens == 300

    run(scenario)


def test_a_full_queue_is_refused_with_retry_after_from_the_drain_estimate():
    async def scenario(batcher, clock, ran):
        batcher.submit(texts(*[100] * 40), deadline=math.inf)  # 4,000 tokens: 4 s at 1000 tokens/s
        batcher.max_queue_tokens = 4_050
        with pytest.raises(Overloaded) as refused:
            batcher.submit(texts(100), deadline=math.inf)
        assert (refused.value.reason, refused.value.retry_after) == ("queue_full", 4)

    run(scenario)


def test_cancelled_texts_leave_the_queue_and_never_reach_the_model():
    async def scenario(batcher, clock, ran):
        cancelled_before = counter("classifier_cancelled_texts_total", reason="client_gone")
        gone = batcher.submit(texts(10, 70), deadline=math.inf)
        kept = batcher.submit(texts(12), deadline=math.inf)
        assert batcher.cancel(gone, "client_gone") == 2
        assert (len(batcher.queue), batcher.queue.tokens) == (1, 12)
        assert all(future.cancelled() for future in gone.futures)
        assert counter("classifier_cancelled_texts_total", reason="client_gone") == cancelled_before + 2
        clock.now += 3600
        batcher.drain()  # runs what is left, then the thread ends
        await batcher.drained()
        assert ran == [12] and kept.futures[0].result() == [12.0, 0.0]
        assert batcher.cancel(kept, "client_gone") == 0  # answered texts are not counted twice

    run(scenario)


def test_texts_queued_past_their_deadline_are_failed_without_running():
    async def scenario(batcher, clock, ran):
        expired_before = counter("classifier_cancelled_texts_total", reason="deadline")
        late = batcher.submit(texts(10, 20), deadline=clock.now + 1.0)
        patient = batcher.submit(texts(30), deadline=clock.now + 7200.0)
        clock.now += 1.0  # the 30 s window has not run out, but the first request's deadline has
        batcher.submit(texts(40), deadline=math.inf)  # an arrival wakes the inference thread
        await asyncio.wait(late.futures, timeout=30)
        for future in late.futures:
            with pytest.raises(DeadlineExceeded):
                future.result()
        assert ran == [] and not patient.futures[0].done()
        clock.now += 3600
        batcher.drain()
        await batcher.drained()
        assert sorted(ran) == [30, 40] and patient.futures[0].result() == [30.0, 0.0]
        assert counter("classifier_cancelled_texts_total", reason="deadline") == expired_before + 2
        assert (len(batcher.queue), batcher.queue.tokens) == (0, 0)

    run(scenario)


def test_a_request_whose_deadline_has_passed_is_not_queued():
    async def scenario(batcher, clock, ran):
        with pytest.raises(DeadlineExceeded):
            batcher.submit(texts(10), deadline=clock.now)
        assert len(batcher.queue) == 0

    run(scenario)


def test_admission_uses_the_drain_rate_measured_while_batches_run_back_to_back():
    """Model time says 1000 tokens/s; batches of 100 tokens that really take 0.4 s each say 250/s."""

    async def scenario(batcher, clock, ran):
        backlog = batcher.submit(texts(100, 100, 100), deadline=math.inf)  # one batch per text
        await asyncio.wait(backlog.futures, timeout=30)
        assert ran == [100, 100, 100]
        assert batcher.rates.backlog.value == pytest.approx(250)
        assert len(batcher.queue) == 0
        with pytest.raises(Overloaded) as refused:  # its own 100 tokens take 0.4 s, not the model's 0.1 s
            batcher.submit(texts(100), deadline=clock.now + 0.3)
        assert refused.value.reason == "predicted_wait"

    one_text_batches = BatchingPolicy(bucket_bounds=(128,), max_batch_tokens=128, max_batch_size=1, window=0.0)
    run(scenario, one_text_batches, batch_seconds=0.4)


def test_a_text_joining_a_queued_batch_is_admitted_by_when_that_batch_ends():
    async def scenario(batcher, clock, ran):
        batcher.submit(texts(100), deadline=math.inf)  # bucket 128, first: it goes first
        clock.now += 0.001
        batcher.submit(texts(*[10] * 5), deadline=math.inf)  # 50 tokens in bucket 16, behind it
        # Behind all 150 queued tokens it would be answered in 0.25 s; joining bucket 128 it follows the first text,
        # predicted 0.1 s from the start, and only the 100 tokens of that bucket run before it: 0.2 s.
        batcher.submit(texts(100), deadline=clock.now + 0.22)
        with pytest.raises(Overloaded):  # opening bucket 64 instead, it waits for all 250 queued tokens: 0.3 s
            batcher.submit(texts(50), deadline=clock.now + 0.22)
        assert batcher.queue.tokens == 250

    run(scenario)


def test_what_left_the_queue_counts_as_work_ahead_until_it_has_run():
    in_flight = InFlight()
    first = Batch([QueuedText(30, 0.0, "a"), QueuedText(20, 0.0, "b")], 30, "window")
    in_flight.taken(first)  # taken while the inference thread is idle: it starts at once, nothing waits
    assert in_flight.backlog(100, 1.0).queued_tokens == 100
    in_flight.started(first.items, 2.0)
    assert in_flight.backlog(100, 2.5) == Backlog(100, 50, 0.5)
    waiting = QueuedText(10, 2.1, "c")
    in_flight.taken(Batch([waiting], 10, "window"))  # collated while the first runs: it waits, cancellable
    assert in_flight.backlog(100, 2.5) == Backlog(110, 50, 0.5)
    assert in_flight.withdraw([waiting, first.items[0]]) == [waiting]  # the running text is not withdrawn
    assert in_flight.backlog(100, 2.5) == Backlog(100, 50, 0.5)
    in_flight.ended()
    assert in_flight.backlog(100, 3.0).running_tokens == 0


def test_a_batch_of_observations_lands_as_each_observed_alone():
    """`observe_each` writes a histogram's sum and buckets once per batch: the same samples as one `observe` each."""
    registry = CollectorRegistry()
    one_by_one = Histogram("one_by_one_seconds", "each", ["length"], buckets=(0.01, 0.1, 1.0), registry=registry)
    batched = Histogram("batched_seconds", "all", ["length"], buckets=(0.01, 0.1, 1.0), registry=registry)
    amounts = [0.0, 0.01, 0.010001, 0.05, 0.1, 0.5, 1.0, 7.0, 0.003]
    for amount in amounts:
        one_by_one.labels("<=16").observe(amount)
    observe_each(batched.labels("<=16"), amounts)
    observe_each(batched.labels("<=32"), [])  # nothing observed: its series stay at 0
    for bound in ("0.01", "0.1", "1.0", "+Inf"):
        expected = registry.get_sample_value("one_by_one_seconds_bucket", {"length": "<=16", "le": bound})
        assert registry.get_sample_value("batched_seconds_bucket", {"length": "<=16", "le": bound}) == expected
    assert registry.get_sample_value("batched_seconds_count", {"length": "<=16"}) == len(amounts)
    assert registry.get_sample_value("batched_seconds_sum", {"length": "<=16"}) == pytest.approx(sum(amounts))
    assert registry.get_sample_value("batched_seconds_count", {"length": "<=32"}) == 0
