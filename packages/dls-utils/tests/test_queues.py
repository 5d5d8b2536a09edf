"""Issue 14 item 6: show-item-locks (local and from the service) and dls-dump show each resource's queues.

A real jdls of the test's instance, and in its table (taken directly with dls_shm, owners of this live
process): resource R1 with two PR holders (the first granted by a hand-off from an EX holder that released
it with "invalidate", so its value block is not valid), the first converting to EX (the convert queue) and a
newer EX request waiting; resource R2 with two PR holders both converting to EX (a conversion deadlock: one
conversion is refused, the other waits). Each tool's text and JSON must show every request's state, mode
(a conversion's held and wanted), the fencing tokens and the block's validity; the default layouts (the
jDLS guide's) must not change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from dls_proto.text import amount
from dls_shm import LOCAL_IP, Doorbell, Grant, LockTable, Owner, Queued, SlotState, modes, pack_ip, resource_value
from dls_testkit import Service, wait_for
from dls_utils.show_item_locks import main

pytestmark = pytest.mark.slow
ME = os.getpid()
INODE = 1483651
PR, EX = modes.PR, modes.EX
X = Owner(ME, 1, 11, 15011, LOCAL_IP)  # EX holder of R1, releases it invalidated
A = Owner(ME, 2, 12, 15012, LOCAL_IP)  # PR holder of R1, converts to EX
B = Owner(ME, 3, 13, 15013, pack_ip("10.44.1.55"))  # PR holder of R1
C = Owner(ME, 4, 14, 15014, pack_ip("127.0.0.1"))  # EX waiter of R1
D = Owner(ME, 5, 15, 15015, LOCAL_IP)  # PR holders of R2, both converting to EX
E = Owner(ME, 6, 16, 15016, LOCAL_IP)
QUEUE_HEADINGS = "IPADDR\tPORT\tPID\tFILENAME\tRECORD KEY\tLOCK#\tPORT/-PID\tSTATE\tMODE\tTOKEN\tBLOCK"


@dataclass
class Scene:
    tokens: dict[int, int]  # a holder's port: its fencing token
    refused: int  # the port whose conversion was refused on R2
    converting: int  # the other
    server: str


def lock_no(key: bytes, letter: str) -> str:
    return f"0x{resource_value(INODE, -1, key):08x},{letter}"


@pytest.fixture
def scene(daemon: Service) -> Iterator[Scene]:
    daemon.start()
    bells = [Doorbell() for _ in range(5)]
    table = LockTable.attach(daemon.instance.key)
    try:
        x = table.lock(X, INODE, -1, b"R1", EX)
        assert isinstance(x, Grant)
        qa = table.lock(A, INODE, -1, b"R1", PR, wait_token=bells[0].token)
        assert isinstance(qa, Queued)
        table.unlock(x.handle, invalidate=True)  # an EX holder's release while A's request exists: not valid
        ga = table.retry(qa.handle)
        gb = table.lock(B, INODE, -1, b"R1", PR)
        assert isinstance(ga, Grant) and isinstance(gb, Grant)
        assert isinstance(table.convert(ga.handle, EX, wait_token=bells[1].token), Queued)
        assert isinstance(table.lock(C, INODE, -1, b"R1", EX, wait_token=bells[2].token), Queued)
        gd = table.lock(D, INODE, -1, b"R2", PR)
        ge = table.lock(E, INODE, -1, b"R2", PR)
        assert isinstance(gd, Grant) and isinstance(ge, Grant)
        assert isinstance(table.convert(gd.handle, EX, wait_token=bells[3].token), Queued)
        assert isinstance(table.convert(ge.handle, EX, wait_token=bells[4].token), Queued)
        table.break_deadlocks()  # the monitor may have done it already
        wait_for(lambda: any(e.slot.state == SlotState.DEADLOCK for e in table.scan()), what="a refused request")
        refused = [e.slot.port for e in table.scan() if e.slot.state == SlotState.DEADLOCK]
        assert len(refused) == 1, refused
        tokens = {12: ga.token, 13: gb.token, 15: gd.token, 16: ge.token}
        yield Scene(tokens, refused[0], ({15, 16} - set(refused)).pop(), f"127.0.0.1,{daemon.port}")
    finally:
        table.close()
        for bell in bells:
            bell.close()


def show(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(list(argv)) == 0
    out, err = capsys.readouterr()
    assert not err
    return out.splitlines()


def test_show_item_locks_queues(scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    t = scene.tokens
    r1, r2 = lock_no(b"R1", "R"), lock_no(b"R2", "R")
    name = f"inode {INODE:08d}"
    # The default layout is the guide's: the held locks, their waiters (the conversions among them) in order.
    assert show(capsys, "--local")[2:] == [
        "IPADDR\tPORT\tPID\tFILENAME\tRECORD KEY\tLOCK#\tPORT/-PID",
        f"0.0.0.0\t12\t{ME}\t{name}\tR1\t{r1}\t12,14",
        f"10.44.1.55\t13\t{ME}\t{name}\tR1\t{r1}\t12,14",
        f"0.0.0.0\t15\t{ME}\t{name}\tR2\t{r2}\t{scene.converting}",
        f"0.0.0.0\t16\t{ME}\t{name}\tR2\t{r2}\t{scene.converting}",
    ]
    # --queues: every request, in queue order, with its state, mode, token and the block's validity.
    c, f = scene.converting, scene.refused
    expected = [
        QUEUE_HEADINGS,
        f"0.0.0.0\t12\t{ME}\t{name}\tR1\t{r1}\t12,14\tgranted\tPR\t{t[12]}\tnot valid",
        f"10.44.1.55\t13\t{ME}\t{name}\tR1\t{r1}\t12,14\tgranted\tPR\t{t[13]}\tnot valid",
        f"0.0.0.0\t12\t{ME}\t{name}\tR1\t{lock_no(b'R1', 'W')}\tconverting\tconverting\tPR->EX\t-\tnot valid",
        f"127.0.0.1\t14\t{ME}\t{name}\tR1\t{lock_no(b'R1', 'W')}\twaiting\twaiting\tEX\t-\tnot valid",
        f"0.0.0.0\t15\t{ME}\t{name}\tR2\t{r2}\t{c}\tgranted\tPR\t{t[15]}\tvalid",
        f"0.0.0.0\t16\t{ME}\t{name}\tR2\t{r2}\t{c}\tgranted\tPR\t{t[16]}\tvalid",
        f"0.0.0.0\t{c}\t{ME}\t{name}\tR2\t{lock_no(b'R2', 'W')}\tconverting\tconverting\tPR->EX\t-\tvalid",
        f"0.0.0.0\t{f}\t{ME}\t{name}\tR2\t{lock_no(b'R2', 'W')}\trefused\trefused\tPR->EX\t-\tvalid",
    ]
    assert show(capsys, "--local", "-q")[2:] == expected
    # The same from the service's snapshot: one path for both.
    assert show(capsys, "--server", scene.server, "--queues")[2:] == expected

    local = json.loads("\n".join(show(capsys, "--local", "--queues", "--json")))
    assert json.loads("\n".join(show(capsys, "--server", scene.server, "--queues", "--json"))) == local
    fields = [(r["key"], r["port"], r["state"], r["mode"], r["held_mode"], r["converting"], r["token"],
               r["block_valid"]) for r in local]
    assert fields == [
        ("R1", 12, "granted", "PR", None, False, t[12], False),
        ("R1", 13, "granted", "PR", None, False, t[13], False),
        ("R1", 12, "converting", "EX", "PR", True, None, False),
        ("R1", 14, "waiting", "EX", None, False, None, False),
        ("R2", 15, "granted", "PR", None, False, t[15], True),
        ("R2", 16, "granted", "PR", None, False, t[16], True),
        ("R2", c, "converting", "EX", "PR", True, None, True),
        ("R2", f, "refused", "EX", "PR", True, None, True),
    ]
    # Without --queues the JSON rows are the held locks, with the new fields.
    held = json.loads("\n".join(show(capsys, "--local", "--json")))
    assert [(r["port"], r["state"], r["token"], r["block_valid"], r["waiters"]) for r in held] == [
        (12, "granted", t[12], False, [12, 14]), (13, "granted", t[13], False, [12, 14]),
        (15, "granted", t[15], True, [c]), (16, "granted", t[16], True, [c])]
    # --port with --queues: that port's requests, and the held locks it waits for.
    assert [(r["port"], r["state"]) for r in json.loads("\n".join(show(capsys, "--local", "-q", "--json",
                                                                        "--port", "14")))] == [
        (12, "granted"), (13, "granted"), (14, "waiting")]


def dump(daemon: Service, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dls_utils.dump", *args], env=daemon.env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dls_dump_queues(daemon: Service, scene: Scene) -> None:
    t, c, f = scene.tokens, scene.converting, scene.refused
    indent = " " * 24
    summary = [f"{indent}3 requests waiting", f"{indent}2 of them converting a lock held",
               f"{indent}{amount(1, 'request')} refused to break a deadlock"]
    # jdls -dvL and dls-dump: the rows as before (a refused request says so where a waiter says "waiting"),
    # the summary ends with the conversions and the refused; no queues section.
    for text in (daemon.jdls("-dvL").stdout, dump(daemon)):
        lines = text.splitlines()
        assert lines[-3:] == summary
        assert "Resource queues" not in lines
        rows = [line.split("\t") for line in lines if line.count("\t") >= 9][1:]
        assert sorted((int(r[4]), r[3], r[7]) for r in rows) == sorted([
            (12, "READ", "2"), (13, "READ", "2"), (12, "WRITE", "waiting"), (14, "WRITE", "waiting"),
            (15, "READ", "2"), (16, "READ", "2"), (c, "WRITE", "waiting"), (f, "WRITE", "refused")]), rows
    # --queues: a section after the summary, a line per resource.
    lines = dump(daemon, "--queues").splitlines()
    at = lines.index("Resource queues")
    assert lines[at - 4:at - 1] == summary and lines[at + 1] == ""
    assert lines[at + 2] == "Group\tvalue\ti-node\tdev\tkey\tblock\tgranted\tconverting\twaiting\trefused"
    by_key = {line.split("\t")[4]: line.split("\t") for line in lines[at + 3:]}
    assert set(by_key) == {"R1", "R2"}
    v1, v2 = resource_value(INODE, -1, b"R1"), resource_value(INODE, -1, b"R2")
    assert by_key["R1"][1:] == [f"0x{v1:08x}", f"{INODE:08d}", "-1", "R1", "not valid",
                                f"12 PR #{t[12]}, 13 PR #{t[13]}", "12 PR->EX", "14 EX", "-"]
    assert by_key["R2"][1:] == [f"0x{v2:08x}", f"{INODE:08d}", "-1", "R2", "valid",
                                f"15 PR #{t[15]}, 16 PR #{t[16]}", f"{c} PR->EX", "-", f"{f} PR->EX"]
    ngroups = int(next(line for line in lines if line.startswith("Record locks:")).split(" in ")[1].split()[0])
    assert (by_key["R1"][0], by_key["R2"][0]) == (str(v1 % ngroups), str(v2 % ngroups))

    doc: dict[str, Any] = json.loads(dump(daemon, "--json"))
    assert (doc["counts"]["waiting"], doc["counts"]["converting"], doc["counts"]["refused"]) == (3, 2, 1)
    slots = sorted((s["key"], s["port"], s["request"], s["state"], s["mode"], s["held_mode"], s["converting"],
                    s["token"] if s["request"] == "granted" else None, s["block_valid"]) for s in doc["slots"])
    assert slots == sorted([
        ("R1", 12, "granted", "granted", "PR", None, False, t[12], False),
        ("R1", 13, "granted", "granted", "PR", None, False, t[13], False),
        ("R1", 12, "converting", "waiting", "EX", "PR", True, None, False),
        ("R1", 14, "waiting", "waiting", "EX", None, False, None, False),
        ("R2", 15, "granted", "granted", "PR", None, False, t[15], True),
        ("R2", 16, "granted", "granted", "PR", None, False, t[16], True),
        ("R2", c, "converting", "waiting", "EX", "PR", True, None, True),
        ("R2", f, "refused", "deadlock", "EX", "PR", True, None, True),
    ])
