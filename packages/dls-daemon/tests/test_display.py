"""``jdls -d``: the layout of the jDLS user guide's ``jDLS -dvL`` example, line for line.

GUIDE is that example as the guide prints it. The test fills a table as in the example (13000 locks in
groups of 50; a remote client on port 1000 through a lock server, a local process on port 2 locking in the
table directly, a local client on port 4 through the loopback address), then compares every line of
``jdls -dvL`` with the guide's, its variable parts (pids, times, ids, sizes, groups, values) replaced by
this service's.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from dls_proto import Acquired, Lock, Welcome
from dls_shm import LOCAL_IP, Grant, Header, Owner, modes, resource_value
from dls_shm.report import age, memory
from dls_testkit import greet, receive

#: The guide's example, tabs and spaces as printed there.
GUIDE = """\
Lock monitor at pid:      14960 - Active
Lock listener at pid:    14961 - Active
Program started:        Thu Apr 27 17:28:17 2006
Time last ran:          Thu Apr 27 18:26:30 2006
Time last tidied up:    Thu Apr 27 18:23:50 2006
Lock retries:           0
Tidy-up time:           5 minutes
Locking mechanism:      IPC semaphores based on THREAD id
Tidy-up operations:     0
Semaphore IDs:          1441792, 1474561
Memory:                 6624 bytes used , 128544 bytes free
CPU Usage:              0.09 usr , 0.09 sys

Record locks outstanding

Group\tvalue\tpid\ttype\tport\ti-node\tdev\tqueued\tipaddr\tkey
89\t0x0df361bc\t15031\tWRITE\t1000\t01483651\t-1\tNone\t10.44.1.55\t33537
161\t0x6bc61286\t15112\tWRITE\t4\t01483651\t-1\tNone\t127.0.0.1\tUSD163170001
189\t0x58ba67d8\t15071\tWRITE\t2\t01483651\t-1\tNone\t0.0.0.0\t32549

Record locks:          13150 locks maximum in 263 groups of 50 locks/group
                        3 locks currently in use
                        1 is max. locks found in one group
"""
#: The one deliberate difference: the guide prints the two pid lines two and one columns to the right of the
#: other header lines; dls aligns every header value at column 24.
ALIGNED = {
    "Lock monitor at pid:      14960 - Active": "Lock monitor at pid:    14960 - Active",
    "Lock listener at pid:    14961 - Active": "Lock listener at pid:   14961 - Active",
}
INODE = 1483651
FILE = "/data/ac/FBNK.ACCOUNT"


def remote_lock(service, port: int, key: bytes) -> tuple[socket.socket, int]:
    """A client on ``port`` holding a WRITE lock on ``key`` through its lock server: (socket, server pid)."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    conn, welcome = greet(sock, port, pid=7000 + port, host="app-server")
    sock.sendall(conn.send(Lock(2, modes.EX, 0, 0, 1, INODE, -1, key, FILE)))
    receive(sock, conn, Acquired)
    assert isinstance(welcome, Welcome)
    return sock, welcome.server_pid


def substitute(text: str, values: dict[str, str]) -> str:
    for guide_value, ours in values.items():
        text = text.replace(guide_value, ours)
    return text


