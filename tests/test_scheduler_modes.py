"""The padding and batching strategies of the scheduler (CLASSIFIER_PADDING, CLASSIFIER_BATCHING), driven with a fake
clock: no threads, no sleeping, no torch."""

import pytest

from service.scheduler import BatchingPolicy, BatchQueue, QueuedText

WINDOW = 0.005
BOUNDS = (16, 32, 64, 128)


def policy(**overrides) -> BatchingPolicy:
    settings = dict(bucket_bounds=BOUNDS, max_batch_tokens=4096, max_batch_size=8, window=WINDOW)
    settings.update(overrides)
    return BatchingPolicy(**settings)


def queue_of(lengths: list[int], queue_policy: BatchingPolicy, at: float = 0.0) -> BatchQueue:
    queue = BatchQueue(queue_policy)
    for index, tokens in enumerate(lengths):
        queue.append(QueuedText(tokens, at, index))
    return queue


def drain(queue: BatchQueue, now: float) -> list:
    batches = []
    while (batch := queue.next_batch(now)) is not None:
        batches.append(batch)
    return batches


def test_defaults_are_dynamic_padding_and_buckets():
    assert (policy().padding, policy().batching) == ("dynamic", "buckets")


def test_fixed_padding_pads_every_batch_to_the_maximum_length():
    queue = queue_of([5, 10, 7], policy(padding="fixed"))
    [batch] = drain(queue, WINDOW)
    assert batch.padded_length == 128
    assert batch.padded_tokens == 3 * 128
    assert batch.padding_efficiency == pytest.approx(22 / 384)


def test_fixed_padding_rounds_the_maximum_up_to_the_padding_granularity():
    assert policy(padding="fixed", bucket_bounds=(16, 100), pad_multiple=8).padded_length(3) == 104


def test_fixed_padding_counts_padded_tokens_against_the_budget():
    """Three texts of 128 padded tokens fill a 384-token budget, however short they are."""
    queue = queue_of([4] * 7, policy(padding="fixed", max_batch_tokens=384))
    batches = drain(queue, 0.0)  # full batches go before their window runs out
    assert [len(batch.items) for batch in batches] == [3, 3]
    assert {batch.reason for batch in batches} == {"budget"}
    assert [len(batch.items) for batch in drain(queue, WINDOW)] == [1]


def test_fixed_padding_with_buckets_still_fills_batches_from_neighbouring_buckets():
    """Padding is the same whichever texts join, so the efficiency floor does not keep neighbours out."""
    queue = queue_of([10, 30, 60, 120], policy(padding="fixed"))
    [batch] = drain(queue, WINDOW)
    assert sorted(item.tokens for item in batch.items) == [10, 30, 60, 120]


def test_arrival_batching_takes_texts_in_arrival_order_padded_to_their_own_longest():
    lengths = [10, 120, 12, 60, 11, 14, 100, 9, 13, 15]
    batches = drain(queue_of(lengths, policy(batching="arrival", max_batch_size=4)), WINDOW)
    assert [[item.handle for item in batch.items] for batch in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [batch.padded_length for batch in batches] == [120, 100, 15]
    assert [batch.reason for batch in batches] == ["size", "size", "window"]


def test_buckets_group_the_same_texts_by_length_where_arrival_does_not():
    lengths = [10, 120, 12, 60, 11, 14, 100, 9]
    by_bucket = drain(queue_of(lengths, policy(max_batch_size=4)), WINDOW)
    by_arrival = drain(queue_of(lengths, policy(batching="arrival", max_batch_size=4)), WINDOW)
    padded = lambda batches: sum(batch.padded_tokens for batch in batches)  # noqa: E731
    assert sorted(item.tokens for item in by_bucket[0].items) == [10, 11, 12, 14]  # the oldest four of <=16
    assert padded(by_bucket) < padded(by_arrival) / 2


def test_arrival_batching_stops_at_the_budget_without_skipping_ahead():
    """A long text that does not fit waits at the head for the next batch; shorter later ones do not jump it."""
    queue = queue_of([100, 100, 120, 10], policy(batching="arrival", max_batch_tokens=256))
    batches = drain(queue, WINDOW)
    assert [[item.handle for item in batch.items] for batch in batches] == [[0, 1], [2, 3]]
    assert batches[0].reason == "budget"


def test_arrival_batching_waits_the_window_then_goes_with_what_it_has():
    queue = BatchQueue(policy(batching="arrival"))
    queue.append(QueuedText(10, 1.0, "a"))
    queue.append(QueuedText(90, 1.001, "b"))
    assert queue.next_batch(1.0 + WINDOW / 2) is None
    assert queue.wake_at() == pytest.approx(1.0 + WINDOW - 0.001)  # less the expected gap to the next arrival
    batch = queue.next_batch(1.0 + WINDOW)
    assert [item.handle for item in batch.items] == ["a", "b"] and batch.padded_length == 90


def test_arrival_batching_drops_texts_past_their_deadline_and_cancelled_ones():
    queue = BatchQueue(policy(batching="arrival"))
    items = [QueuedText(tokens, 0.0, tokens, deadline) for tokens, deadline in ((10, 1.0), (90, 5.0), (40, 5.0))]
    for item in items:
        queue.append(item)
    assert queue.remove_missed_deadlines(2.0) == [items[0]]
    assert queue.remove([items[2]]) == [items[2]]
    assert len(queue) == 1 and queue.tokens == 90
    [batch] = drain(queue, 2.0)
    assert batch.items == [items[1]]


def test_fixed_padding_and_arrival_together_are_the_classic_server():
    batches = drain(queue_of([5, 6, 7, 8, 9], policy(padding="fixed", batching="arrival", max_batch_size=2)), WINDOW)
    assert [[item.handle for item in batch.items] for batch in batches] == [[0, 1], [2, 3], [4]]
    assert {batch.padded_length for batch in batches} == {128}


@pytest.mark.parametrize("strategy", [{"padding": "static"}, {"batching": "sorted"}])
def test_an_unknown_strategy_is_refused(strategy):
    with pytest.raises(ValueError, match="unknown strategy"):
        policy(**strategy)
