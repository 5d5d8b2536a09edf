"""Lock-delay and reclaim with real processes: a real jdls, real lock servers, SIGKILL, SIGSTOP and SIGTERM.

A lock whose lock server ends while its client may live is kept (in everyone's way) for the lock-delay,
for the client to take back through a new connection with Reclaim; a client whose process ended frees its
locks at once. The clients here speak dls-proto by hand (``Raw``), as the client library does, so that a
test says exactly which identity asks for what and sees every answer; several of them live in the test
process, each a client of its own (its own Hello port and pid).

Lock-delays are short (2 to 6 s) so that the tests can wait them out. Every test has its own instance and
port, and its teardown (``Service.stop_and_check``) fails it if a process or IPC object of it is left.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_proto import (
    WAIT_FOREVER,
    Acquired,
    ConnectionClosed,
    Error,
    ErrorCode,
    Granted,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    Reclaim,
    Refused,
    RefuseReason,
    Unlock,
    Welcome,
)
from dls_shm import SlotState
from dls_testkit import Service, alive, attached, greet, receive, running, running_service, wait_for

EX, PR = 5, 3
INODE, DEVICE = 0x1357, -1
KEY = b"USD163170001"
#: The lock-delay of most tests (seconds).
DELAY = 2.0
#: How late after its lock-delay a kept lock may be granted to a waiter (the machine is shared and busy).
LATE = 1.5
#: The Hello identities of the clients: (port, pid).
HOLDER, WAITER, STRANGER = (1111, 40001), (2222, 40002), (3333, 40003)


class Raw:
    """A client of ``service`` speaking dls-proto over its own connection, as ``port`` and ``pid``."""

    def __init__(self, service: Service, who: tuple[int, int] = HOLDER, thread: int = 1, *,
                 source: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", service.port), timeout=10,
                                             source_address=None if source is None else (source, 0))
        service.sockets.append(self.sock)  # closed before the service is stopped
        self.conn, welcome = greet(self.sock, who[0], thread=thread, pid=who[1])
        self.welcome: Welcome = welcome
        self.thread = thread
        self._rid = 0

    @property
    def server(self) -> int:
        """Its lock server's pid."""
        return self.welcome.server_pid

    def send(self, message: Message) -> None:
        self.sock.sendall(self.conn.send(message))

    def rid(self) -> int:
        self._rid += 1
        return self._rid

    def ask_lock(self, key: bytes = KEY, mode: int = EX, timeout_ms: int = 0) -> int:
        """Send a Lock (no interim messages); its request id."""
        rid = self.rid()
        self.send(Lock(rid, mode, LockFlag.NO_INTERIM, timeout_ms, self.thread, INODE, DEVICE, key, "FBNK.ACCOUNT"))
        return rid

    def lock(self, key: bytes = KEY, mode: int = EX) -> Acquired:
        """A lock that must be granted at once (protocol 4: Acquired)."""
        rid = self.ask_lock(key, mode)
        answer: Acquired = self.answer(Acquired)
        assert answer.request_id == rid
        return answer

    def refused(self, key: bytes = KEY, mode: int = EX) -> Refused:
        """A lock that must be refused at once (held by another)."""
        self.ask_lock(key, mode)
        answer: Refused = self.answer(Refused)
        assert answer.reason == RefuseReason.BUSY
        return answer

    def reclaim(self, handle: int, key: bytes = KEY, mode: int = EX, *, inode: int = INODE,
                thread: int | None = None) -> Granted | Error:
        rid = self.rid()
        self.send(Reclaim(rid, handle, mode, self.thread if thread is None else thread, inode, DEVICE, key))
        answer: Granted | Error = self.answer(Granted | Error)
        assert answer.request_id == rid
        return answer

    def unlock(self, handle: int) -> None:
        self.send(Unlock(self.rid(), handle))

    def answer(self, kind: Any, timeout: float = 10.0) -> Any:
        return receive(self.sock, self.conn, kind, timeout)

    def quiet_for(self, seconds: float) -> bool:
        """Nothing arrives for ``seconds`` (a waiting request stays unanswered)."""
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return not readable

    def close(self) -> None:
        self.sock.close()


def not_held(answer: Granted | Error) -> str:
    """The reason of an Error NOT_HELD (anything else fails the test)."""
    assert isinstance(answer, Error) and answer.code == ErrorCode.NOT_HELD, answer
    return answer.reason


