"""The text report of a table (``jdls -dvL``, ``dls-dump``): a fixed snapshot, line for line, and a real read."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from dls_shm import (
    LOCAL_IP,
    Entry,
    Geometry,
    Grant,
    Header,
    LockTable,
    Owner,
    Slot,
    SlotState,
    TableFlag,
    modes,
    pack_ip,
    report,
)
from dls_shm.layout import KEY_MAX, LAYOUT_VERSION, MAGIC, SLOT_SIZE
from dls_shm.report import Process, Snapshot

GEOMETRY = Geometry(263, 50)
CREATED = 1146151697.0
NOW = 1146155190.0


def header(flags: int = 0) -> Header:
    return Header(
        magic=MAGIC, layout_version=LAYOUT_VERSION, header_size=4096, flags=flags, ngroups=GEOMETRY.ngroups,
        per_group=GEOMETRY.per_group, slot_size=SLOT_SIZE, key_max=KEY_MAX, total_size=GEOMETRY.total_size,
        created=CREATED, monitor_pid=14960, listener_pid=14961, last_ran=0.0, last_tidy=0.0, tidy_period=300,
        semid=1441792, lock_retries=0, tidy_ops=7, semaphores=1, cpu_user=0.09, cpu_system=0.1,
        lock_delay=15.0, next_expiry=0.0, block_size=32, waits_begun=0,
    )


def entry(group: int, value: int, ticket: int, state: int, port: int, ip: bytes, key: bytes, age: float,
          queued: int = 0) -> Entry:
    slot = Slot(
        ticket=ticket, state=state, mode=modes.EX, flags=0, key_len=len(key), queued=queued, pid=15000 + port,
        port=port, client_pid=16000 + port, ip=ip, thread=1, inode=1483651, device=-1, timestamp=NOW - age,
        doorbell=0, key=key.ljust(KEY_MAX, b"\0"), token=ticket, notify=0, block=bytes(64),
    )
    return Entry(group * GEOMETRY.per_group, group, value, slot)


def snapshot(flags: int = 0) -> Snapshot:
    # Out of order on purpose: the rows are by group, then by ticket (queue order).
    entries = (
        entry(189, 0x58BA67D8, 3, SlotState.GRANTED, 2, LOCAL_IP, b"32549", 65),
        entry(89, 0x0DF361BC, 5, SlotState.WAITING, 7, pack_ip("10.44.1.60"), b"33537", 3725),
        entry(89, 0x0DF361BC, 1, SlotState.GRANTED, 1000, pack_ip("10.44.1.55"), b"33537", 4000, queued=1),
    )
    return Snapshot(0x0001E240, 98306, (1441792,), header(flags), GEOMETRY, entries, NOW)


MONITOR = Process(14960, True)
LISTENER = Process(14961, False)


def test_the_whole_text_of_a_fixed_snapshot() -> None:
    used = 4096 + 263 * 8 + 3 * (SLOT_SIZE + 4)  # the header, the groups' ticket counters, the slots in use
    free = (263 * 50 - 3) * (SLOT_SIZE + 4)
    assert report.lines(snapshot(), MONITOR, LISTENER, very=True) == [
        "Lock monitor at pid:    14960 - Active",
        "Lock listener at pid:   14961 - Inactive",
        f"Program started:        {time.ctime(CREATED)}",
        "Time last ran:          never",
        "Time last tidied up:    never",
        "Lock retries:           0",
        "Tidy-up time:           5 minutes",
        "Locking mechanism:      IPC semaphores based on THREAD id",
        "Tidy-up operations:     7",
        "Semaphore IDs:          1441792",
        f"Memory:                 {used} bytes used , {free} bytes free",
        "CPU Usage:              0.09 usr , 0.10 sys",
        "IPC key:                0x0001e240",
        "Shared memory ID:       98306",
        "",
        "Record locks outstanding",
        "",
        "Group\tvalue\tpid\ttype\tport\ti-node\tdev\tqueued\tipaddr\tkey",
        "89\t0x0df361bc\t16000\tWRITE\t1000\t01483651\t-1\t1\t10.44.1.55\t33537",
        "89\t0x0df361bc\t15007\tWRITE\t7\t01483651\t-1\twaiting\t10.44.1.60\t33537",
        "189\t0x58ba67d8\t15002\tWRITE\t2\t01483651\t-1\tNone\t0.0.0.0\t32549",
        "",
        "Record locks:          13150 locks maximum in 263 groups of 50 locks/group",
        "                        2 locks currently in use",
        "                        2 is max. locks found in one group",
        "                        1 requests waiting",
    ]


def test_the_parts_left_out() -> None:
    """``jdls -d``: the processes, the start and the summary only."""
    text = report.lines(snapshot(), MONITOR, LISTENER, details=False, locks=False)
    assert text[:3] == [*report.process_lines(MONITOR, LISTENER), f"Program started:        {time.ctime(CREATED)}"]
    assert text[3:] == report.summary_lines(snapshot())
    assert not any(line.startswith(("IPC key", "Record locks outstanding")) for line in text)


def test_port_owners_and_time_stamps() -> None:
    snap = snapshot(TableFlag.PORT_OWNERS | TableFlag.TIMESTAMPS)
    assert report.mechanism(snap.header.flags) == "IPC semaphores based on PORT number, locks time stamped"
    rows = report.lock_rows(snap)
    assert rows[0].endswith("\tkey\tage")
    assert [row.rsplit("\t", 1)[1] for row in rows[1:]] == ["1:06:40", "1:02:05", "01:05"]


@pytest.mark.parametrize(("seconds", "shown"), [(0, "00:00"), (-3, "00:00"), (59.9, "00:59"), (3600, "1:00:00")])
def test_age(seconds: float, shown: str) -> None:
    assert report.age(seconds) == shown


@pytest.mark.parametrize(("seconds", "shown"), [(60, "1 minute"), (300, "5 minutes"), (1, "1 second"),
                                                (90, "90 seconds")])
def test_tidy_period(seconds: int, shown: str) -> None:
    assert report.tidy_period(seconds) == shown


def test_a_snapshot_read_from_a_real_table(make_table: Callable[..., LockTable]) -> None:
    table = make_table()
    owner = Owner(os.getpid(), 1, 4, os.getpid(), pack_ip("127.0.0.1"))
    assert isinstance(table.lock(owner, 1483651, -1, b"USD163170001", modes.PR), Grant)
    snap = Snapshot.read(table)
    assert (snap.key, snap.shm_id, snap.semaphore_ids, snap.geometry) == (
        table.key, table.shm_id, table.semaphore_ids, table.geometry)
    assert (snap.granted, snap.waiting, snap.max_in_group) == (1, 0, 1)
    row = report.lock_rows(snap)[1].split("\t")
    assert row[2:] == [str(os.getpid()), "READ", "4", "01483651", "-1", "None", "127.0.0.1", "USD163170001"]
