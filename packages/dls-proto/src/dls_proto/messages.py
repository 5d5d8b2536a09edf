"""Every message of the dls protocol: its kind and its event class, and the protocol's constants.

The bytes of each message are specified by its construct definition in ``spec``
(network byte order). Each message body is a fixed part followed by its
variable fields; the lengths of the variable fields sit in the fixed part, so
that one ``struct`` call decodes a body on the hot path (see ``codec``, whose
layouts a test checks against ``spec``). This module does not import
construct: a client's start-up does without it.

Events are immutable named tuples whose first field is the request id carried
in the frame header: a reply names the request it answers, which lets many
threads share one connection.

No ``from __future__ import annotations`` here: with it every field's annotation is a string, and
typing.NamedTuple compiles each (a ForwardRef) when the class is made, about a hundred ``compile()`` calls
at every import, milliseconds of each client's start-up; the fields' types are plain classes, made at once.
"""

import enum
from typing import Any, NamedTuple

#: The frame format version, the second field of every frame header.
FRAME_VERSION = 1
#: Protocol versions this package speaks, negotiated in Hello/Welcome.
#: Version 2 (dls-proto 0.3) added the lock-delay to Welcome and the Reclaim request; version 1 is no longer spoken.
#: Version 3 (dls-proto 0.5) added the Settings request, by which a client tells its acknowledgement timeout (JDLS
#: TIMEOUT) so that its lock server sends interim Waiting messages often enough; nothing else differs.
PROTOCOL_VERSIONS = (2, 3)
#: Magic that opens every Hello, so that a stray client is recognised at once.
HELLO_MAGIC = b"jDLS"
#: A lock request's ``timeout_ms`` meaning "wait as long as it takes".
WAIT_FOREVER = 0xFFFFFFFF
#: The longest record key a request carries, in bytes: its length travels in 16 bits (``key_len``).
MAX_KEY = 0xFFFF
#: An ``UnlockAll`` thread id meaning "every thread of the client".
ALL_THREADS = 0xFFFFFFFFFFFFFFFF

#: The frame header's size: body length (u32), frame version (u8), message kind (u8), reserved (u16, zero),
#: request id (u32); ``spec.HEADER`` defines it.
HEADER_SIZE = 12


class Mode(enum.IntEnum):
    """The six DLM lock modes; jBASE's READ lock is PR and its WRITE lock EX."""

    NL = 0
    CR = 1
    CW = 2
    PR = 3
    PW = 4
    EX = 5


#: The lock modes a request may ask for, NL (0) to EX (5): any other is refused, by every side alike.
LOCK_MODES = range(len(Mode))


def not_a_mode(mode: object) -> str:
    """The text a refused lock mode is refused with."""
    return f"lock mode {mode!r} is not one of {LOCK_MODES.start}..{LOCK_MODES.stop - 1}"


class LockFlag(enum.IntFlag):
    """Per-request options of a Lock message."""

    NONE = 0
    NO_INTERIM = 1  # the client's JDLS WAIT: no interim Waiting messages
    OSLOCK = 2  # take the record lock as an OS file lock on the server
    BINARY = 4  # a binary (file, execution) lock rather than a record lock


class RefuseReason(enum.IntEnum):
    """Why a lock was not granted."""

    BUSY = 1  # held by another owner and the request would not wait
    TIMEOUT = 2  # waited as long as the request allowed
    CANCELLED = 3  # the client gave up on it
    DEADLOCK = 4  # granting it would close a cycle of waiters


class ErrorCode(enum.IntEnum):
    """Codes of an Error reply; the reason text says the rest."""

    PROTOCOL = 1
    VERSION = 2
    UNKNOWN_MESSAGE = 3
    LIMIT = 4
    GROUP_FULL = 5
    NOT_HELD = 6
    BAD_REQUEST = 7
    INTERNAL = 8
    FORBIDDEN = 9  # not from this address (--admin-allow), not this port (-P), not this kind of lock


class Mechanism(enum.IntEnum):
    """The lock mechanism a lock server uses, told in Welcome."""

    TABLE = 1  # the shared-memory lock table
    OSLOCKS = 2  # OS file locks under the lock-file directories


class HolderState(enum.IntEnum):
    """Answer of a lock status query."""

    FREE = 0
    MINE = 1
    OTHER = 2


class Kind(enum.IntEnum):
    """Message kind codes, the third field of the frame header."""

    HELLO = 0x01
    WELCOME = 0x02
    LOCK = 0x10
    UNLOCK = 0x11
    UNLOCK_ALL = 0x12
    STATUS = 0x13
    INFO_PUT = 0x14
    INFO_GET = 0x15
    ECHO = 0x16
    RECLAIM = 0x17
    SETTINGS = 0x18
    GRANTED = 0x20
    REFUSED = 0x21
    WAITING = 0x22
    STATUS_REPLY = 0x23
    INFO_SNAPSHOT = 0x24
    ECHO_REPLY = 0x25
    UNLOCKED = 0x26
    ERROR = 0x2F


class Hello(NamedTuple):
    """Client to server, first: who the client is and which versions it speaks."""

    request_id: int
    min_version: int
    max_version: int
    flags: int
    port: int
    pid: int
    thread_id: int
    host: str
    program: str


class Welcome(NamedTuple):
    """Server to client: the chosen version and how this lock server works."""

    request_id: int
    version: int
    mechanism: int
    flags: int
    server_pid: int
    max_frame: int
    lock_delay_ms: int  # how long this service keeps the locks of a client it lost, for it to reclaim them
    peer: str
    server_host: str


