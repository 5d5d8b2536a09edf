"""Who may connect, what a peer may claim and see, and limits a stranger cannot get round (issue 11).

Against real daemons (``jdls -ib`` of the test's own instance and port), over real TCP, with frames
made by hand (dls-proto's encoder on a raw socket) so that each test says exactly what a hostile peer
sends. Other addresses are loopback ones (127.0.0.2, 127.0.0.3: the client socket is bound to them),
which the daemon, listening on 0.0.0.0, sees as other hosts.

- ``--allow``: a peer outside it is closed at accept, unanswered, no lock server forked, and logged
  (a flood of them only a burst of lines); without it, the log warns that anyone may connect;
- ``--admin-allow``: only those addresses read the lock snapshot (InfoGet) and the host name in the
  Welcome; others get a short FORBIDDEN;
- the handshake deadline counts from accept: a peer dribbling a byte at a time is cut off at it;
- ``--max-per-address``: one address over its share is refused, another is served;
- ``-P``: a port held by a live connection cannot be claimed from another address; no frame lets one
  client release, reclaim or convert another's lock, and Status does not show handles;
- a deeply nested InfoPut is refused with a short error and the conversation goes on; OS-lock requests
  are refused with --refuse-os-locks; the table's geometry is never told to a peer.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from dls_proto import (
    Acquired,
    Connection,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    HolderState,
    InfoGet,
    InfoPut,
    InfoSnapshot,
    Lock,
    LockFlag,
    Message,
    Mode,
    Reclaim,
    Refused,
    RefuseReason,
    Status,
    StatusReply,
    Unlock,
    Welcome,
    encode,
)
from dls_shm import LOCAL_IP, Grant, Owner
from dls_testkit import Service, dribble, greet, make_service, receive, wait_for

pytestmark = pytest.mark.slow

INODE, DEVICE, KEY = 4711, 5, b"ACCOUNT*1"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    """A service of the test's own, not yet started (the test starts it with its options)."""
    with make_service(tmp_path).checked() as service:
        yield service


