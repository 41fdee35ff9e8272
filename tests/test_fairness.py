"""Fair share between callers: the pure decisions (limits, virtual time, the queue's choice of batches and its
prediction of a caller's wait), the batcher with a greedy and an interactive caller on a fake clock, callers'
identification, and the HTTP slots a stalled upload holds. No torch, no server process."""

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from service.admission import Backlog, refusal
from service.api import create_app
from service.batcher import Batcher
from service.callers import CallerIdentity, class_of
from service.drain_rate import DrainRate
from service.errors import Overloaded
from service.fairness import RetryAfterBook, Usage, VirtualTime, exceeded, fair_share
from service.scheduler import BatchingPolicy, BatchQueue, Place, QueuedText
from service.settings import Settings
from tests.conftest import build_tiny_tokenizer
from tests.fakes import FakeClock, FakeModel, FakeScorer
from tests.test_http import JSON, RawClient, fake_engine, in_flight, serving, settings, until
from tests.test_overload import GatedTokenizer

# Limits


def test_a_caller_alone_is_held_to_the_limit_itself():
    assert exceeded(Usage(90, 90, 1), 10, 100, headroom=0.5) is None
    assert exceeded(Usage(95, 95, 1), 10, 100, headroom=0.5) == "full"


def test_once_the_limit_is_full_the_caller_over_its_share_is_refused_and_the_one_under_it_is_not():
    """A greedy caller holds the whole limit of 100; a newcomer's share is 50 of it."""
    assert exceeded(Usage(100, 100, 2), 1, 100, headroom=0.1) == "fair_share"
    assert exceeded(Usage(100, 0, 2), 10, 100, headroom=0.1) is None  # the headroom: up to 110
    assert exceeded(Usage(105, 5, 2), 10, 100, headroom=0.1) == "full"  # past even the headroom
    assert exceeded(Usage(100, 0, 2), 1, 100, headroom=0.0) == "full"  # no headroom: a full limit refuses everyone


def test_over_its_share_a_caller_still_uses_what_the_limit_leaves():
    assert exceeded(Usage(60, 60, 3), 10, 100, headroom=0.1) is None  # over its share of 33, but the limit has room
    assert fair_share(100, 3) == pytest.approx(33.33, abs=0.01)


# Virtual time


def test_a_caller_joining_starts_at_the_virtual_time_now_and_banks_nothing_while_idle():
    virtual = VirtualTime()
    virtual.activated("greedy")
    for _ in range(5):
        virtual.seeded("greedy")
        virtual.served("greedy", 100)
    assert virtual.now == 400 and virtual.tag("greedy") == 500
    virtual.activated("interactive")
    assert virtual.tag("interactive") == 400  # smaller than the greedy caller's: it seeds the next batch
    virtual.seeded("interactive")
    virtual.served("interactive", 10)
    virtual.activated("interactive")  # back while it was served ahead: it keeps its tag
    assert virtual.tag("interactive") == 410


def test_tags_are_forgotten_once_passed_or_once_nothing_is_queued():
    virtual = VirtualTime()
    for caller in ("a", "b"):
        virtual.activated(caller)
    virtual.seeded("a")
    virtual.served("a", 10)
    virtual.forget_idle({"a"})  # b is not active and the virtual time (0) has reached its tag (0): forgotten
    assert len(virtual) == 1 and virtual.tag("a") == 10
    for caller in (f"one-shot-{i}" for i in range(100)):  # each alone, served once: the virtual time never moves
        virtual.activated(caller)
        virtual.seeded(caller)
        virtual.served(caller, 10)
        virtual.forget_idle(set())
    assert len(virtual) == 0


# The queue: which caller seeds the next batch, and what it predicts


def policy(**overrides) -> BatchingPolicy:
    return BatchingPolicy(**{"bucket_bounds": (16, 32, 64, 128), "max_batch_tokens": 512, "max_batch_size": 8, "window": 0.005, **overrides})


def text(tokens: int, caller: str, at: float = 0.0, name=None) -> QueuedText:
    return QueuedText(tokens, at, name, math.inf, caller)


