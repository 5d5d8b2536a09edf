"""Struct-based codecs for the messages, generated from their layouts.

construct's own compiled parsers cost 5-8 microseconds a message, as much as a
loopback round trip, so the lock/unlock path cannot afford them. Every message
has the same shape (fixed fields, then variable fields whose lengths are in
the fixed part), which a single ``struct.Struct`` call covers. ``LAYOUTS``
writes down that shape for each message, as ``spec.layout`` reads it from the
construct definitions (a test checks they agree, so the definitions stay the
specification); this module generates from it, for each kind, on first use, an
encoder that produces the whole frame (header included) with one ``pack``, and a decoder
that reads a body with one ``unpack_from``. Reading the layouts rather than the
definitions keeps construct (about 20 ms) out of a client's start-up. The tests
check both paths give the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import BOUNDS, CLASSES, FRAME_VERSION, HEADER_SIZE, Bound, Kind

Encoder = Callable[[Any], bytes]
Decoder = Callable[[int, Any, int, int], Any]

_HEADER_FMT = "IBBHI"
HEADER_STRUCT = struct.Struct(">" + _HEADER_FMT)
assert HEADER_STRUCT.size == HEADER_SIZE


#: Each message's fields in order, as ``spec.layout`` gives them: (name, code), the code a struct format for a
#: number, ``#`` and one for the length of the variable field named as it without ``_len``, ``=`` and the
#: bytes (latin-1) for a constant, ``text`` or ``bytes`` for a variable field.
LAYOUTS: dict[Kind, tuple[tuple[str, str], ...]] = {
    Kind.HELLO: (
        ("magic", "=jDLS"), ("min_version", "B"), ("max_version", "B"), ("flags", "H"), ("port", "L"), ("pid", "L"),
        ("thread_id", "Q"), ("host_len", "#B"), ("program_len", "#B"), ("host", "text"), ("program", "text"),
    ),
    Kind.WELCOME: (
        ("version", "B"), ("mechanism", "B"), ("flags", "H"), ("server_pid", "L"), ("max_frame", "L"),
        ("lock_delay_ms", "L"), ("peer_len", "#B"), ("server_host_len", "#B"), ("peer", "text"),
        ("server_host", "text"),
    ),
    Kind.LOCK: (
        ("mode", "B"), ("flags", "B"), ("timeout_ms", "L"), ("thread_id", "Q"), ("inode", "Q"), ("device", "q"),
        ("key_len", "#H"), ("path_len", "#H"), ("key", "bytes"), ("path", "text"),
    ),
    Kind.UNLOCK: (("handle", "Q"),),
    Kind.UNLOCK_ALL: (("thread_id", "Q"),),
    Kind.STATUS: (("thread_id", "Q"), ("inode", "Q"), ("device", "q"), ("key_len", "#H"), ("key", "bytes"),),
    Kind.INFO_PUT: (("payload_len", "#L"), ("payload", "bytes"),),
    Kind.INFO_GET: (("flags", "H"),),
    Kind.ECHO: (("data_len", "#H"), ("data", "bytes"),),
    Kind.RECLAIM: (
        ("handle", "Q"), ("mode", "B"), ("thread_id", "Q"), ("inode", "Q"), ("device", "q"), ("key_len", "#H"),
        ("key", "bytes"),
    ),
    Kind.SETTINGS: (("flags", "H"), ("ack_timeout_ms", "L"),),
    Kind.GRANTED: (("handle", "Q"), ("mode", "B"), ("value", "L"),),
    Kind.REFUSED: (
        ("reason", "B"), ("holder_mode", "B"), ("holder_pid", "L"), ("holder_port", "L"), ("holder_client_pid", "L"),
        ("holder_thread", "Q"), ("holder_ip_len", "#B"), ("holder_ip", "text"),
    ),
    Kind.WAITING: (
        ("waited_ms", "L"), ("holder_mode", "B"), ("holder_pid", "L"), ("holder_port", "L"), ("holder_client_pid", "L"),
        ("holder_thread", "Q"), ("holder_ip_len", "#B"), ("holder_ip", "text"),
    ),
    Kind.STATUS_REPLY: (
        ("state", "B"), ("holder_mode", "B"), ("holder_pid", "L"), ("holder_port", "L"), ("holder_client_pid", "L"),
        ("holder_thread", "Q"), ("holder_ip_len", "#B"), ("holder_ip", "text"),
    ),
    Kind.INFO_SNAPSHOT: (("payload_len", "#L"), ("payload", "bytes"),),
    Kind.ECHO_REPLY: (("data_len", "#H"), ("data", "bytes"),),
    Kind.CONVERT: (
        ("handle", "Q"), ("mode", "B"), ("flags", "B"), ("value_flags", "B"), ("timeout_ms", "L"), ("block_len", "#B"),
        ("block", "bytes"),
    ),
    Kind.RELEASE: (("handle", "Q"), ("value_flags", "B"), ("block_len", "#B"), ("block", "bytes"),),
    Kind.CANCEL: (("target", "L"),),
    Kind.UNLOCKED: (("count", "L"),),
    Kind.ACQUIRED: (
        ("handle", "Q"), ("mode", "B"), ("value", "L"), ("token", "Q"), ("block_status", "B"), ("block_len", "#B"),
        ("block", "bytes"),
    ),
    Kind.BLOCKING: (("handle", "Q"), ("mode", "B"),),
    Kind.ERROR: (("code", "H"), ("reason_len", "#H"), ("reason", "text"),),
}


class _Plan:
    """What one message's layout says, in the terms the generator needs."""

    def __init__(self, layout: tuple[tuple[str, str], ...]) -> None:
        self.fmt = ""
        self.encode_args: list[str] = []
        self.unpacked: list[str] = []
        self.consts: list[tuple[str, bytes]] = []
        self.tails: list[tuple[str, bool]] = []  # (name, is_text)
        self.values: list[str] = []  # event fields, in order
        for name, code in layout:
            self._add(name, code)

    def _add(self, name: str, code: str) -> None:
        if code.startswith("="):
            value = code[1:].encode("latin-1")
            self.fmt += f"{len(value)}s"
            self.encode_args.append(repr(value))
            self.unpacked.append(f"_{name}")
            self.consts.append((f"_{name}", value))
        elif code.startswith("#"):
            self.fmt += code[1:]
            self.encode_args.append(f"len(_t_{name[: -len('_len')]})")
            self.unpacked.append(name)
        elif code in ("text", "bytes"):
            self.tails.append((name, code == "text"))
            self.values.append(name)
        else:
            self.fmt += code
            self.encode_args.append(f"ev.{name}")
            self.unpacked.append(name)
            self.values.append(name)


