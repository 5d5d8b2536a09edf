"""dls_shm.occupancy: which processes of an instance run, who has its table attached, what blocks removing it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import sysv_ipc
from dls_shm import (
    LABELS,
    LISTENER,
    MONITOR,
    Header,
    Instance,
    IpcObject,
    LockTable,
    Occupancy,
    Occupant,
    Refusal,
    command_line,
    ipc_key_for,
    pidfiles,
    running_role,
    running_servers,
    service_processes,
)
from dls_shm.occupancy import COMMAND_WIDTH


def _instance(tmp_path: Path, key: int = 1) -> Instance:
    return Instance(tmp_path / "release", key)


def _stale(pid: int) -> pidfiles.PidRecord:
    """A record with this pid but another start time: a process that has gone, its pid reused."""
    return pidfiles.PidRecord(pid, psutil.Process(pid).create_time() + 10)


def test_servers_read_only_leave_stale_files_tidy_removes_them(tmp_path: Path) -> None:
    instance = _instance(tmp_path)
    me = pidfiles.record_of(os.getpid())
    pidfiles.write(instance.server_pid_file(me.pid), me)
    pidfiles.write(instance.server_pid_file(me.pid + 1), me)  # live, under another pid's name: not listed
    stale = instance.server_pid_file(os.getppid())
    pidfiles.write(stale, _stale(os.getppid()))
    for tidy in (False, True):
        (server,) = running_servers(instance, tidy=tidy)
        assert (server.label, server.pid, server.record) == ("lock server", me.pid, me)
        assert str(server) == f"lock server (pid {me.pid})" and server.alive()
        assert stale.exists() is not tidy
    assert instance.server_pid_file(me.pid + 1).exists()  # alive: never removed
    assert running_servers(_instance(tmp_path / "none"), tidy=True) == []


def test_roles_read_only_and_tidy(tmp_path: Path) -> None:
    instance = _instance(tmp_path)
    me = pidfiles.record_of(os.getpid())
    pidfiles.write(instance.pid_file(MONITOR), me)
    pidfiles.write(instance.pid_file(LISTENER), _stale(os.getppid()))
    for tidy in (False, True):
        monitor = running_role(instance, MONITOR, tidy=tidy)
        assert monitor is not None and str(monitor) == f"{LABELS[MONITOR]} (pid {me.pid})"
        assert running_role(instance, LISTENER, tidy=tidy) is None
        assert instance.pid_file(LISTENER).exists() is not tidy


def test_a_locked_pid_file_counts_while_its_holder_lives(tmp_path: Path, children: Any, pipes: Any) -> None:
    """Read only, the lock is the last word: a holder that has not written its record yet still runs."""
    instance = _instance(tmp_path)
    path = instance.pid_file(LISTENER)
    path.parent.mkdir(parents=True)
    path.write_text("")
    locked, done = pipes(), pipes()

    def hold() -> None:  # a lock of this process would not conflict with its own test: a child holds it
        fcntl.lockf(os.open(path, os.O_RDWR), fcntl.LOCK_EX)
        locked.send()
        done.recv(timeout=30)

    pid = children.fork(hold)
    locked.recv()
    listener = running_role(instance, LISTENER, tidy=False)
    assert listener is not None and listener.pid == pid and listener.record is None
    assert listener.alive()
    done.send()
    assert children.wait(pid) == 0
    assert not listener.alive()
    assert running_role(instance, LISTENER, tidy=False) is None and path.exists()


def test_service_processes_from_pid_files_or_the_header(tmp_path: Path) -> None:
    instance = _instance(tmp_path)
    pidfiles.write(instance.pid_file(MONITOR), pidfiles.record_of(os.getpid()))
    assert service_processes(instance, None, tidy=False) == {"monitor": (os.getpid(), True), "listener": (0, False)}
    header = Header._make(0 for _ in Header._fields)._replace(monitor_pid=os.getppid(), listener_pid=2**22 + 1)
    assert service_processes(instance, header, tidy=True) == {
        "monitor": (os.getpid(), True), "listener": (2**22 + 1, False)}
    assert service_processes(instance, header, tidy=False, pid_files=False) == {
        "monitor": (os.getppid(), True), "listener": (2**22 + 1, False)}


def test_a_table_nobody_else_has_attached(tmp_path: Path, make_table: Callable[..., LockTable]) -> None:
    table = make_table()  # this process has it attached: it never counts
    instance = _instance(tmp_path, table.key)
    found = Occupancy.survey(instance, tidy=False)
    assert found.shm is not None and found.shm.id == table.shm_id and found.shm.nattch == 1
    assert found.sem is not None and found.sem.id == table.semaphore_ids[0]
    assert (found.roles, found.servers, found.attached, found.others, found.unidentified) == ((), (), (), 0, 0)
    assert found.forbidden is None and found.lone is None and not found.missing
    assert found.shm.uid == os.geteuid()


def test_attached_processes_are_named(
    tmp_path: Path, make_table: Callable[..., LockTable], children: Any, pipes: Any,
) -> None:
    table = make_table()
    attached, done = pipes(), pipes()

    def attach() -> None:  # the table is inherited: one more attachment
        attached.send()
        done.recv(timeout=30)

    pid = children.fork(attach)
    attached.recv()
    found = Occupancy.survey(_instance(tmp_path, table.key), tidy=False)
    assert found.shm is not None and found.shm.nattch == 2  # the child and this process, which never counts
    assert found.attached == (pid,) and found.others == 1 and found.unidentified == 0
    assert command_line(pid) == command_line(os.getpid())  # a forked child: our command line
    done.send()
    assert children.wait(pid) == 0


def test_no_table_one_object_and_another_users_table(
    tmp_path: Path, make_table: Callable[..., LockTable], monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = ipc_key_for(tmp_path / "no table")
    found = Occupancy.survey(_instance(tmp_path, key), tidy=True)
    assert found.missing and found.lone is None and found.others == 0
    sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 1)
    try:
        found = Occupancy.survey(_instance(tmp_path, key), tidy=False)
        assert not found.missing and found.lone is not None
        assert (found.lone.kind, found.lone.id) == ("sem", sem.id)
    finally:
        sem.remove()
    table = make_table()
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    found = Occupancy.survey(_instance(tmp_path, table.key), tidy=False)
    assert found.forbidden is not None and found.forbidden.kind == "shm"


def test_who_may_remove_an_ipc_object() -> None:
    obj = IpcObject("shm", 1, 0o600, uid=1000, cuid=1001)
    assert obj.may_remove(0) and obj.may_remove(1000) and obj.may_remove(1001)
    assert not obj.may_remove(1002)
    assert IpcObject("sem", 2, 0o600, uid=0, cuid=0).owner == "root"
    assert IpcObject("sem", 2, 0o600, uid=2**31 - 7, cuid=0).owner == str(2**31 - 7)  # no such user


def test_command_line_is_cut_and_a_gone_process_is_a_question_mark() -> None:
    long = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()",
                             "x" * 100], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert long.stdout is not None and long.stdout.readline() == "ready\n"
        assert len(command_line(long.pid)) == COMMAND_WIDTH
        assert command_line(long.pid).startswith(sys.executable[:COMMAND_WIDTH])
    finally:
        assert long.stdin is not None and long.stdout is not None
        long.stdin.close()
        long.stdout.close()
        long.wait(5)
    assert command_line(long.pid) == "?"


def test_a_servers_directory_that_may_not_be_listed_names_none_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance = _instance(tmp_path)

    def refused(self: Path, pattern: str) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "glob", refused)  # as for a user who may not list it (root may list any)
    assert running_servers(instance, tidy=False) == []
    with pytest.raises(PermissionError):
        running_servers(instance, tidy=True)


def test_the_refusal_is_decided_in_one_order_for_both_tools(tmp_path: Path) -> None:
    """Nothing, a lone object, the service, permission, then what forcing goes past: jdls -K and dls-ipcrm
    ask Occupancy.refusal and only word the answer."""
    shm = IpcObject("shm", 7, 0o660, 0, 0, nattch=1)
    sem = IpcObject("sem", 8, 0o660, 0, 0)
    monitor = pidfiles.PidRecord(os.getpid(), 0.0)
    roles = (Occupant(LABELS[MONITOR], monitor.pid, tmp_path / "m.pid", monitor),)
    servers = (Occupant("lock server", 4321, tmp_path / "4321.pid", None),)

    def occupancy(**fields: Any) -> Occupancy:
        base: dict[str, Any] = dict(key=1, shm=shm, sem=sem, roles=(), servers=(), attached=(), others=0,
                                    forbidden=None)
        return Occupancy(**{**base, **fields})

    assert occupancy(shm=None, sem=None).refusal(force=True) is Refusal.NOTHING
    assert occupancy(sem=None, roles=roles).refusal(force=True) is Refusal.LONE
    assert occupancy(roles=roles, forbidden=shm).refusal(force=True) is Refusal.SERVICE
    assert occupancy(attached=(99,), others=1).refusal(force=True, service_pids=(0, 99)) is Refusal.SERVICE
    assert occupancy(forbidden=sem, servers=servers).refusal(force=False) is Refusal.FORBIDDEN
    assert occupancy(servers=servers).refusal(force=False) is Refusal.IN_USE
    assert occupancy(attached=(99,), others=1).refusal(force=False) is Refusal.IN_USE
    assert occupancy(servers=servers, attached=(99,), others=1).refusal(force=True) is None
    assert occupancy().refusal(force=False) is None
