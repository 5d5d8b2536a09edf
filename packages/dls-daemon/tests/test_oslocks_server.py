"""A lock server with OS file locks: real lock server processes, real TCP, real fcntl locks.

A small listener of the test's own accepts each connection and forks a lock
server (``lockserver.serve``) with a ServerContext whose lock directories are
under tmp_path: without a table (``jdls -ibD`` alone) every record lock is an
OS lock; with a table, only Locks flagged BINARY are (OSLOCK ones are table locks). The clients
speak the protocol directly (``dls_proto.Connection``), so that each test says
exactly which thread asks what. Every lock server is ended and reaped at
teardown, and every table removed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_daemon import lockserver
from dls_daemon.context import Limits, ServerContext
from dls_proto import (
    PROTOCOL_VERSIONS,
    WAIT_FOREVER,
    Acquired,
    Connection,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Event,
    Hello,
    InfoPut,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    Refused,
    RefuseReason,
    Role,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
    Waiting,
    Welcome,
)
from dls_shm import Instance, LockTable, geometry_for, ipc_key_for, lock_file_name
from dls_testkit import Children, own_table, wire

NL, CR, CW, PR, PW, EX = range(6)
INODE, DEVICE, KEY = 0x2468, -1, b"FBNK.ACCOUNT*USD1"
FILE = lock_file_name(INODE, DEVICE)
ALL_THREADS = 0xFFFFFFFFFFFFFFFF
#: Every socket of the test process that a forked lock server must not keep open (a client's close
#: would not reach its own lock server while another process holds the socket too).
_SOCKETS: list[socket.socket] = []


class Peer:
    """A client connection, speaking the protocol by hand."""

    def __init__(self, address: tuple[str, int], pid: int, port: int) -> None:
        self.sock = socket.create_connection(address)
        _SOCKETS.append(self.sock)
        self.conn = Connection(Role.CLIENT)
        self.pid, self.port = pid, port
        self._rid = 0
        self.sock.sendall(self.conn.send(Hello(0, *PROTOCOL_VERSIONS, 0, port, pid, 1, "apphost", "test")))
        self.server_pid = 0  # set by Servers.connect once the lock server is forked
        self.welcomed: Welcome | None = None

    def welcome(self) -> Welcome:
        event = self.next()
        assert isinstance(event, Welcome), event
        return event

    def rid(self) -> int:
        self._rid += 1
        return self._rid

    def send(self, message: Message) -> None:
        self.sock.sendall(self.conn.send(message))

    def next(self, timeout: float = 5.0) -> Event:
        event: Event = wire.receive(self.sock, self.conn, object, timeout)
        return event

    def lock(self, mode: int = EX, *, thread: int = 1, timeout_ms: int = 0, flags: int = 0, key: bytes = KEY,
             inode: int = INODE) -> Event:
        """Send a Lock and return its first answer (Acquired, Refused, Waiting or Error)."""
        rid = self.rid()
        self.send(Lock(rid, mode, flags, timeout_ms, thread, inode, DEVICE, key, "ac/FBNK.ACCOUNT"))
        event = self.next()
        assert getattr(event, "request_id", rid) == rid, event
        return event

    def granted(self, mode: int = EX, **kwargs: object) -> Acquired:
        event = self.lock(mode, **kwargs)  # type: ignore[arg-type]
        assert isinstance(event, Acquired), event
        return event

    def unlock(self, handle: int) -> None:
        self.send(Unlock(self.rid(), handle))
        self.sync()

    def sync(self) -> None:
        """Wait until everything sent before has been handled (Unlock has no answer)."""
        rid = self.rid()
        self.send(Echo(rid, b"sync"))
        event = self.next()
        assert event == EchoReply(rid, b"sync"), event

    def status(self, *, thread: int = 1, key: bytes = KEY) -> StatusReply:
        rid = self.rid()
        self.send(Status(rid, thread, INODE, DEVICE, key))
        event = self.next()
        assert isinstance(event, StatusReply), event
        return event

    def close(self) -> None:
        self.sock.close()


class Servers:
    """The test's listener: one forked lock server per connection, all ended at teardown."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.listen = socket.socket()
        self.listen.bind(("127.0.0.1", 0))
        self.listen.listen()
        _SOCKETS.append(self.listen)
        self.peers: list[Peer] = []
        self.children = Children()

    def connect(self, pid: int = 4242, port: int = 7) -> Peer:
        peer = Peer(self.listen.getsockname(), pid, port)
        self.peers.append(peer)
        conn, addr = self.listen.accept()

        def lock_server() -> int:
            for sock in _SOCKETS:
                sock.close()
            return lockserver.serve(conn, addr, self.ctx)

        child = self.children.fork(lock_server)
        conn.close()
        peer.server_pid = child
        peer.welcomed = peer.welcome()
        assert peer.welcomed.server_pid == child
        return peer

    def wait(self, pid: int, timeout: float = 10.0) -> int:
        """Reap the lock server ``pid``: its exit code (negative: the signal that killed it)."""
        return self.children.wait(pid, timeout)

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.listen.close()
        self.children.check_reaped()