def slot_states(service: Service, key: bytes = KEY) -> list[tuple[int, int]]:
    """(state, pid) of every slot of ``key`` in the table."""
    with attached(service) as table:
        return sorted((e.slot.state, e.slot.pid) for e in table.scan() if e.slot.key[: e.slot.key_len] == key)


def kept_since(service: Service, key: bytes = KEY) -> float | None:
    """When the lock of ``key`` was kept (its slot's time), None while it is not kept."""
    with attached(service) as table:
        kept = [e.slot.timestamp for e in table.scan()
                if e.slot.key[: e.slot.key_len] == key and e.slot.state == SlotState.KEPT]
    return kept[0] if kept else None


def shown_row(service: Service, key: bytes = KEY) -> list[str]:
    """The ``jdls -dL`` row of the held (or kept) lock of ``key``."""
    shown = service.jdls("-dL")
    assert shown.returncode == 0, shown.stderr
    rows = [r.split("\t") for r in shown.stdout.splitlines() if r.endswith("\t" + key.decode())]
    held = [r for r in rows if r[7] != "waiting"]
    assert len(held) == 1, shown.stdout
    return held[0]


@pytest.fixture
def delayed(tmp_path: Path) -> Iterator[Service]:
    """A service with a lock-delay of DELAY seconds (and the default tidy period: the monitor's tidy is
    not what these tests are about)."""
    with running_service(tmp_path / "release", "--lock-delay", f"{DELAY:g}") as svc:
        yield svc


# -- the Welcome tells the lock-delay -------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "told"), [((), 15000), (("--lock-delay", "2.5"), 2500),
                                               (("--lock-delay", "0"), 0)])
def test_welcome_tells_the_lock_delay(tmp_path: Path, options: tuple[str, ...], told: int) -> None:
    with running_service(tmp_path / "release", *options) as service:
        client = Raw(service)
        assert (client.welcome.mechanism, client.welcome.lock_delay_ms) == (Mechanism.TABLE, told)
        assert service.header().lock_delay == told / 1000


def test_a_monitor_started_on_the_table_rewrites_its_lock_delay_and_says_so(tmp_path: Path) -> None:
    with running_service(tmp_path / "release", "--lock-delay", "2") as service:
        assert service.jdls("-kA").returncode == 0
        restart = service.jdls("-ibA", "--lock-delay", "5")
        assert restart.returncode == 0, restart.stderr
        service.wait_for_log(r"monitor INFO lock-delay of the existing table changed from 2 s to 5 s")
        assert service.header().lock_delay == 5.0
        assert Raw(service).welcome.lock_delay_ms == 5000  # the listener's lock servers read it from the table


def test_without_a_table_nothing_is_kept_and_every_reclaim_is_refused(tmp_path: Path) -> None:
    service = Service(tmp_path / "release", start_options=("-ibD",))
    with service.checked():
        service.start()
        holder = Raw(service)
        assert (holder.welcome.mechanism, holder.welcome.lock_delay_ms) == (Mechanism.OSLOCKS, 0)
        g = holder.lock()
        other = Raw(service, HOLDER)
        assert "OS file locks cannot be kept" in not_held(other.reclaim(g.handle))
        os.kill(holder.server, signal.SIGKILL)
        waiter = Raw(service, WAITER)
        started = time.monotonic()
        rid = waiter.ask_lock(timeout_ms=10_000)
        assert waiter.answer(Acquired).request_id == rid
        assert time.monotonic() - started < 1.5, "an OS lock outlived its lock server"


# -- a lock server killed: its client's locks are kept for the lock-delay -------------------------------------


