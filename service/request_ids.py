"""Request ids: each HTTP request's id (the client's X-Request-Id, or one made here) is set in a context variable for
the request's task, and a logging filter puts it on every log record, so a request's log lines can be found by its
id in the API process and, since the id crosses in the engine's ScoreRequest, in the engine process too."""

import contextvars
import itertools
import logging
import secrets

# The request being handled in this task ("" outside any request).
current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# The longest id taken from a client, and the characters it may hold: it is echoed in headers and written to logs.
MAX_LENGTH = 128
_ALLOWED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/+=@")
# Ids made here: a random prefix per process and a counter, unique across replicas and cheaper than a uuid each.
_prefix = secrets.token_hex(4)
_sequence = itertools.count(1)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


def from_header(value: bytes | None) -> str:
    """The client's id when it is one to trust in a header and a log line (printable, not too long); else a new one."""
    if value and len(value) <= MAX_LENGTH and _ALLOWED.issuperset(value):
        return value.decode("ascii")
    return f"{_prefix}-{next(_sequence)}"


class RequestIdFilter(logging.Filter):
    """Gives each record `request_id` (the request in progress, or "") and `request_tag` (" [id]" or ""), for
    formats to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or current.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


def configure_logging(level: str, process: str = "") -> None:
    """The root logger's handler, with each line tagged by its request id (and, given, the process's name)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT.replace("%(name)s", f"{process} %(name)s".lstrip()))
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
