"""What a lock service's answer means to the application: the exception of each refusal or error.

One place, for the client (the answer to its request) and for a resilient route
(the secondary's answer, which is the caller's too: a lock is granted only when
both services granted it).
"""

from __future__ import annotations

from typing import TypeGuard

from dls_proto import Acquired, Error, Granted, Message, Refused, RefuseReason, StatusReply, Waiting

from .errors import Deadlock, DlsError, Holder, LockCancelled, LockRefused, LockTimeout, RequestFailed

#: The answers that grant a lock: Granted, and Acquired (a lock server of protocol version 4 answers Lock and
#: Convert with it: Granted's fields, a fencing token and the value block). Tested ``type(reply) in GRANTS``.
GRANTS = frozenset({Granted, Acquired})
#: A grant, of either kind.
Grant = Granted | Acquired


def is_grant(reply: Message) -> TypeGuard[Grant]:
    """Whether ``reply`` grants a lock (Granted, or Acquired)."""
    return type(reply) in GRANTS


def holder(reply: Refused | Waiting | StatusReply) -> Holder:
    """The holder an answer names."""
    return Holder(reply.holder_mode, reply.holder_pid, reply.holder_port, reply.holder_client_pid,
                  reply.holder_thread, reply.holder_ip)


def failure(reply: Message, what: str) -> DlsError:
    """The exception for ``reply``, an answer other than the one hoped for, to a request about ``what``."""
    if isinstance(reply, Refused):
        who = holder(reply)
        if reply.reason == RefuseReason.TIMEOUT:
            return LockTimeout(f"{what}: still held by {who.describe()} when the wait ended", who)
        if reply.reason == RefuseReason.DEADLOCK:
            return Deadlock(f"{what}: refused to break a deadlock (a cycle of waiters, this request one of them); "
                            f"waiting behind {who.describe()}")
        if reply.reason == RefuseReason.CANCELLED:
            return LockCancelled(f"{what}: request cancelled", who)
        return LockRefused(f"{what}: held by {who.describe()}", who)
    if isinstance(reply, Error):
        return RequestFailed(f"{what}: {reply.reason}", reply.code)
    return DlsError(f"{what}: unexpected answer {type(reply).__name__}")