@pytest.mark.parametrize("noticed_by", ["listener", "waiter"])
def test_the_locks_of_a_killed_lock_server_are_kept_for_the_lock_delay(delayed: Service, noticed_by: str) -> None:
    """SIGKILL of the lock server of a client holding EX: nobody else gets the lock before the lock-delay has
    passed, and a waiter gets it soon after. Who notices the death starts the delay: the listener when it
    reaps its child, else (the listener killed first) the first request the dead lock server's lock blocks."""
    service = delayed
    holder = Raw(service)
    waiter = Raw(service, WAITER)
    again = Raw(service, HOLDER)  # the holder's client through a new connection, too late
    g = holder.lock()
    assert slot_states(service) == [(SlotState.GRANTED, holder.server)]
    if noticed_by == "waiter":
        listener = service.pid("listener")
        assert listener is not None
        os.kill(listener, signal.SIGKILL)
        wait_for(lambda: not alive(listener), 5, "the listener to die")
    os.kill(holder.server, signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: not alive(holder.server), 5, "the lock server to die")
    if noticed_by == "listener":
        wait_for(lambda: kept_since(service) is not None, 2, "the listener to keep the dead lock server's lock")
        service.wait_for_log(rf"listener INFO kept 1 lock\(s\) of lock server {holder.server} for 2 s")
        assert re.fullmatch(r"kept, [12] s left", shown_row(service)[7]), shown_row(service)
    else:
        time.sleep(0.5)
        assert slot_states(service) == [(SlotState.GRANTED, holder.server)], "kept by nobody yet"

    asked = time.time()
    rid = waiter.ask_lock(timeout_ms=30_000)
    wait_for(lambda: kept_since(service) is not None, 2, "the lock to be kept")
    kept = kept_since(service)
    assert kept is not None and killed <= kept <= asked + 0.5
    assert waiter.answer(Acquired, timeout=DELAY + 10).request_id == rid
    granted = time.time()
    assert granted >= kept + DELAY, f"granted {kept + DELAY - granted:.2f} s before the lock-delay ended"
    assert granted <= kept + DELAY + LATE, f"granted only {granted - kept - DELAY:.2f} s after the lock-delay"
    assert not_held(again.reclaim(g.handle)).startswith("no lock of this client")


def test_a_reclaim_with_a_holders_identity_from_another_address_is_refused(delayed: Service) -> None:
    """A Refused tells anyone the lock is in the way of the holder's port, client pid and thread: with
    those and a guessed handle (tickets are counted, the slot's group follows from the key), another host
    took a kept lock. The address the client connects from must be the lock's too."""
    service = delayed
    holder = Raw(service, thread=7)
    g = holder.lock()
    os.kill(holder.server, signal.SIGKILL)
    wait_for(lambda: kept_since(service) is not None, 5, "the dead lock server's lock to be kept")
    told = Raw(service, STRANGER).refused()
    who = (told.holder_port, told.holder_client_pid)
    assert (who, told.holder_thread) == (HOLDER, 7)
    forger = Raw(service, who, thread=told.holder_thread, source="127.0.0.2")
    assert not_held(forger.reclaim(g.handle)).startswith("no lock of this client")
    assert Raw(service, STRANGER).refused().holder_pid == holder.server  # still kept for its own client
    back = Raw(service, HOLDER, thread=7).reclaim(g.handle)
    assert isinstance(back, Granted) and back.handle == g.handle


def test_a_kept_lock_nobody_asks_for_is_freed_by_the_monitor_when_its_delay_ends(tmp_path: Path) -> None:
    """The listener gone, a killed lock server's lock is found by the monitor's tidy (every second), kept,
    and freed by the monitor about when its delay ends, not at the next tidy period."""
    with running_service(tmp_path / "release", "--lock-delay", f"{DELAY:g}", "--tidy-seconds", "1") as service:
        kept_then_freed_by_the_monitor(service)


def kept_then_freed_by_the_monitor(service: Service) -> None:
    holder = Raw(service)
    holder.lock()
    listener = service.pid("listener")
    assert listener is not None
    os.kill(listener, signal.SIGKILL)
    os.kill(holder.server, signal.SIGKILL)
    wait_for(lambda: kept_since(service) is not None, 5, "the monitor's tidy to keep the lock")
    kept = kept_since(service)
    assert kept is not None
    service.wait_for_log(r"monitor INFO tidy \(periodic\): kept 1 lock\(s\) of dead lock servers")
    wait_for(lambda: not slot_states(service), DELAY + 5, "the kept lock to be freed", poll=0.05)
    freed = time.time()
    assert kept + DELAY <= freed <= kept + DELAY + LATE, f"freed {freed - kept:.2f} s after it was kept"
    # The tidy every second may be the one that finds it due: the time above is what this test is about.
    service.wait_for_log(r"monitor INFO tidy \((a kept lock is due|periodic)\): freed 1 orphaned lock\(s\)")


