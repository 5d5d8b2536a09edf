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
#: Version 4 (dls-proto 0.6) added conversions, value blocks, fencing tokens, cancel and blocking notices: the
#: requests Convert, Release and Cancel, the replies Acquired (a v4 lock server's answer to Lock and Convert,
#: Granted with a fencing token and the value block) and Blocking; the layouts of the other messages are unchanged.
#: The lowest and the highest version, as a Hello offers them (every version between is spoken too).
PROTOCOL_VERSIONS = (2, 4)
#: Magic that opens every Hello, so that a stray client is recognised at once.
HELLO_MAGIC = b"jDLS"
#: A lock request's ``timeout_ms`` meaning "wait as long as it takes".
WAIT_FOREVER = 0xFFFFFFFF
#: The longest record key a request carries, in bytes: its length travels in 16 bits (``key_len``).
MAX_KEY = 0xFFFF
#: The longest value block a resource has, in bytes (a table chooses its size, up to this; the DLM's is 32 or 64).
#: Its length travels in 8 bits: a longer block is a protocol error received and a LocalProtocolError to send.
MAX_VALUE_BLOCK = 64
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
    # Version 4 on (in a Lock or a Convert):
    VALUE_BLOCK = 8  # return the resource's value block with the grant (Acquired's block_status and block)
    NOTIFY = 16  # send Blocking notices while this lock is held and blocks another request


class ValueFlag(enum.IntFlag):
    """What a Convert or a Release does to the resource's value block (version 4 on)."""

    NONE = 0
    WRITE = 1  # write the message's block as the value block (the holder holds PW or EX)
    INVALIDATE = 2  # mark the value block not valid (BlockStatus.NOT_VALID until someone writes)


class BlockStatus(enum.IntEnum):
    """The state of the value block an Acquired carries."""

    NONE = 0  # not asked for (no LockFlag.VALUE_BLOCK), or not available (a mechanism without value blocks)
    VALID = 1
    # The DLM's VALNOTVALID: the last value written, after a PW or EX holder ended abnormally or released with
    # ValueFlag.INVALIDATE; it stays so until someone writes a new value.
    NOT_VALID = 2


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
    CONVERT = 0x19
    RELEASE = 0x1A
    CANCEL = 0x1B
    GRANTED = 0x20
    REFUSED = 0x21
    WAITING = 0x22
    STATUS_REPLY = 0x23
    INFO_SNAPSHOT = 0x24
    ECHO_REPLY = 0x25
    UNLOCKED = 0x26
    ACQUIRED = 0x27
    BLOCKING = 0x28
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
    """Take a record lock on (inode, device, key); ``path`` travels for display only. ``timeout_ms`` is how
    long the request may wait: 0 means not at all (the DLM's NOQUEUE: refused BUSY at once when it cannot be
    granted), WAIT_FOREVER as long as it takes. A lock server of version 4 answers with Acquired, an older one
    with Granted."""

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


class Convert(NamedTuple):
    """Convert the held lock ``handle`` to ``mode`` in place (version 4 on): a conversion down (or to the same
    mode) is granted at once; one up waits in the resource's convert queue, ahead of its waiting requests,
    unless ``timeout_ms`` is 0 (refused BUSY at once; WAIT_FOREVER: as long as it takes).

    ``flags``: LockFlag.VALUE_BLOCK (the answer carries the value block) and LockFlag.NOTIFY (Blocking notices
    from now on); ``value_flags``: ValueFlag.WRITE (``block`` becomes the value block: a conversion down from PW
    or EX) or ValueFlag.INVALIDATE. Answered with Acquired (the same handle, the new mode, a new fencing token
    when up), Refused (BUSY, TIMEOUT, CANCELLED, DEADLOCK: the lock stays held in its old mode), Waiting while it
    waits, or Error."""

    request_id: int
    handle: int
    mode: int
    flags: int
    value_flags: int
    timeout_ms: int
    block: bytes


class Release(NamedTuple):
    """Unlock with a value block (version 4 on): ``value_flags`` ValueFlag.WRITE writes ``block`` as the value
    block first (the holder holds PW or EX), ValueFlag.INVALIDATE marks it not valid. Answered only if it
    fails, as Unlock."""

    request_id: int
    handle: int
    value_flags: int
    block: bytes


class Cancel(NamedTuple):
    """Withdraw the waiting Lock or Convert whose request id is ``target`` (version 4 on). Not answered itself:
    the target is, with Refused CANCELLED, or with its grant if that won the race (a target no longer waiting
    is no error: nothing to cancel)."""

    request_id: int
    target: int


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


