"""The specification of the bytes on the wire: a construct definition of the frame header and of every message.

Each message body is a fixed part followed by its variable fields, whose
lengths sit in the fixed part. ``codec`` encodes and decodes from the layouts
(``layout``) of these definitions, written down in ``codec.LAYOUTS`` so that a
client imports no construct (about 20 ms of start-up, pdb included): the tests
check the layouts against the definitions here, and the bytes of every message
against golden frames.
"""

from __future__ import annotations

from typing import Any

from construct import (
    Bytes,
    Const,
    Construct,
    FormatField,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64sb,
    Int64ub,
    Rebuild,
    Renamed,
    StringEncoded,
    Struct,
    this,
)

from .messages import CLASSES, HELLO_MAGIC, Kind

#: Frame header: body length, frame version, message kind, reserved (zero), request id.
HEADER = Struct(
    "length" / Int32ub,
    "version" / Int8ub,
    "kind" / Int8ub,
    "reserved" / Int16ub,
    "request_id" / Int32ub,
)


def _text(name: str, prefix: Construct[int, int]) -> tuple[Construct[Any, Any], Construct[Any, Any]]:
    """A UTF-8 string field as (length field for the fixed part, data field)."""
    length = f"{name}_len" / Rebuild(prefix, lambda ctx: len(ctx[name].encode("utf-8")))
    data = name / StringEncoded(Bytes(this[f"{name}_len"]), "utf8")
    return length, data


def _blob(name: str, prefix: Construct[int, int]) -> tuple[Construct[Any, Any], Construct[Any, Any]]:
    """A bytes field as (length field for the fixed part, data field)."""
    length = f"{name}_len" / Rebuild(prefix, lambda ctx: len(ctx[name]))
    data = name / Bytes(this[f"{name}_len"])
    return length, data


#: The owner of a lock, as told in Refused, Waiting and StatusReply.
_HOLDER_FIXED = (
    "holder_mode" / Int8ub,
    "holder_pid" / Int32ub,
    "holder_port" / Int32ub,
    "holder_client_pid" / Int32ub,
    "holder_thread" / Int64ub,
)

_host_len, _host = _text("host", Int8ub)
_program_len, _program = _text("program", Int8ub)
HELLO = Struct(
    "magic" / Const(HELLO_MAGIC),
    "min_version" / Int8ub,
    "max_version" / Int8ub,
    "flags" / Int16ub,
    "port" / Int32ub,
    "pid" / Int32ub,
    "thread_id" / Int64ub,
    _host_len,
    _program_len,
    _host,
    _program,
)

_peer_len, _peer = _text("peer", Int8ub)
_server_host_len, _server_host = _text("server_host", Int8ub)
WELCOME = Struct(
    "version" / Int8ub,
    "mechanism" / Int8ub,
    "flags" / Int16ub,
    "server_pid" / Int32ub,
    "max_frame" / Int32ub,
    "lock_delay_ms" / Int32ub,
    _peer_len,
    _server_host_len,
    _peer,
    _server_host,
)

_key_len, _key = _blob("key", Int16ub)
_path_len, _path = _text("path", Int16ub)
LOCK = Struct(
    "mode" / Int8ub,
    "flags" / Int8ub,
    "timeout_ms" / Int32ub,
    "thread_id" / Int64ub,
    "inode" / Int64ub,
    "device" / Int64sb,
    _key_len,
    _path_len,
    _key,
    _path,
)

UNLOCK = Struct("handle" / Int64ub)
RECLAIM = Struct(
    "handle" / Int64ub,
    "mode" / Int8ub,
    "thread_id" / Int64ub,
    "inode" / Int64ub,
    "device" / Int64sb,
    _key_len,
    _key,
)
UNLOCK_ALL = Struct("thread_id" / Int64ub)
SETTINGS = Struct("flags" / Int16ub, "ack_timeout_ms" / Int32ub)
# Version 4. A value block travels with its length in 8 bits; messages.BOUNDS limits it to MAX_VALUE_BLOCK bytes,
# a Convert's mode to the six modes and the value flags to ValueFlag's bits (the codec checks them both ways).
_block_len, _block = _blob("block", Int8ub)
CONVERT = Struct(
    "handle" / Int64ub,
    "mode" / Int8ub,
    "flags" / Int8ub,  # LockFlag, as Lock's
    "value_flags" / Int8ub,
    "timeout_ms" / Int32ub,
    _block_len,
    _block,
)
RELEASE = Struct("handle" / Int64ub, "value_flags" / Int8ub, _block_len, _block)
CANCEL = Struct("target" / Int32ub)
STATUS = Struct(
    "thread_id" / Int64ub,
    "inode" / Int64ub,
    "device" / Int64sb,
    _key_len,
    _key,
)

