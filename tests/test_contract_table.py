"""Contract: a lock table and proc/info written by dls-shm, read by dls-utils.

The table is made directly with ``dls_shm`` (no daemon), under a private
JBCRELEASEDIR in tmp_path, hence its own IPC key; locks of several owners and
modes are taken in it (shared holders, queued waiters, a long key, a lock of a
remote client, a file no document names), proc/info documents are written with
``dls_shm.info``, and ``show-item-locks --local --json`` is run as a separate
program: every field of every row is checked against what was written. A
second table is made with port owners (``jdls -P``). At the end the table is
removed and nothing may be left under its key.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_shm import (
    KEY_MAX,
    LOCAL_IP,
    Conflict,
    Grant,
    Instance,
    LockTable,
    Owner,
    Queued,
    TableFlag,
    geometry_for,
    info,
    modes,
    pack_ip,
)
from dls_testkit import instance_env, ipc_left, own_table

BIN = Path(sys.executable).parent
SHOW_ITEM_LOCKS = BIN / "show-item-locks"
DLS_DUMP = BIN / "dls-dump"

PR, EX, CR = modes.parse("PR"), modes.parse("EX"), modes.parse("CR")
DEVICE = -1  # as the lock servers record files of remote hosts


@contextlib.contextmanager
def private_table(root: Path, flags: int = 0) -> Iterator[tuple[Instance, LockTable, dict[str, str]]]:
    """A new lock table for the instance at ``root``; removed at the end, and no IPC may be left."""
    instance = Instance.from_environment(root)
    assert not ipc_left(instance.key), f"IPC key 0x{instance.key:08x} already in use"
    instance.make_dirs()
    with own_table(instance.key, geometry_for(1000, 50), flags=flags) as table:
        yield instance, table, instance_env(root)


def show_item_locks(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    result = subprocess.run([str(SHOW_ITEM_LOCKS), "--local", "--json", *args], env=env, capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"show-item-locks exited {result.returncode}: {result.stderr}"
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def label(value: int, mode: int) -> str:
    return f"0x{value:08x},{modes.LETTERS[mode]}"


def row(owner: Owner, path: str, key: str, value: int, mode: int, inode: int, waiters: list[int],
        token: int, state: str = "granted") -> dict[str, Any]:
    return {
        "ipaddr": {LOCAL_IP: "0.0.0.0"}.get(owner.ip) or IPS[owner.ip],
        "port": owner.port, "pid": owner.pid, "filename": path, "key": key, "lock": label(value, mode),
        "value": value, "mode": modes.NAMES[mode], "state": state, "waiters": waiters, "inode": inode,
        "device": DEVICE, "client_pid": owner.client_pid, "thread": owner.thread,
        "token": token, "converting": False, "held_mode": None, "block_valid": True,
    }


IPS = {pack_ip("10.1.2.3"): "10.1.2.3", pack_ip("fd00::17"): "fd00::17"}


@pytest.fixture
def other_process() -> Iterator[int]:
    """A live process other than this one, to stand for a lock server holding locks."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdin=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def test_show_item_locks_reads_what_dls_shm_wrote(tmp_path: Path, other_process: int) -> None:
    me = os.getpid()
    account, customer, nameless = 1_000_001, 2_000_002, 3_000_003
    long_key = "L" * 110 + "-Ω-" + "9" * 30  # more than KEY_MAX bytes: the slot keeps 104 and a digest
    orphan_long = "X" * 200
    assert len(long_key.encode()) > KEY_MAX

    # Owners: a local process (two threads), a remote client's lock server, a second remote client.
    local = Owner(me, 1, 101, me, LOCAL_IP)
    local_t2 = Owner(me, 2, 101, me, LOCAL_IP)
    remote = Owner(other_process, 7, 202, 4242, pack_ip("10.1.2.3"))
    remote6 = Owner(me, 0x0102030405060708, 303, 31337, pack_ip("fd00::17"))
    waiter1 = Owner(other_process, 8, 404, 5151, pack_ip("10.1.2.3"))

    with private_table(tmp_path / "release") as (instance, table, env):
        assert not table.port_owners
        # EX held by the local process, two requests queued behind it (FIFO: 404 then 303).
        held = table.lock(local, account, DEVICE, b"USD163170001", EX)
        assert isinstance(held, Grant)
        bell = table.doorbell()
        q1 = table.lock(waiter1, account, DEVICE, b"USD163170001", PR, wait_token=bell.token)
        q2 = table.lock(remote6, account, DEVICE, b"USD163170001", EX, wait_token=bell.token)
        assert isinstance(q1, Queued) and isinstance(q2, Queued)
        assert q1.holder.pid == me and q1.holder.port == 101
        # PR shared by two owners.
        shared1 = table.lock(remote, customer, DEVICE, "Cüstomer 42".encode(), PR)
        shared2 = table.lock(local_t2, customer, DEVICE, "Cüstomer 42".encode(), PR)
        assert isinstance(shared1, Grant) and isinstance(shared2, Grant) and shared1.value == shared2.value
        # A refused request leaves nothing behind.
        refused = table.lock(remote6, customer, DEVICE, "Cüstomer 42".encode(), EX)
        assert isinstance(refused, Conflict) and refused.holder.port in (202, 101)
        # A long key, named in full by its client's document; another one no document names.
        longest = table.lock(remote, account, DEVICE, long_key.encode(), CR)
        orphan = table.lock(remote6, nameless, DEVICE, orphan_long.encode(), EX)
        # A file that no document names.
        unnamed = table.lock(local, nameless, DEVICE, b"K1", PR)
        assert all(isinstance(g, Grant) for g in (longest, orphan, unnamed))

        info.write(instance, 101, {"pid": me, "ip": "0.0.0.0", "host": "apphost", "server_pid": 0,
                                   "updated": 1.5, "files": [{"path": "/data/FBNK.ACCOUNT", "inode": account},
                                                             {"path": "/data/FBNK.CUSTOMER", "inode": customer}],
                                   "locks": [], "stats": {}, "future_field": [1, 2]})
        info.write(instance, 202, {"pid": 4242, "ip": "10.1.2.3", "host": "remote", "server_pid": other_process,
                                   "updated": 2.5, "files": [],
                                   "locks": [{"path": "/remote/FBNK.ACCOUNT", "inode": account, "key": long_key,
                                              "mode": "CR", "state": "granted"},
                                             {"path": "/remote/FBNK.CUSTOMER", "inode": customer,
                                              "key": "Cüstomer 42", "mode": "PR", "state": "granted"}],
                                   "stats": {}})
        (instance.info_dir / "not-a-port").write_text("not json")  # ignored by readers

        rows = show_item_locks(env)
        assert len(rows) == 6, json.dumps(rows, indent=1)
        expected = [
            row(local, "/data/FBNK.ACCOUNT", "USD163170001", held.value, EX, account, [404, 303], held.token),
            row(local_t2, "/data/FBNK.CUSTOMER", "Cüstomer 42", shared1.value, PR, customer, [], shared2.token),
            row(remote, "/remote/FBNK.ACCOUNT", long_key, longest.value, CR, account, [], longest.token),
            row(remote, "/remote/FBNK.CUSTOMER", "Cüstomer 42", shared1.value, PR, customer, [], shared1.token),
            row(local, f"inode {nameless:08d}", "K1", unnamed.value, PR, nameless, [], unnamed.token),
            row(remote6, f"inode {nameless:08d}", orphan_long[: KEY_MAX - 16] + "...", orphan.value, EX,
                nameless, [], orphan.token),
        ]
        assert sorted(rows, key=_order) == sorted(expected, key=_order)
        assert [(r["filename"], r["key"]) for r in rows] == sorted((r["filename"], r["key"]) for r in rows), \
            "rows not sorted by file name and key"
        for r in rows:
            assert set(r) == set(expected[0]), f"fields of a row: {sorted(r)}"

        # The selections work on the same data.
        assert [r["port"] for r in show_item_locks(env, "--port", "404")] == [101]
        assert {r["key"] for r in show_item_locks(env, "--file", "CUSTOMER")} == {"Cüstomer 42"}
        assert [r["key"] for r in show_item_locks(env, "--key", long_key)] == [long_key]

        # Once the holder lets go and the first waiter is granted, the display follows.
        table.unlock(held.handle)
        granted = table.retry(q1.handle)
        assert isinstance(granted, Grant)
        after = [r for r in show_item_locks(env) if r["key"] == "USD163170001"]
        assert after == [row(waiter1, f"inode {account:08d}", "USD163170001", held.value, PR, account, [303],
                             granted.token)]

        assert table.cancel(q2.handle)
        bell.close()


