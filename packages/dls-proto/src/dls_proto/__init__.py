"""dls-proto: the dls wire protocol, one of the two contracts between dls packages, and what every
dls program agrees on beyond the bytes: the JDLS variable (``jdls``), the environment
(``environment``) and how a client introduces itself (``identity``).

Everything a peer needs is exported here; other packages import only from this module (names, and
the submodules above and ``probe``, the test of a client's configuration), never from its other submodules.

``trusted`` holds the checks of a directory or file another local user could have made or changed (the
service's instance and lock directories, a client's binary lock directory and trace files).

``probe``, ``tls``, ``trusted`` and ``spec`` (with its ``HEADER`` and ``MESSAGES``, the construct definitions)
are imported when first used (``from dls_proto import tls``, ``dls_proto.tls``, ``from dls_proto import
MESSAGES``): a client locking through the service without TLS, dls-lock's hot path, loads neither ssl, nor
the test, nor construct.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import environment, identity, jdls, numerals
from .__about__ import __version__
from .codec import encode, generate_codecs
from .connection import (
    CLIENT_MAX_FRAME,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    Connection,
    NeedData,
    Role,
    State,
    choose_version,
)
from .errors import ConfigurationError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .jdls import Config, Server
from .messages import (
    ALL_THREADS,
    FRAME_VERSION,
    HEADER_SIZE,
    HELLO_MAGIC,
    LOCK_MODES,
    MAX_KEY,
    MAX_VALUE_BLOCK,
    PROTOCOL_VERSIONS,
    SINCE,
    WAIT_FOREVER,
    Acquired,
    Blocking,
    BlockStatus,
    Cancel,
    ConnectionClosed,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Event,
    Granted,
    Hello,
    HolderState,
    InfoGet,
    InfoPut,
    InfoSnapshot,
    Kind,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    Mode,
    Reclaim,
    Refused,
    RefuseReason,
    Release,
    Settings,
    Status,
    StatusReply,
    UnknownMessage,
    Unlock,
    UnlockAll,
    Unlocked,
    ValueFlag,
    Waiting,
    Welcome,
    kind_since,
    not_a_mode,
)
from .transport import SpinningReader, exchange, receive

if TYPE_CHECKING:
    from . import probe, spec, tls, trusted
    from .spec import HEADER, MESSAGES

#: The submodules imported on first use, not with the package.
_LAZY = frozenset({"probe", "spec", "tls", "trusted"})
#: The names of ``spec`` exported here, imported with it on first use.
_SPEC_NAMES = frozenset({"HEADER", "MESSAGES"})


def __getattr__(name: str) -> Any:
    """``probe``, ``spec``, ``tls`` and ``trusted`` on first use (the import system keeps them as attributes from then
    on), and ``spec``'s exported names (kept here once asked for)."""
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _SPEC_NAMES:
        value = getattr(importlib.import_module(".spec", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ALL_THREADS", "LOCK_MODES", "MAX_KEY", "MAX_VALUE_BLOCK", "not_a_mode",
    "Acquired", "Blocking", "BlockStatus", "Cancel", "Convert", "Release", "ValueFlag",
    "CLIENT_MAX_FRAME", "DEFAULT_MAX_FRAME", "Config", "ConfigurationError", "Server", "environment",
    "exchange", "identity", "jdls", "numerals", "probe", "receive", "spec", "tls", "trusted", "FRAME_VERSION",
    "HEADER", "HEADER_SIZE", "HELLO_MAGIC", "MESSAGES",
    "NEED_DATA", "PROTOCOL_VERSIONS", "SINCE", "kind_since", "WAIT_FOREVER", "Connection", "ConnectionClosed",
    "Echo", "EchoReply",
    "Error", "ErrorCode", "Event", "Granted", "Hello", "HolderState", "InfoGet", "InfoPut", "InfoSnapshot",
    "Kind", "LocalProtocolError", "Lock", "LockFlag", "Mechanism", "Message", "Mode", "NeedData",
    "ProtocolError", "Reclaim", "RefuseReason", "Refused", "RemoteProtocolError", "Role", "SpinningReader",
    "Settings", "State", "Status", "StatusReply", "UnknownMessage", "Unlock", "UnlockAll", "Unlocked", "Waiting",
    "Welcome",
    "__version__", "choose_version", "encode", "generate_codecs",
]