def _bound_lines(cls: type[Any], plan: _Plan, value_of: Callable[[str, bool], str], error: str) -> list[str]:
    """The lines that raise ``error`` (the text of a call, its last argument left open) with the problem's text
    when a field of a ``cls`` message is out of its bound (``messages.BOUNDS``: values its width carries but
    the protocol does not allow). ``value_of(field, is_bytes)`` is the expression of the value tested, of a
    bytes field its length. One comparison a bound, inline: the lock path's Acquired pays no call for it."""
    bytes_fields = {tail for tail, is_text in plan.tails if not is_text}
    bounds: tuple[Bound, ...] = BOUNDS.get(cls, ())
    lines = []
    for number, bound in enumerate(bounds):
        value = value_of(bound.field, bound.field in bytes_fields)
        test = f"{value} & {~bound.most}" if bound.check == "bits" else f"{value} > {bound.most}"
        lines.append(f"    if {test}:")
        lines.append(f"        raise {error}_bounds[{number}].problem({value}))")
    return lines


def _compiled(kind: Kind, cls: type[Any], role: str, lines: list[str], **names: Any) -> Callable[..., Any]:
    """The function ``role``_``kind`` that ``lines`` define, compiled with ``names`` (and ``cls``) as globals.

    exec() of the text, not of compile()'s code: the first compile() call of a process makes the ast module's
    classes, about 2 ms, which a client's start-up otherwise never needs (a traceback names the file
    "<string>"; the function's name, encode_KIND or decode_KIND, says which)."""
    namespace: dict[str, Any] = {"_cls": cls, "RemoteProtocolError": RemoteProtocolError,
                                 "LocalProtocolError": LocalProtocolError, "_bounds": BOUNDS.get(cls, ()), **names}
    exec("\n".join(lines), namespace)  # noqa: S102
    function: Callable[..., Any] = namespace[f"{role}_{kind.name.lower()}"]
    return function


def _plan(kind: Kind, cls: type[Any]) -> _Plan:
    plan = _Plan(LAYOUTS[kind])
    if tuple(cls._fields) != ("request_id", *plan.values):
        raise TypeError(f"{cls.__name__} fields {cls._fields} do not follow its definition")
    return plan


