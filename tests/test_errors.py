"""The one error hierarchy: each error's status, message and headers, and that they survive pickling (the engine's
back half may answer from another process)."""

import pickle

import pytest

from service.errors import (
    ClassifierError,
    DeadlineExceeded,
    InferenceFailed,
    LoadFailed,
    NotAccepting,
    NotReady,
    Overloaded,
    TextTooLargeForDevice,
    TextTooLong,
)

ERRORS = [
    (TextTooLong(1, 600, 512), 413, {}),
    (Overloaded("queue_full", "the queue is full", 4.0), 429, {"Retry-After": "4"}),
    (NotAccepting(), 503, {"Retry-After": "1"}),
    (NotReady(), 503, {"Retry-After": "5"}),
    (LoadFailed("FileNotFoundError: gone"), 503, {}),
    (DeadlineExceeded(), 504, {}),
    (TextTooLargeForDevice(4000), 413, {}),
    (InferenceFailed(IndexError("index out of range")), 500, {}),
]


@pytest.mark.parametrize(("error", "status", "headers"), ERRORS, ids=lambda value: type(value).__name__)
def test_each_error_carries_its_status_message_and_headers_through_pickling(error, status, headers):
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, ClassifierError) and type(restored) is type(error)
    assert (restored.status, restored.headers) == (error.status, error.headers) == (status, headers)
    assert restored.message == error.message == str(restored) and error.message


def test_messages_say_what_to_do():
    assert str(TextTooLong(1, 600, 512)) == (
        "texts[1] has 600 tokens but the model takes at most 512; shorten it or send truncate=true"
    )
    assert str(Overloaded("queue_full", "the queue is full", 4.0)) == "the queue is full; retry in about 4 s"
    assert Overloaded("predicted_wait", "slow", 2.0).reason == "predicted_wait"
    assert str(InferenceFailed(IndexError("bad id"))) == "the model failed on a text: IndexError: bad id"
