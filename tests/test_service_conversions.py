"""Issue 14 through the service, on the wire: a real daemon (``jdls -ib``) and clients speaking protocol 4 by hand.

- a v4 Lock is answered with Acquired (fencing token; the value block when asked), the tokens of a resource
  strictly increasing across grants and conversions up;
- Convert: in place, down at once; up waits in the convert queue ahead of a newer waiting Lock, Waiting
  messages meanwhile, granted when the other holder goes; NOQUEUE (timeout 0) refused BUSY, the lock held in its
  old mode; a conversion chosen as a deadlock victim refused DEADLOCK (marked in the table, as the monitor's
  detector marks it), the lock still held;
- Cancel withdraws a waiting Lock (Refused CANCELLED); one of an unknown request is ignored;
- Release writes the value block (PW/EX only: a PR's is refused and its lock stays held); a PR reads it back;
  an EX holder whose client is lost leaves it not valid, with its last value;
- under OS file locks (``jdls -ibD``) Convert, VALUE_BLOCK and a Release with a block are refused, saying why.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_proto import (
    WAIT_FOREVER,
    Acquired,
    Blocking,
    BlockStatus,
    Cancel,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Granted,
    Lock,
    LockFlag,
    Message,
    Mode,
    Refused,
    RefuseReason,
    Release,
    Unlock,
    ValueFlag,
    Waiting,
    Welcome,
)
from dls_proto import Connection as ProtoConnection
from dls_shm import SlotState, doorbell
from dls_testkit import Service, data_file, make_service
from dls_testkit.clients import attached
from dls_testkit.wire import greet, receive

pytestmark = pytest.mark.slow


class Peer:
    """A v4 client on a socket of its own: sends messages, reads what comes back."""

    def __init__(self, svc: Service, port: int, thread: int = 1) -> None:
        self.sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        svc.sockets.append(self.sock)
        self.conn: ProtoConnection
        self.conn, welcome = greet(self.sock, port, thread=thread)
        assert isinstance(welcome, Welcome) and welcome.version == 4, welcome
        self.thread = thread
        self.ids = iter(range(2, 1 << 30))

    def send(self, message: Message) -> None:
        self.sock.sendall(self.conn.send(message))

    def next_id(self) -> int:
        return next(self.ids)

    def event(self, kind: Any = object, timeout: float = 10.0) -> Any:
        return receive(self.sock, self.conn, kind, timeout)

    def silent(self, seconds: float) -> bool:
        """Nothing comes within ``seconds`` (interim Waiting messages aside)."""
        self.sock.settimeout(seconds)
        try:
            while True:
                event = self.conn.next_event()
                if type(event).__name__ == "NeedData":
                    self.conn.receive_data(self.sock.recv(65536))
                    continue
                if not isinstance(event, Waiting):
                    raise AssertionError(f"unexpected {event!r}")
        except TimeoutError:
            return True

    def lock(self, data: Path, key: bytes, mode: int, *, flags: int = 0, timeout_ms: int = 0) -> int:
        """Send a Lock; its request id."""
        rid = self.next_id()
        self.send(Lock(rid, mode, flags, timeout_ms, self.thread, data.stat().st_ino, -1, key, str(data)))
        return rid

    def take(self, data: Path, key: bytes, mode: int, *, flags: int = 0) -> Acquired:
        rid = self.lock(data, key, mode, flags=flags)
        got = self.event(Acquired)
        assert got.request_id == rid and got.mode == mode, got
        return got

    def convert(self, handle: int, mode: int, *, timeout_ms: int = WAIT_FOREVER, flags: int = 0,
                value_flags: int = 0, block: bytes = b"") -> int:
        rid = self.next_id()
        self.send(Convert(rid, handle, mode, flags | LockFlag.NO_INTERIM, value_flags, timeout_ms, block))
        return rid

    def answer(self, rid: int, kind: Any = object, timeout: float = 10.0) -> Any:
        """The final answer to request ``rid`` (interim Waiting messages skipped)."""
        while True:
            event = self.event(object, timeout)
            if isinstance(event, Waiting):
                continue
            assert event.request_id == rid, event
            assert isinstance(event, kind), event
            return event

    def unlock(self, handle: int) -> None:
        """Unlock, and wait until it is done (an Unlock is answered only when it fails)."""
        self.send(Unlock(self.next_id(), handle))
        self.echo()

    def echo(self) -> None:
        """A round trip: whatever was sent before it has been served."""
        rid = self.next_id()
        self.send(Echo(rid, b"sync"))
        assert self.answer(rid, EchoReply).data == b"sync"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return data_file(tmp_path)


def test_lock_answered_with_acquired_and_tokens_increase(daemon: Service, data: Path) -> None:
    a, b = Peer(daemon, 47201), Peer(daemon, 47202)
    tokens = []
    first = a.take(data, b"TOKENS", Mode.PR)
    tokens.append(first.token)
    assert first.block_status == BlockStatus.NONE and first.block == b""
    second = b.take(data, b"TOKENS", Mode.PR)
    tokens.append(second.token)
    a.unlock(first.handle)
    up = b.convert(second.handle, Mode.EX)
    converted = b.answer(up, Acquired)
    assert (converted.handle, converted.mode) == (second.handle, Mode.EX)
    tokens.append(converted.token)
    down = b.convert(second.handle, Mode.PR)
    assert b.answer(down, Acquired).token == converted.token  # down keeps its token
    b.unlock(second.handle)
    tokens.append(a.take(data, b"TOKENS", Mode.EX).token)
    assert tokens == sorted(set(tokens)), tokens


def test_conversion_up_waits_ahead_of_a_newer_waiter(daemon: Service, data: Path) -> None:
    """PR held by two; one converts to EX and waits; a newer EX Lock waits too; the other PR goes: the
    conversion is granted first, the EX waiter only when the converted lock goes."""
    a, b, c = Peer(daemon, 47211), Peer(daemon, 47212), Peer(daemon, 47213)
    held_a = a.take(data, b"QUEUE", Mode.PR)
    held_b = b.take(data, b"QUEUE", Mode.PR)
    up = a.convert(held_a.handle, Mode.EX)
    a.echo()  # queued: answered before the Echo after it otherwise
    waiter = c.lock(data, b"QUEUE", Mode.EX, timeout_ms=WAIT_FOREVER)
    c.echo()
    assert a.silent(0.2) and c.silent(0.2)
    b.unlock(held_b.handle)
    granted = a.answer(up, Acquired)
    assert (granted.handle, granted.mode) == (held_a.handle, Mode.EX)
    assert granted.token > held_a.token
    assert c.silent(0.3), "the newer EX waiter was granted beside the converted EX lock"
    a.unlock(held_a.handle)
    assert c.answer(waiter, Acquired).token > granted.token


def test_noqueue_conversion_refused_busy_lock_kept(daemon: Service, data: Path) -> None:
    a, b = Peer(daemon, 47221), Peer(daemon, 47222)
    held_a = a.take(data, b"BUSY", Mode.PR)
    held_b = b.take(data, b"BUSY", Mode.PR)
    refused = a.answer(a.convert(held_a.handle, Mode.EX, timeout_ms=0), Refused)
    assert refused.reason == RefuseReason.BUSY and refused.holder_mode == Mode.PR
    timed_out = a.answer(a.convert(held_a.handle, Mode.EX, timeout_ms=200), Refused)
    assert timed_out.reason == RefuseReason.TIMEOUT
    # Still held in PR: an EX of a third client is refused, a conversion down works.
    c = Peer(daemon, 47223)
    assert c.answer(c.lock(data, b"BUSY", Mode.EX), Refused).reason == RefuseReason.BUSY
    assert a.answer(a.convert(held_a.handle, Mode.CR), Acquired).mode == Mode.CR
    b.unlock(held_b.handle)
    a.unlock(held_a.handle)
    c.take(data, b"BUSY", Mode.EX)


def test_conversion_of_a_lock_not_held_is_an_error(daemon: Service) -> None:
    a = Peer(daemon, 47224)
    error = a.answer(a.convert(0x1234, Mode.EX), Error)
    assert error.code == ErrorCode.NOT_HELD


def test_a_conversion_with_flags_it_cannot_use_or_a_block_not_to_write_is_refused(daemon: Service, data: Path) -> None:
    """Lock flags that mean nothing to a conversion (OSLOCK, BINARY, undefined bits), and a value block sent
    without the WRITE value flag (to Convert or Release), are refused BAD_REQUEST saying why; the lock stays
    held in its mode (found by the outside attack: they were taken silently)."""
    a = Peer(daemon, 47225)
    held = a.take(data, b"FLAGS", Mode.EX)
    for flags in (LockFlag.OSLOCK, LockFlag.BINARY, 0xE0):
        error = a.answer(a.convert(held.handle, Mode.PR, flags=flags), Error)
        assert error.code == ErrorCode.BAD_REQUEST and "mean nothing to a conversion" in error.reason, error
    error = a.answer(a.convert(held.handle, Mode.PR, block=b"ignored?"), Error)
    assert error.code == ErrorCode.BAD_REQUEST and "without the WRITE value flag" in error.reason, error
    rid = a.next_id()
    a.send(Release(rid, held.handle, 0, b"ignored?"))
    error = a.answer(rid, Error)
    assert error.code == ErrorCode.BAD_REQUEST and "without the WRITE value flag" in error.reason, error
    assert a.answer(a.convert(held.handle, Mode.PR), Acquired).mode == Mode.PR  # held all along
    a.unlock(held.handle)


def test_deadlock_victim_refused_deadlock_lock_kept(daemon: Service, data: Path) -> None:
    """A waiting conversion marked DEADLOCK in the table (as the monitor's detector marks its victim) and rung
    is refused DEADLOCK; its lock stays held in its old mode."""
    a, b = Peer(daemon, 47231), Peer(daemon, 47232)
    held_a = a.take(data, b"CYCLE", Mode.PR)
    held_b = b.take(data, b"CYCLE", Mode.PR)
    up = a.convert(held_a.handle, Mode.EX)
    a.echo()  # queued
    with attached(daemon) as table:
        waiting = [entry for entry in table.scan()
                   if entry.slot.state == SlotState.WAITING and entry.slot.key.startswith(b"CYCLE")]
        assert len(waiting) == 1, waiting
        entry = waiting[0]
        offset = table.geometry.slot_offset(entry.index)
        with table._group_held(entry.group):
            table._mv[offset + 8] = SlotState.DEADLOCK  # the slot's state byte
        doorbell.ring(entry.slot.doorbell)
    refused = a.answer(up, Refused, timeout=5)
    assert refused.reason == RefuseReason.DEADLOCK
    c = Peer(daemon, 47233)
    assert c.answer(c.lock(data, b"CYCLE", Mode.PW), Refused).reason == RefuseReason.BUSY  # both PR still held
    b.unlock(held_b.handle)
    assert a.answer(a.convert(held_a.handle, Mode.EX), Acquired).mode == Mode.EX


def test_cancel_withdraws_a_waiting_lock(daemon: Service, data: Path) -> None:
    a, b = Peer(daemon, 47241), Peer(daemon, 47242)
    held = a.take(data, b"CANCEL", Mode.EX)
    waiting = b.lock(data, b"CANCEL", Mode.EX, timeout_ms=WAIT_FOREVER, flags=LockFlag.NO_INTERIM)
    assert b.silent(0.2)
    b.send(Cancel(b.next_id(), 999_999))  # nothing waits under that id: ignored
    b.send(Cancel(b.next_id(), waiting))
    assert b.answer(waiting, Refused).reason == RefuseReason.CANCELLED
    b.echo()
    a.unlock(held.handle)
    b.take(data, b"CANCEL", Mode.EX)  # nothing of the cancelled request is left in the way


def test_value_block_written_at_release_and_read(daemon: Service, data: Path) -> None:
    """The block lives while any lock of its resource does (granted, converting or waiting): a keeper's NL lock
    keeps it between the writer and the reader here."""
    keeper, a, b = Peer(daemon, 47250), Peer(daemon, 47251), Peer(daemon, 47252)
    kept = keeper.take(data, b"LVB", Mode.NL)
    held = a.take(data, b"LVB", Mode.EX, flags=LockFlag.VALUE_BLOCK)
    assert held.block_status == BlockStatus.VALID and held.block == bytes(len(held.block))  # zero, never written
    size = len(held.block)
    a.send(Release(a.next_id(), held.handle, ValueFlag.WRITE, b"balance=42"))
    a.echo()  # a Release is answered only when it fails: done once the Echo after it is answered
    read = b.take(data, b"LVB", Mode.PR, flags=LockFlag.VALUE_BLOCK)
    assert read.block_status == BlockStatus.VALID
    assert read.block == b"balance=42".ljust(size, b"\0")
    # A PR holder may not write it: refused, the lock still held.
    rid = b.next_id()
    b.send(Release(rid, read.handle, ValueFlag.WRITE, b"nope"))
    error = b.answer(rid, Error)
    assert error.code == ErrorCode.BAD_REQUEST and "PW or EX" in error.reason, error
    assert a.answer(a.lock(data, b"LVB", Mode.EX), Refused).reason == RefuseReason.BUSY
    # Written at a conversion down too; a waiting reader is handed it with its grant.
    b.unlock(read.handle)
    writer = a.take(data, b"LVB", Mode.EX)
    reader = b.lock(data, b"LVB", Mode.PR, flags=LockFlag.VALUE_BLOCK | LockFlag.NO_INTERIM,
                    timeout_ms=WAIT_FOREVER)
    b.echo()  # queued
    down = a.answer(a.convert(writer.handle, Mode.NL, flags=LockFlag.VALUE_BLOCK, value_flags=ValueFlag.WRITE,
                              block=b"balance=43"), Acquired)
    assert (down.block_status, down.block) == (BlockStatus.VALID, b"balance=43".ljust(size, b"\0"))
    handed = b.answer(reader, Acquired)
    assert (handed.block_status, handed.block) == (BlockStatus.VALID, b"balance=43".ljust(size, b"\0"))
    for peer, handle in ((a, writer.handle), (b, handed.handle), (keeper, kept.handle)):
        peer.unlock(handle)


def test_lost_ex_holder_leaves_the_block_not_valid(daemon: Service, data: Path) -> None:
    """The EX holder's client goes (its connection ends) while a reader waits: the reader is granted the last
    value, not valid; a writer's new value makes it valid again."""
    a, b = Peer(daemon, 47261), Peer(daemon, 47262)
    held = a.take(data, b"LOST", Mode.EX)
    reader = b.lock(data, b"LOST", Mode.PR, flags=LockFlag.VALUE_BLOCK | LockFlag.NO_INTERIM,
                    timeout_ms=WAIT_FOREVER)
    b.echo()  # queued
    same = a.answer(a.convert(held.handle, Mode.EX, value_flags=ValueFlag.WRITE, block=b"v1"), Acquired)
    assert same.token == held.token  # written, still EX: no conversion up
    a.sock.close()  # the client is gone holding EX
    got = b.answer(reader, Acquired, timeout=5)
    assert got.token > held.token
    assert got.block_status == BlockStatus.NOT_VALID and got.block.rstrip(b"\0") == b"v1"
    up = b.answer(b.convert(got.handle, Mode.EX, value_flags=0), Acquired)
    c = Peer(daemon, 47263)
    c_held = c.take(data, b"LOST", Mode.NL)  # keeps the resource, and its block, while nobody else holds it
    b.send(Release(b.next_id(), up.handle, ValueFlag.NONE, b""))
    b.echo()
    again = b.take(data, b"LOST", Mode.EX, flags=LockFlag.VALUE_BLOCK)
    assert again.block_status == BlockStatus.NOT_VALID  # nobody wrote since
    b.send(Release(b.next_id(), again.handle, ValueFlag.WRITE, b"v2"))
    b.echo()
    assert c.answer(c.convert(c_held.handle, Mode.PR, flags=LockFlag.VALUE_BLOCK), Acquired).block_status == \
        BlockStatus.VALID


def test_blocking_notice_names_the_lock_and_the_mode_once_and_not_to_an_older_client(
    daemon: Service, data: Path,
) -> None:
    """A Lock with NOTIFY: a request queued behind it sends its client a Blocking (the Lock's id, the handle it
    was given, the mode wanted), once until nobody waits; a version-3 client's NOTIFY bit means nothing (it
    would not know a Blocking: none is sent)."""
    holder, waiter = Peer(daemon, 7101), Peer(daemon, 7102)
    rid = holder.lock(data, b"NOTICE", Mode.PW, flags=LockFlag.NOTIFY)
    held = holder.answer(rid, Acquired)
    waiter.lock(data, b"NOTICE", Mode.EX, flags=LockFlag.NO_INTERIM, timeout_ms=WAIT_FOREVER)
    notice = holder.event(Blocking)
    assert (notice.request_id, notice.handle, notice.mode) == (rid, held.handle, Mode.EX)
    waiter.lock(data, b"NOTICE", Mode.PR, flags=LockFlag.NO_INTERIM, timeout_ms=WAIT_FOREVER)
    assert holder.silent(0.3), "told once"
    old = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    daemon.sockets.append(old)
    conn, welcome = greet(old, 7103, max_version=3)
    assert welcome.version == 3
    old.sendall(conn.send(Lock(2, Mode.EX, LockFlag.NOTIFY, 0, 1, data.stat().st_ino, -1, b"OLD", str(data))))
    granted = receive(old, conn, Granted)
    other = Peer(daemon, 7104)
    other.lock(data, b"OLD", Mode.EX, flags=LockFlag.NO_INTERIM, timeout_ms=WAIT_FOREVER)
    old.settimeout(0.3)
    with pytest.raises(TimeoutError):
        old.recv(1)  # nothing: no Blocking for a client of version 3
    old.sendall(conn.send(Unlock(3, granted.handle)))
    holder.send(Unlock(holder.next_id(), held.handle))


@pytest.fixture
def os_daemon(tmp_path: Path) -> Iterator[Service]:
    with make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        svc.start("--lock-dir", str(svc.lock_dir), "--binary-lock-dir", str(svc.binary_lock_dir))
        yield svc


def test_os_file_locks_refuse_what_they_cannot_do(os_daemon: Service, data: Path) -> None:
    a = Peer(os_daemon, 47271)
    refused = a.answer(a.lock(data, b"OS", Mode.EX, flags=LockFlag.VALUE_BLOCK), Error)
    assert refused.code == ErrorCode.BAD_REQUEST and "OS file locks cannot keep value blocks" in refused.reason
    held = a.take(data, b"OS", Mode.EX)
    assert held.token == 0  # OS file locks have no fencing tokens
    error = a.answer(a.convert(held.handle, Mode.PR), Error)
    assert error.code == ErrorCode.BAD_REQUEST and "OS file locks cannot convert" in error.reason
    rid = a.next_id()
    a.send(Release(rid, held.handle, ValueFlag.INVALIDATE, b""))
    assert "OS file locks cannot keep value blocks" in a.answer(rid, Error).reason
    a.unlock(held.handle)  # still held until then
    a.echo()