def test_an_interactive_text_seeds_the_next_batch_and_the_greedy_caller_fills_the_rest():
    queue = BatchQueue(policy())
    for i in range(400):  # 400 texts of 100 tokens: 50 batches of 4 (4 x 128 padded = 512)
        queue.append(text(100, "greedy", at=0.0, name=f"g{i}"))
    first = queue.next_batch(1.0)
    assert [item.caller for item in first.items] == ["greedy"] * 5  # 5 x 100 tokens of the 512
    queue.append(text(120, "interactive", at=1.0, name="mine"))
    second = queue.next_batch(1.0 + 0.005)
    assert second.items[0].handle == "mine"
    assert [item.caller for item in second.items] == ["interactive", "greedy", "greedy", "greedy"]  # 4 x 120 padded
    assert second.reason == "budget"  # the room the interactive text left went to the greedy caller
    assert len(queue) == 400 - 5 - 3 and queue.callers == 1


def test_while_callers_share_the_model_batches_stay_within_the_shared_budget():
    """One caller alone fills its batches to the budget (512: 5 texts of 100); once another has queued texts within
    SHARING_SECONDS, batches hold at most the shared budget (here 256: 2 of them), and once that caller has been
    quiet that long, the full budget is back. Under a shared budget smaller than a text, a batch holds that one text."""
    queue = BatchQueue(policy(max_batch_size=8))
    queue.set_shared_batch_tokens(256)
    for i in range(100):
        queue.append(text(100, "greedy", at=0.0, name=i))
    assert len(queue.next_batch(1.0).items) == 5 and not queue.sharing(1.0)
    queue.append(text(10, "interactive", at=1.0, name="mine"))
    assert queue.sharing(1.0)
    assert [item.handle for item in queue.next_batch(1.01).items] == ["mine"]  # its own bucket; then greedy's:
    assert len(queue.next_batch(1.02).items) == 2
    later = 1.0 + BatchQueue.SHARING_SECONDS + 0.01
    assert not queue.sharing(later) and len(queue.next_batch(later).items) == 5
    queue.append(text(10, "interactive", at=later, name="again"))
    queue.set_shared_batch_tokens(10)  # below the greedy caller's texts: each batch holds one of them
    assert [item.handle for item in queue.next_batch(later + 0.01).items] == ["again"]
    assert [len(queue.next_batch(later + 0.02 + i / 100).items) for i in range(3)] == [1, 1, 1]


def test_two_greedy_callers_share_the_batches_in_turn():
    queue = BatchQueue(policy(max_batch_size=4))
    for i in range(40):
        queue.append(text(50, "a", name=i))
    for i in range(40):
        queue.append(text(50, "b", at=0.001, name=i))
    seeds = [queue.next_batch(1.0).items[0].caller for _ in range(10)]
    assert seeds == ["a", "b"] * 5


def test_a_caller_joining_a_busy_queue_takes_turns_with_the_one_already_there():
    """b ran alone for 20 batches; a joins at the virtual time now: they take turns, neither gets 20 in a row."""
    queue = BatchQueue(policy(max_batch_size=4))
    for i in range(120):
        queue.append(text(50, "b", name=i))
    for _ in range(20):
        queue.next_batch(1.0)
    for i in range(40):
        queue.append(text(50, "a", at=1.0, name=i))
    seeds = [queue.next_batch(2.0).items[0].caller for _ in range(6)]
    assert seeds.count("a") == 3 and seeds.count("b") == 3


def test_a_caller_is_predicted_to_wait_for_its_own_texts_and_as_many_of_each_others():
    queue = BatchQueue(policy())
    for _ in range(100):
        queue.append(text(100, "greedy"))
    queue.append(text(20, "light"))
    assert queue.tokens_ahead_of("interactive", 30) == 30 + 20  # min(10,000, 30) + min(20, 30)
    assert queue.place(30, "interactive").tokens_ahead == 50
    assert queue.tokens_ahead_of("greedy", 100) == 10_000 + 20
    assert queue.usage("greedy") == Usage(10_020, 10_000, 2)
    assert queue.usage("interactive") == Usage(10_020, 0, 3)
    assert queue.callers == 2


def test_one_caller_sees_the_queue_it_always_did():
    """One caller: the whole queue ahead, as without fairness."""
    queue = BatchQueue(policy())
    queued = [text(tokens, "") for tokens in (100, 10, 60)]
    for item in queued:
        queue.append(item)
    assert queue.tokens_ahead_of("", 30) == 170
    # It joins the 100-token text's batch, behind every bucket whose first text is as old.
    assert queue.place(100, "") == Place(queued[0], 170)


