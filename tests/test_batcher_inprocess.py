"""The batcher in process, with a fake model and the injected clock: cancellation, inference failure, drain, answer
order and the neighbour merge. Events are ordered by waiting on the model's own progress, never by sleeping."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from service.batcher import Batcher
from service.drain_rate import DrainRate, WaitCalibration
from service.errors import DeadlineExceeded, InferenceFailed, NotAccepting, Overloaded
from service.scheduler import BatchingPolicy, BatchQueue
from service.scorer import Deadlines, Scorer
from tests.fakes import WAIT, FakeClock, FakeModel

ONE_TEXT_BATCHES = BatchingPolicy(bucket_bounds=(64,), max_batch_tokens=64, max_batch_size=1, window=0.0)
SHARED_BATCHES = BatchingPolicy(bucket_bounds=(16, 32, 64), max_batch_tokens=512, max_batch_size=8, window=0.0)


async def until(condition, seconds: float = WAIT) -> None:
    """Returns once `condition()` holds (polled: the batcher's threads change it)."""
    async with asyncio.timeout(seconds):
        while True:  # polled: no event tells when another thread has changed it
            if condition():
                return
            await asyncio.sleep(0.001)


def text(name: int, length: int) -> list[int]:
    return [name] * length


def scores_of(ids: list[int]) -> list[float]:
    return [float(len(ids)), float(ids[0])]


class FixedModelRate(DrainRate):
    """A model rate that batches run on the frozen fake clock do not change."""

    def __init__(self, tokens_per_second: float, calibration: WaitCalibration | None = None) -> None:
        super().__init__(calibration)
        super().model_ran(round(tokens_per_second), 1.0)

    def model_ran(self, tokens: int, seconds: float) -> None:
        pass


def run(scenario, model: FakeModel, policy: BatchingPolicy, rates: DrainRate | None = None):
    """Run `scenario(batcher, clock)` with the batcher's threads started; it drains at the end."""

    async def main():
        clock = FakeClock()
        batcher = Batcher(BatchQueue(policy), model, max_queue_tokens=100_000, rates=rates or DrainRate(), clock=clock)
        with ThreadPoolExecutor(1) as inference_thread:
            batcher.start(inference_thread)
            try:
                return await scenario(batcher, clock)
            finally:
                model.release()
                batcher.drain()
                await asyncio.wait_for(batcher.drained(), WAIT)

    return asyncio.run(main())


def test_cancel_drops_the_queued_and_waiting_texts_and_the_running_batch_finishes():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        running = batcher.submit([text(1, 10)])
        await model.running(1)
        gone = batcher.submit([text(2, 20), text(3, 30)])  # one is taken as the next batch, the other queued
        assert batcher.cancel(running, "client_gone") == 0  # running: left to finish
        assert batcher.cancel(gone, "client_gone") == 2
        assert all(future.cancelled() for future in gone.futures)
        model.release()
        assert await asyncio.wait_for(running.futures[0], WAIT) == scores_of(text(1, 10))
        batcher.drain()
        await asyncio.wait_for(batcher.drained(), WAIT)
        assert model.ran == [[text(1, 10)]]  # the cancelled texts never reached the model

    run(scenario, model, ONE_TEXT_BATCHES)


def test_a_text_dropped_at_its_deadline_while_waiting_to_run_never_runs():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        batcher.submit([text(1, 10)])
        await model.running(1)
        late = batcher.submit([text(2, 20)], deadline=clock.now + 1)  # taken and collated as the next batch
        patient = batcher.submit([text(3, 30)])
        clock.now += 1
        assert batcher.cancel(late, "deadline") == 1  # what the scorer does at the deadline: dropped, not run
        model.release()
        assert await asyncio.wait_for(patient.futures[0], WAIT) == scores_of(text(3, 30))
        assert late.futures[0].cancelled()
        assert [batch[0][0] for batch in model.ran] == [1, 3]

    run(scenario, model, ONE_TEXT_BATCHES)


def test_a_text_whose_deadline_would_pass_before_its_batch_ends_is_dropped_when_the_batch_starts():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        first = batcher.submit([text(1, 10)])
        await model.running(1)
        # Admitted: at 100 tokens/s the running batch and this text take 0.6 s of the 1 s left.
        late = batcher.submit([text(2, 50)], deadline=clock.now + 1.0)
        patient = batcher.submit([text(3, 30)], deadline=clock.now + 5.0)
        clock.now += 0.7  # the running batch took longer: 50 tokens more would end 0.2 s past the deadline
        model.release()
        with pytest.raises(DeadlineExceeded, match="would pass"):
            await asyncio.wait_for(late.futures[0], WAIT)
        assert await asyncio.wait_for(first.futures[0], WAIT) == scores_of(text(1, 10))
        assert await asyncio.wait_for(patient.futures[0], WAIT) == scores_of(text(3, 30))
        assert text(2, 50) not in [ids for batch in model.ran for ids in batch]  # no model time for a late answer

    run(scenario, model, ONE_TEXT_BATCHES, rates=FixedModelRate(100.0))


def test_the_event_loops_lag_counts_against_the_deadline():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        first = batcher.submit([text(1, 10)])
        await model.running(1)
        late = batcher.submit([text(2, 30)], deadline=clock.now + 0.6)  # admitted: 0.4 s of work ahead
        batcher.answers.delivered([], [], ended=clock.now - 2.0)  # answers reached the loop 2 s after their batch ended
        assert batcher.rates.delivery_lag == pytest.approx(0.4)  # smoothed
        with pytest.raises(Overloaded):  # 0.5 s of work would fit the 0.6 s left, but not with 0.4 s of lag
            batcher.submit([text(3, 10)], deadline=clock.now + 0.6)
        # Its batch would end 0.3 s before the deadline, but its answer would reach the loop after it, whether the
        # first batch's own prompt delivery has brought the smoothed lag down to 0.32 s by then or not.
        model.release()
        assert await asyncio.wait_for(first.futures[0], WAIT) == scores_of(text(1, 10))
        with pytest.raises(DeadlineExceeded, match="would pass"):
            await asyncio.wait_for(late.futures[0], WAIT)
        assert model.ran == [[text(1, 10)]]

    run(scenario, model, ONE_TEXT_BATCHES, rates=FixedModelRate(100.0))


def test_texts_that_waited_longer_than_predicted_make_admission_stricter():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        first = batcher.submit([text(1, 10)])  # predicted 0.1 s at 100 tokens/s
        await model.running(1)
        second = batcher.submit([text(2, 10)])  # 0.1 s behind the running batch, then its own 0.1 s
        clock.now += 0.4  # both batches end 0.4 s after they arrived: 4x and 2x their prediction
        model.release()
        await asyncio.wait_for(asyncio.gather(*first.futures, *second.futures), WAIT)
        await until(lambda: batcher.rates.calibration.factor != 1.0)  # updated once the batch's answers are out
        assert batcher.rates.calibration.factor == pytest.approx(4.0)
        assert REGISTRY.get_sample_value("classifier_admission_wait_factor") == pytest.approx(4.0)
        with pytest.raises(Overloaded, match=r"about 0\.4 s"):  # its own 0.1 s, 4x, does not fit 0.3 s any more
            batcher.submit([text(3, 10)], deadline=clock.now + 0.3)
        batcher.submit([text(4, 10)], deadline=clock.now + 0.5)

    calibration = WaitCalibration(min_predicted=0.05, min_samples=2)
    run(scenario, model, ONE_TEXT_BATCHES, rates=FixedModelRate(100.0, calibration))


def test_one_text_waiting_for_another_does_not_count_as_a_backlog():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        short = batcher.submit([text(1, 8)])
        await model.running(1)
        long = batcher.submit([text(2, 60)])  # taken while the short one runs, with nothing queued behind it
        clock.now += 0.03
        model.release()
        await asyncio.wait_for(asyncio.gather(*short.futures, *long.futures), WAIT)
        assert batcher.rates.backlog.value is None  # not 8 tokens per 30 ms: that is no drain rate
        # Two texts queued behind a running one: the first of them is taken with the other still waiting.
        model._released.clear()
        running = batcher.submit([text(3, 8)])
        await model.running(3)
        queued = batcher.submit([text(4, 8), text(5, 8)])
        clock.now += 0.04
        model.release()
        await asyncio.wait_for(asyncio.gather(*running.futures, *queued.futures), WAIT)
        assert batcher.rates.backlog.value == pytest.approx(200.0)  # 8 tokens in 0.04 s, back to back

    run(scenario, model, ONE_TEXT_BATCHES)


def test_an_answer_ready_only_after_its_deadline_is_delivered_and_counted_late():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        late_before = REGISTRY.get_sample_value("classifier_late_answers_total")
        scorer = Scorer(batcher, inference_thread=None)
        answer = asyncio.create_task(scorer.score([text(1, 10)], deadline=clock.now + 0.01))
        await model.running(1)
        clock.now += 1.0  # the batch ran past the deadline: nothing queued is left to drop, so it finishes
        model.release()
        assert await asyncio.wait_for(answer, WAIT) == [scores_of(text(1, 10))]
        assert REGISTRY.get_sample_value("classifier_late_answers_total") == late_before + 1
        on_time = await asyncio.wait_for(scorer.score([text(2, 10)], deadline=clock.now + 5.0), WAIT)
        assert on_time == [scores_of(text(2, 10))]
        assert REGISTRY.get_sample_value("classifier_late_answers_total") == late_before + 1

    run(scenario, model, ONE_TEXT_BATCHES)


def test_each_request_fails_at_its_own_deadline_whatever_order_the_deadlines_came_in():
    """One timer serves every request's deadline (`Deadlines`): a request with an earlier deadline than those already
    waiting fails first, the later one only at its own, and one whose deadline has not come is answered."""
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        scorer = Scorer(batcher, inference_thread=None)
        running = asyncio.create_task(scorer.score([text(1, 10)], deadline=clock.now + 60))
        await model.running(1)
        later = asyncio.create_task(scorer.score([text(2, 10)], deadline=clock.now + 0.5))
        sooner = asyncio.create_task(scorer.score([text(3, 10)], deadline=clock.now + 0.01))
        patient = asyncio.create_task(scorer.score([text(4, 10)], deadline=clock.now + 60))
        clock.now += 0.1  # past the sooner deadline only
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(sooner, WAIT)
        assert not later.done()
        clock.now += 1.0
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(later, WAIT)
        model.release()
        assert await asyncio.wait_for(patient, WAIT) == [scores_of(text(4, 10))]
        assert await asyncio.wait_for(running, WAIT) == [scores_of(text(1, 10))]
        assert [batch[0][0] for batch in model.ran] == [1, 4]  # the expired texts never ran

    run(scenario, model, ONE_TEXT_BATCHES)


def test_the_deadline_timer_forgets_requests_answered_before_their_deadline():
    """Answered requests leave the deadline heap by the time they are most of it, so it stays as large as the requests
    in progress, not as all those of the last deadline's length."""

    class Call:
        """Finishes when told its deadline has passed, and says so, as a ScoreCall failing then does (which may make
        the heap be rebuilt while the timer is emptying it)."""

        finished = False
        reached = 0

        def deadline_reached(self) -> None:
            self.reached += 1
            if not self.finished:
                self.finished = True
                deadlines.finished()

    clock = FakeClock()
    deadlines = Deadlines(clock)

    async def main():
        calls = [Call() for _ in range(400)]
        for call in calls:
            deadlines.add(clock.now + 0.05, call)
        for call in calls[:300]:
            call.finished = True
            deadlines.finished()
        assert len(deadlines) <= 200  # rebuilt once more than half were finished
        clock.now += 1.0
        await until(lambda: all(call.reached for call in calls[300:]))
        assert len(deadlines) == 0
        assert [call.reached for call in calls[300:]] == [1] * 100  # each told once
        assert all(call.reached <= 1 for call in calls[:300])  # those finished early: at most told, and ignoring it

    asyncio.run(main())


def test_a_request_fails_with_its_first_failure_even_while_an_earlier_text_still_runs():
    """The poisoned short text runs first and fails at once; the long text before it in the request still runs."""

    class FailsAtOnce(FakeModel):
        def run(self, sequences: list[list[int]]) -> list[list[float]]:
            if any(self.poison in ids for ids in sequences):
                raise ValueError("poisoned batch")
            return super().run(sequences)

    model = FailsAtOnce(held=True, poison=666)

    async def scenario(batcher, clock):
        scorer = Scorer(batcher, inference_thread=None)
        with pytest.raises(InferenceFailed, match="poisoned batch"):
            await asyncio.wait_for(scorer.score([text(1, 60), [666] * 10], deadline=clock.now + 60), WAIT)
        await model.running(1)
        assert [[ids[0] for ids in batch] for batch in model.ran] == [[1]]  # the long text runs (and finishes)

    run(scenario, model, SHARED_BATCHES)


def test_a_poisoned_text_fails_alone_the_batch_split_down_to_it_and_the_error_is_logged_once(caplog):
    model = FakeModel(poison=666)
    texts = [text(name, 10) for name in range(1, 8)]
    texts.insert(3, [666] * 10)
    splits_before = REGISTRY.get_sample_value("classifier_batch_splits_total", {"reason": "error"}) or 0.0

    async def scenario(batcher, clock):
        submission = batcher.submit(texts)
        answers = await asyncio.wait_for(asyncio.gather(*submission.futures, return_exceptions=True), WAIT)
        return answers, batcher.queue.policy.max_batch_tokens

    with caplog.at_level(logging.ERROR, logger="service.splitting"):
        answers, budget = run(scenario, model, SHARED_BATCHES)
    assert isinstance(answers[3], InferenceFailed) and "ValueError: poisoned batch" in str(answers[3])
    assert [answer for index, answer in enumerate(answers) if index != 3] == [scores_of(ids) for index, ids in enumerate(texts) if index != 3]
    assert len(model.ran[0]) == 8 and [len(batch) for batch in model.ran].count(1) >= 1  # split down to one
    assert len([r for r in caplog.records if "inference failed" in r.getMessage()]) == 1
    splits = REGISTRY.get_sample_value("classifier_batch_splits_total", {"reason": "error"}) - splits_before
    assert splits == 3  # 8 -> 4 -> 2 -> 1
    assert budget == SHARED_BATCHES.max_batch_tokens  # an ordinary error does not touch the budget


def test_drain_refuses_new_texts_and_answers_everything_queued_before_returning():
    model = FakeModel(held=True)

    async def scenario(batcher, clock):
        first = batcher.submit([text(1, 10)])
        await model.running(1)
        queued = batcher.submit([text(name, 10 + name) for name in range(2, 6)])
        batcher.drain()
        with pytest.raises(NotAccepting):
            batcher.submit([text(9, 10)])
        drained = asyncio.ensure_future(batcher.drained())
        model.release()
        await asyncio.wait_for(drained, WAIT)
        # Everything queued before the drain was answered by the time it returned.
        assert all(future.done() for future in first.futures + queued.futures)
        assert [future.result() for future in queued.futures] == [scores_of(text(n, 10 + n)) for n in range(2, 6)]
        assert len(batcher.queue) == 0

    run(scenario, model, ONE_TEXT_BATCHES)


def test_answers_match_their_texts_whatever_order_the_batches_run_in():
    model = FakeModel()
    lengths = [50, 3, 17, 64, 9, 33, 12, 60, 2, 31, 16, 45]
    texts = [text(100 + index, length) for index, length in enumerate(lengths)]

    async def scenario(batcher, clock):
        submission = batcher.submit(texts)
        return await asyncio.wait_for(asyncio.gather(*submission.futures), WAIT)

    answers = run(scenario, model, SHARED_BATCHES)
    assert answers == [scores_of(ids) for ids in texts]
    assert len(model.ran) > 1  # the texts really ran in several batches
    assert sorted(ids[0] for batch in model.ran for ids in batch) == [ids[0] for ids in texts]


def test_a_mergeable_text_behind_a_non_mergeable_one_joins_the_batch():
    """Seed 30 tokens; the next bucket holds 60 (would pad the batch to 75% efficiency) and then 33 (95%)."""
    model = FakeModel()

    async def scenario(batcher, clock):
        submission = batcher.submit([text(1, 30), text(2, 60), text(3, 33)])
        return await asyncio.wait_for(asyncio.gather(*submission.futures), WAIT)

    run(scenario, model, SHARED_BATCHES)
    assert [[ids[0] for ids in batch] for batch in model.ran] == [[1, 3], [2]]
