"""The batching decisions, driven with a fake clock: no threads, no sleeping, no torch."""

import itertools

import pytest

from service.scheduler import (
    BatchingPolicy,
    BatchQueue,
    Place,
    QueuedText,
    deadline_passed,
    default_bucket_bounds,
    missed_deadlines,
)

WINDOW = 0.005


def policy(**overrides) -> BatchingPolicy:
    settings = dict(
        bucket_bounds=(16, 32, 64, 128),
        max_batch_tokens=512,
        max_batch_size=8,
        window=WINDOW,
        merge_min_efficiency=0.9,
    )
    settings.update(overrides)
    return BatchingPolicy(**settings)


def text(tokens: int, at: float = 0.0, name=None) -> QueuedText:
    return QueuedText(tokens, at, name)


def drain(queue: BatchQueue, now: float) -> list:
    batches = []
    while (batch := queue.next_batch(now)) is not None:
        batches.append(batch)
    return batches


def test_a_lone_text_waits_for_the_window_then_leaves_alone():
    queue = BatchQueue(policy())
    queue.append(text(10, at=1.0))
    assert queue.next_batch(1.0 + WINDOW / 2) is None
    assert queue.wake_at() == pytest.approx(1.0 + WINDOW)
    batch = queue.next_batch(1.0 + WINDOW)
    assert [item.tokens for item in batch.items] == [10]
    assert batch.reason == "window"
    assert batch.padded_length == 10
    assert len(queue) == 0 and queue.tokens == 0 and queue.wake_at() is None


def test_at_light_load_a_text_starts_at_once_instead_of_idling_through_the_window():
    """Texts 200 ms apart: nobody will join within a 5 ms window, so waiting for one would only add latency."""
    queue = BatchQueue(policy())
    for i in range(5):
        now = i * 0.2
        queue.append(text(10, at=now, name=i))
        batch = queue.next_batch(now) if i else queue.next_batch(now + WINDOW)  # the first has no rate yet
        assert [item.handle for item in batch.items] == [i]


def test_at_high_rate_the_window_still_gathers_a_batch():
    """Texts 0.5 ms apart: partners are expected within the window, so the bucket keeps filling."""
    queue = BatchQueue(policy())
    for i in range(6):
        queue.append(text(10, at=i * 0.0005, name=i))
        assert queue.next_batch(i * 0.0005) is None
    assert queue.wake_at() == pytest.approx(WINDOW - 0.0005)
    batch = queue.next_batch(queue.wake_at())
    assert [item.handle for item in batch.items] == list(range(6))


def test_texts_of_one_request_count_as_one_arrival():
    """Requests of 10 texts, 10 ms apart: the gap is 10 ms (longer than the window), not mostly zeros."""
    queue = BatchQueue(policy(max_batch_size=64, max_batch_tokens=4096))
    for at in (0.0, 0.01):
        for _ in range(10):
            queue.append(text(10, at=at))
        batch = queue.next_batch(at + WINDOW) if at == 0.0 else queue.next_batch(at)
        assert batch is not None and len(batch.items) == 10


def test_texts_of_different_buckets_do_not_share_a_batch_when_padding_would_suffer():
    queue = BatchQueue(policy())
    queue.append(text(10, name="short"))
    queue.append(text(100, name="long"))
    batches = drain(queue, now=WINDOW)
    assert sorted([item.handle for item in b.items] for b in batches) == [["long"], ["short"]]
    assert all(b.padding_efficiency == 1.0 for b in batches)


def test_neighbouring_buckets_merge_while_efficiency_stays_above_the_floor():
    queue = BatchQueue(policy())
    for tokens in (30, 31, 32):  # bucket (16, 32]
        queue.append(text(tokens))
    queue.append(text(33))  # bucket (32, 64], only one token longer
    queue.append(text(60))  # same bucket, but would pad the 30s far too much
    batches = drain(queue, now=WINDOW)
    assert sorted(item.tokens for item in batches[0].items) == [30, 31, 32, 33]
    assert batches[0].padded_length == 33
    assert [item.tokens for item in batches[1].items] == [60]


def test_a_full_bucket_flushes_on_its_token_budget_before_the_window():
    queue = BatchQueue(policy(max_batch_tokens=256))
    for _ in range(4):
        queue.append(text(64))
    assert queue.next_batch(0.0) is None  # 4 x 64 = 256 fits exactly: could still take no more, but is not over
    queue.append(text(64))
    batch = queue.next_batch(0.0)
    assert batch.reason == "budget"
    assert len(batch.items) == 4 and batch.padded_tokens <= 256
    assert len(queue) == 1


def test_a_full_bucket_flushes_on_its_size_limit_before_the_window():
    queue = BatchQueue(policy(max_batch_size=3))
    for i in range(4):
        queue.append(text(8, name=i))
    batch = queue.next_batch(0.0)
    assert batch.reason == "size"
    assert [item.handle for item in batch.items] == [0, 1, 2]  # oldest first