def test_removed_and_expired_texts_leave_their_caller_and_idle_callers_are_forgotten():
    queue = BatchQueue(policy())
    gone = [text(10, "leaver")]
    queue.append(gone[0])
    queue.append(QueuedText(10, 0.0, None, 1.0, "late"))
    queue.append(text(10, "stays"))
    assert queue.callers == 3
    assert queue.remove(gone) == gone
    assert [item.caller for item in queue.remove_missed_deadlines(2.0)] == ["late"]
    assert queue.callers == 1 and queue.usage("stays") == Usage(10, 10, 1)


# Admission


def test_a_full_queue_refuses_the_caller_over_its_share_naming_it_and_admits_the_one_under_it():
    greedy = refusal(Backlog(10_000), 100, 600.0, 10_000, 1000.0, usage=Usage(10_000, 10_000, 2), headroom=0.1)
    assert greedy is not None and greedy.reason == "fair_share"
    assert "its share 5,000 of 10,000 (2 callers waiting)" in greedy.message
    newcomer = refusal(Backlog(100), 100, 5.0, 10_000, 1000.0, usage=Usage(10_000, 0, 2), headroom=0.1)
    assert newcomer is None
    alone = refusal(Backlog(10_000), 100, 600.0, 10_000, 1000.0, usage=Usage(10_000, 10_000, 1), headroom=0.1)
    assert alone is not None and alone.reason == "queue_full"


# The batcher: a greedy caller and an interactive one, on a fake clock


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ids(length: int, first: int) -> list[int]:
    return [first] + [0] * (length - 1)


def batcher_over(model: FakeModel, clock: FakeClock, max_queue_tokens: int, **options) -> Batcher:
    """A batcher over `model` on the fake clock: batches flushed at once, the model measured at 1,000 tokens/s."""
    rates = DrainRate()
    rates.model_ran(1000, 1.0)
    return Batcher(BatchQueue(policy(window=0.0)), model, max_queue_tokens, rates, clock, **options)


@contextlib.asynccontextmanager
async def running(batcher: Batcher, model: FakeModel, clock: FakeClock) -> AsyncIterator[None]:
    """The batcher running its batches on a thread of its own; at the end the model lets every batch finish, every
    deadline passes and the queue is drained."""
    with ThreadPoolExecutor(1) as thread:
        batcher.start(thread)
        try:
            yield
        finally:
            model.release()
            clock.now += 3600
            batcher.drain()
            await batcher.drained()


def flood(batcher: Batcher) -> None:
    """The greedy caller's 9 requests of 8 texts of 100 tokens (7,200 tokens), with no deadline."""
    for i in range(9):
        batcher.submit([ids(100, 1000 + i)] * 8, math.inf, "peer:greedy")


def test_an_interactive_caller_is_admitted_and_answered_while_a_greedy_one_holds_the_queue():
    """A greedy caller queues 7,200 tokens (7.2 s at 1000 tokens/s) with no deadline, and more until the queue is
    full; an interactive caller's text with a 2 s deadline is admitted anyway (first come, first served would predict
    over 10 s), runs right after the batches already taken, and the greedy caller's next request is the one refused."""
    clock = FakeClock()
    model = FakeModel(clock, batch_seconds=0.1, held=True)
    batcher = batcher_over(model, clock, 10_000, fair_share_headroom=0.1)

    async def main():
        async with running(batcher, model, clock):
            flood(batcher)
            await model.running(1)
            refused_before = counter("classifier_fair_share_refusals_total", resource="queue", caller="peer")
            with pytest.raises(Overloaded) as refused:
                for i in range(20):  # until the queue is full
                    batcher.submit([ids(100, 2000 + i)] * 8, math.inf, "peer:greedy")
            assert refused.value.reason == "queue_full"  # alone, the greedy caller meets the plain limit
            admitted_before = counter("classifier_admitted_texts_total", caller="client_id")
            mine = batcher.submit([ids(10, 7)], clock.now + 2.0, "client_id:interactive")
            batcher.publish_admitted()  # as the event loop does, QUEUE_STATE_DELAY later
            assert counter("classifier_admitted_texts_total", caller="client_id") == admitted_before + 1
            with pytest.raises(Overloaded) as greedy_again:
                batcher.submit([ids(100, 3000)] * 8, math.inf, "peer:greedy")
            assert greedy_again.value.reason == "fair_share"
            assert "fair share" in str(greedy_again.value.message)
            assert counter("classifier_fair_share_refusals_total", resource="queue", caller="peer") == (refused_before + 1)
            model.release()
            [scores] = await asyncio.gather(*mine.futures)
            assert scores == [10.0, 7.0]
            # The batch running when it came, perhaps the one taken while that ran, then its own (it seeded it).
            [ran_in] = [i for i, batch in enumerate(model.ran) if any(sequence[0] == 7 for sequence in batch)]
            assert ran_in <= 2

    asyncio.run(main())


