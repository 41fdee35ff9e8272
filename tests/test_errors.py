"""The one error hierarchy: each error's status, message and headers, and its wire format between the engine
process and an API process (`service.ipc.encode_failure` / `decode_failure`), through msgpack as the socket carries
it."""

import inspect
import logging

import msgspec
import pytest

from service import errors
from service.errors import (
    ClassifierError,
    DeadlineExceeded,
    EngineUnavailable,
    InferenceFailed,
    LoadFailed,
    NotAccepting,
    NotReady,
    Overloaded,
    TextTooLargeForDevice,
    TextTooLong,
)
from service.ipc import Failure, FromEngine, decode_failure, encode_failure

ERRORS = [
    (TextTooLong(1, 600, 512), 413, {}),
    (Overloaded("queue_full", "the queue is full", 4.0), 429, {"Retry-After": "4"}),
    (NotAccepting(), 503, {"Retry-After": "1"}),
    (NotReady(), 503, {"Retry-After": "5"}),
    (LoadFailed("FileNotFoundError: gone"), 503, {}),
    (DeadlineExceeded(), 504, {}),
    (TextTooLargeForDevice(4000), 413, {}),
    (InferenceFailed(IndexError("index out of range")), 500, {}),
    (EngineUnavailable(), 503, {"Retry-After": "1"}),
    (ClassifierError(), 500, {}),
]


def across_the_socket(failure: Failure) -> Failure:
    decoded = msgspec.msgpack.Decoder(FromEngine).decode(msgspec.msgpack.encode(failure))
    assert isinstance(decoded, Failure)
    return decoded


def test_the_table_has_every_error_of_the_hierarchy():
    defined = {kind for _, kind in inspect.getmembers(errors, inspect.isclass) if issubclass(kind, ClassifierError)}
    assert {type(error) for error, _, _ in ERRORS} == defined


@pytest.mark.parametrize(("error", "status", "headers"), ERRORS, ids=lambda value: type(value).__name__)
def test_each_error_crosses_to_the_api_process_as_the_same_error(error, status, headers):
    failure = across_the_socket(encode_failure(7, error))
    assert (failure.request_id, failure.kind) == (7, type(error).__name__)
    restored = decode_failure(failure)
    assert type(restored) is type(error)
    assert (restored.status, restored.headers) == (error.status, error.headers) == (status, headers)
    assert restored.message == error.message == str(restored) and error.message


def test_an_unexpected_error_crosses_as_a_500_pointing_to_the_engine_log(caplog):
    bug = KeyError("batch")
    with caplog.at_level(logging.ERROR, logger="service.ipc"):
        restored = decode_failure(across_the_socket(encode_failure(3, bug)))
    assert type(restored) is ClassifierError and restored.status == 500 and restored.headers == {}
    assert restored.message == "internal error (KeyError); the server log has the details"
    [logged] = caplog.records
    assert logged.message == "scoring failed unexpectedly" and logged.exc_info[1] is bug


def test_an_unknown_kind_is_a_plain_500_with_its_message_and_headers():
    restored = decode_failure(Failure(1, "ErrorOfANewerEngine", "something new", {"Retry-After": "2"}))
    assert type(restored) is ClassifierError and restored.status == 500
    assert (restored.message, restored.headers) == ("something new", {"Retry-After": "2"})


def test_messages_say_what_to_do():
    assert str(TextTooLong(1, 600, 512)) == ("texts[1] has 600 tokens but the model takes at most 512; shorten it or send truncate=true")
    assert str(Overloaded("queue_full", "the queue is full", 4.0)) == "the queue is full; retry in about 4 s"
    assert Overloaded("predicted_wait", "slow", 2.0).reason == "predicted_wait"
    assert str(InferenceFailed(IndexError("bad id"))) == "the model failed on a text: IndexError: bad id"