def context(tmp_path: Path, table: LockTable | None = None) -> ServerContext:
    return ServerContext(
        Instance.from_environment(tmp_path / "release"), table, logging.getLogger("dls-test-server"),
        limits=Limits(interim_period=0.2), lock_dir=tmp_path / "jbase", binary_lock_dir=tmp_path / "jbase_lock",
    )


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    made = Servers(context(tmp_path))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def table(tmp_path: Path) -> Iterator[LockTable]:
    with own_table(ipc_key_for(tmp_path / "table"), geometry_for(1000, 10)) as made:
        yield made


@pytest.fixture
def table_servers(tmp_path: Path, table: LockTable) -> Iterator[Servers]:
    made = Servers(context(tmp_path, table))
    try:
        yield made
    finally:
        made.close()


def refused(event: Event, reason: int = RefuseReason.BUSY) -> Refused:
    assert isinstance(event, Refused), event
    assert event.reason == reason, event
    return event


def from_lock_server(event: Refused | Waiting | StatusReply, server_pid: int, mode: int = EX) -> None:
    """The holder is another lock server, known by its pid only (as F_GETLK shows it)."""
    assert (event.holder_mode, event.holder_pid, event.holder_port, event.holder_client_pid,
            event.holder_thread, event.holder_ip) == (mode, server_pid, 0, 0, 0, "0.0.0.0"), event


# -- without a table ----------------------------------------------------------------------------


def test_without_a_table_locks_are_jlock_files_and_exclude_other_clients(servers: Servers, tmp_path: Path) -> None:
    a = servers.connect(pid=100, port=10)
    b = servers.connect(pid=200, port=20)
    g = a.granted(EX)
    assert [p.name for p in (tmp_path / "jbase").iterdir()] == [FILE]
    assert not (tmp_path / "jbase_lock").exists()
    from_lock_server(refused(b.lock(PR)), a.server_pid, EX)
    assert isinstance(b.lock(EX, key=b"another key"), Acquired)
    assert isinstance(b.lock(EX, inode=INODE + 1), Acquired)
    a.unlock(g.handle)
    assert isinstance(b.lock(EX), Acquired)
    from_lock_server(refused(a.lock(EX)), b.server_pid, EX)


#: Python code a lock server has no need of from fork to serving its client: ipaddress (its client's address is
#: packed by inet_pton, --admin-allow matched as integers) and the random module's SystemRandom (its doorbell's
#: token is read from os.urandom). Random.seed runs all the same: the random module's own at-fork handler.
NOT_ON_THE_WAY = ("ipaddress.py:", "random.py:SystemRandom.")


def test_a_lock_server_runs_no_code_it_can_do_without(servers: Servers, tmp_path: Path) -> None:
    """Greeting, a lock information document, locking and unlocking run no function of the modules above (issue
    13): in a lock server each Python object touched costs the 4 KiB page it is on, copied from the listener for
    its reference count, and those modules ran through about 0.2 MiB of them. The forked lock server inherits
    this process's profile hook."""
    calls = tmp_path / "calls"
    parent = os.getpid()

    def hook(frame: types.FrameType, event: str, _arg: object) -> None:
        code = frame.f_code
        where = f"{os.path.basename(code.co_filename)}:{code.co_qualname}"
        if event == "call" and where.startswith(NOT_ON_THE_WAY) and os.getpid() != parent:
            with calls.open("a") as out:
                out.write(f"{where}\n")

    sys.setprofile(hook)
    try:
        peer = servers.connect()
    finally:
        sys.setprofile(None)
    peer.send(InfoPut(peer.rid(), b'{"files": [], "locks": []}'))
    peer.unlock(peer.granted(EX).handle)
    peer.close()
    assert servers.wait(peer.server_pid) == 0
    assert not calls.exists(), calls.read_text()
    assert not list((tmp_path / "release").rglob("*@*")), "the document is removed as its client goes"


def test_welcome_tells_the_mechanism(servers: Servers, table_servers: Servers) -> None:
    without = servers.connect().welcomed
    with_table = table_servers.connect().welcomed
    assert without is not None and without.mechanism == Mechanism.OSLOCKS
    assert with_table is not None and with_table.mechanism == Mechanism.TABLE


