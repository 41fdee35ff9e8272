"""Who is calling: one plain string per caller, which the fair share (`fairness`) is kept by.

With API keys on, the caller is its key (a digest of it: the key itself never leaves the HTTP layer); else the client's
own id header (`X-Client-Id` by default, cut to a bounded length), as clients sharing one address (behind a proxy or
NAT) can set; else the peer's address. A caller string is "<class>:<id>"; metrics name only the class, so their labels
stay few whatever the traffic. The id header is the client's word: a client could send many ids to take many shares,
so where callers are not trusted, turn keys on.
"""

import hashlib

from starlette.types import Scope

# The classes of caller, the one label metrics carry; "none" is an unidentified caller (in-process use, tests).
CALLER_CLASSES = ("key", "client_id", "peer", "none")


class CallerIdentity:
    """Names the caller of a request from its ASGI scope: the API key when `keyed`, else the `client_id_header`
    (lower-case, cut to `max_id_length` characters), else the peer address."""

    def __init__(self, keyed: bool, client_id_header: str, max_id_length: int) -> None:
        self.keyed = keyed
        self.client_id_header = client_id_header.lower().encode("latin-1")
        self.max_id_length = max_id_length

    def __call__(self, scope: Scope) -> str:
        key = client_id = None
        for name, value in scope["headers"]:
            if name == b"authorization" and self.keyed:
                key = value.partition(b" ")[2].strip()
            elif name == self.client_id_header:
                client_id = value.strip()[: self.max_id_length]
        if key:  # a wrong key is refused right after (401): its request holds a slot only that long
            return "key:" + hashlib.sha256(key).hexdigest()[:16]
        if client_id:
            return "client_id:" + client_id.decode("latin-1")
        peer = scope.get("client")
        return f"peer:{peer[0]}" if peer else "peer:unknown"


def class_of(caller: str) -> str:
    """The caller's class (`CALLER_CLASSES`): what metrics label it by."""
    kind = caller.partition(":")[0]
    return kind if kind in CALLER_CLASSES else "none"