class OneBatchAtATime(FakeModel):
    """FakeModel whose batches each wait, once started, for a step the test grants."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, batch_seconds=0.1)
        self.steps = threading.Semaphore(0)

    def run(self, sequences: list[list[int]]) -> list[list[float]]:
        scores = super().run(sequences)  # recorded as started
        assert self.steps.acquire(timeout=30)
        return scores

    def release(self) -> None:
        """Every batch, now and to come, runs to its end."""
        super().release()
        self.steps.release(1000)


def test_while_callers_share_the_model_the_next_batch_is_chosen_as_the_running_one_ends():
    """A greedy caller's batches run back to back, one taken while the other runs; once an interactive caller has
    come, the next batch is chosen only when the running one ends, so a text that came while it ran joins it rather
    than waiting one batch more."""
    clock = FakeClock()
    model = OneBatchAtATime(clock)
    batcher = batcher_over(model, clock, 100_000, shared_batch_seconds=0.05)

    async def main():
        async with running(batcher, model, clock):
            flood(batcher)
            await model.running(1)
            await model.collated(2)  # the next greedy batch is taken while the first runs
            first = batcher.submit([ids(10, 7)], math.inf, "client_id:interactive")
            model.steps.release()
            await model.running(2)  # the greedy batch taken ahead; nothing is taken while it runs now
            second = batcher.submit([ids(10, 8)], math.inf, "client_id:interactive")
            model.steps.release(1000)
            assert await asyncio.gather(*first.futures, *second.futures) == [[10.0, 7.0], [10.0, 8.0]]
            assert sorted(sequence[0] for sequence in model.ran[2]) == [7, 8]

    asyncio.run(main())


# Who is calling


def scope(headers: dict[bytes, bytes], client=("10.0.0.7", 4321)) -> dict:
    return {"headers": list(headers.items()), "client": client}


def test_callers_are_their_key_when_keys_are_on_else_their_client_id_else_their_peer():
    keyed = CallerIdentity(keyed=True, client_id_header="X-Client-Id", max_id_length=8)
    open_ = CallerIdentity(keyed=False, client_id_header="X-Client-Id", max_id_length=8)
    with_key = scope({b"authorization": b"Bearer secret-key", b"x-client-id": b"batch-job"})
    assert keyed(with_key) == "key:" + hashlib.sha256(b"secret-key").hexdigest()[:16]
    assert "secret" not in keyed(with_key)
    assert open_(with_key) == "client_id:batch-jo"  # cut to 8 characters
    assert keyed(scope({b"x-client-id": b"  "})) == "peer:10.0.0.7"  # a blank id names nobody
    assert open_(scope({}, client=None)) == "peer:unknown"
    assert [class_of(caller) for caller in ("key:ab", "client_id:x", "peer:1.2.3.4", "", "odd")] == ["key", "client_id", "peer", "none", "none"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("fair_share_headroom", 1.5),
        ("fair_share_headroom", -0.1),
        ("client_id_header", ""),
        ("client_id_max_length", 0),
        ("client_id_max_length", 4096),
    ],
)
def test_bad_fair_share_settings_are_refused(name, value):
    with pytest.raises(ValidationError):
        Settings(**{name: value})


def test_the_caller_reaches_the_back_half():
    keyed, open_ = FakeScorer(), FakeScorer()  # a back half stops with its app

    async def main():
        async with serving(create_app(settings(api_keys="k1,k2"), fake_engine(keyed))) as client:
            auth = {"Authorization": "Bearer k2"}
            assert (await client.post("/classify", json={"texts": ["hi"]}, headers=auth)).status_code == 200
        async with serving(create_app(settings(), fake_engine(open_))) as client:
            named = {"X-Client-Id": "nightly-batch"}
            assert (await client.post("/classify", json={"texts": ["hi"]}, headers=named)).status_code == 200
            assert (await client.post("/predict", json={"inputs": "hi"})).status_code == 200
            shown = (await client.get("/info")).json()["settings"]
            assert (shown["fair_share_headroom"], shown["client_id_header"], shown["client_id_max_length"]) == (0.1, "X-Client-Id", 64)

    asyncio.run(main())
    assert keyed.callers == ["key:" + hashlib.sha256(b"k2").hexdigest()[:16]]
    assert open_.callers == ["client_id:nightly-batch", "peer:127.0.0.1"]


# Retry-After: a caller back too soon is refused unread


def test_a_caller_told_to_retry_later_is_held_until_then_while_others_call_and_one_told_a_second_is_not():
    book = RetryAfterBook(capacity=2)
    book.arrived("peer:greedy", 100.0)
    book.told("peer:greedy", 30.0, now=100.0)
    assert book.seconds_left("peer:greedy", 101.0) == 0.0  # alone: refused request by request, never held
    book.arrived("client_id:interactive", 108.0)
    book.told("client_id:interactive", 1.0, now=108.0)  # room any moment: not held
    assert book.seconds_left("peer:greedy", 110.0) == 20.0
    assert book.seconds_left("client_id:interactive", 108.5) == 0.0
    assert book.seconds_left("peer:greedy", 113.5) == 0.0  # the other caller came 5.5 s ago: nobody to protect
    book.arrived("client_id:interactive", 125.0)
    assert book.seconds_left("peer:greedy", 126.0) == 4.0
    assert book.seconds_left("peer:greedy", 130.0) == 0.0  # its time passed
    for i in range(3):  # a third caller held pushes out the earliest told
        book.told(f"peer:{i}", 5.0, now=200.0 + i)
    book.arrived("client_id:interactive", 203.0)
    assert [book.seconds_left(f"peer:{i}", 203.0) for i in range(3)] == [0.0, 3.0, 4.0]


def test_a_caller_back_before_its_retry_after_is_refused_unread_and_others_are_served():
    """Beside another caller, the queue refuses a caller's texts with Retry-After 30 s; its next request is refused at
    once, without reaching the back half, while the other caller is answered and the held one may still read /info.
    A caller alone is not held: its next request reaches the back half."""
    back = FakeScorer(Overloaded("predicted_wait", "the queue would not reach these texts in time", 30.0), fail_token=12)  # "hi"
    interactive = {"X-Client-Id": "interactive"}

    async def main():
        async with serving(create_app(settings(), fake_engine(back))) as client:
            greedy = {"X-Client-Id": "greedy"}
            assert (await client.post("/classify", json={"texts": ["a"]}, headers=interactive)).status_code == 200
            refused = await client.post("/classify", json={"texts": ["hi"]}, headers=greedy)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
            before = counter("classifier_early_retry_refusals_total", caller="client_id")
            back.fail_token = -1  # the queue would take them now: the caller is still held to what it was told
            again = await client.post("/classify", json={"texts": ["hi"]}, headers=greedy)
            assert again.status_code == 429 and 29 <= int(again.headers["retry-after"]) <= 30
            assert "refused unread" in again.json()["error"]
            assert counter("classifier_early_retry_refusals_total", caller="client_id") == before + 1
            assert (await client.get("/info", headers=greedy)).status_code == 200
            assert (await client.post("/classify", json={"texts": ["hi"]}, headers=interactive)).status_code == 200
        async with serving(create_app(settings(), fake_engine(alone))) as client:
            assert (await client.post("/classify", json={"texts": ["hi"]}, headers=interactive)).status_code == 429
            alone.fail_token = -1
            assert (await client.post("/classify", json={"texts": ["hi"]}, headers=interactive)).status_code == 200

    alone = FakeScorer(back.failure, fail_token=12)  # a back half stops with its app
    asyncio.run(main())
    assert back.callers == ["client_id:interactive", "client_id:greedy", "client_id:interactive"]
    assert alone.callers == ["client_id:interactive", "client_id:interactive"]


def test_a_caller_told_to_retry_later_has_its_requests_waiting_for_a_tokenizer_refused_unencoded():
    """One tokenizer thread, held by the greedy caller's first big request, two more of its big requests queued for
    it; its short request (encoded inline) is refused by the queue with Retry-After 30 s: the two waiting are refused
    at once, the one being encoded is answered, and so is another caller."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.__class__ = GatedTokenizer
    GatedTokenizer.gate.clear()
    back = FakeScorer(Overloaded("predicted_wait", "the queue would not reach these texts in time", 30.0), fail_token=56)  # "zz"
    app = create_app(settings(), fake_engine(back, tokenizer=tokenizer))  # one tokenizer thread
    greedy = {"X-Client-Id": "greedy"}
    big = "x" * 1000  # beyond what is encoded inline

    async def main():
        async with serving(app) as client:

            async def waiting_for_the_tokenizer() -> int:
                return len(app.state.slot.engine().front.encoders._jobs._queued.get("client_id:greedy", ()))

            post = functools.partial(client.post, "/classify", headers=greedy)
            assert (await client.post("/classify", json={"texts": ["a"]}, headers={"X-Client-Id": "interactive"})).status_code == 200
            first = asyncio.create_task(post(json={"texts": ["block", big]}))
            waiting = [asyncio.create_task(post(json={"texts": [big, "more"]})) for _ in range(2)]
            await until(waiting_for_the_tokenizer, lambda count: count == 2)
            before = counter("classifier_early_retry_refusals_total", caller="client_id")
            assert (await post(json={"texts": ["zz"]})).status_code == 429
            for refused in await asyncio.gather(*waiting):
                assert refused.status_code == 429 and "refused unread" in refused.json()["error"]
            assert counter("classifier_early_retry_refusals_total", caller="client_id") == before + 2
            GatedTokenizer.gate.set()
            assert (await first).status_code == 200
            assert (await client.post("/classify", json={"texts": [big]}, headers={"X-Client-Id": "interactive"})).status_code == 200

    try:
        asyncio.run(main())
    finally:
        GatedTokenizer.gate.set()
    assert back.callers == ["client_id:interactive", "client_id:greedy", "client_id:greedy", "client_id:interactive"]


