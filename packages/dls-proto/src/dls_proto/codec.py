"""Compile the construct definitions of ``messages`` into struct-based codecs.

construct's own compiled parsers cost 5-8 microseconds a message, as much as a
loopback round trip, so the lock/unlock path cannot afford them. Every message
here has the same shape (fixed fields, then variable fields whose lengths are
in the fixed part), which a single ``struct.Struct`` call covers. This module
reads each construct definition once, at import, and generates an encoder that
produces the whole frame (header included) with one ``pack``, and a decoder
that reads a body with one ``unpack_from``. The construct definitions stay the
specification: the tests check both paths give the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from construct import Bytes, Const, FormatField, Rebuild, Renamed, StringEncoded, Struct

from .errors import RemoteProtocolError
from .messages import FRAME_VERSION, HEADER_SIZE, MESSAGES, Kind

Encoder = Callable[[Any], bytes]
Decoder = Callable[[int, Any, int, int], Any]

_HEADER_FMT = "IBBHI"
HEADER_STRUCT = struct.Struct(">" + _HEADER_FMT)
assert HEADER_STRUCT.size == HEADER_SIZE


class _Plan:
    """What one message's definition says, in the terms the generator needs."""

    def __init__(self, spec: Struct[Any, Any]) -> None:
        self.fmt = ""
        self.encode_args: list[str] = []
        self.unpacked: list[str] = []
        self.consts: list[tuple[str, bytes]] = []
        self.tails: list[tuple[str, bool]] = []  # (name, is_text)
        self.values: list[str] = []  # event fields, in order
        for sub in spec.subcons:
            if not isinstance(sub, Renamed):
                raise TypeError(f"unnamed field {sub!r}")
            self._add(sub.name, sub.subcon)

    def _add(self, name: str, inner: Any) -> None:
        if isinstance(inner, Const):
            value = inner.value
            self.fmt += f"{len(value)}s"
            self.encode_args.append(repr(value))
            self.unpacked.append(f"_{name}")
            self.consts.append((f"_{name}", value))
        elif isinstance(inner, Rebuild):
            self.fmt += _format_char(inner.subcon)
            self.encode_args.append(f"len(_t_{name[: -len('_len')]})")
            self.unpacked.append(name)
        elif isinstance(inner, FormatField):
            self.fmt += _format_char(inner)
            self.encode_args.append(f"ev.{name}")
            self.unpacked.append(name)
            self.values.append(name)
        elif isinstance(inner, Bytes) and isinstance(inner.length, int):
            self.fmt += f"{inner.length}s"
            self.encode_args.append(f"ev.{name}")
            self.unpacked.append(name)
            self.values.append(name)
        elif isinstance(inner, Bytes):
            self.tails.append((name, False))
            self.values.append(name)
        elif isinstance(inner, StringEncoded):
            self.tails.append((name, True))
            self.values.append(name)
        else:
            raise TypeError(f"field {name}: no fast form for {inner!r}")


def _format_char(field: Any) -> str:
    if not isinstance(field, FormatField) or field.fmtstr[0] != ">":
        raise TypeError(f"{field!r} is not a big-endian format field")
    return str(field.fmtstr[1:])


def _generate(kind: Kind, spec: Struct[Any, Any], cls: type[Any]) -> tuple[Encoder, Decoder]:
    plan = _Plan(spec)
    if tuple(cls._fields) != ("request_id", *plan.values):
        raise TypeError(f"{cls.__name__} fields {cls._fields} do not follow its definition")
    body = struct.Struct(">" + plan.fmt)
    frame = struct.Struct(">" + _HEADER_FMT + plan.fmt)
    fixed = body.size
    name = kind.name.lower()
    lines = [f"def encode_{name}(ev):"]
    for tail, is_text in plan.tails:
        source = f"ev.{tail}.encode('utf-8')" if is_text else f"ev.{tail}"
        lines.append(f"    _t_{tail} = {source}")
    length = " + ".join([str(fixed), *(f"len(_t_{t})" for t, _ in plan.tails)])
    args = ", ".join([length, str(FRAME_VERSION), str(int(kind)), "0", "ev.request_id", *plan.encode_args])
    lines.append(f"    return _frame_pack({args})" + "".join(f" + _t_{t}" for t, _ in plan.tails))
    lines.append(f"def decode_{name}(rid, buf, off, length):")
    lines.append(f"    if length < {fixed}:")
    lines.append(f"        raise RemoteProtocolError('{kind.name} body of %d bytes, at least {fixed} needed' % length)")
    if plan.unpacked:
        lines.append(f"    {', '.join(plan.unpacked)}, = _body_unpack(buf, off)")
    for var, value in plan.consts:
        lines.append(f"    if {var} != {value!r}:")
        lines.append(f"        raise RemoteProtocolError('{kind.name} with bad magic %r' % ({var},))")
    if plan.tails:
        total = " + ".join([str(fixed), *(f"{t}_len" for t, _ in plan.tails)])
        lines.append(f"    if {total} != length:")
        lines.append(f"        raise RemoteProtocolError('{kind.name} fields do not add up to its length %d' % length)")
        lines.append(f"    o = off + {fixed}")
        for tail, is_text in plan.tails:
            if is_text:
                lines.append(f"    {tail} = str(buf[o:o + {tail}_len], 'utf-8')")
            else:
                lines.append(f"    {tail} = bytes(buf[o:o + {tail}_len])")
            lines.append(f"    o += {tail}_len")
    else:
        lines.append(f"    if length != {fixed}:")
        lines.append(f"        raise RemoteProtocolError('{kind.name} body of %d bytes, {fixed} expected' % length)")
    lines.append(f"    return _cls(rid, {', '.join(plan.values)})" if plan.values else "    return _cls(rid)")
    namespace: dict[str, Any] = {
        "_frame_pack": frame.pack,
        "_body_unpack": body.unpack_from,
        "_cls": cls,
        "RemoteProtocolError": RemoteProtocolError,
    }
    exec(compile("\n".join(lines), f"<dls_proto codec {kind.name}>", "exec"), namespace)  # noqa: S102
    return namespace[f"encode_{name}"], namespace[f"decode_{name}"]


#: Encoder by event class: event -> whole frame.
ENCODERS: dict[type[Any], Encoder] = {}
#: Decoder by kind code: (request id, buffer, body offset, body length) -> event.
DECODERS: dict[int, Decoder] = {}
#: Kind code by event class.
KINDS: dict[type[Any], Kind] = {}

for _kind, _spec, _cls in MESSAGES:
    ENCODERS[_cls], DECODERS[int(_kind)] = _generate(_kind, _spec, _cls)
    KINDS[_cls] = _kind


def encode(event: Any) -> bytes:
    """The whole frame for one message event."""
    return ENCODERS[type(event)](event)