class Lock(NamedTuple):
    """Take a record lock on (inode, device, key); ``path`` travels for display only."""

    request_id: int
    mode: int
    flags: int
    timeout_ms: int
    thread_id: int
    inode: int
    device: int
    key: bytes
    path: str


class Unlock(NamedTuple):
    """Release the lock a Granted named; answered only if it fails."""

    request_id: int
    handle: int


class Reclaim(NamedTuple):
    """Take back a lock this client held through a lock server that is gone (killed, or the service
    restarted): ``handle`` is what the Granted gave, and the rest must match the lock it named.
    Answered with Granted (the same handle) or Error NOT_HELD when the service no longer keeps it."""

    request_id: int
    handle: int
    mode: int
    thread_id: int
    inode: int
    device: int
    key: bytes


class Settings(NamedTuple):
    """How this client uses the conversation (version 3 on; sent once, right after Welcome, before any
    request; unanswered unless refused). ``ack_timeout_ms`` is how long the client waits in silence for an
    answer (JDLS TIMEOUT): its lock server sends interim Waiting messages often enough to stay well inside it.
    ``flags`` is zero (reserved)."""

    request_id: int
    flags: int
    ack_timeout_ms: int


class UnlockAll(NamedTuple):
    """Release every lock of one thread, or of all threads (ALL_THREADS)."""

    request_id: int
    thread_id: int


class Status(NamedTuple):
    """Ask who holds a record lock, without taking it."""

    request_id: int
    thread_id: int
    inode: int
    device: int
    key: bytes


class InfoPut(NamedTuple):
    """The client's lock information, for the lock server to keep in proc/info."""

    request_id: int
    payload: bytes


class InfoGet(NamedTuple):
    """Ask for an information snapshot of the service (locks and proc/info)."""

    request_id: int
    flags: int


class Echo(NamedTuple):
    """A test string to be sent back, for connection tests."""

    request_id: int
    data: bytes


class Granted(NamedTuple):
    """The lock is held; ``handle`` names it for Unlock."""

    request_id: int
    handle: int
    mode: int
    value: int


class Refused(NamedTuple):
    """The lock was not granted, and who holds it."""

    request_id: int
    reason: int
    holder_mode: int
    holder_pid: int
    holder_port: int
    holder_client_pid: int
    holder_thread: int
    holder_ip: str


class Waiting(NamedTuple):
    """Interim message: the request still waits, behind this holder."""

    request_id: int
    waited_ms: int
    holder_mode: int
    holder_pid: int
    holder_port: int
    holder_client_pid: int
    holder_thread: int
    holder_ip: str


class StatusReply(NamedTuple):
    """Answer to Status."""

    request_id: int
    state: int
    holder_mode: int
    holder_pid: int
    holder_port: int
    holder_client_pid: int
    holder_thread: int
    holder_ip: str


class InfoSnapshot(NamedTuple):
    """Answer to InfoGet: a UTF-8 JSON document (see dls-shm's info format)."""

    request_id: int
    payload: bytes


class EchoReply(NamedTuple):
    """Answer to Echo."""

    request_id: int
    data: bytes


class Unlocked(NamedTuple):
    """Answer to UnlockAll: how many locks were released."""

    request_id: int
    count: int  # type: ignore[assignment]  # shadows tuple.count, as the field is named


class Error(NamedTuple):
    """A request failed, or the conversation is over; ``code`` is an ErrorCode."""

    request_id: int
    code: int
    reason: str


class UnknownMessage(NamedTuple):
    """A well-formed frame of a kind this side does not know; it was skipped."""

    request_id: int
    kind: int


class ConnectionClosed(NamedTuple):
    """The peer closed the connection cleanly, between frames."""


#: Every message: its kind and event class, in the order of their kinds.
CLASSES: tuple[tuple[Kind, type[Any]], ...] = (
    (Kind.HELLO, Hello),
    (Kind.WELCOME, Welcome),
    (Kind.LOCK, Lock),
    (Kind.UNLOCK, Unlock),
    (Kind.UNLOCK_ALL, UnlockAll),
    (Kind.STATUS, Status),
    (Kind.INFO_PUT, InfoPut),
    (Kind.INFO_GET, InfoGet),
    (Kind.ECHO, Echo),
    (Kind.RECLAIM, Reclaim),
    (Kind.SETTINGS, Settings),
    (Kind.GRANTED, Granted),
    (Kind.REFUSED, Refused),
    (Kind.WAITING, Waiting),
    (Kind.STATUS_REPLY, StatusReply),
    (Kind.INFO_SNAPSHOT, InfoSnapshot),
    (Kind.ECHO_REPLY, EchoReply),
    (Kind.UNLOCKED, Unlocked),
    (Kind.ERROR, Error),
)

Message = (
    Hello
    | Welcome
    | Lock
    | Unlock
    | UnlockAll
    | Status
    | InfoPut
    | InfoGet
    | Echo
    | Reclaim
    | Settings
    | Granted
    | Refused
    | Waiting
    | StatusReply
    | InfoSnapshot
    | EchoReply
    | Unlocked
    | Error
)
Event = Message | UnknownMessage | ConnectionClosed

#: What a client may send once the conversation is open, and what a server may.
REQUESTS = frozenset({Lock, Unlock, UnlockAll, Status, InfoPut, InfoGet, Echo, Reclaim, Settings})
#: The messages a protocol version after the lowest added, and that version: in a conversation of an older
#: version they are not sent, and one received is a kind unknown to that version (UnknownMessage).
SINCE: dict[type[Any], int] = {Settings: 3}
REPLIES = frozenset({Granted, Refused, Waiting, StatusReply, InfoSnapshot, EchoReply, Unlocked, Error})