def _encoder(kind: Kind, cls: type[Any]) -> Encoder:
    plan = _plan(kind, cls)
    fixed = struct.calcsize(">" + plan.fmt)
    lines = [f"def encode_{kind.name.lower()}(ev):"]
    for tail, is_text in plan.tails:
        source = f"ev.{tail}.encode('utf-8')" if is_text else f"ev.{tail}"
        lines.append(f"    _t_{tail} = {source}")
    lines += _bound_lines(cls, plan, lambda field, is_bytes: f"len(_t_{field})" if is_bytes else f"ev.{field}",
                          f"LocalProtocolError('cannot encode {cls.__name__}: ' + ")
    length = " + ".join([str(fixed), *(f"len(_t_{t})" for t, _ in plan.tails)])
    args = ", ".join([length, str(FRAME_VERSION), str(int(kind)), "0", "ev.request_id", *plan.encode_args])
    lines.append(f"    return _frame_pack({args})" + "".join(f" + _t_{t}" for t, _ in plan.tails))
    return _compiled(kind, cls, "encode", lines, _frame_pack=struct.Struct(">" + _HEADER_FMT + plan.fmt).pack)


def _decoder(kind: Kind, cls: type[Any]) -> Decoder:
    plan = _plan(kind, cls)
    body = struct.Struct(">" + plan.fmt)
    fixed = body.size
    lines = [f"def decode_{kind.name.lower()}(rid, buf, off, length):"]
    lines.append(f"    if length < {fixed}:")
    lines.append(f"        raise RemoteProtocolError('{kind.name} body of %d bytes, at least {fixed} needed' % length)")
    if plan.unpacked:
        lines.append(f"    {', '.join(plan.unpacked)}, = _body_unpack(buf, off)")
    lines += _bound_lines(cls, plan, lambda field, is_bytes: f"{field}_len" if is_bytes else field,
                          f"RemoteProtocolError('{kind.name}: ' + ")
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
    # The tuple made directly: a NamedTuple's own __new__ is a Python function, a third of a Granted's decoding.
    lines.append(f"    return _new(_cls, (rid, {''.join(value + ', ' for value in plan.values)}))")
    return _compiled(kind, cls, "decode", lines, _body_unpack=body.unpack_from, _new=tuple.__new__)


#: Kind code by event class.
KINDS: dict[type[Any], Kind] = {cls: kind for kind, cls in CLASSES}
_CLASS_OF: dict[int, type[Any]] = {int(kind): cls for kind, cls in CLASSES}


class _OnFirstUse(dict[Any, Any]):
    """ENCODERS or DECODERS: each message kind's encoder, or decoder, generated (and compiled) when first
    looked up, not at import: a client encodes a few kinds of the twenty and decodes a few others, and
    generating them all cost dls-lock's start-up milliseconds. Looked up as a dict (``codec[key]``, ``key
    in codec``, which says whether the kind is known); a value, once made, is a plain dict entry."""

    def __init__(self, kind_of: dict[Any, Kind], make: Callable[[Kind, type[Any]], Any]) -> None:
        super().__init__()
        self._kind_of = kind_of
        self._make = make

    def __contains__(self, key: object) -> bool:
        return key in self._kind_of

    def __missing__(self, key: Any) -> Any:
        kind = self._kind_of[key]  # KeyError for a kind no message has
        made = self[key] = self._make(kind, _CLASS_OF[int(kind)])
        return made


#: Encoder by event class: event -> whole frame.
ENCODERS: dict[type[Any], Encoder] = _OnFirstUse(KINDS, _encoder)
#: Decoder by kind code: (request id, buffer, body offset, body length) -> event.
DECODERS: dict[int, Decoder] = _OnFirstUse({int(kind): kind for kind, _ in CLASSES}, _decoder)


def generate_codecs() -> None:
    """Generate every kind's encoder and decoder now, for a process that forks many children speaking the
    protocol (the daemon's listener, before it forks its lock servers): each child would otherwise generate
    and compile them again on its first messages, a few milliseconds of every new connection."""
    for kind, cls in CLASSES:
        ENCODERS[cls], DECODERS[int(kind)]  # looked up to be made


def packer(cls: type[Any]) -> Callable[..., bytes]:
    """The frame of a ``cls`` message from its fields in order (request id first), no message made: the frame's
    one ``pack`` with the header's constants bound (a C call, no Python frame), for a message of fixed fields
    only (an Unlock's, on a client's lock path). TypeError for a message with text, bytes or a constant."""
    kind = KINDS[cls]
    plan = _Plan(LAYOUTS[kind])
    if plan.tails or plan.consts or cls in BOUNDS:
        raise TypeError(f"{cls.__name__} has fields that are not numbers, or bounds: only its encoder makes its frame")
    frame = struct.Struct(">" + _HEADER_FMT + plan.fmt)
    return partial(frame.pack, frame.size - HEADER_SIZE, FRAME_VERSION, int(kind), 0)


def encode(event: Any) -> bytes:
    """The whole frame for one message event."""
    return ENCODERS[type(event)](event)
