"""A sans-IO dls connection: bytes in, events out; events in, bytes out.

The socket code around it stays a few lines, and every rule of the
conversation (who speaks first, which messages each side may send, how big a
frame may be) is enforced here, once, for the daemon, the client and the tests.

The conversation: the client sends Hello; the server answers Welcome (or Error
and closes); from then on the client sends requests and the server replies.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final

from .codec import DECODERS, ENCODERS, HEADER_STRUCT, Encoder, packer
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    CLASSES,
    FRAME_VERSION,
    HEADER_SIZE,
    PROTOCOL_VERSIONS,
    REPLIES,
    REQUESTS,
    SINCE,
    ConnectionClosed,
    Error,
    Event,
    Hello,
    Kind,
    Message,
    UnknownMessage,
    Welcome,
)

#: Default largest frame body either side accepts (bytes).
DEFAULT_MAX_FRAME: Final = 64 * 1024
#: Largest frame body a client accepts: an information snapshot lists every lock and client of a service.
CLIENT_MAX_FRAME: Final = 16 * 1024 * 1024


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    OPENING = "opening"  # client: nothing sent yet; server: waiting for Hello
    GREETING = "greeting"  # client: Hello sent; server: Hello received, Welcome owed
    READY = "ready"
    CLOSED = "closed"


class NeedData:
    """Sentinel: no complete event yet; feed more bytes."""


NEED_DATA: Final = NeedData()

_REQUEST_KINDS = frozenset(int(kind) for kind, cls in CLASSES if cls in REQUESTS)
_REPLY_KINDS = frozenset(int(kind) for kind, cls in CLASSES if cls in REPLIES)


def choose_version(hello: Hello, supported: tuple[int, int] = PROTOCOL_VERSIONS) -> int | None:
    """The highest version both sides speak, or None when there is none."""
    high = min(hello.max_version, supported[1])
    low = max(hello.min_version, supported[0])
    return high if high >= low else None


class Connection:
    """One side of one dls conversation.

    ``max_frame`` bounds the frames this side accepts: each side protects
    itself, and tells its limit to the peer (Welcome carries the server's).
    """

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.role = role
        self.max_frame = max_frame
        self.state = State.OPENING
        self.version: int | None = None
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        #: Kinds of messages a later protocol version than the one spoken added: unknown to this conversation.
        self._later: frozenset[int] = frozenset()
        #: The versions the client's Hello offered (a client's Welcome must choose one of them).
        self._offered = PROTOCOL_VERSIONS
        if role is Role.CLIENT:
            self._may_send: frozenset[type[Any]] = frozenset({Hello})
            self._may_receive: frozenset[int] = frozenset()  # nothing before our Hello
        else:
            self._may_send = frozenset({Error})
            self._may_receive = frozenset({int(Kind.HELLO)})

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; b"" means the peer closed."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after the end of the stream")
        if self._pos >= len(self._buf):
            self._buf = data
            self._pos = 0
        elif isinstance(self._buf, bytearray):
            del self._buf[: self._pos]
            self._buf += data
            self._pos = 0
        else:
            self._buf = bytearray(memoryview(self._buf)[self._pos :]) + data
            self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buf) - self._pos

    def next_event(self) -> Event | NeedData:
        """The next complete event, NEED_DATA, or ConnectionClosed at a clean end."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return NEED_DATA if not self._eof else self._short(avail)  # the test saves a call per read
        length, version, kind, _reserved, rid = HEADER_STRUCT.unpack_from(buf, pos)
        if version != FRAME_VERSION:
            raise RemoteProtocolError(f"frame version {version}, this side speaks {FRAME_VERSION}")
        if length > self.max_frame:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            return self._short(avail)
        self._pos = end
        if kind not in self._may_receive:
            return self._unexpected(kind, rid)
        try:
            event: Message = DECODERS[kind](rid, buf, pos + HEADER_SIZE, length)
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"{Kind(kind).name} with text that is not UTF-8: {exc}") from None
        if self.state is not State.READY:
            self._received_in_greeting(event)
        return event

    def _short(self, avail: int) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        if avail:
            raise RemoteProtocolError(f"connection closed in the middle of a frame ({avail} bytes pending)")
        self.state = State.CLOSED
        return ConnectionClosed()

    def _unexpected(self, kind: int, rid: int) -> UnknownMessage:
        if kind not in DECODERS or self.state is not State.READY or kind in self._later:
            if self.state is State.READY:
                return UnknownMessage(rid, kind)
            raise RemoteProtocolError(f"message kind 0x{kind:02x} where {self._expected()} was expected")
        raise RemoteProtocolError(f"{Kind(kind).name} may not be sent by the {self._peer_name()}")

    def _expected(self) -> str:
        return "Hello" if self.role is Role.SERVER else "Welcome"

    def _peer_name(self) -> str:
        return "server" if self.role is Role.CLIENT else "client"

    def _received_in_greeting(self, event: Message) -> None:
        if isinstance(event, Hello):
            self.state = State.GREETING
            self._may_send = frozenset({Welcome, Error})
            self._may_receive = frozenset()
        elif isinstance(event, Welcome):
            low, high = self._offered
            if not max(low, PROTOCOL_VERSIONS[0]) <= event.version <= min(high, PROTOCOL_VERSIONS[1]):
                raise RemoteProtocolError(f"server chose version {event.version}, not one we offered")
            self._open(event.version)
        # An Error during the greeting leaves the state: the server closes next.

    def _open(self, version: int) -> None:
        self.state = State.READY
        self.version = version
        later = frozenset(cls for cls, since in SINCE.items() if since > version)
        self._later = frozenset(int(kind) for kind, cls in CLASSES if cls in later)
        if self.role is Role.CLIENT:
            self._may_send = REQUESTS - later
            self._may_receive = _REPLY_KINDS - self._later
        else:
            self._may_send = REPLIES - later
            self._may_receive = _REQUEST_KINDS - self._later

    # -- sending -------------------------------------------------------------

    def send(self, event: Message) -> bytes:
        """The bytes to write for one event; raises LocalProtocolError if not allowed now."""
        cls = type(event)
        if cls not in self._may_send:
            raise self._may_not_send(cls)
        try:
            data = ENCODERS[cls](event)
        except LocalProtocolError:  # a field out of its bounds (messages.BOUNDS): the encoder says which
            raise
        except Exception as exc:  # struct.error, AttributeError, UnicodeError: a bad field value
            raise LocalProtocolError(f"cannot encode {cls.__name__}: {exc}") from None
        if self.state is not State.READY:
            self._sent_in_greeting(event)
        return data

    def encoder(self, cls: type[Message]) -> Encoder:
        """``send`` for the messages of class ``cls``, its checks made once: the function from such a message to
        its bytes, for a caller that sends many (a client's lock path). Once the conversation is open (READY)
        what this side may send no longer changes, so it holds from then on; it raises what the codec raises
        for a field no frame can carry, where ``send`` says LocalProtocolError. LocalProtocolError if this
        side may not send ``cls`` now, or the conversation is not open yet."""
        if self.state is not State.READY or cls not in self._may_send:
            raise self._may_not_send(cls)
        encoder: Encoder = ENCODERS[cls]
        return encoder

    def packer(self, cls: type[Message]) -> Callable[..., bytes]:
        """``encoder``'s for a message of fixed fields only (an Unlock), taking its fields (request id first)
        rather than a message: no message made (see ``codec.packer``)."""
        self.encoder(cls)  # its checks
        return packer(cls)

    def _may_not_send(self, cls: type[Message]) -> LocalProtocolError:
        since = SINCE.get(cls, 0)
        if self.state is State.READY and self.version is not None and since > self.version:
            # A message the peer's version lacks: a client library tells its user what the service lacks.
            return LocalProtocolError(f"the {self._peer_name()} speaks protocol version {self.version}: "
                                      f"{cls.__name__} needs version {since}")
        return LocalProtocolError(f"the {self.role.value} may not send {cls.__name__} in state {self.state.value}")

    def _sent_in_greeting(self, event: Message) -> None:
        if isinstance(event, Hello):
            self.state = State.GREETING
            self._offered = (event.min_version, event.max_version)
            self._may_send = frozenset()
            self._may_receive = frozenset({int(Kind.WELCOME), int(Kind.ERROR)})
        elif isinstance(event, Welcome):
            self._open(event.version)
        elif isinstance(event, Error) and self.role is Role.SERVER:
            self.state = State.CLOSED
            self._may_send = frozenset()