def test_readers_share_across_clients_and_a_writer_is_refused(servers: Servers) -> None:
    a, b, c = servers.connect(pid=1), servers.connect(pid=2), servers.connect(pid=3)
    ra = a.granted(PR)
    rb = b.granted(PR)
    rc = c.granted(CR)
    mine = refused(c.lock(EX, thread=2))  # its own thread 1 stands in the way first
    assert (mine.holder_mode, mine.holder_pid, mine.holder_thread) == (CR, c.server_pid, 1)
    c.unlock(rc.handle)
    either = refused(c.lock(EX, thread=2))
    assert either.holder_pid in (a.server_pid, b.server_pid)
    from_lock_server(either, either.holder_pid, PR)
    a.unlock(ra.handle)
    from_lock_server(refused(c.lock(PW, thread=2)), b.server_pid, PR)
    b.unlock(rb.handle)
    assert c.status(thread=2).state == 0
    assert isinstance(c.lock(EX, thread=2), Acquired)


def test_threads_of_one_client_exclude_each_other_as_in_the_table(servers: Servers) -> None:
    a = servers.connect(pid=4321, port=77)
    g = a.granted(EX, thread=1)
    r = refused(a.lock(PR, thread=2))
    assert (r.holder_mode, r.holder_pid, r.holder_port, r.holder_client_pid, r.holder_thread, r.holder_ip) == \
        (EX, a.server_pid, 77, 4321, 1, "127.0.0.1")
    # A conversion: the same handle (OS file locks have no fencing tokens: 0).
    assert a.lock(EX, thread=1) == Acquired(r.request_id + 1, g.handle, EX, g.value, 0, 0, b"")
    a.unlock(g.handle)
    assert isinstance(a.lock(PR, thread=2), Acquired)


def test_a_waiting_request_gets_interim_messages_then_times_out(servers: Servers) -> None:
    a, b = servers.connect(pid=1), servers.connect(pid=2)
    a.granted(EX)
    started = time.monotonic()
    first = b.lock(EX, timeout_ms=700)
    assert isinstance(first, Waiting), first
    from_lock_server(first, a.server_pid)
    interims = 0
    while True:
        event = b.next()
        if not isinstance(event, Waiting):
            break
        interims += 1
        from_lock_server(event, a.server_pid)
        assert event.waited_ms >= 150
    from_lock_server(refused(event, RefuseReason.TIMEOUT), a.server_pid)
    took = time.monotonic() - started
    assert 0.65 <= took < 1.5, took
    assert interims >= 2  # every 0.2 s
    assert isinstance(b.lock(EX, key=b"free"), Acquired), "the lock server carries on"


def test_a_waiting_request_is_granted_soon_after_release_and_costs_almost_no_cpu(servers: Servers) -> None:
    a, b = servers.connect(pid=1), servers.connect(pid=2)
    g = a.granted(EX)
    rid = b.rid()
    b.send(Lock(rid, EX, LockFlag.NO_INTERIM, WAIT_FOREVER, 1, INODE, DEVICE, KEY, ""))
    b.sync()  # the Lock has been handled: it waits
    waiter = psutil.Process(b.server_pid)
    before = waiter.cpu_times()
    time.sleep(1.0)
    after = waiter.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.1, f"a waiting lock server used {used:.3f} s of CPU in 1 s"
    released = time.monotonic()
    a.unlock(g.handle)
    event = b.next()
    assert isinstance(event, Acquired) and event.request_id == rid, event
    assert time.monotonic() - released < 0.5


def test_a_waiting_thread_is_granted_at_once_when_a_thread_of_its_client_releases(servers: Servers) -> None:
    a = servers.connect()
    g = a.granted(EX, thread=1)
    rid = a.rid()
    a.send(Lock(rid, EX, LockFlag.NO_INTERIM, WAIT_FOREVER, 2, INODE, DEVICE, KEY, ""))
    a.sync()
    time.sleep(0.6)  # the waiter's polling pause has grown to its longest
    released = time.monotonic()
    a.send(Unlock(a.rid(), g.handle))
    event = a.next()
    assert isinstance(event, Acquired) and event.request_id == rid, event
    assert time.monotonic() - released < 0.1, "not rung: served by the next poll only"


def test_a_client_that_goes_releases_everything_and_its_lock_server_ends(servers: Servers) -> None:
    a, b = servers.connect(pid=1), servers.connect(pid=2)
    a.granted(EX)
    a.granted(PR, key=b"second")
    a.lock(EX, thread=2, key=b"second", timeout_ms=WAIT_FOREVER)  # waiting, behind its own thread
    refused(b.lock(EX))
    a.close()
    assert servers.wait(a.server_pid) == 0
    assert isinstance(b.lock(EX), Acquired)
    assert isinstance(b.lock(EX, key=b"second"), Acquired)


