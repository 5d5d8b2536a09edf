"""``jdls -d`` (the service and its lock table, as jDLS shows them) and ``jdls -C`` (a connection test).

``-d`` names the monitor and listener and sums up the table, ``-v`` adds the
rest of the header (times, counters, semaphore ids, memory, CPU), ``-vv`` also
the IPC key and shared memory id, ``-L`` lists every lock. The lines, their
order and the columns are those of the jDLS user guide's ``jDLS -dvL``
example, so an operator finds each figure where jDLS put it. Whether a process
is active comes from its pid file, checked against the live process (pid and
start time), so a pid left in the header by a killed monitor is shown as
inactive rather than trusted.

``-C teststring`` checks what a client would do: connect, say Hello, have the
string echoed by a lock server, and print what it used, what came back and how
long the round trip took. It speaks dls-proto directly over a plain socket, so
it needs no client library and tests the service, not a client's set-up.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import Counter
from typing import TextIO, TypeVar

from dls_proto import (
    NEED_DATA,
    PROTOCOL_VERSIONS,
    Connection,
    ConnectionClosed,
    Echo,
    EchoReply,
    Error,
    Hello,
    Mechanism,
    ProtocolError,
    Role,
    Welcome,
)
from dls_shm import Entry, Header, Instance, LockTable, SlotState, TableError, TableFlag, TableMissing, modes, unpack_ip

from . import pidfile
from .roles import LISTENER, MONITOR

#: Where the values of the header lines start.
LABEL_WIDTH = 24
#: The summary's first line puts its figure one column to the left, as jDLS does.
SUMMARY_WIDTH = 23
COLUMNS = ("Group", "value", "pid", "type", "port", "i-node", "dev", "queued", "ipaddr", "key")
#: The extra column of a time-stamped table (jdls -iT): how long each lock has been held (or waited).
AGE_COLUMN = "age"
#: How long ``-C`` waits for the connection and for each answer.
TEST_TIMEOUT = 10.0

T = TypeVar("T")


def _line(label: str, value: object) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{value}"


def _when(t: float) -> str:
    return time.ctime(t) if t else "never"


def _process_lines(instance: Instance, header: Header | None) -> list[str]:
    lines = []
    for role, label in ((MONITOR, "Lock monitor at pid"), (LISTENER, "Lock listener at pid")):
        record = pidfile.running(instance.pid_file(role))
        if record is not None:
            lines.append(_line(label, f"{record.pid} - Active"))
        else:
            pid = 0 if header is None else (header.monitor_pid if role == MONITOR else header.listener_pid)
            lines.append(_line(label, f"{pid} - Inactive"))
    return lines


def mechanism(flags: int) -> str:
    """The "Locking mechanism" line: one SysV semaphore guards the table; whose locks they are."""
    owners = "PORT number" if flags & TableFlag.PORT_OWNERS else "THREAD id"
    stamped = ", locks time stamped" if flags & TableFlag.TIMESTAMPS else ""
    return f"IPC semaphores based on {owners}{stamped}"


def memory(header: Header, used_slots: int) -> tuple[int, int]:
    """(bytes used, bytes free): the header and the slots in use (each with its value word), and the rest."""
    total_slots = header.ngroups * header.per_group
    free = (total_slots - used_slots) * (header.slot_size + 4)
    return header.total_size - free, free


def _tidy_period(seconds: int) -> str:
    if seconds % 60 == 0:
        minutes = seconds // 60
        return f"{minutes} minute" if minutes == 1 else f"{minutes} minutes"
    return f"{seconds} second" if seconds == 1 else f"{seconds} seconds"


def _details(table: LockTable, header: Header, used: int, very: bool) -> list[str]:
    used_bytes, free_bytes = memory(header, used)
    lines = [
        _line("Time last ran", _when(header.last_ran)),
        _line("Time last tidied up", _when(header.last_tidy)),
        _line("Lock retries", header.lock_retries),
        _line("Tidy-up time", _tidy_period(header.tidy_period)),
        _line("Locking mechanism", mechanism(header.flags)),
        _line("Tidy-up operations", header.tidy_ops),
        _line("Semaphore IDs", ", ".join(str(s) for s in table.semaphore_ids)),
        _line("Memory", f"{used_bytes} bytes used , {free_bytes} bytes free"),
        _line("CPU Usage", f"{header.cpu_user:.2f} usr , {header.cpu_system:.2f} sys"),
    ]
    if very:
        lines += [_line("IPC key", f"0x{table.key:08x}"), _line("Shared memory ID", table.shm_id)]
    return lines


def age(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _lock_rows(entries: list[Entry], timestamps: bool, now: float) -> list[str]:
    header = COLUMNS + ((AGE_COLUMN,) if timestamps else ())
    rows = ["\t".join(header)]
    for e in sorted(entries, key=lambda e: (e.group, e.slot.ticket)):
        s = e.slot
        queued = "waiting" if s.state == SlotState.WAITING else (str(s.queued) if s.queued else "None")
        row = [
            str(e.group), f"0x{e.value:08x}", str(s.pid), modes.DISPLAY[s.mode], str(s.port), f"{s.inode:08d}",
            str(s.device), queued, unpack_ip(s.ip), s.key[: s.key_len].decode("utf-8", "backslashreplace"),
        ]
        if timestamps:
            row.append(age(now - s.timestamp))
        rows.append("\t".join(row))
    return rows


def display(
    instance: Instance, *, verbose: int = 0, locks: bool = False, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the service's state; the exit status (1 when there is no table to show, or it cannot be read)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        table = LockTable.attach(instance.key)
    except TableMissing:
        for line in _process_lines(instance, None):
            print(line, file=out)
        print(_line("Locking mechanism", f"OS file locks (no lock table with key 0x{instance.key:08x})"), file=out)
        print(f"jdls: there is no shared memory lock table with key 0x{instance.key:08x} for {instance.root}: "
              "the lock monitor has not created one (jdls -ib or -ibA) or it was removed (jdls -K)", file=err)
        return 1
    except TableError as exc:
        print(f"jdls: {exc}", file=err)
        return 1
    try:
        header = table.header()
        entries = list(table.scan())
        now = time.time()
        details = _details(table, header, len(entries), verbose > 1) if verbose else []
        geometry = table.geometry
    finally:
        table.close()
    granted = sum(1 for e in entries if e.slot.state == SlotState.GRANTED)
    waiting = len(entries) - granted
    per_group = Counter(e.group for e in entries)
    lines = [*_process_lines(instance, header), _line("Program started", _when(header.created)), *details]
    if locks:
        lines += ["", "Record locks outstanding", ""]
        lines += _lock_rows(entries, bool(header.flags & TableFlag.TIMESTAMPS), now)
    indent = " " * LABEL_WIDTH
    lines += [
        "",
        f"{'Record locks:':<{SUMMARY_WIDTH}}{geometry.locks} locks maximum in {geometry.ngroups} groups of "
        f"{geometry.per_group} locks/group",
        f"{indent}{granted} locks currently in use",
        f"{indent}{max(per_group.values(), default=0)} is max. locks found in one group",
    ]
    if waiting:
        lines.append(f"{indent}{waiting} requests waiting")
    for line in lines:
        print(line, file=out)
    return 0


# -- jdls -C: the connection test ----------------------------------------------------------------


class _TestFailed(Exception):
    pass


def _client_port() -> int:
    """The port number a client of this process would give: JBCPORTNO, else the pid."""
    text = os.environ.get("JBCPORTNO", "")
    return int(text) if text.isdigit() and int(text) < 1 << 32 else os.getpid()


def _receive(sock: socket.socket, conn: Connection, kind: type[T], where: str) -> T:
    while True:
        event = conn.next_event()
        if isinstance(event, kind):
            return event
        if isinstance(event, Error):
            raise _TestFailed(f"Client: the lock service at {where} answered with an error: {event.reason}")
        if isinstance(event, ConnectionClosed):
            raise _TestFailed(f"Client: the lock service at {where} closed the connection")
        if event is not NEED_DATA:
            raise _TestFailed(f"Client: unexpected {type(event).__name__} from {where}")
        conn.receive_data(sock.recv(65536))


def connection_test(
    host: str, port: int, text: str, *, verbose: bool = False, timeout: float = TEST_TIMEOUT,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """``jdls -C``: connect, greet, echo ``text``; 0 when it came back intact, else 1 (with the reason)."""
    out = out or sys.stdout
    err = err or sys.stderr
    print(f"Client: Using host '{host}', service '{port}'", file=out, flush=True)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        print("Client: Unable to allocate socket", file=err)
        print(f"Client: connection failed for host '{host}', service '{port}', error {reason}", file=err)
        return 1
    where = f"host '{host}', service '{port}'"
    data = text.encode("utf-8", "surrogateescape")
    try:
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(Role.CLIENT)
            hello = Hello(1, PROTOCOL_VERSIONS[0], PROTOCOL_VERSIONS[1], 0, _client_port(), os.getpid(),
                          threading.get_native_id(), socket.gethostname()[:255], "jdls -C")
            sock.sendall(conn.send(hello))
            welcome = _receive(sock, conn, Welcome, where)
            how = "shared memory lock table" if welcome.mechanism == Mechanism.TABLE else "OS file locks"
            print(f"Client: connected to lock server pid {welcome.server_pid} on '{welcome.server_host}' "
                  f"(protocol version {welcome.version}, {how})", file=out)
            if verbose:
                print(f"Client: the service sees this client as {welcome.peer}; its largest frame is "
                      f"{welcome.max_frame} bytes", file=out)
            started = time.perf_counter()
            sock.sendall(conn.send(Echo(2, data)))
            reply = _receive(sock, conn, EchoReply, where)
            took = time.perf_counter() - started
    except _TestFailed as exc:
        print(exc, file=err)
        return 1
    except TimeoutError:
        print(f"Client: no answer from {where} within {timeout:g} s", file=err)
        return 1
    except (OSError, ProtocolError) as exc:
        print(f"Client: connection to {where} failed: {exc}", file=err)
        return 1
    shown = reply.data.decode("utf-8", "backslashreplace")
    if reply.data != data:
        print(f"Client: sent '{text}' but received '{shown}'", file=err)
        return 1
    print(f"Client: received '{shown}' in {took * 1000:.3f} ms (round trip)", file=out)
    return 0
