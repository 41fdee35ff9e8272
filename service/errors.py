"""The one error hierarchy of the classifier: every refusal or failure a caller can get, with its HTTP status.

Stages raise these; the HTTP layer answers any of them generically as `{"error": message}` with `status` and
`headers`. With --workers, `service.ipc` carries them from the engine process to the API process as their kind,
message and headers (`encode_failure`, `decode_failure`).
"""


class ClassifierError(Exception):
    """A request the classifier refused or could not answer: a status code, a message saying what to do, headers."""

    status = 500
    message = "the classifier could not answer"

    def __init__(self, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.message = message or type(self).message
        self.headers = headers or {}
        super().__init__(self.message)


def internal_error_message(error: Exception) -> str:
    """What a caller is told of an error that is not a ClassifierError (a bug): its type; the log has the rest."""
    return f"internal error ({type(error).__name__}); the server log has the details"


class TextTooLong(ClassifierError):
    """A text exceeds the model's maximum length and the request asked not to truncate."""

    status = 413

    def __init__(self, index: int, tokens: int, max_length: int, exact: bool = True) -> None:
        counted = f"{tokens}" if exact else f"more than {tokens - 1}"
        super().__init__(f"texts[{index}] has {counted} tokens but the model takes at most {max_length}; shorten it or send truncate=true")
        self.index, self.tokens, self.max_length = index, tokens, max_length


class Overloaded(ClassifierError):
    """The queue cannot take these texts now: it would exceed its token limit (`queue_full`), their caller would hold
    more than its fair share of a full queue (`fair_share`), or it would not reach them before their deadline
    (`predicted_wait`)."""

    status = 429

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(f"{message}; retry in about {retry_after:.0f} s", {"Retry-After": f"{retry_after:.0f}"})
        self.reason, self.retry_after = reason, retry_after


class NotAccepting(ClassifierError):
    """The classifier is draining for shutdown and takes no new texts."""

    status = 503
    message = "the service is shutting down; retry on another replica"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class NotReady(ClassifierError):
    """The model is still loading."""

    status = 503
    message = "the model is still loading; retry shortly"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "5"})


class LoadFailed(ClassifierError):
    """The model could not be loaded; this replica will not answer."""

    status = 503

    def __init__(self, failure: str) -> None:
        # The replica exits after this (service.server): the caller's only remedy is another replica.
        super().__init__(f"model failed to load: {failure}; retry on another replica")


class DeadlineExceeded(ClassifierError):
    """The texts' deadline passed before the model reached them, or would pass before their batch ended."""

    status = 504
    message = "the request's deadline passed before the model reached its texts; retry later or allow more time (timeout_ms)"
    unreachable_message = (
        "the request's deadline passed, or would pass before the model finished its texts; retry later or allow more time (timeout_ms)"
    )


class TextTooLargeForDevice(ClassifierError):
    """One text, run alone, ran the device out of memory: it cannot be answered at this length."""

    status = 413

    def __init__(self, tokens: int) -> None:
        super().__init__(f"a text of {tokens} tokens does not fit in the device's memory even alone; send it shorter")
        self.tokens = tokens


class InferenceFailed(ClassifierError):
    """The model raised on one text even when it ran alone (its batch's other texts got their answers)."""

    status = 500

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"the model failed on a text: {type(cause).__name__}: {cause}")


class EngineUnavailable(ClassifierError):
    """The engine process stopped answering: this replica cannot classify until it is restarted."""

    status = 503
    message = "the inference engine of this replica has stopped; retry on another replica"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})