_payload_len, _payload = _blob("payload", Int32ub)
INFO_PUT = Struct(_payload_len, _payload)
INFO_GET = Struct("flags" / Int16ub)
_data_len, _data = _blob("data", Int16ub)
ECHO = Struct(_data_len, _data)

GRANTED = Struct("handle" / Int64ub, "mode" / Int8ub, "value" / Int32ub)
ACQUIRED = Struct(
    "handle" / Int64ub,
    "mode" / Int8ub,
    "value" / Int32ub,
    "token" / Int64ub,
    "block_status" / Int8ub,
    _block_len,
    _block,
)
BLOCKING = Struct("handle" / Int64ub, "mode" / Int8ub)
_ip_len, _ip = _text("holder_ip", Int8ub)
REFUSED = Struct("reason" / Int8ub, *_HOLDER_FIXED, _ip_len, _ip)
WAITING = Struct("waited_ms" / Int32ub, *_HOLDER_FIXED, _ip_len, _ip)
STATUS_REPLY = Struct("state" / Int8ub, *_HOLDER_FIXED, _ip_len, _ip)
INFO_SNAPSHOT = Struct(_payload_len, _payload)
ECHO_REPLY = Struct(_data_len, _data)
UNLOCKED = Struct("count" / Int32ub)
_reason_len, _reason = _text("reason", Int16ub)
ERROR = Struct("code" / Int16ub, _reason_len, _reason)

#: The definition of each message kind.
DEFINITIONS: dict[Kind, Struct[Any, Any]] = {
    Kind.HELLO: HELLO,
    Kind.WELCOME: WELCOME,
    Kind.LOCK: LOCK,
    Kind.UNLOCK: UNLOCK,
    Kind.UNLOCK_ALL: UNLOCK_ALL,
    Kind.STATUS: STATUS,
    Kind.INFO_PUT: INFO_PUT,
    Kind.INFO_GET: INFO_GET,
    Kind.ECHO: ECHO,
    Kind.RECLAIM: RECLAIM,
    Kind.SETTINGS: SETTINGS,
    Kind.CONVERT: CONVERT,
    Kind.RELEASE: RELEASE,
    Kind.CANCEL: CANCEL,
    Kind.GRANTED: GRANTED,
    Kind.REFUSED: REFUSED,
    Kind.WAITING: WAITING,
    Kind.STATUS_REPLY: STATUS_REPLY,
    Kind.INFO_SNAPSHOT: INFO_SNAPSHOT,
    Kind.ECHO_REPLY: ECHO_REPLY,
    Kind.UNLOCKED: UNLOCKED,
    Kind.ACQUIRED: ACQUIRED,
    Kind.BLOCKING: BLOCKING,
    Kind.ERROR: ERROR,
}
#: Every message: kind, construct definition, event class (in the order of ``messages.CLASSES``).
MESSAGES: tuple[tuple[Kind, Struct[Any, Any], type[Any]], ...] = tuple(
    (kind, DEFINITIONS[kind], cls) for kind, cls in CLASSES
)


def layout(spec: Struct[Any, Any]) -> tuple[tuple[str, str], ...]:
    """The layout of a message definition, as ``codec.LAYOUTS`` writes it: each field's name and code (a
    struct format character for a number, ``#`` and one for the length of a variable field named as the
    length without ``_len``, ``=`` and the bytes (latin-1) for a constant, ``text`` or ``bytes`` for a
    variable field). TypeError for a field the codec has no form for."""
    fields = []
    for sub in spec.subcons:
        if not isinstance(sub, Renamed):
            raise TypeError(f"unnamed field {sub!r}")
        fields.append((str(sub.name), _code(sub.name, sub.subcon)))
    return tuple(fields)


def _code(name: str, inner: Any) -> str:
    if isinstance(inner, Const):
        return "=" + bytes(inner.value).decode("latin-1")
    if isinstance(inner, Rebuild):
        return "#" + _format_char(inner.subcon)
    if isinstance(inner, FormatField):
        return _format_char(inner)
    if isinstance(inner, Bytes) and isinstance(inner.length, int):
        return f"{inner.length}s"
    if isinstance(inner, Bytes):
        return "bytes"
    if isinstance(inner, StringEncoded):
        return "text"
    raise TypeError(f"field {name}: no fast form for {inner!r}")


def _format_char(field: Any) -> str:
    if not isinstance(field, FormatField) or field.fmtstr[0] != ">":
        raise TypeError(f"{field!r} is not a big-endian format field")
    return str(field.fmtstr[1:])
