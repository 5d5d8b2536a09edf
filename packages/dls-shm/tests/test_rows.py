"""Rows from plain data: the guide's three ports, waiters, names, filters, long keys; no IPC."""

from __future__ import annotations

from typing import Any

import pytest
from dls_shm import KEY_MAX
from dls_shm.rows import SnapshotError, build_rows, format_rows, inode_name, select_rows

INODE = 1483651


def entry(value: int, port: int, client_pid: int, ip: str, key: str, *, pid: int | None = None,
          state: str = "granted", mode: str = "EX", timestamp: float = 1.0, index: int = 0,
          inode: int = INODE, long_key: bool = False) -> dict[str, Any]:
    """A lock as dls_shm.info.entry_json gives it."""
    return {
        "index": index, "group": value % 11, "value": value, "state": state, "mode": mode,
        "pid": client_pid if pid is None else pid, "port": port, "client_pid": client_pid, "ip": ip,
        "thread": 1, "inode": inode, "device": -1, "queued": 0, "timestamp": timestamp, "key": key,
        "long_key": long_key,
    }


def document(
    port: int, path: str = "ac/FBNK.ACCOUNT", inode: int = INODE, keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {"format": 1, "port": port, "files": [{"path": path, "inode": inode}],
            "locks": [{"path": path, "inode": inode, "key": k, "mode": "EX", "state": "granted"} for k in keys]}


# The three ports of the guide: a direct local process, a remote client, a local one through the listener.
GUIDE_LOCKS = [
    entry(0x0DF361BC, 1000, 15031, "10.44.1.55", "33537", pid=15031),
    entry(0x6BC61286, 4, 15112, "127.0.0.1", "USD163170001", pid=15112),
    entry(0x58BA67D8, 2, 15071, "0.0.0.0", "32549"),
]
GUIDE_LINES = [
    "IPADDR\tPORT\tPID\tFILENAME\tRECORD KEY\tLOCK#\tPORT/-PID",
    "0.0.0.0\t2\t15071\tac/FBNK.ACCOUNT\t32549\t0x58ba67d8,W\t---",
    "10.44.1.55\t1000\t15031\tac/FBNK.ACCOUNT\t33537\t0x0df361bc,W\t---",
    "127.0.0.1\t4\t15112\tac/FBNK.ACCOUNT\tUSD163170001\t0x6bc61286,W\t---",
]


def test_the_guides_three_ports() -> None:
    rows = build_rows(GUIDE_LOCKS, [document(2), document(1000), document(4)])
    assert format_rows(rows) == GUIDE_LINES


def test_without_information_the_inode_is_shown() -> None:
    rows = build_rows(GUIDE_LOCKS, [document(2)])
    assert [r["filename"] for r in rows] == ["ac/FBNK.ACCOUNT", "inode 01483651", "inode 01483651"]
    assert inode_name(42) == "inode 00000042"


def test_a_name_is_matched_by_port_and_inode() -> None:
    # Port 2's document names another file with the same inode number elsewhere: not this lock's.
    rows = build_rows([entry(1, 2, 10, "0.0.0.0", "K")], [document(2, "other", inode=7), document(3, "wrong")])
    assert rows[0]["filename"] == "inode 01483651"
    rows = build_rows([entry(1, 2, 10, "0.0.0.0", "K", inode=7)], [document(2, "other", inode=7)])
    assert rows[0]["filename"] == "other"


def test_a_lock_server_pid_falls_back_when_no_client_pid() -> None:
    e = entry(1, 5, 0, "10.0.0.9", "K", pid=777)
    (row,) = build_rows([e], [])
    assert row["pid"] == 777 and row["client_pid"] == 777


def test_waiters_are_shown_in_the_holders_row_in_queue_order() -> None:
    locks = [
        entry(0xABC, 9, 900, "10.0.0.9", "K", state="waiting", timestamp=3.0, index=2),
        entry(0xABC, 2, 200, "0.0.0.0", "K", timestamp=1.0, index=0),
        entry(0xABC, 7, 700, "127.0.0.1", "K", state="waiting", timestamp=2.0, index=1),
        entry(0xDEF, 3, 300, "0.0.0.0", "L"),
    ]
    rows = build_rows(locks, [document(2), document(3)])
    assert [(r["port"], r["waiters"]) for r in rows] == [(2, [7, 9]), (3, [])]
    assert format_rows(rows)[1:] == [
        "0.0.0.0\t2\t200\tac/FBNK.ACCOUNT\tK\t0x00000abc,W\t7,9",
        "0.0.0.0\t3\t300\tac/FBNK.ACCOUNT\tL\t0x00000def,W\t---",
    ]


def test_shared_holders_each_have_a_row_and_the_read_letter() -> None:
    locks = [entry(0x10, 2, 20, "0.0.0.0", "K", mode="PR"), entry(0x10, 3, 30, "0.0.0.0", "K", mode="PR", index=1),
             entry(0x10, 4, 40, "0.0.0.0", "K", mode="EX", state="waiting", index=2)]
    rows = build_rows(locks, [])
    assert [(r["port"], r["lock"], r["waiters"]) for r in rows] == [(2, "0x00000010,R", [4]), (3, "0x00000010,R", [4])]


def test_same_value_other_resource_is_not_a_waiter() -> None:
    locks = [entry(0x10, 2, 20, "0.0.0.0", "K"), entry(0x10, 3, 30, "0.0.0.0", "OTHER", state="waiting")]
    rows = build_rows(locks, [])
    assert [(r["port"], r["state"], r["waiters"]) for r in rows] == [(2, "granted", []), (3, "waiting", [])]


def test_a_waiter_without_a_holder_is_not_hidden() -> None:
    rows = build_rows([entry(0x10, 3, 30, "0.0.0.0", "K", state="waiting")], [])
    assert format_rows(rows)[1] == "0.0.0.0\t3\t30\tinode 01483651\tK\t0x00000010,W\twaiting"


def test_sorted_by_file_then_key() -> None:
    locks = [entry(1, 2, 1, "0.0.0.0", "B", inode=1), entry(2, 2, 1, "0.0.0.0", "A", inode=2),
             entry(3, 2, 1, "0.0.0.0", "A", inode=1)]
    rows = build_rows(locks, [document(2, "b/FILE", inode=1), document(2, "a/FILE", inode=2)])
    assert [(r["filename"], r["key"]) for r in rows] == [("a/FILE", "A"), ("b/FILE", "A"), ("b/FILE", "B")]


def test_long_keys_come_back_whole_from_the_document() -> None:
    full = "X" * (KEY_MAX + 30)
    stored = "X" * (KEY_MAX - 16) + "\\x01" * 16  # prefix and digest, as entry_json decodes it
    e = entry(1, 2, 20, "0.0.0.0", stored, long_key=True)
    assert build_rows([e], [document(2, keys=("X" * 10, full))])[0]["key"] == full
    assert build_rows([e], [])[0]["key"] == "X" * (KEY_MAX - 16) + "..."


def test_filters() -> None:
    locks = [*GUIDE_LOCKS, entry(0x99, 7, 70, "127.0.0.1", "33537", state="waiting", pid=70)]
    docs = [document(2), document(1000), document(4, "st/F.STMT.ENTRY"), document(7)]
    rows = build_rows(locks, docs)
    assert [r["port"] for r in select_rows(rows, file="ACCOUNT")] == [2, 7, 1000]
    assert [r["port"] for r in select_rows(rows, file="STMT")] == [4]
    assert [r["port"] for r in select_rows(rows, key="33537")] == [7, 1000]
    assert select_rows(rows, key="3353") == []
    assert [r["port"] for r in select_rows(rows, port=4)] == [4]
    assert [r["port"] for r in select_rows(rows, file="ACCOUNT", key="32549", port=2)] == [2]


def test_a_waiting_port_selects_the_lock_it_waits_for() -> None:
    locks = [entry(0x10, 2, 20, "0.0.0.0", "K"), entry(0x10, 8, 80, "0.0.0.0", "K", state="waiting")]
    assert [r["port"] for r in select_rows(build_rows(locks, []), port=8)] == [2]


@pytest.mark.parametrize("bad", [[{"value": 1}], [42], [{**entry(1, 2, 3, "0.0.0.0", "K"), "mode": "XX"}]])
def test_malformed_entries_are_reported(bad: list[Any]) -> None:
    with pytest.raises(SnapshotError):
        build_rows(bad, [])


def test_malformed_documents_are_skipped() -> None:
    rows = build_rows(GUIDE_LOCKS[:1], [{"port": "x"}, {"port": 1000, "files": "no"}, {"port": 1000, "files": [3]}])
    assert rows[0]["filename"] == "inode 01483651"



def test_queues_of_an_earlier_services_entries() -> None:
    """Entries of a service before issue 14 (no token, converting nor block_valid) read as plain requests on
    a valid block, in queue order; the default rows keep the guide's columns."""
    locks = [entry(5, 7, 70, "0.0.0.0", "K", state="waiting", timestamp=3.0, index=3),
             entry(5, 2, 20, "0.0.0.0", "K", timestamp=1.0, index=1),
             entry(5, 9, 90, "0.0.0.0", "K", state="waiting", timestamp=2.0, index=2)]
    rows = build_rows(locks, [], every=True)
    assert [(r["port"], r["state"], r["token"], r["converting"], r["held_mode"], r["block_valid"]) for r in rows] == [
        (2, "granted", None, False, None, True), (9, "waiting", None, False, None, True),
        (7, "waiting", None, False, None, True)]
    assert format_rows(rows, every=True)[1:] == [
        "0.0.0.0\t2\t20\tinode 01483651\tK\t0x00000005,W\t9,7\tgranted\tEX\t-\tvalid",
        "0.0.0.0\t9\t90\tinode 01483651\tK\t0x00000005,W\twaiting\twaiting\tEX\t-\tvalid",
        "0.0.0.0\t7\t70\tinode 01483651\tK\t0x00000005,W\twaiting\twaiting\tEX\t-\tvalid",
    ]
    assert format_rows(build_rows(locks, []))[1:] == ["0.0.0.0\t2\t20\tinode 01483651\tK\t0x00000005,W\t9,7"]