def test_lock_delay_0_frees_a_killed_lock_servers_locks_at_once(tmp_path: Path) -> None:
    with running_service(tmp_path / "release", "--lock-delay", "0") as service:
        holder = Raw(service)
        waiter = Raw(service, WAITER)
        holder.lock()
        rid = waiter.ask_lock(timeout_ms=30_000)
        assert waiter.quiet_for(0.3)
        os.kill(holder.server, signal.SIGKILL)
        killed = time.monotonic()
        assert waiter.answer(Acquired).request_id == rid
        assert time.monotonic() - killed < 1.0


# -- a client that has gone frees its locks at once -----------------------------------------------------------

GONE_CLIENT = textwrap.dedent("""
    import os, socket, sys, time
    from dls_proto import Acquired, Connection, Hello, Lock, LockFlag, PROTOCOL_VERSIONS, Role, receive

    port, inode, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
    sock = socket.create_connection(("127.0.0.1", port))
    conn = Connection(Role.CLIENT)
    sock.sendall(conn.send(Hello(1, *PROTOCOL_VERSIONS, 0, 1111, os.getpid(), 1, "gone", "test")))
    receive(conn, lambda: sock.recv(65536))
    sock.sendall(conn.send(Lock(2, 5, LockFlag.NO_INTERIM, 0, 1, inode, -1, key, "")))
    assert isinstance(receive(conn, lambda: sock.recv(65536)), Acquired)
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_client_frees_its_locks_at_once(delayed: Service) -> None:
    """The holder's own process is killed: the kernel closes its connection, its lock server sees the end
    of the stream and frees everything at once, lock-delay or not."""
    service = delayed
    proc = subprocess.Popen([sys.executable, "-c", GONE_CLIENT, str(service.port), str(INODE), KEY.decode()],
                            env=service.env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    with running(proc):
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        waiter = Raw(service, WAITER)
        rid = waiter.ask_lock(timeout_ms=30_000)
        assert waiter.quiet_for(0.3)
        proc.kill()
        killed = time.monotonic()
        assert waiter.answer(Acquired).request_id == rid
        assert time.monotonic() - killed < 1.0
    service.wait_for_log(r"server INFO released 1 lock\(s\) of 127\.0\.0\.1:\d+ \(port 1111, pid " + str(proc.pid))


def test_a_connection_reset_frees_its_locks_at_once(delayed: Service) -> None:
    service = delayed
    holder = Raw(service)
    waiter = Raw(service, WAITER)
    holder.lock()
    rid = waiter.ask_lock(timeout_ms=30_000)
    holder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
    holder.close()
    assert waiter.answer(Acquired, timeout=2).request_id == rid
    assert not any("kept" in line for line in service.log().splitlines() if " server " in line)


# -- a service restarted on its table: every client reclaims what it held ---------------------------------------


def test_a_restarted_service_keeps_the_locks_for_their_clients_to_reclaim(tmp_path: Path) -> None:
    """``jdls -k`` then ``jdls -ib`` under held locks: the lock servers keep their clients' locks when
    stopped, the new monitor keeps them, and through a new connection the client reclaims one (under the
    same handle) while a conflicting request waits; a reclaim that is not exactly the lock is refused; the
    lock nobody reclaims is freed after the delay, and a late reclaim is refused."""
    delay = 6.0
    with running_service(tmp_path / "release", "--lock-delay", f"{delay:g}") as service:
        holder = Raw(service)
        a = holder.lock(b"A")
        b = holder.lock(b"B", PR)
        stopped = service.jdls("-k")
        assert stopped.returncode == 0, stopped.stderr
        stopped_at = time.time()
        service.wait_for_log(rf"server INFO kept 2 lock\(s\) of 127\.0\.0\.1:\d+ \(port {HOLDER[0]}, pid "
                             rf"{HOLDER[1]}\) for 6 s, for it to reclaim")
        assert [s for s, _ in slot_states(service, b"A") + slot_states(service, b"B")] == [SlotState.KEPT] * 2
        service.start("--lock-delay", f"{delay:g}")
        service.wait_for_log(r"monitor INFO lock-delay of the existing table rewritten: 6 s, as it was")
        assert [s for s, _ in slot_states(service, b"A")] == [SlotState.KEPT], "the start-up tidy freed it"
        assert shown_row(service, b"A")[7].startswith("kept, ")

        waiter = Raw(service, WAITER)
        rid = waiter.ask_lock(b"A", timeout_ms=WAIT_FOREVER)
        stranger = Raw(service, STRANGER)
        assert not_held(stranger.reclaim(a.handle, b"A")) == (
            f"no lock of this client, file, key and mode is kept under handle {a.handle:#x}")
        again = Raw(service, HOLDER)
        other_pid = Raw(service, (HOLDER[0], 1))
        for wrong in (again.reclaim(a.handle + (1 << 24), b"A"), again.reclaim(a.handle, b"B"),
                      again.reclaim(a.handle, b"A", PR), again.reclaim(a.handle, b"A", thread=2),
                      again.reclaim(a.handle, b"A", inode=INODE + 1), other_pid.reclaim(a.handle, b"A")):
            assert not_held(wrong).startswith("no lock of this client"), wrong
        back = again.reclaim(a.handle, b"A")
        assert back == Granted(back.request_id, a.handle, EX, a.value)
        assert slot_states(service, b"A") == sorted([(SlotState.GRANTED, again.server),
                                                     (SlotState.WAITING, waiter.server)])
        assert waiter.quiet_for(0.5), "the waiter got a reclaimed lock"
        stranger.refused(b"A")

        # B is not reclaimed: in the way until the delay has passed since the stop, then freed.
        stranger.refused(b"B")
        b_kept = kept_since(service, b"B")
        assert b_kept is not None and b_kept <= stopped_at
        wait_for(lambda: not slot_states(service, b"B"), delay + 5, "the lock nobody reclaimed to be freed",
                 poll=0.05)
        assert time.time() >= b_kept + delay
        assert not_held(again.reclaim(b.handle, b"B", PR)).startswith("no lock of this client")
        stranger.lock(b"B")

        again.unlock(a.handle)
        assert waiter.answer(Acquired, timeout=2).request_id == rid


def test_a_reclaim_after_the_delay_is_refused_even_before_the_lock_was_freed(tmp_path: Path) -> None:
    """Restarted without its monitor (nobody tidies), the lock kept by the stop is still in the table after
    its delay: the late reclaim is refused all the same, and frees it."""
    with running_service(tmp_path / "release", "--lock-delay", "1") as service:
        g = Raw(service).lock()
        assert service.jdls("-k").returncode == 0
        kept = kept_since(service)
        assert kept is not None
        restart = service.jdls("-ibD", "--port", str(service.port))
        assert restart.returncode == 0, restart.stderr
        time.sleep(max(0.0, kept + 1.0 - time.time()) + 0.1)
        assert [s for s, _ in slot_states(service)] == [SlotState.KEPT]
        reason = not_held(Raw(service).reclaim(g.handle))
        assert reason == f"no lock of this client, file, key and mode is kept under handle {g.handle:#x}"
        service.wait_for_log(f"reclaim of {g.handle:#x} refused .*: the lock under handle {g.handle:#x} was kept 1 s "
                             "for its client to reclaim, and has been freed")
        assert not slot_states(service)
        assert not_held(Raw(service).reclaim(g.handle)).startswith("no lock of this client")


# -- a lock server stopped (SIGSTOP) still holds ----------------------------------------------------------------


def test_a_stopped_lock_server_keeps_holding_and_its_lock_cannot_be_reclaimed(delayed: Service) -> None:
    service = delayed
    holder = Raw(service)
    g = holder.lock()
    os.kill(holder.server, signal.SIGSTOP)
    try:
        other = Raw(service, WAITER)
        other.refused()
        again = Raw(service, HOLDER)
        reason = not_held(again.reclaim(g.handle))  # a right guess reads like a wrong one; the log says why
        assert reason == f"no lock of this client, file, key and mode is kept under handle {g.handle:#x}"
        service.wait_for_log(f"the lock under handle {g.handle:#x} is still held by the lock server that took it "
                             rf"\(pid {holder.server}\), which has not ended")
        time.sleep(DELAY + 1.0)  # longer than the lock-delay: a live lock server's lock is never kept
        other.refused()
        assert slot_states(service) == [(SlotState.GRANTED, holder.server)]
        assert not_held(again.reclaim(g.handle)).startswith("no lock of this client")
    finally:
        os.kill(holder.server, signal.SIGCONT)
    holder.close()  # the client goes: its lock server frees the lock at once
    wait_for(lambda: not slot_states(service), 3, "the lock to be freed when the client went")


# -- jdls -k: the lock servers keep; jdls -dvL shows it --------------------------------------------------------


def test_sigterm_of_a_lock_server_keeps_its_lock_and_it_is_shown_kept(delayed: Service) -> None:
    service = delayed
    holder = Raw(service)
    holder.lock()
    holder.lock(b"other", PR)
    os.kill(holder.server, signal.SIGTERM)
    wait_for(lambda: not alive(holder.server), 5, "the lock server to stop")
    service.wait_for_log(rf"server INFO kept 2 lock\(s\) of .* \(port {HOLDER[0]}, pid {HOLDER[1]}\) for 2 s")
    row = shown_row(service)
    assert re.fullmatch(r"kept, [12] s left", row[7]), row
    shown = service.jdls("-dvL").stdout
    assert " 2 locks kept for their clients to reclaim (lock-delay 2 s)" in shown, shown
    holder.answer(ConnectionClosed, timeout=2)  # and it closed the connection


def test_guessing_handles_by_reclaim_is_slowed_down(delayed: Service) -> None:
    """A handle is no secret: past FREE_RECLAIM_FAILURES refusals on a connection, each answer waits, so that
    trying handles one after another cannot find a kept lock within its lock-delay."""
    from dls_daemon.lockserver import FREE_RECLAIM_FAILURES, RECLAIM_TARPIT

    guesser = Raw(delayed, WAITER)
    for guess in range(FREE_RECLAIM_FAILURES):
        assert isinstance(guesser.reclaim((guess + 1000) << 24), Error)
    started = time.monotonic()
    slowed = 20
    for guess in range(slowed):
        assert isinstance(guesser.reclaim((guess + 5000) << 24), Error)
    assert time.monotonic() - started >= slowed * RECLAIM_TARPIT


def test_a_kept_lock_is_reclaimed_only_with_the_handle_its_client_was_given(delayed: Service) -> None:
    """The table's handle is a sequential ticket anyone can read off his own locks: the client is given a
    sealed one instead, and only that one reclaims the kept lock. Whoever knows the client's identity (Status
    tells it) and comes from its address, with the table's handle, is refused; the client then gets it back."""
    victim = Raw(delayed, HOLDER)
    given = victim.lock()
    with attached(delayed) as table:
        entry = next(e for e in table.scan() if e.slot.key[: e.slot.key_len] == KEY)
    in_table = entry.slot.ticket << 24 | entry.index
    assert given.handle != in_table and given.handle & 0xFFFFFF == entry.index
    os.kill(victim.server, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{victim.server}"), 5, "the victim's lock server to die")
    thief = Raw(delayed, HOLDER)  # the victim's port, pid, thread and address
    for guess in (in_table, given.handle ^ (1 << 24), given.handle ^ (1 << 63)):
        assert not_held(thief.reclaim(guess)).startswith("no lock of this client")
    back = thief.reclaim(given.handle)  # the victim, reconnected, with the handle it was given
    assert isinstance(back, Granted) and back.handle == given.handle
    thief.unlock(given.handle)  # unanswered: done when the table says so
    wait_for(lambda: slot_states(delayed) == [], 5, "the reclaimed lock released")


#: A client process that holds a record until told, then releases it and says how that went.
RELEASER = textwrap.dedent("""\
    import sys
    from dls_client import Client, LockLost
    client = Client()
    held = client.lock(sys.argv[1], sys.argv[2])
    print("held", flush=True)
    sys.stdin.readline()
    try:
        held.release()
    except LockLost as exc:
        print("lost:", exc, flush=True)
    else:
        print("released", flush=True)
""")


def test_a_client_stopped_past_the_lock_delay_is_told_its_lock_was_lost_when_it_releases(tmp_path: Path) -> None:
    """A client process stopped (SIGSTOP) while its lock server dies and the lock-delay passes, the lock handed
    on meanwhile: resumed, its release must raise LockLost, whichever of its threads looks first (the audit saw
    "released")."""
    data = tmp_path / "data"
    data.write_text("")
    with running_service(tmp_path / "release", "--lock-delay", "3") as service, \
            service.client(timeout=10) as witness:
        proc = subprocess.Popen([sys.executable, "-c", RELEASER, str(data), "K"], env=service.env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with running(proc):
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == "held\n"
            server = witness.status(data, "K")[1]
            assert server is not None
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                os.kill(server.pid, signal.SIGKILL)
                witness.lock(data, "K", timeout=15).release()  # after the lock-delay
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write("\n")
            proc.stdin.flush()
            said = proc.stdout.readline()
            assert said.startswith("lost: "), said
            proc.wait(timeout=10)