def test_dynamic_padding_pads_to_the_longest_text_rounded_to_the_multiple():
    queue = BatchQueue(policy(pad_multiple=8, merge_min_efficiency=0.5))
    for tokens in (17, 20, 21):
        queue.append(text(tokens))
    batch = queue.next_batch(WINDOW)
    assert batch.padded_length == 24
    assert batch.real_tokens == 58 and batch.padded_tokens == 72


def test_a_due_bucket_goes_before_full_batches_of_younger_texts():
    queue = BatchQueue(policy(max_batch_size=2))
    queue.append(text(100, at=0.0, name="old"))
    for i in range(2):
        queue.append(text(8, at=0.004, name=f"young{i}"))
    batch = queue.next_batch(0.006)
    assert [item.handle for item in batch.items] == ["old"]


def test_no_text_waits_longer_than_the_window_plus_one_batch_under_steady_load():
    """Short texts stream in fast enough to fill a batch every step; long ones trickle in. A batch takes one
    step. Every text, long ones included, leaves within the window plus the one batch running when its bucket falls due."""
    queue = BatchQueue(policy(max_batch_size=4, max_batch_tokens=512))
    step = 0.001
    waits, sent = [], 0
    busy_until = 0.0
    for tick in range(3000):
        now = tick * step
        arrivals = [8, 9] + ([120] if tick % 7 == 0 else []) + ([40] if tick % 11 == 0 else [])
        for tokens in arrivals:
            queue.append(text(tokens, at=now))
        sent += len(arrivals)
        if now >= busy_until and (batch := queue.next_batch(now)) is not None:
            waits += [now - item.arrived_at for item in batch.items]
            busy_until = now + step
    assert len(queue) < 50  # the load is sustainable, so the guarantee applies
    assert len(waits) + len(queue) == sent
    assert max(waits) <= WINDOW + step + 1e-9


def test_nothing_is_lost_or_duplicated_and_limits_hold():
    queue = BatchQueue(policy())
    lengths = [3, 128, 15, 16, 17, 40, 64, 65, 90, 127, 2, 31, 32, 33] * 7
    for i, tokens in enumerate(lengths):
        queue.append(text(tokens, at=i * 0.0001, name=i))
    batches = drain(queue, now=1.0)
    seen = [item.handle for batch in batches for item in batch.items]
    assert sorted(seen) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch.items) <= 8
        assert batch.padded_tokens <= 512
        assert batch.padded_length == max(item.tokens for item in batch.items)
    assert len(queue) == 0 and queue.tokens == 0


def test_texts_longer_than_the_last_bound_go_to_the_last_bucket():
    queue = BatchQueue(policy())
    assert queue.bucket_of(500) == 3
    assert queue.bucket_of(16) == 0 and queue.bucket_of(17) == 1


def test_default_bounds_are_ascending_narrow_and_end_at_the_max_length():
    bounds = default_bucket_bounds(512)
    assert bounds[-1] == 512 and list(bounds) == sorted(set(bounds))
    assert all(b / a <= 1.26 for a, b in itertools.pairwise(bounds[3:]))
    assert all(b % 8 == 0 for b in default_bucket_bounds(512, pad_multiple=8))


def test_policy_rejects_a_budget_too_small_for_the_longest_text():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        policy(max_batch_tokens=100)


def test_texts_past_their_deadline_are_removed_and_handed_back():
    queue = BatchQueue(policy(window=10.0))
    queue.append(QueuedText(10, 0.0, "early", deadline=1.0))
    queue.append(QueuedText(20, 0.0, "late", deadline=3.0))
    queue.append(QueuedText(100, 0.0, "long", deadline=1.0))
    assert queue.wake_at() == pytest.approx(1.0)  # the collation thread wakes for the first deadline
    assert queue.remove_missed_deadlines(0.999) == []
    missed = queue.remove_missed_deadlines(1.0)
    assert sorted(item.handle for item in missed) == ["early", "long"]
    assert (len(queue), queue.tokens) == (1, 20)
    assert queue.wake_at() == pytest.approx(3.0)
    assert [item.handle for item in queue.remove_missed_deadlines(5.0)] == ["late"]
    assert (len(queue), queue.tokens, queue.wake_at()) == (0, 0, None)


def test_a_text_that_left_in_a_batch_is_not_handed_back_at_its_deadline():
    queue = BatchQueue(policy())
    queue.append(QueuedText(10, 0.0, "a", deadline=0.5))
    assert [item.handle for item in queue.next_batch(WINDOW).items] == ["a"]
    queue.append(QueuedText(12, 1.0, "b", deadline=9.0))
    assert queue.remove_missed_deadlines(1.0) == []  # "a" is gone; only "b" is queued, and it has time left
    assert [item.handle for item in drain(queue, 1.0 + WINDOW)[0].items] == ["b"]


