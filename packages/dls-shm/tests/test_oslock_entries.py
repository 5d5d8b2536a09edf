"""OS file locks as lock entries (``oslock_entries``): real fcntl locks, read back from /proc/locks.

The locks are taken by OsLocks in this process and in a forked child; the
documents are proc/info documents as a local process (pid = the holder) or a
lock server (server_pid = the holder) writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from dls_shm import OsLocks, Owner, key_offset, oslocks_held, resource_value
from dls_shm.layout import LOCAL_IP
from dls_shm.oslock_entries import entries_of, lock_file_ids
from dls_testkit import Children, Pipe

INODE, DEVICE = 0x2345, -1
EX, PR = 5, 3


def doc(port: int, pid: int, ip: str, locks: list[tuple[str, str, str]], server_pid: int = 0) -> dict[str, object]:
    return {"port": port, "pid": pid, "ip": ip, "server_pid": server_pid, "updated": 1.0,
            "files": [{"path": "/d/FBNK.ACCOUNT", "inode": INODE}],
            "locks": [{"path": "/d/FBNK.ACCOUNT", "inode": INODE, "key": key, "mode": mode, "state": state,
                       "thread": 7} for key, mode, state in locks]}


def test_lock_file_names_give_inode_and_device() -> None:
    assert lock_file_ids("jlock_00002345_ffffffff") == (INODE, -1)
    assert lock_file_ids("jlock_00002345_00000803") == (INODE, 0x803)
    assert lock_file_ids("jlock_zz_1") is None and lock_file_ids("other") is None


def test_held_locks_are_joined_with_their_holders_documents(tmp_path: Path) -> None:
    me = os.getpid()
    locks = OsLocks(tmp_path / "jbase")
    try:
        mine = locks.lock(Owner(me, 1, 2, me, LOCAL_IP), INODE, DEVICE, b"32549", EX)
        shared = locks.lock(Owner(me, 1, 2, me, LOCAL_IP), INODE, DEVICE, b"READ-ME", PR)
        unexplained = locks.lock(Owner(me, 1, 2, me, LOCAL_IP), INODE, DEVICE, b"NOBODY-SAYS", EX)
        assert all(hasattr(g, "handle") for g in (mine, shared, unexplained))
        held = oslocks_held(tmp_path / "jbase")
        assert {(h.pid, h.write, h.start) for h in held} >= {
            (me, True, key_offset(b"32549")), (me, False, key_offset(b"READ-ME"))}

        documents = [
            doc(2, me, "0.0.0.0", [("32549", "EX", "held"), ("READ-ME", "PR", "held")]),
            # a lock server's client, waiting for 32549 (no table: the waiter shows)
            doc(1000, 4242, "10.44.1.55", [("32549", "EX", "waiting")], server_pid=4243),
        ]
        entries = entries_of(tmp_path / "jbase", documents, waiting=True)
        by_key = {e["key"]: e for e in entries if e["state"] == "granted"}
        assert set(by_key) == {"32549", "READ-ME", f"(byte {key_offset(b'NOBODY-SAYS')})"}
        e = by_key["32549"]
        assert (e["state"], e["mode"], e["pid"], e["port"], e["ip"], e["client_pid"], e["inode"], e["device"]) == (
            "granted", "EX", me, 2, "0.0.0.0", me, INODE, DEVICE)
        assert e["value"] == resource_value(INODE, DEVICE, b"32549")
        assert by_key["READ-ME"]["mode"] == "PR"
        nobody = by_key[f"(byte {key_offset(b'NOBODY-SAYS')})"]
        assert (nobody["port"], nobody["ip"], nobody["value"]) == (0, "-", 0)
        waiter = next(e for e in entries if e["state"] == "waiting")
        assert (waiter["port"], waiter["ip"], waiter["pid"], waiter["value"]) == (
            1000, "10.44.1.55", 4243, resource_value(INODE, DEVICE, b"32549"))
        assert not any(e["state"] == "waiting" for e in entries_of(tmp_path / "jbase", documents, waiting=False))
    finally:
        locks.close()


def test_a_holder_without_document_is_named_by_a_waiters_key(tmp_path: Path, children: Children,
                                                             pipes: Callable[[], Pipe]) -> None:
    """Another process holds the lock and has published nothing; a waiter's document names the key."""
    locked, release = pipes(), pipes()

    def child() -> int:
        locks = OsLocks(tmp_path / "jbase")
        locks.lock(Owner(os.getpid(), 1, 9, os.getpid(), LOCAL_IP), INODE, DEVICE, b"33537", EX)
        locked.send()
        release.recv(timeout=60)
        locks.close()
        return 0

    pid = children.fork(child)
    locked.recv()
    try:
        documents = [doc(1001, 5000, "127.0.0.1", [("33537", "EX", "waiting")], server_pid=5001)]
        entries = entries_of(tmp_path / "jbase", documents, waiting=True)
        holder = next(e for e in entries if e["state"] == "granted")
        assert (holder["pid"], holder["key"], holder["port"], holder["ip"]) == (pid, "33537", 0, "-")
        assert holder["value"] == resource_value(INODE, DEVICE, b"33537")
    finally:
        release.send()
        assert children.wait(pid) == 0
