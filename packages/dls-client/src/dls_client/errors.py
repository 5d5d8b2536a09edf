"""The exceptions of dls-client: one hierarchy, so callers catch as broadly as they need.

No ``from __future__ import annotations`` here, as in dls_proto.messages: Holder's fields would be strings,
each compiled when the class is made, at every client's start (dls-lock's before it connects).
"""

from typing import NamedTuple

import dls_proto


class Holder(NamedTuple):
    """Who holds a lock another request wanted."""

    mode: int
    pid: int
    port: int
    client_pid: int
    thread: int
    ip: str

    def describe(self) -> str:
        return f"port {self.port}, pid {self.client_pid} on {self.ip} (lock server pid {self.pid})"


class DlsError(Exception):
    """Base of every dls-client error."""


class ConfigurationError(DlsError, dls_proto.ConfigurationError):
    """JDLS or JBCPORTNO (or an argument) is not valid; the message names the option.

    dls-proto reads both for every dls program and raises its own ConfigurationError, of which this is
    the dls-client kind: ``dls_client.config`` turns one into the other, so that DlsError catches it.
    """


class InvalidRequest(DlsError, ValueError):
    """A lock request no lock service can take, refused before anything is sent: a record key that is not
    text (a str with lone surrogates, as os.fsdecode makes of bytes that are not UTF-8: pass the bytes), or
    longer than dls_proto.MAX_KEY bytes, or a request larger than the lock server takes (its --max-frame).
    The message says which; the connection and the process's other locks are untouched."""


class ServiceUnavailable(DlsError):
    """No lock service could be reached, or the one in use was lost."""


class ServiceLost(ServiceUnavailable):
    """No longer raised; kept so that code written for it still imports and catches it.

    It said that every lock server of a resilient process had failed and that the process must wrap
    up. A client now connects again by itself (the next request after a service is back works), and
    what a failure cost is said lock by lock (LockLost).
    """


class AcknowledgementTimeout(ServiceUnavailable):
    """The service said nothing for TIMEOUT seconds while a request was outstanding."""

    #: The connection that went silent (a dls_client.channel.Channel), for whoever must give it up: with
    #: SERVER2, a request on the primary's connection may time out on the secondary's.
    channel: object = None


class LockLost(DlsError):
    """A lock this process held was lost for a reason other than its own release (its lock server died
    and the lock could not be reclaimed in time, the service restarted without it, the client was cut off).

    Raised by the lock's next call (``release()``, ``ensure_held()``, leaving its ``with`` block), so
    that a holder never goes on believing it holds a lock someone else may now hold. ``path`` and
    ``key`` name the lock, ``reason`` says how it was lost.
    """

    def __init__(self, path: str, key: bytes, reason: str) -> None:
        super().__init__(f"lock {describe(path, key)} was lost: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


def describe(path: str, key: bytes) -> str:
    """How messages name a record lock: its file and key."""
    return f"{path} {key.decode('utf-8', 'replace')}"


class LockRefused(DlsError):
    """The lock is held by another owner and the request would not wait."""

    def __init__(self, message: str, holder: Holder) -> None:
        super().__init__(message)
        self.holder = holder


class LockTimeout(LockRefused):
    """The request waited as long as it was allowed to."""


class LockCancelled(LockRefused):
    """The request was withdrawn (release-all while it waited)."""


class Cancelled(DlsError):
    """The waiting request (``lock`` or ``HeldLock.convert``) was withdrawn by its ``dls_client.Cancel``, called
    from another thread (or before it waited). A conversion's lock stays held in its old mode. (LockCancelled
    is the withdrawal by a ``release_all``, which gives up every lock; this one gives up only the request.)"""


class Deadlock(DlsError):
    """The waiting request (a lock or a conversion) closed a cycle of waiters and was chosen to be refused
    so that the others go on: its owner still holds what it held, a conversion's lock in its old mode. Let go
    of something (or retry later): waiting again at once may close the same cycle."""


class Unsupported(DlsError):
    """The lock mechanism or the service in use cannot do what was asked; the message says what: OS file
    locks (a service run with ``-ibD``) have no conversions or value blocks, a service speaking an older
    protocol neither. Nothing was done."""


class NotWritable(DlsError):
    """A lock of a mode other than PW or EX asked to write (or invalidate) the resource's value block:
    only a PW or EX holder writes it. Nothing was done: the lock is still held, in its mode."""


class RequestFailed(DlsError):
    """The service answered with an error (limit reached, group full, bad request...)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