def _order(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["filename"], r["key"], r["port"], r["pid"], r["thread"]


def test_port_owner_table_is_read_by_show_item_locks(tmp_path: Path, other_process: int) -> None:
    """A jdls -P table: a lock belongs to (port, thread), whichever process asks for it."""
    me = os.getpid()
    before = Owner(other_process, 3, 700, 777, pack_ip("10.1.2.3"))
    reconnected = Owner(me, 3, 700, 778, pack_ip("10.1.2.3"))  # the same client through a new lock server
    stranger = Owner(me, 3, 701, 779, pack_ip("10.1.2.3"))
    inode = 4_000_004
    with private_table(tmp_path / "release-p", flags=TableFlag.PORT_OWNERS) as (instance, table, env):
        assert table.port_owners
        first = table.lock(before, inode, DEVICE, b"P-KEY", PR)
        again = table.lock(reconnected, inode, DEVICE, b"P-KEY", EX)  # the same owner: a conversion
        other = table.lock(stranger, inode, DEVICE, b"P-KEY", PR)
        assert isinstance(first, Grant) and isinstance(again, Grant) and again.handle == first.handle
        assert isinstance(other, Conflict) and other.holder.port == 700
        info.write(instance, 700, {"pid": 777, "files": [{"path": "/p/FILE", "inode": inode}], "locks": []})
        rows = show_item_locks(env)
        assert rows == [row(before, "/p/FILE", "P-KEY", first.value, EX, inode, [], again.token)]


def test_long_key_cut_inside_a_character_is_still_named_in_full(tmp_path: Path) -> None:
    """A long key keeps its first KEY_MAX - 16 bytes in the slot; when that cut falls inside a
    multi-byte UTF-8 character, show-item-locks must still find the full key in the client's
    document (as it does for any other long key) and show it, and --key must select it."""
    me = os.getpid()
    owner = Owner(me, 1, 111, me, LOCAL_IP)
    inode = 5_000_005
    cut = KEY_MAX - 16
    key = "A" * (cut - 1) + "Ω" + "-TAIL" * 5  # the slot's prefix ends with Ω's first byte
    assert len(key.encode()) > KEY_MAX and not key.encode()[:cut].decode("utf-8", "ignore").endswith("Ω")
    with private_table(tmp_path / "release") as (instance, table, env):
        granted = table.lock(owner, inode, DEVICE, key.encode(), EX)
        assert isinstance(granted, Grant)
        info.write(instance, 111, {"pid": me, "files": [],
                                   "locks": [{"path": "/data/F", "inode": inode, "key": key, "mode": "EX"}]})
        rows = show_item_locks(env)
        assert [r["key"] for r in rows] == [key], "the long key is not shown in full"
        assert [r["filename"] for r in rows] == ["/data/F"]
        assert len(show_item_locks(env, "--key", key)) == 1


def dls_dump(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run([str(DLS_DUMP), "--json", *args], env=env, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"dls-dump exited {result.returncode}: {result.stderr}"
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize("flags", [TableFlag.NONE, TableFlag.PORT_OWNERS | TableFlag.TIMESTAMPS],
                         ids=["pid-owners", "port-owners-timestamps"])
def test_dls_dump_reads_what_dls_shm_wrote(tmp_path: Path, other_process: int, flags: TableFlag) -> None:
    if not DLS_DUMP.exists():
        pytest.fail(f"{DLS_DUMP} is not installed (pip install -e packages/dls-utils)")
    me = os.getpid()
    holder = Owner(other_process, 5, 801, 9001, pack_ip("10.9.8.7"))
    waiter_a = Owner(me, 1, 802, me, LOCAL_IP)
    waiter_b = Owner(me, 2, 803, me, pack_ip("fd00::17"))
    long_key = ("Z" * 130).encode()
    with private_table(tmp_path / "release", flags=flags) as (instance, table, env):
        held = table.lock(holder, 11, DEVICE, b"R1", EX)
        shared = table.lock(waiter_a, 12, DEVICE, long_key, PR)
        bell = table.doorbell()
        qa = table.lock(waiter_a, 11, DEVICE, b"R1", PR, wait_token=bell.token)
        qb = table.lock(waiter_b, 11, DEVICE, b"R1", CR, wait_token=bell.token)
        assert isinstance(held, Grant) and isinstance(shared, Grant)
        assert isinstance(qa, Queued) and isinstance(qb, Queued)

        doc = dls_dump(env)
        header = table.header()
        assert doc["instance"] == str(instance.root)
        assert doc["key"] == f"0x{instance.key:08x}"
        assert doc["shm_id"] == table.shm_id
        assert doc["semaphore_ids"] == list(table.semaphore_ids)
        for name, value in header._asdict().items():
            expected = value.decode("ascii") if isinstance(value, bytes) else value
            assert doc["header"][name] == expected, f"header field {name}"
        assert doc["header"]["flag_names"] == [f.name for f in TableFlag if f and flags & f]
        assert doc["geometry"] == {"ngroups": table.geometry.ngroups, "per_group": table.geometry.per_group,
                                   "locks": table.geometry.ngroups * table.geometry.per_group}
        assert doc["counts"]["used"] == 4 and doc["counts"]["granted"] == 2 and doc["counts"]["waiting"] == 2
        assert 1 <= doc["counts"]["max_in_group"] <= 4
        assert doc["processes"] == {"monitor": {"pid": 0, "active": False}, "listener": {"pid": 0, "active": False}}
        owners = "PORT number" if flags & TableFlag.PORT_OWNERS else "THREAD id"
        assert owners in doc["mechanism"]
        assert ("time stamped" in doc["mechanism"]) == bool(flags & TableFlag.TIMESTAMPS)

        by_port = {}
        for slot in doc["slots"]:
            assert slot["port"] not in by_port or slot["port"] == 802
            by_port.setdefault(slot["port"], []).append(slot)
        # Each slot is the entry dls-shm gives for it, plus its ticket, the ports waiting for it and the mode a
        # conversion's owner holds.
        scanned = {e.index: e for e in table.scan()}
        assert sorted(s["index"] for s in doc["slots"]) == sorted(scanned)
        for slot in doc["slots"]:
            entry = scanned[slot["index"]]
            expected = {**info.entry_json(entry), "ticket": entry.slot.ticket}
            assert {k: slot[k] for k in expected} == expected
            assert set(slot) == {*expected, "waiters", "held_mode"}
        (h,) = by_port[801]
        assert (h["state"], h["mode"], h["pid"], h["client_pid"], h["thread"], h["ip"], h["inode"], h["device"],
                h["key"], h["long_key"], h["value"], h["queued"], h["waiters"]) == (
                "granted", "EX", other_process, 9001, 5, "10.9.8.7", 11, DEVICE, "R1", False, held.value, 2,
                [802, 803])
        (b,) = by_port[803]
        assert (b["state"], b["mode"], b["ip"], b["thread"], b["waiters"], b["value"]) == (
            "waiting", "CR", "fd00::17", 2, [], held.value)
        a_slots = {s["state"]: s for s in by_port[802]}
        assert a_slots["waiting"]["mode"] == "PR" and a_slots["waiting"]["ip"] == "0.0.0.0"
        assert a_slots["granted"]["long_key"] is True and a_slots["granted"]["value"] == shared.value
        assert a_slots["granted"]["key"].startswith("Z" * (KEY_MAX - 16))
        assert a_slots["granted"]["waiters"] == []

        assert table.cancel(qa.handle) and table.cancel(qb.handle)
        bell.close()