def test_a_lock_server_killed_with_sigkill_leaves_no_lock(servers: Servers) -> None:
    a, b = servers.connect(pid=1), servers.connect(pid=2)
    a.granted(EX)
    rid = b.rid()
    b.send(Lock(rid, EX, LockFlag.NO_INTERIM, 5000, 1, INODE, DEVICE, KEY, ""))
    b.sync()
    os.kill(a.server_pid, signal.SIGKILL)
    assert servers.wait(a.server_pid) == -signal.SIGKILL
    event = b.next()
    assert isinstance(event, Acquired) and event.request_id == rid, event


def test_status_unlock_all_and_bad_handles(servers: Servers) -> None:
    a, b = servers.connect(pid=1), servers.connect(pid=2)
    assert a.status().state == 0
    a.granted(EX, thread=1)
    a.granted(PR, thread=2, key=b"k2")
    mine = a.status(thread=1)
    assert (mine.state, mine.holder_thread, mine.holder_pid) == (1, 1, a.server_pid)
    other = b.status()
    assert other.state == 2
    from_lock_server(other, a.server_pid, EX)
    rid = a.rid()
    a.send(UnlockAll(rid, ALL_THREADS))
    assert a.next() == Unlocked(rid, 2)
    assert b.status().state == 0
    rid = a.rid()
    a.send(Unlock(rid, 1 << 63 | 999))
    event = a.next()
    assert isinstance(event, Error) and event.code == ErrorCode.NOT_HELD, event


# -- with a table: OSLOCK and BINARY ------------------------------------------------------------


def test_with_a_table_binary_locks_are_os_locks_and_every_record_lock_a_table_lock(
        table_servers: Servers, table: LockTable, tmp_path: Path) -> None:
    a, b = table_servers.connect(pid=1), table_servers.connect(pid=2)
    in_table = a.granted(EX, key=b"in the table")
    assert [e.slot.key[: e.slot.key_len] for e in table.scan()] == [b"in the table"]

    # OSLOCK changes nothing beside a table: one mechanism per record, so a record has one holder.
    os_lock = a.granted(EX, flags=LockFlag.OSLOCK)
    assert len(list(table.scan())) == 2, "an OSLOCK lock did not go to the table"
    for flags in (0, LockFlag.OSLOCK):
        assert refused(b.lock(EX, flags=flags)).holder_pid == a.server_pid
    assert b.status().holder_pid == a.server_pid
    assert not (tmp_path / "jbase").exists()

    binary = a.granted(EX, flags=LockFlag.BINARY, key=b"")
    assert [p.name for p in (tmp_path / "jbase_lock").iterdir()] == [FILE]
    from_lock_server(refused(b.lock(EX, flags=LockFlag.BINARY | LockFlag.OSLOCK, key=b"")), a.server_pid)

    # Handles of every mechanism unlock, in any order, the table's still the fast way.
    a.unlock(os_lock.handle)
    taken = b.lock(EX)
    assert isinstance(taken, Acquired)
    b.unlock(taken.handle)
    a.unlock(in_table.handle)
    assert list(table.scan()) == []
    a.unlock(binary.handle)
    assert isinstance(b.lock(EX, flags=LockFlag.BINARY, key=b""), Acquired)
    again = a.granted(EX, key=b"in the table")
    a.unlock(again.handle)
    assert list(table.scan()) == []


def test_with_a_table_a_client_that_goes_releases_its_os_locks_too(
        table_servers: Servers, table: LockTable) -> None:
    a, b = table_servers.connect(pid=1), table_servers.connect(pid=2)
    a.granted(EX)
    a.granted(EX, flags=LockFlag.OSLOCK)
    a.granted(EX, flags=LockFlag.BINARY)
    a.close()
    assert table_servers.wait(a.server_pid) == 0
    assert list(table.scan()) == []
    for flags in (0, LockFlag.OSLOCK, LockFlag.BINARY):
        assert isinstance(b.lock(EX, flags=flags), Acquired)


# -- the dead-client bound (the lock server's socket settings) ----------------------------------


@pytest.mark.parametrize("bound", [1, 2, 3, 6, 10, 15, 30, 60, 600])
def test_keepalive_gives_up_on_a_silent_client_within_the_dead_client_bound(bound: float) -> None:
    idle, interval, count = lockserver.keepalive_for(bound)
    assert min(idle, interval, count) >= 1
    assert idle + interval * count <= max(2, bound)
    assert idle + interval * count >= bound * 0.8 or bound < 5
    assert lockserver.keepalive_for(15) == (5, 2, 5)