def test_texts_whose_caller_left_are_removed_from_the_queue_and_its_token_count():
    queue = BatchQueue(policy())
    mine = [QueuedText(10, 0.0, "mine-1"), QueuedText(70, 0.0, "mine-2")]
    other = QueuedText(11, 0.0, "other")
    for item in (*mine, other):
        queue.append(item)
    batch_before = QueuedText(30, 0.0, "already-running")
    assert queue.remove([*mine, batch_before]) == mine  # one was never (or no longer) queued
    assert (len(queue), queue.tokens) == (1, 11)
    assert [item.handle for item in drain(queue, 1.0)[0].items] == ["other"]


def test_texts_whose_deadline_would_pass_before_their_batch_ends_are_named_earliest_first():
    # 100 tokens/s: the whole batch (60 tokens) would end at 0.6 s.
    soon = QueuedText(30, 0.0, "soon", deadline=0.39)  # still late once "later" is out (0.4 s)
    later = QueuedText(20, 0.0, "later", deadline=0.35)
    patient = QueuedText(10, 0.0, "patient", deadline=5.0)
    assert [item.handle for item in missed_deadlines([soon, later, patient], 0.0, 100.0)] == ["later", "soon"]


def test_dropping_a_late_text_shortens_the_batch_enough_for_the_next():
    # 60 tokens would end at 0.6 s, past "a" (0.5); without "a" the batch ends at 0.3 s, before "b" (0.45).
    a = QueuedText(30, 0.0, "a", deadline=0.5)
    b = QueuedText(20, 0.0, "b", deadline=0.45)
    c = QueuedText(10, 0.0, "c", deadline=5.0)
    assert [item.handle for item in missed_deadlines([a, b, c], 0.0, 100.0)] == ["b"]
    assert missed_deadlines([a, c], 0.0, 100.0) == []  # 40 tokens end at 0.4 s


def test_the_answers_delivery_lag_counts_against_the_deadline():
    # 40 tokens end at 0.4 s; with 0.15 s more to reach the event loop, "a" (0.5) would hear too late.
    a = QueuedText(30, 0.0, "a", deadline=0.5)
    c = QueuedText(10, 0.0, "c", deadline=5.0)
    assert [item.handle for item in missed_deadlines([a, c], 0.0, 100.0, delivery_lag=0.15)] == ["a"]


def test_before_the_rate_is_measured_only_passed_deadlines_are_missed():
    assert missed_deadlines([QueuedText(500, 0.0, "x", deadline=0.001)], 0.0, None) == []
    passed = QueuedText(5, 0.0, "passed", deadline=1.0)
    assert missed_deadlines([QueuedText(500, 0.0, "x", deadline=9.0), passed], 1.0) == [passed]


def test_a_deadline_has_passed_once_now_reaches_it():
    assert not deadline_passed(1.0, 0.999)
    assert deadline_passed(1.0, 1.0) and deadline_passed(1.0, 2.0)
    assert not deadline_passed(float("inf"), 1e12)


def test_a_text_joining_a_bucket_follows_its_last_text_after_the_buckets_whose_first_text_is_older():
    queue = BatchQueue(policy())
    queue.append(text(30, at=1.0, name="a"))  # bucket 32, first at 1.0
    queue.append(text(60, at=2.0, name="b"))  # bucket 64, first at 2.0
    queue.append(text(10, at=3.0, name="c"))  # bucket 16, first at 3.0
    queue.append(text(20, at=4.0, name="d"))  # bucket 32 again
    assert (queue.place(25).follows.handle, queue.place(25).tokens_ahead) == ("d", 50)  # bucket 32 goes first
    assert (queue.place(50).follows.handle, queue.place(50).tokens_ahead) == ("b", 110)  # after bucket 32
    assert (queue.place(12).follows.handle, queue.place(12).tokens_ahead) == ("c", 120)  # last: behind everything
    assert queue.place(100) == Place(None, 120)  # bucket 128 is empty: it would open a batch behind all the others


def test_a_text_that_would_not_fit_its_buckets_batch_opens_one_behind_everything():
    queue = BatchQueue(policy())  # 8 texts at most per batch
    queue.append(text(60, at=0.0))
    for index in range(7):
        queue.append(text(20, at=1.0 + index, name=index))
    assert (queue.place(20).follows.handle, queue.place(20).tokens_ahead) == (6, 200)  # an 8th fits, after bucket 64
    queue.append(text(20, at=9.0))
    assert queue.place(20) == Place(None, 220)  # a 9th would not
    drain(queue, now=100.0)
    assert queue.place(20) == Place(None, 0) and queue.tokens == 0


def test_in_arrival_order_a_text_follows_the_queue_while_it_fits_one_batch_at_the_longest_length():
    queue = BatchQueue(policy(batching="arrival"))
    for index in range(3):
        queue.append(text(10, at=float(index), name=index))
    assert (queue.place(10).follows.handle, queue.place(10).tokens_ahead) == (2, 30)  # 4 x 128 tokens fit 512
    queue.append(text(10, at=3.0))
    assert queue.place(10) == Place(None, 40)
