"""Property-based tests of the pure scheduler (hypothesis): for any policy and any arrivals, nothing is lost or
duplicated, batches stay within their token budget and size, merged texts respect the efficiency floor, and no text
waits past its window when the worker is free, however many callers share the queue."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from service.scheduler import BatchingPolicy, BatchQueue, QueuedText

SETTINGS = settings(max_examples=200, deadline=None)
CALLERS = ("", "peer:10.0.0.1", "client_id:batch")  # the queue is shared fairly between callers: every property holds


@st.composite
def policies(draw) -> BatchingPolicy:
    bounds = sorted(draw(st.sets(st.integers(1, 256), min_size=1, max_size=8)))
    pad_multiple = draw(st.sampled_from([1, 8]))
    longest = math.ceil(bounds[-1] / pad_multiple) * pad_multiple
    return BatchingPolicy(
        bucket_bounds=tuple(bounds),
        max_batch_tokens=draw(st.integers(longest, 4 * longest)),
        max_batch_size=draw(st.integers(1, 16)),
        window=draw(st.sampled_from([0.0, 0.001, 0.005, 0.05])),
        pad_multiple=pad_multiple,
        merge_min_efficiency=draw(st.floats(0.3, 1.0)),
    )


@st.composite
def workloads(draw) -> tuple[BatchingPolicy, list[QueuedText]]:
    """A policy and texts (within its longest bucket) arriving in order, some at the same instant, from one to three
    callers."""
    policy = draw(policies())
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0001, 0.001, 0.003, 0.01, 0.1]), min_size=1, max_size=60))
    texts, now = [], 0.0
    for index, gap in enumerate(gaps):
        now += gap
        tokens, caller = draw(st.integers(1, policy.bucket_bounds[-1])), draw(st.sampled_from(CALLERS))
        texts.append(QueuedText(tokens, now, handle=index, caller=caller))
    return policy, texts


def run_with_a_free_worker(policy: BatchingPolicy, texts: list[QueuedText]) -> list[tuple[float, object]]:
    """Feed the arrivals in time order and take every batch as soon as the scheduler hands it out (an infinitely fast
    worker, woken at each arrival and at `wake_at`). Returns (time taken, batch) pairs."""
    queue, taken, pending, now = BatchQueue(policy), [], list(texts), 0.0
    for _ in range(10 * len(texts) + 10):  # each step takes a batch or admits a text: it ends
        wake = queue.wake_at()
        if pending and (wake is None or pending[0].arrived_at <= wake):
            now = max(now, pending[0].arrived_at)
            while pending and pending[0].arrived_at <= now:
                queue.append(pending.pop(0))
        elif wake is not None:
            now = max(now, wake)
        else:
            break
        while (batch := queue.next_batch(now)) is not None:
            taken.append((now, batch))
    assert not pending and len(queue) == 0, "the scheduler stopped handing out batches"
    return taken


@SETTINGS
@given(workloads())
def test_every_text_leaves_exactly_once_in_batches_within_budget_and_size(workload):
    policy, texts = workload
    batches = [batch for _, batch in run_with_a_free_worker(policy, texts)]
    left = [item.handle for batch in batches for item in batch.items]
    assert sorted(left) == [text.handle for text in texts]
    for batch in batches:
        assert 1 <= len(batch.items) <= policy.max_batch_size
        assert batch.padded_length == policy.padded_length(max(item.tokens for item in batch.items))
        assert batch.padded_tokens <= policy.max_batch_tokens


@SETTINGS
@given(workloads())
def test_no_text_waits_past_its_window_when_the_worker_is_free(workload):
    policy, texts = workload
    for taken_at, batch in run_with_a_free_worker(policy, texts):
        for item in batch.items:
            assert taken_at <= item.arrived_at + policy.window + 1e-9


@SETTINGS
@given(workloads())
def test_a_batch_with_texts_merged_from_other_buckets_keeps_the_efficiency_floor(workload):
    policy, texts = workload
    queue = BatchQueue(policy)
    for batch in [batch for _, batch in run_with_a_free_worker(policy, texts)]:
        seed_bucket = queue.bucket_of(batch.items[0].tokens)  # a batch starts with its seed bucket's texts
        if any(queue.bucket_of(item.tokens) != seed_bucket for item in batch.items):
            assert batch.padding_efficiency >= policy.merge_min_efficiency - 1e-9


@SETTINGS
@given(workloads(), st.data())
def test_draining_at_any_time_hands_out_everything_once(workload, data):
    """Texts all queued, then taken at arbitrary (increasing) times: none lost or duplicated, limits hold."""
    policy, texts = workload
    queue = BatchQueue(policy)
    for text in texts:
        queue.append(text)
    now, left = texts[-1].arrived_at, []
    while len(queue):
        now += data.draw(st.sampled_from([0.0, policy.window / 2, policy.window, 1.0]))
        while (batch := queue.next_batch(now)) is not None:
            assert batch.padded_tokens <= policy.max_batch_tokens and len(batch.items) <= policy.max_batch_size
            left += [item.handle for item in batch.items]
    assert sorted(left) == [text.handle for text in texts]