def connect(svc: Service, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the service from ``source`` (an address of this host), closed with the service."""
    sock = socket.create_connection((source, svc.port), timeout=10, source_address=(source, 0))
    svc.sockets.append(sock)
    return sock


def ask(sock: socket.socket, conn: Connection, message: Message, kind: Any) -> Any:
    """Send ``message``; the answer, which must be of ``kind``."""
    sock.sendall(conn.send(message))
    return receive(sock, conn, kind)


def lock(rid: int, key: bytes = KEY, *, thread: int = 1, mode: int = Mode.EX, flags: int = 0) -> Lock:
    return Lock(rid, mode, flags | LockFlag.NO_INTERIM, 0, thread, INODE, DEVICE, key, "/data/FBNK.ACCOUNT")


def closed_unanswered(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` without a byte."""
    sock.settimeout(10)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_peer_outside_allow_is_closed_at_accept_and_logged_in_moderation(svc: Service) -> None:
    svc.start("--allow", "127.0.0.1", "--allow", "10.0.0.0/8")
    assert "no --allow" not in svc.log()
    stranger = connect(svc, "127.0.0.2")
    assert closed_unanswered(stranger)
    svc.wait_for_log(r"refused connection from 127\.0\.0\.2: not in --allow")
    assert svc.server_pids() == set()  # nothing was forked for it
    for _ in range(40):  # a flood: the log keeps a burst of it
        assert closed_unanswered(connect(svc, "127.0.0.2"))
    _conn, welcome = greet(connect(svc, "127.0.0.1"))
    assert isinstance(welcome, Welcome)
    lines = [line for line in svc.log().splitlines() if "not in --allow" in line]
    assert 1 <= len(lines) <= 12, lines


def test_without_allow_the_log_warns_that_anyone_may_connect(svc: Service) -> None:
    svc.start()
    assert re.search(r"WARNING no --allow: accepting clients from any address", svc.log())
    _conn, welcome = greet(connect(svc, "127.0.0.2"))
    assert isinstance(welcome, Welcome)


def test_the_lock_snapshot_and_host_name_go_to_admin_addresses_only(svc: Service) -> None:
    svc.start("--admin-allow", "127.0.0.3")
    sock = connect(svc, "127.0.0.1")
    conn, welcome = greet(sock)
    assert welcome.server_host == ""
    refused = ask(sock, conn, InfoGet(2, 0), Error)
    assert (refused.code, refused.reason) == (
        ErrorCode.FORBIDDEN, "not permitted: this address is not in the service's --admin-allow")
    assert isinstance(ask(sock, conn, Echo(3, b"still here"), EchoReply), EchoReply)
    svc.wait_for_log(r"127\.0\.0\.1:\d+ \(port 4242, pid \d+\) asked for the lock snapshot, refused: this address "
                     r"is not in")
    admin = connect(svc, "127.0.0.3")
    conn, welcome = greet(admin, 4243)
    assert welcome.server_host == socket.gethostname()
    assert b'"locks"' in ask(admin, conn, InfoGet(2, 0), InfoSnapshot).payload


def test_the_handshake_deadline_counts_from_accept_not_per_read(svc: Service) -> None:
    svc.start("--handshake-timeout", "1")
    header = b"\0\0\0\x40\x01\x01\0\0\0\0\0\x01jDLS"  # a Hello's start, never its end
    cut = dribble(connect(svc), header + bytes(64))  # a byte every 0.25 s: each read is quick, the whole is not
    assert cut is not None and cut < 4.0, cut
    svc.wait_for_log(r"closing connection from 127\.0\.0\.1:\d+: no Hello within 1(\.0)? s")


def test_connections_per_address_are_capped(svc: Service) -> None:
    svc.start("--max-per-address", "2")
    for port in (4001, 4002):
        greet(connect(svc, "127.0.0.1"), port)
    wait_for(lambda: len(svc.server_pids()) == 2, 5, "two lock servers")
    _conn, refused = greet(connect(svc, "127.0.0.1"), 4003, expect=Error)
    assert (refused.code, refused.reason) == (ErrorCode.LIMIT, "limit of 2 connections per address reached")
    svc.wait_for_log(r"refused connection from 127\.0\.0\.1: limit of 2 connections per address")
    _conn, welcome = greet(connect(svc, "127.0.0.2"), 4004)
    assert isinstance(welcome, Welcome)


def test_a_live_port_cannot_be_claimed_from_another_address(svc: Service) -> None:
    svc.start("-P")
    owner = connect(svc, "127.0.0.1")
    conn, _ = greet(owner, 4242)
    granted = ask(owner, conn, lock(2), Acquired)
    thief = connect(svc, "127.0.0.2")
    _c, refused = greet(thief, 4242, expect=Error)
    assert (refused.code, refused.reason) == (ErrorCode.FORBIDDEN, "port 4242 is in use by another client")
    assert closed_unanswered(thief)
    svc.wait_for_log(r"refused client 127\.0\.0\.2:\d+ \(port 4242, pid \d+\): it claims port 4242: port 4242 is "
                     r"held by lock server pid \d+")
    # Nor from the client's own address: one port, one connection (another local user could name it too).
    _c, refused = greet(connect(svc, "127.0.0.1"), 4242, expect=Error)
    assert refused.code == ErrorCode.FORBIDDEN
    assert ask(owner, conn, Status(3, 1, INODE, DEVICE, KEY), StatusReply).state == HolderState.MINE
    owner.sendall(conn.send(Unlock(4, granted.handle)))
    assert ask(owner, conn, Echo(5, b""), EchoReply)  # the unlock was not answered: it worked
    owner.close()
    wait_for(lambda: "client 127.0.0.1" in svc.log() and "closed" in svc.log(), 5, "the owner's lock server ends")
    # Once the connection is gone the port is free for the next one, wherever it comes from.
    wait_for(lambda: _greets(svc, "127.0.0.2", 4242), 5, "port 4242 free again")


def test_a_port_a_local_process_locks_under_cannot_be_claimed_from_another_host(svc: Service) -> None:
    """Local processes lock in the table directly, claiming no port: a peer from another host (here the host
    side of a veth link, an address that is not loopback) may not name a port one of them locks under; a
    loopback peer, on this host like them, may (as it may name any)."""
    svc.start("-P")
    table = svc.table()
    try:
        mine = table.lock(Owner(os.getpid(), 1, 7000, os.getpid(), LOCAL_IP, False), INODE, DEVICE, KEY, Mode.EX)
        assert isinstance(mine, Grant)
        with netns.link() as link:
            _c, refused = greet(connect(svc, link.host_ip), 7000, expect=Error)
            assert (refused.code, refused.reason) == (ErrorCode.FORBIDDEN, "port 7000 is in use by another client")
            svc.wait_for_log(rf"it claims port 7000: process {os.getpid()} holds locks under port 7000")
            loopback = connect(svc, "127.0.0.2")
            assert isinstance(greet(loopback, 7000)[1], Welcome)
            loopback.close()
            table.unlock(mine.handle)
            # No live lock under it now, and the loopback connection's claim goes with its lock server.
            wait_for(lambda: _greets(svc, link.host_ip, 7000), 5, "port 7000 free for another host")
            for sock in svc.sockets:
                sock.close()
    finally:
        table.close()


def _greets(svc: Service, source: str, port: int) -> bool:
    _conn, answer = greet(connect(svc, source), port, expect=(Welcome, Error))
    return isinstance(answer, Welcome)


@pytest.mark.parametrize("options", [("-P",), ()], ids=["port-owners", "process-owners"])
def test_no_frame_lets_one_client_release_reclaim_convert_or_see_anothers_lock(svc: Service,
                                                                                 options: tuple[str, ...]) -> None:
    svc.start(*options)
    owner = connect(svc, "127.0.0.1")
    oconn, _ = greet(owner, 5001)
    granted = ask(owner, oconn, lock(2, mode=Mode.PR), Acquired)
    other = connect(svc, "127.0.0.2")
    conn, _ = greet(other, 5002)
    gone = ask(other, conn, Unlock(2, granted.handle), Error)
    assert (gone.code, gone.reason) == (ErrorCode.NOT_HELD, "not held")
    taken = ask(other, conn, Reclaim(3, granted.handle, Mode.PR, 1, INODE, DEVICE, KEY), Error)
    assert taken.code == ErrorCode.NOT_HELD and f"{granted.handle:x}" in taken.reason  # its own handle, no more
    busy = ask(other, conn, lock(4, mode=Mode.EX), Refused)  # no conversion of the other's PR to EX
    assert (busy.reason, busy.holder_port) == (RefuseReason.BUSY, 5001)
    status = ask(other, conn, Status(5, 1, INODE, DEVICE, KEY), StatusReply)
    assert status.state == HolderState.OTHER
    assert granted.handle not in status  # who holds it (as jDLS told), never the handle that releases it
    # The owner's lock is untouched: still its own, still releasable by it alone.
    assert ask(owner, oconn, Status(3, 1, INODE, DEVICE, KEY), StatusReply).state == HolderState.MINE
    owner.sendall(oconn.send(Unlock(4, granted.handle)))
    assert isinstance(ask(owner, oconn, Echo(5, b""), EchoReply), EchoReply)
    assert isinstance(ask(other, conn, lock(6), Acquired), Acquired)


def test_a_deeply_nested_info_put_is_refused_and_the_conversation_goes_on(svc: Service) -> None:
    svc.start()
    sock = connect(svc)
    conn, _ = greet(sock)
    deep = b"{" + b'"a":[' * 20000 + b"]" * 20000 + b"}"
    refused = ask(sock, conn, InfoPut(2, deep[:60000]), Error)
    assert (refused.code, refused.reason) == (ErrorCode.BAD_REQUEST,
                                              "lock information refused: JSON nested deeper than 32 levels")
    assert isinstance(ask(sock, conn, Echo(3, b"alive"), EchoReply), EchoReply)
    sock.sendall(conn.send(InfoPut(4, b'{"locks": []}')))
    assert isinstance(ask(sock, conn, Echo(5, b""), EchoReply), EchoReply)  # a good one is taken, unanswered
    svc.wait_for_log(r"its lock information refused: JSON nested deeper than 32 levels")


def test_os_lock_requests_are_refused_when_the_service_says_so(svc: Service) -> None:
    svc.start("--refuse-os-locks")
    assert "BINARY requests refused" in svc.log()
    sock = connect(svc)
    conn, _ = greet(sock)
    refused = ask(sock, conn, lock(3, flags=LockFlag.BINARY), Error)
    assert (refused.code, refused.reason) == (ErrorCode.FORBIDDEN, "OS file locks are not served here")
    # Record locks are served, OSLOCK ones too: beside a table they are table locks like the others.
    assert isinstance(ask(sock, conn, lock(4, key=b"oslock", flags=LockFlag.OSLOCK), Acquired), Acquired)
    assert isinstance(ask(sock, conn, lock(5), Acquired), Acquired)


def test_max_locks_defaults_to_a_quarter_of_the_table(svc: Service) -> None:
    svc.start()  # -ibs1000,10: 101 groups of 10
    assert re.search(r"limits: \d+ clients, 64 per address, 252 locks per client", svc.log())



def test_waiting_requests_count_against_max_locks(svc: Service) -> None:
    """A waiting request takes a table slot as a lock does: one client cannot fill a group with them."""
    svc.start("--max-locks", "3")
    holder = connect(svc)
    hconn, _ = greet(holder, 7001)
    ask(holder, hconn, lock(2), Acquired)
    waiter = connect(svc)
    conn, _ = greet(waiter, 7002)
    ask(waiter, conn, lock(2, b"mine"), Acquired)
    for rid, thread in ((3, 2), (4, 3)):  # two requests waiting behind the holder
        waiter.sendall(conn.send(Lock(rid, Mode.EX, LockFlag.NO_INTERIM, 60000, thread, INODE, DEVICE, KEY,
                                      "/data/FBNK.ACCOUNT")))
    refused = ask(waiter, conn, lock(5, b"more"), Error)
    assert (refused.request_id, refused.code) == (5, ErrorCode.LIMIT)

def test_a_closed_connection_is_not_answered_after_refusal(svc: Service) -> None:
    """A refused Hello (another address's port) ends the conversation: nothing more is read or answered."""
    svc.start("-P")
    greet(connect(svc, "127.0.0.1"), 6000)
    thief = connect(svc, "127.0.0.2")
    greet(thief, 6000, expect=Error)
    try:
        thief.sendall(encode(Echo(2, b"x")))
    except OSError:
        return
    assert closed_unanswered(thief)


def test_the_log_follows_logrotate_and_reopens_on_sighup(svc: Service) -> None:
    svc.start()
    rotated = svc.log_path.with_name("jdls.log.1")
    svc.log_path.rename(rotated)  # what logrotate does (without copytruncate)
    greet(connect(svc))
    svc.wait_for_log(r"listener INFO connection from 127\.0\.0\.1:\d+: lock server pid")  # a new file
    assert "listener started" in rotated.read_text() and "listener started" not in svc.log()
    listener = svc.pid("listener")
    assert listener is not None
    os.kill(listener, signal.SIGHUP)
    svc.wait_for_log(r"listener INFO log reopened \(SIGHUP\)")
    assert svc.pid("listener") == listener



def test_a_lock_server_lives_through_a_sighup(svc: Service) -> None:
    """``systemctl kill -s HUP`` or a closed terminal reaches the lock servers too: a lock server must not
    die of it (its client would have to reclaim its locks); its log follows logrotate by itself."""
    from dls_client import Client, Config, FileRef, Server

    svc.start()
    with Client(Config(server=Server("127.0.0.1", svc.port))) as client:
        held = client.lock(FileRef(4242, "data/F"), b"K")
        server = client.connect().welcome.server_pid
        os.kill(server, signal.SIGHUP)
        client.echo(b"after the hang-up")  # answered by the same lock server
        assert os.path.exists(f"/proc/{server}") and client.connect().welcome.server_pid == server
        held.ensure_held()
        held.release()

def test_allow_on_a_dual_stack_listener_sees_ipv4_peers_as_ipv4(svc: Service) -> None:
    """Listening on ``::``, an IPv4 peer arrives as ::ffff:a.b.c.d: --allow 127.0.0.1 still lets it in (and
    it is an admin address), and ::1 only when allowed."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    svc.start("--bind", "::", "--allow", "127.0.0.1", "--allow", "::1/128")
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10, source_address=("127.0.0.1", 0))
    svc.sockets.append(sock)
    conn, welcome = greet(sock)
    assert welcome.server_host == socket.gethostname()  # an admin address, though it came as ::ffff:127.0.0.1
    assert isinstance(ask(sock, conn, InfoGet(2, 0), InfoSnapshot), InfoSnapshot)
    assert closed_unanswered(connect(svc, "127.0.0.2"))
    svc.wait_for_log(r"refused connection from ::ffff:127\.0\.0\.2: not in --allow")
    six = socket.create_connection(("::1", svc.port), timeout=10)
    svc.sockets.append(six)
    assert isinstance(greet(six)[1], Welcome)


def test_a_key_with_control_characters_cannot_forge_rows_in_the_operators_tools(svc: Service) -> None:
    """A key is a client's bytes: a newline, tab or escape sequence in it is shown escaped by jdls -dL and by
    show-item-locks, never acted on by the terminal nor read as another row."""
    import subprocess
    import sys

    svc.start()
    forged = b"KEY\n127.0.0.1\t1\t1\tFAKE\x1b[2J"
    client = connect(svc)
    conn, _ = greet(client, 7100)
    ask(client, conn, lock(2, forged), Acquired)
    env = {**os.environ, "JBCRELEASEDIR": str(svc.root)}
    shown = svc.jdls("-dL").stdout
    tool = subprocess.run([str(Path(sys.executable).with_name("show-item-locks")), "--server",
                           f"127.0.0.1,{svc.port}"], capture_output=True, text=True, env=env, check=False)
    assert tool.returncode == 0, tool.stderr
    for output in (shown, tool.stdout):
        assert "\x1b" not in output and "FAKE" in output
        assert "KEY\\x0a127.0.0.1\\x091\\x091\\x09FAKE\\x1b[2J" in output, output
        assert not any(line.startswith("127.0.0.1\t1\t1") for line in output.splitlines())