class Acquired(NamedTuple):
    """The lock is held (version 4 on: a lock server's answer to Lock and Convert, where an older one says
    Granted): Granted's fields, then a fencing token, a 64-bit number strictly increasing per resource for the
    life of the service's table (every grant and every conversion up gets a new one, so that a resource can
    refuse the writes of a stale holder), and the value block when the request asked for it (LockFlag.
    VALUE_BLOCK; otherwise ``block_status`` BlockStatus.NONE and ``block`` empty)."""

    request_id: int
    handle: int
    mode: int
    value: int
    token: int
    block_status: int
    block: bytes


class Blocking(NamedTuple):
    """Unsolicited (version 4 on): the held lock ``handle``, taken with LockFlag.NOTIFY, blocks a request for
    ``mode``. ``request_id`` is the id of the Lock that took the lock, by which its client finds it as by the
    handle. Sent once per holder until the situation changes."""

    request_id: int
    handle: int
    mode: int


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
    (Kind.CONVERT, Convert),
    (Kind.RELEASE, Release),
    (Kind.CANCEL, Cancel),
    (Kind.GRANTED, Granted),
    (Kind.REFUSED, Refused),
    (Kind.WAITING, Waiting),
    (Kind.STATUS_REPLY, StatusReply),
    (Kind.INFO_SNAPSHOT, InfoSnapshot),
    (Kind.ECHO_REPLY, EchoReply),
    (Kind.UNLOCKED, Unlocked),
    (Kind.ACQUIRED, Acquired),
    (Kind.BLOCKING, Blocking),
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
    | Convert
    | Release
    | Cancel
    | Granted
    | Refused
    | Waiting
    | StatusReply
    | InfoSnapshot
    | EchoReply
    | Unlocked
    | Acquired
    | Blocking
    | Error
)
Event = Message | UnknownMessage | ConnectionClosed

class Bound(NamedTuple):
    """A limit on one field of a message beyond what its width carries: a message outside it is a protocol
    error received (RemoteProtocolError) and is never sent (LocalProtocolError), as a field too wide for its
    width is. ``check`` says what ``most`` is: the highest ``mode`` ("mode"), the most bytes of a bytes field
    ("length"), the bits a flags field may have ("bits")."""

    field: str
    most: int
    check: str
    name: str  # the field as a person reads it

    def problem(self, value: int) -> str:
        """What is wrong with ``value`` (of a bytes field: its length), for the error."""
        if self.check == "mode":
            return not_a_mode(value)
        if self.check == "length":
            return f"{self.name} of {value} bytes, at most {self.most}"
        return f"{self.name} 0x{value:02x}: bits 0x{value & ~self.most:02x} are not defined (only 0x{self.most:02x})"


_MODE_BOUND = Bound("mode", LOCK_MODES[-1], "mode", "lock mode")
_VALUE_FLAGS_BOUND = Bound("value_flags", int(ValueFlag.WRITE | ValueFlag.INVALIDATE), "bits", "value flags")
_BLOCK_BOUND = Bound("block", MAX_VALUE_BLOCK, "length", "value block")
#: The bounds of the messages that have some, checked by the codec both ways (an encoder raises
#: LocalProtocolError, a decoder RemoteProtocolError). A Lock's mode has none, for the peers of older versions:
#: a lock server answers one out of range with Error BAD_REQUEST (``not_a_mode``) and the conversation goes on;
#: a Convert's, like its value flags and block, is a protocol error from the start, with the same text.
BOUNDS: dict[type[Any], tuple[Bound, ...]] = {
    Convert: (_MODE_BOUND, _VALUE_FLAGS_BOUND, _BLOCK_BOUND),
    Release: (_VALUE_FLAGS_BOUND, _BLOCK_BOUND),
    Acquired: (_BLOCK_BOUND,),
}

#: What a client may send once the conversation is open, and what a server may.
REQUESTS = frozenset({Lock, Unlock, UnlockAll, Status, InfoPut, InfoGet, Echo, Reclaim, Settings, Convert, Release,
                      Cancel})
#: The messages a protocol version after the lowest added, and that version: in a conversation of an older
#: version they are not sent, and one received is a kind unknown to that version (UnknownMessage).
SINCE: dict[type[Any], int] = {Settings: 3, Convert: 4, Release: 4, Cancel: 4, Acquired: 4, Blocking: 4}


def kind_since(kind: int) -> int | None:
    """The protocol version that added the message of ``kind``, when a version after the lowest did (None:
    every version has it, or no version does): what a peer that sent it in an older conversation is told."""
    return next((SINCE[cls] for k, cls in CLASSES if k == kind and cls in SINCE), None)
REPLIES = frozenset({Granted, Refused, Waiting, StatusReply, InfoSnapshot, EchoReply, Unlocked, Error, Acquired,
                     Blocking})
