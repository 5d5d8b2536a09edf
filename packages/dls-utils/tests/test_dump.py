"""dls-dump against real tables and a real jdls: the same text as ``jdls -dvL`` for the same table."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from dls_shm import LOCAL_IP, Doorbell, Grant, Instance, LockTable, Owner, Queued, modes, pack_ip, resource_value
from dls_utils.dump import get_parser

pytestmark = pytest.mark.slow
ME = os.getpid()
INODE = 1483651


def dump(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dls_utils.dump", *args], env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


#: The header lines a monitor's tick changes (once a second under load, between any two of the commands).
TICKING = ("Time last ran", "CPU Usage")


#: A lock's age (-T), the last column of its row: it grows by a second between two commands of a busy machine.
AGE = re.compile(r"\t\d+:\d\d(:\d\d)?$")


def untick(text: str) -> str:
    """``text`` with the values of the lines a monitor's tick changes, and the locks' ages, blanked."""
    return "\n".join(line.split(":", 1)[0] + ": (tick)" if line.startswith(TICKING) else AGE.sub("\t(age)", line)
                     for line in text.split("\n"))


def same_as_jdls(daemon: Any, jdls_args: tuple[str, ...] = ("-dvL",), dump_args: tuple[str, ...] = ()) -> str:
    """dls-dump's text, which must equal jdls's printed just before or after it (the monitor may
    tick, and ages grow, in between: a few tries; on a machine so busy that the monitor ticks within every
    try, equal but for the lines its tick changes)."""
    for _ in range(5):
        before = daemon.jdls(*jdls_args)
        ours = dump(*dump_args)
        after = daemon.jdls(*jdls_args)
        assert before.returncode == ours.returncode == 0, (before.stderr, ours.stderr)
        if ours.stdout in (before.stdout, after.stdout):
            return ours.stdout
    assert untick(ours.stdout) in (untick(before.stdout), untick(after.stdout)), "\n".join(difflib.unified_diff(
        untick(after.stdout).split("\n"), untick(ours.stdout).split("\n"), "jdls -dvL", "dls-dump", lineterm=""))
    return ours.stdout


@pytest.fixture
def bells() -> Iterator[list[Doorbell]]:
    made: list[Doorbell] = []
    yield made
    for bell in made:
        bell.close()


def fill(instance: Instance, bells: list[Doorbell]) -> None:
    """Three held locks, a read lock and two waiters, in the instance's table."""
    table = LockTable.attach(instance.key)
    try:
        for thread, port, ip, key, mode in ((1, 2, LOCAL_IP, b"32549", modes.EX),
                                            (2, 1000, pack_ip("10.44.1.55"), b"33537", modes.EX),
                                            (3, 4, pack_ip("127.0.0.1"), b"USD163170001", modes.EX),
                                            (4, 9, LOCAL_IP, b"CUST1", modes.PR)):
            assert isinstance(table.lock(Owner(ME, thread, port, 15000 + port, ip), INODE, -1, key, mode), Grant)
        for thread, port in ((7, 7), (8, 8)):
            bells.append(Doorbell())
            waiter = Owner(ME, thread, port, 7000 + port, pack_ip("10.44.1.60"))
            queued = table.lock(waiter, INODE, -1, b"33537", modes.EX, wait_token=bells[-1].token)
            assert isinstance(queued, Queued)
    finally:
        table.close()