# HTTP slots: stalled uploads count against their caller's share


def test_stalled_uploads_hold_their_callers_slots_and_another_caller_still_gets_in():
    """4 slots, headroom 50%: one caller's 4 stalled uploads fill them; another caller's upload still gets in (its
    share is 2), the stalled caller's fifth is refused at once, and the other caller's second request is answered."""

    async def main():
        app = create_app(settings(max_concurrent_requests=4, fair_share_headroom=0.5), fake_engine(FakeScorer()))
        async with serving(app) as client:
            before = await in_flight()
            stalled = {**JSON, "content-length": "1000", "x-client-id": "stalled"}
            uploads = [RawClient([b'{"texts": ["part of a body'], finished=False) for _ in range(4)]
            calls = [upload.call(app, stalled) for upload in uploads]
            await until(in_flight, lambda count: count == before + 4)
            slow = RawClient([b'{"texts": ["slow'], finished=False)
            calls.append(slow.call(app, {**stalled, "x-client-id": "interactive"}))
            await until(in_flight, lambda count: count == before + 5)
            refused_before = counter("classifier_fair_share_refusals_total", resource="slots", caller="client_id")
            more = RawClient([b'{"texts": ["another'], finished=False)
            await more.call(app, stalled)  # refused at once: it does not wait for its body
            refused_after = counter("classifier_fair_share_refusals_total", resource="slots", caller="client_id")
            other = await client.post("/classify", json={"texts": ["hi"]}, headers={"X-Client-Id": "interactive"})
            for upload in [*uploads, slow]:
                upload.leave()
            await asyncio.gather(*calls)
            return other, more.answer, refused_after - refused_before

    other, (status, headers, body), refusals = asyncio.run(main())
    assert other.status_code == 200
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["error"] == (
        "the server is handling 5 requests, 4 of them this caller's, more than its fair share (2 of 4, 2 callers); retry shortly"
    )
    assert refusals == 1