def test_dvl_prints_the_guide_s_example_layout(service) -> None:
    result = service.jdls("-ibs13000,50")
    assert result.returncode == 0, result.stderr
    monitor, listener = service.pid("monitor"), service.pid("listener")
    assert monitor and listener
    table = service.table()
    sockets = []
    try:
        for port, key in ((1000, b"33537"), (4, b"USD163170001")):
            sock, server = remote_lock(service, port, key)
            sockets.append((sock, server, port, key))
        # The local process on port 2 is this test, locking in the table directly.
        local = table.lock(Owner(os.getpid(), 1, 2, os.getpid(), LOCAL_IP), INODE, -1, b"32549", modes.EX)
        assert isinstance(local, Grant)
        table.tidy()  # as the monitor's periodic tidy would: it frees nothing (every owner lives) but is dated
        shown = service.jdls("-dvL")
        assert shown.returncode == 0, shown.stderr
        header: Header = table.header()
        sem_ids = ", ".join(str(s) for s in table.semaphore_ids)
    finally:
        table.close()
        for sock, *_ in sockets:
            sock.close()
    rows = {
        b"33537": (sockets[0][1], 1000, "10.44.1.55", "127.0.0.1"),
        b"USD163170001": (sockets[1][1], 4, "127.0.0.1", "127.0.0.1"),
        b"32549": (os.getpid(), 2, "0.0.0.0", "0.0.0.0"),
    }
    guide_values = {b"33537": ("89", "0x0df361bc", "15031"), b"USD163170001": ("161", "0x6bc61286", "15112"),
                    b"32549": ("189", "0x58ba67d8", "15071")}
    used, free = memory(header, 3)
    # Our resources hash to other values and groups than jBASE's: rows are listed by group, so the
    # expected rows are the guide's, with our figures, in our order.
    guide_lines = substitute(GUIDE, ALIGNED).splitlines()
    table_at = guide_lines.index("Group\tvalue\tpid\ttype\tport\ti-node\tdev\tqueued\tipaddr\tkey") + 1
    guide_rows = {line.split("\t")[-1].encode(): line for line in guide_lines[table_at : table_at + 3]}
    expected_rows = []
    for key, (pid, port, guide_ip, our_ip) in rows.items():
        value = resource_value(INODE, -1, key)
        group, guide_value, guide_pid = guide_values[key]
        line = guide_rows[key]
        assert f"\t{port}\t" in line and f"\t{guide_ip}\t" in line
        line = line.replace(f"{group}\t{guide_value}\t{guide_pid}\t", f"{value % 263}\t0x{value:08x}\t{pid}\t", 1)
        expected_rows.append((value % 263, line.replace(f"\t{guide_ip}\t", f"\t{our_ip}\t")))
    expected_rows.sort()
    busiest = max(sum(1 for g, _ in expected_rows if g == group) for group, _ in expected_rows)
    expected = substitute("\n".join(guide_lines[:table_at]), {
        "14960": str(monitor),
        "14961": str(listener),
        "Thu Apr 27 17:28:17 2006": time.ctime(header.created),
        "Thu Apr 27 18:23:50 2006": time.ctime(header.last_tidy),
        "1441792, 1474561": sem_ids,
        "6624 bytes used , 128544 bytes free": f"{used} bytes used , {free} bytes free",
    }).splitlines()
    expected += [line for _, line in expected_rows]
    expected += substitute("\n".join(guide_lines[table_at + 3 :]), {
        "1 is max.": f"{busiest} is max.",
    }).splitlines()
    got = shown.stdout.splitlines()
    assert len(got) == len(expected), shown.stdout
    for ours, wanted in zip(got, expected, strict=True):
        if wanted.startswith("Time last ran:"):  # it ticks every second: any time from the monitor's start on
            assert re.fullmatch(r"Time last ran:          \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", ours), ours
        elif wanted.startswith("CPU Usage:"):
            assert re.fullmatch(r"CPU Usage:              \d+\.\d\d usr , \d+\.\d\d sys", ours), ours
        else:
            assert ours == wanted


def test_d_alone_and_vv(service) -> None:
    assert service.jdls("-ibAs100,10").returncode == 0
    plain = service.jdls("-d").stdout.splitlines()
    assert [line.split(":")[0] for line in plain[:4]] == [
        "Lock monitor at pid", "Lock listener at pid", "Program started", "",
    ]
    assert len(plain) == 7
    assert plain[-3:] == [
        "Record locks:          110 locks maximum in 11 groups of 10 locks/group",
        "                        0 locks currently in use",
        "                        0 is max. locks found in one group",
    ]
    very = service.jdls("-dvv").stdout
    assert f"IPC key:                0x{service.instance.key:08x}\n" in very
    assert re.search(r"^Shared memory ID:       \d+$", very, re.M)
    assert "IPC key" not in service.jdls("-dv").stdout


def test_display_without_a_table_says_so(service) -> None:
    result = service.jdls("-dvL")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "Lock monitor at pid:    0 - Inactive",
        "Lock listener at pid:   0 - Inactive",
        f"Locking mechanism:      OS file locks (no lock table with key 0x{service.instance.key:08x})",
    ]
    assert f"there is no shared memory lock table with key 0x{service.instance.key:08x}" in result.stderr


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "00:00"), (1.9, "00:01"), (59, "00:59"), (61, "01:01"), (3599, "59:59"), (3600, "1:00:00"),
     (90061, "25:01:01"), (-3, "00:00")],
)
def test_age(seconds: float, shown: str) -> None:
    assert age(seconds) == shown


def test_memory_used_and_free_add_up() -> None:
    header = Header(b"", 1, 4096, 0, 263, 50, 200, 120, 4096 + 263 * 50 * 204, 0.0, 0, 0, 0.0, 0.0, 300, 0, 0, 0, 0,
                    0.0, 0.0, 15.0, 0.0, 32, 0)
    assert memory(header, 0) == (4096, 263 * 50 * 204)
    assert memory(header, 3) == (4096 + 3 * 204, (263 * 50 - 3) * 204)


def test_a_reader_that_stops_reading_is_no_error(service) -> None:
    """``jdls -dvL | head -1``: the display stops where the reader did, without a traceback. The pipe's
    read end is closed before jdls starts, so that every write fails (a head that has read enough)."""
    assert service.jdls("-ibAs100,10").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "dls_daemon", "-dvL"], env=service.env, stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")