@pytest.mark.parametrize("options", [(), ("-P",), ("-P", "-T")], ids=["pid", "port", "port-timestamps"])
def test_the_text_of_jdls_dvL(daemon: Any, bells: list[Doorbell], options: tuple[str, ...]) -> None:
    daemon.start(*options)
    fill(daemon.instance, bells)
    text = same_as_jdls(daemon)
    lines = text.splitlines()
    assert lines[0].endswith(" - Active") and lines[1].endswith(" - Active")
    assert "Record locks outstanding" in lines
    assert lines[-1] == " " * 24 + "2 requests waiting"
    rows = [line.split("\t") for line in lines if line.count("\t") >= 9]
    assert rows[0][:10] == ["Group", "value", "pid", "type", "port", "i-node", "dev", "queued", "ipaddr", "key"]
    assert ("age" in rows[0]) == ("-T" in options)
    assert len(rows) == 7
    value = f"0x{resource_value(INODE, -1, b'33537'):08x}"
    held = next(r for r in rows if r[9] == "33537" and r[7] != "waiting")
    assert held[1:8] == [value, str(ME), "WRITE", "1000", f"{INODE:08d}", "-1", "2"]
    mechanism = next(line for line in lines if line.startswith("Locking mechanism:"))
    assert ("PORT number" in mechanism) == ("-P" in options)
    # -v: as jdls -dvvL, with the IPC key and shared memory id.
    very = same_as_jdls(daemon, ("-dvvL",), ("-v",))
    assert f"IPC key:                0x{daemon.instance.key:08x}" in very.splitlines()


def test_a_stopped_service_and_another_key(daemon: Any, bells: list[Doorbell], tmp_path: Any) -> None:
    daemon.start()
    fill(daemon.instance, bells)
    stopped = daemon.jdls("-k")  # the table stays, the monitor and listener go
    assert stopped.returncode == 0, stopped.stderr
    text = same_as_jdls(daemon)
    assert text.splitlines()[:2] == [
        f"Lock monitor at pid:    {next_pid(text, 0)} - Inactive",
        f"Lock listener at pid:   {next_pid(text, 1)} - Inactive",
    ]
    # --key from anywhere: the header's pids (not running) with the same table.
    elsewhere = {**os.environ, "JBCRELEASEDIR": str(tmp_path / "elsewhere")}
    other = dump("--key", f"0x{daemon.instance.key:08x}", env=elsewhere)
    assert other.returncode == 0, other.stderr
    assert other.stdout == text


def next_pid(text: str, line: int) -> int:
    return int(text.splitlines()[line].split(":")[1].split()[0])


def test_json(daemon: Any, bells: list[Doorbell]) -> None:
    daemon.start("-P")
    fill(daemon.instance, bells)
    done = dump("--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["key"] == f"0x{daemon.instance.key:08x}" and doc["instance"] == str(daemon.instance.root)
    assert doc["header"]["flag_names"] == ["PORT_OWNERS"] and doc["header"]["magic"] == "DLSTABLE"
    assert doc["geometry"]["locks"] == doc["geometry"]["ngroups"] * doc["geometry"]["per_group"]
    assert doc["counts"] == {"used": 6, "granted": 4, "kept": 0, "waiting": 2, "converting": 0, "refused": 0,
                             "max_in_group": doc["counts"]["max_in_group"]}
    assert doc["processes"]["monitor"]["active"] and doc["processes"]["listener"]["active"]
    by_port = {s["port"]: s for s in doc["slots"]}
    assert by_port[1000]["waiters"] == [7, 8] and by_port[1000]["state"] == "granted"
    assert (by_port[1000]["ip"], by_port[1000]["client_pid"], by_port[1000]["mode"]) == ("10.44.1.55", 16000, "EX")
    assert by_port[9]["mode"] == "PR" and by_port[9]["waiters"] == []
    assert by_port[7]["state"] == "waiting" and by_port[7]["waiters"] == []
    assert {s["inode"] for s in doc["slots"]} == {INODE} and {s["device"] for s in doc["slots"]} == {-1}
    for name in ("state", "key", "inode", "device", "pid", "port", "client_pid", "thread", "ip", "mode", "value",
                 "waiters"):
        assert all(name in s for s in doc["slots"])


def test_no_table(clean_env: Instance) -> None:
    done = dump()
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"dls-dump: there is no lock table with key 0x{clean_env.key:08x} "
                                  f"(JBCRELEASEDIR={clean_env.root})")
    assert dump("--key", "nope").returncode == 2
    assert "exit status" in get_parser().format_help()
