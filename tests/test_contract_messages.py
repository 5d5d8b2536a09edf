"""Contract: the exact bytes of every message of the dls wire protocol (golden file).

``tests/contract/messages.golden`` holds one line per message kind:

    KIND  <the whole frame, header included, in hex>  <the message, as repr() shows it>

Each message is built from the fixed field values of ``SAMPLES`` below. The
tests encode every sample with the current ``dls_proto`` and compare the frame
with its golden line, decode the golden frame (through a ``dls_proto.Connection``
in the state where that message may arrive) and compare it with the sample, and
build the body from the construct definition (the specification) as well. The
message kinds are discovered from ``dls_proto.Kind`` and ``dls_proto.MESSAGES``:
a new kind without a sample or without a golden line fails with a message saying so.

A change of the golden file is a change of the wire protocol, so it is made
deliberately, never by a test run on its own. To (re)write it after such a
conscious change (and then bump dls-proto's version, PROTOCOL_VERSIONS if old
peers cannot follow, and its CHANGELOG):

    DLS_WRITE_GOLDEN=1 pytest tests/test_contract_messages.py -n 0

and review ``git diff tests/contract/messages.golden`` before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from dls_proto import (
    ALL_THREADS,
    FRAME_VERSION,
    HEADER,
    HEADER_SIZE,
    MESSAGES,
    PROTOCOL_VERSIONS,
    SINCE,
    WAIT_FOREVER,
    Acquired,
    Blocking,
    BlockStatus,
    Cancel,
    Connection,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
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
    Mode,
    NeedData,
    Reclaim,
    Refused,
    RefuseReason,
    Release,
    Role,
    Settings,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
    ValueFlag,
    Waiting,
    Welcome,
    encode,
)

GOLDEN = Path(__file__).parent / "contract" / "messages.golden"
WRITE_VARIABLE = "DLS_WRITE_GOLDEN"

#: A key longer than a table slot keeps (120 bytes), with a byte that is not UTF-8.
LONG_KEY = b"K" * 150 + b"\xff"

#: One message of every kind, with fixed, distinctive field values (several bytes of each number
#: differ, so that a byte-order or width change shows; text with non-ASCII characters).
SAMPLES: dict[Kind, Any] = {
    Kind.HELLO: Hello(0x01020304, 1, 1, 0x0A0B, 50123, 0x00123456,
                      0x1122334455667788, "appserver-1.example", "tSA_Ünïcode"),
    Kind.WELCOME: Welcome(0x01020304, 2, Mechanism.TABLE, 0x0C0D, 0x00654321, 65536, 0x00012345,
                          "192.168.10.20", "lockhost"),
    Kind.LOCK: Lock(7, Mode.EX, LockFlag.NO_INTERIM | LockFlag.OSLOCK, WAIT_FOREVER, 0x0102030405060708,
                    0x00000000DEADBEEF, -1, b"USD163170001", "/data/FBNK.ACCOUNT"),
    Kind.UNLOCK: Unlock(8, 0x0000123400000042),
    Kind.RECLAIM: Reclaim(14, 0x0000123400000042, Mode.PW, 0x0102030405060708, 0x00000000DEADBEEF, -1,
                          b"USD163170001"),
    Kind.SETTINGS: Settings(17, 0, 2000),
    Kind.CONVERT: Convert(18, 0x0000123400000042, Mode.PW, LockFlag.VALUE_BLOCK | LockFlag.NOTIFY, ValueFlag.WRITE,
                          0x00012345, b"\x00balance=1234.56\xff"),
    Kind.RELEASE: Release(19, 0x0000123400000042, ValueFlag.INVALIDATE, bytes(range(64))),
    Kind.CANCEL: Cancel(20, 0x01020304),
    Kind.UNLOCK_ALL: UnlockAll(9, ALL_THREADS),
    Kind.STATUS: Status(10, 0x1122334455667788, 0xCAFEBABE, -2, LONG_KEY),
    Kind.INFO_PUT: InfoPut(11, b'{"files": [{"inode": 3735928559, "path": "/data/F\xc3\xa9"}]}'),
    Kind.INFO_GET: InfoGet(12, 0x8001),
    Kind.ECHO: Echo(13, bytes(range(0, 256, 17))),
    Kind.GRANTED: Granted(7, 0x0000123400000042, Mode.PR, 0x89ABCDEF),
    Kind.REFUSED: Refused(14, RefuseReason.TIMEOUT, Mode.EX, 4242, 50124, 31337, 0x0102030405060708,
                          "10.1.2.3"),
    Kind.WAITING: Waiting(15, 1500, Mode.PW, 4243, 50125, 31338, 0x0807060504030201, "::1"),
    Kind.STATUS_REPLY: StatusReply(10, HolderState.OTHER, Mode.CR, 4244, 50126, 31339, 77, "fe80::1"),
    Kind.INFO_SNAPSHOT: InfoSnapshot(12, b'{"locks": [], "info": []}'),
    Kind.ECHO_REPLY: EchoReply(13, b""),
    Kind.UNLOCKED: Unlocked(9, 0x00010203),
    Kind.ACQUIRED: Acquired(18, 0x0000123400000042, Mode.PW, 0x89ABCDEF, 0x0102030405060708, BlockStatus.NOT_VALID,
                            b"\x00balance=1234.56\xff"),
    Kind.BLOCKING: Blocking(7, 0x0000123400000042, Mode.CW),
    Kind.ERROR: Error(16, ErrorCode.VERSION, "client speaks versions 2..3, server speaks 1..1 — bye"),
}

#: Kinds a client sends (a server Connection receives them once open); the rest a server sends.
FROM_CLIENT = {Kind.HELLO, Kind.LOCK, Kind.UNLOCK, Kind.UNLOCK_ALL, Kind.STATUS, Kind.INFO_PUT, Kind.INFO_GET,
               Kind.ECHO, Kind.RECLAIM, Kind.SETTINGS, Kind.CONVERT, Kind.RELEASE, Kind.CANCEL}


def plain(message: Any) -> Any:
    """A message with its enum members turned into plain ints, so that repr() reads the same
    whatever enum a value was written with (the wire knows only numbers)."""
    return type(message)(*(int(v) if isinstance(v, int) else v for v in message))


def golden_lines() -> dict[Kind, tuple[str, bytes, str]]:
    """The golden file: kind -> (name, frame, repr) from its lines."""
    assert GOLDEN.exists(), f"{GOLDEN} is missing: write it with {WRITE_VARIABLE}=1 (see this module's docstring)"
    lines: dict[Kind, tuple[str, bytes, str]] = {}
    for number, line in enumerate(GOLDEN.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, hexframe, text = line.split("  ", 2)
        assert name in Kind.__members__, f"{GOLDEN}:{number}: {name!r} is not a message kind of dls_proto.Kind"
        kind = Kind[name]
        assert kind not in lines, f"{GOLDEN}:{number}: a second line for {name}"
        lines[kind] = (name, bytes.fromhex(hexframe), text)
    return lines


#: The kind of each message class.
KIND_OF = {cls: kind for kind, _spec, cls in MESSAGES}


def render_golden() -> str:
    header = [
        "# Golden frames of the dls wire protocol: every message kind, whole frame (12-byte header:",
        "# body length u32, frame version u8, kind u8, reserved u16, request id u32; then the body), in hex.",
        f"# Frame version {FRAME_VERSION}; protocol versions {PROTOCOL_VERSIONS[0]}..{PROTOCOL_VERSIONS[1]}"
        " (the message layouts do not differ between them; "
        + ", ".join(f"{KIND_OF[cls].name} only from version {since}" for cls, since in SINCE.items()) + ").",
        f"# A change here is a change of the protocol: written only with {WRITE_VARIABLE}=1,"
        " see tests/test_contract_messages.py.",
        "# KIND  FRAME  MESSAGE",
    ]
    body = [f"{kind.name}  {encode(SAMPLES[kind]).hex()}  {plain(SAMPLES[kind])!r}"
            for kind, _spec, _cls in MESSAGES]
    return "\n".join([*header, *body]) + "\n"


@pytest.fixture(scope="module")
def golden() -> dict[Kind, tuple[str, bytes, str]]:
    if os.environ.get(WRITE_VARIABLE) == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        tmp = GOLDEN.with_name(f".{GOLDEN.name}.{os.getpid()}")
        tmp.write_text(render_golden(), encoding="utf-8")
        os.replace(tmp, GOLDEN)  # xdist workers may both write it: the same text, atomically
    return golden_lines()


# -- every kind is covered ---------------------------------------------------------------


def test_every_kind_has_a_definition_a_sample_and_a_golden_line(golden: dict[Kind, Any]) -> None:
    defined = [kind for kind, _spec, _cls in MESSAGES]
    assert len(defined) == len(set(defined)), f"a kind defined twice in dls_proto.MESSAGES: {defined}"
    without_definition = sorted(k.name for k in Kind if k not in defined)
    assert not without_definition, f"dls_proto.Kind members without a definition in MESSAGES: {without_definition}"
    without_sample = sorted(k.name for k in Kind if k not in SAMPLES)
    assert not without_sample, (
        f"message kinds without a sample in {__name__}.SAMPLES: {without_sample}. A new kind is a protocol "
        f"change: add a sample, then write its golden line with {WRITE_VARIABLE}=1 (see the module docstring)")
    without_line = sorted(k.name for k in Kind if k not in golden)
    assert not without_line, (
        f"message kinds without a line in {GOLDEN}: {without_line}. If the new kind is deliberate, "
        f"write the golden file with {WRITE_VARIABLE}=1 (see {__name__}'s docstring) and review the diff")
    stale = sorted(name for name, *_ in golden.values() if name not in Kind.__members__)
    assert not stale, f"golden lines for kinds dls_proto no longer has: {stale}"
    for kind, _spec, cls in MESSAGES:
        assert isinstance(SAMPLES[kind], cls), f"SAMPLES[{kind.name}] is not a {cls.__name__}"


def test_golden_file_is_the_rendered_samples(golden: dict[Kind, Any]) -> None:
    """The whole file, comments and order included, is what the samples give (no hand edits)."""
    assert GOLDEN.read_text(encoding="utf-8") == render_golden(), (
        f"{GOLDEN} differs from what dls_proto encodes now: a protocol change? If deliberate, rewrite it "
        f"with {WRITE_VARIABLE}=1 and review the diff")


# -- per kind: encode, decode, specification -------------------------------------------------


KINDS = [kind for kind, _spec, _cls in MESSAGES]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_encode_gives_the_golden_frame(kind: Kind, golden: dict[Kind, Any]) -> None:
    if kind not in golden:
        pytest.fail(f"no golden line for {kind.name} in {GOLDEN} (write it deliberately with {WRITE_VARIABLE}=1)")
    _name, frame, text = golden[kind]
    sample = SAMPLES[kind]
    assert text == repr(plain(sample)), f"{kind.name}: the golden line describes another message than SAMPLES"
    encoded = encode(sample)
    assert encoded.hex() == frame.hex(), f"{kind.name}: encoded frame differs from the golden one"
    header = HEADER.parse(frame[:HEADER_SIZE])
    assert header.length == len(frame) - HEADER_SIZE
    assert header.version == FRAME_VERSION
    assert header.kind == int(kind)
    assert header.reserved == 0
    assert header.request_id == sample.request_id
    # The sans-IO connection, as a peer sends it, gives the same bytes.
    assert sender_in_state(kind).send(sample) == frame


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_golden_frame_decodes_to_the_message(kind: Kind, golden: dict[Kind, Any]) -> None:
    if kind not in golden:
        pytest.fail(f"no golden line for {kind.name} in {GOLDEN} (write it deliberately with {WRITE_VARIABLE}=1)")
    frame = golden[kind][1]
    conn = receiver_in_state(kind)
    # Byte by byte first half, then the rest: framing must not depend on how reads split.
    half = len(frame) // 2
    for i in range(half):
        conn.receive_data(frame[i:i + 1])
        assert isinstance(conn.next_event(), NeedData)
    conn.receive_data(frame[half:])
    event = conn.next_event()
    assert type(event) is type(SAMPLES[kind])
    assert event == SAMPLES[kind]
    assert isinstance(conn.next_event(), NeedData)
    assert conn.buffered == 0


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_construct_definition_agrees_with_the_golden_frame(kind: Kind, golden: dict[Kind, Any]) -> None:
    """The construct definitions are the specification: they build and parse the golden body too."""
    if kind not in golden:
        pytest.fail(f"no golden line for {kind.name} in {GOLDEN} (write it deliberately with {WRITE_VARIABLE}=1)")
    spec = next(s for k, s, _c in MESSAGES if k == kind)
    sample = SAMPLES[kind]
    body = golden[kind][1][HEADER_SIZE:]
    fields = dict(sample._asdict())
    del fields["request_id"]
    assert spec.build(fields) == body
    parsed = spec.parse(body)
    for name, value in fields.items():
        assert parsed[name] == value, f"{kind.name}.{name}: the specification parses {parsed[name]!r}"


# -- connections in the state where a message may be sent or received ------------------------


def _hello() -> Hello:
    """The sample Hello, offering the versions this package speaks (the sample's own are for its bytes)."""
    return SAMPLES[Kind.HELLO]._replace(min_version=PROTOCOL_VERSIONS[0], max_version=PROTOCOL_VERSIONS[1])


def _welcome() -> Welcome:
    return SAMPLES[Kind.WELCOME]


def _welcome_for(kind: Kind) -> Welcome:
    """The sample Welcome, of the first protocol version that has messages of ``kind``."""
    cls = next(cls for k, _, cls in MESSAGES if k is kind)
    return _welcome()._replace(version=max(_welcome().version, SINCE.get(cls, 0)))


def _open_client(kind: Kind) -> Connection:
    conn = Connection(Role.CLIENT)
    conn.send(_hello())
    conn.receive_data(encode(_welcome_for(kind)))
    assert isinstance(conn.next_event(), Welcome)
    return conn


def _open_server(kind: Kind) -> Connection:
    conn = Connection(Role.SERVER)
    conn.receive_data(encode(_hello()))
    assert isinstance(conn.next_event(), Hello)
    conn.send(_welcome_for(kind))
    return conn


def sender_in_state(kind: Kind) -> Connection:
    if kind is Kind.HELLO:
        return Connection(Role.CLIENT)
    if kind in (Kind.WELCOME, Kind.ERROR):
        conn = Connection(Role.SERVER)
        conn.receive_data(encode(_hello()))
        conn.next_event()
        return conn
    return _open_client(kind) if kind in FROM_CLIENT else _open_server(kind)


def receiver_in_state(kind: Kind) -> Connection:
    if kind is Kind.HELLO:
        return Connection(Role.SERVER)
    if kind in (Kind.WELCOME, Kind.ERROR):
        conn = Connection(Role.CLIENT)
        conn.send(_hello())
        return conn
    return _open_server(kind) if kind in FROM_CLIENT else _open_client(kind)
