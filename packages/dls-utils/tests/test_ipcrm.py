"""dls-ipcrm against real tables, a real jdls and real attached processes, run as real programs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sysv_ipc
from dls_shm import Instance, LockTable, geometry_for
from dls_testkit import ipc_left, ipcs_lines
from dls_utils.ipcrm import get_parser

pytestmark = pytest.mark.slow
ATTACHER = (
    "import sys, time\n"
    "from dls_shm import LockTable\n"
    "table = LockTable.attach(int(sys.argv[1]))\n"
    "print('attached', flush=True)\n"
    "time.sleep(120)\n"
)


def ipcrm(*args: str, env: dict[str, str] | None = None,
          user: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*user, sys.executable, "-m", "dls_utils.ipcrm", *args], env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")


@pytest.fixture
def table(clean_env: Instance) -> Iterator[Instance]:
    """A table of the test's instance that nobody has attached (created, then detached); removed at the end."""
    created, _ = LockTable.create(clean_env.key, geometry_for(100, 10))
    created.close()
    try:
        yield clean_env
    finally:
        if LockTable.exists(clean_env.key):
            LockTable.attach(clean_env.key).remove()
        assert not ipc_left(clean_env.key)


@pytest.fixture
def attacher(table: Instance) -> Iterator[subprocess.Popen[str]]:
    """A plain python process that attaches the table and sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", ATTACHER, str(table.key)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "attached\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_refuses_while_the_service_runs_even_forced(daemon: Any) -> None:
    daemon.start()
    key = daemon.instance.key
    for args in ((), ("--force",)):
        done = ipcrm(*args)
        assert done.returncode == 4, done
        assert "lock monitor (pid " in done.stderr and "lock listener (pid " in done.stderr
        assert "stop the service first (jdls -k)" in done.stderr
        assert done.stdout == ""
    assert len(ipcs_lines(key)) == 2  # the segment and the semaphore are still there
    stopped = daemon.jdls("-k")
    assert stopped.returncode == 0, stopped.stderr
    done = ipcrm()
    assert done.returncode == 0, done
    assert done.stdout.startswith(f"dls-ipcrm: removed lock table 0x{key:08x} (shared memory id ")
    assert ipcs_lines(key) == [] and ipc_left(key) == []
    again = ipcrm()
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout == (f"dls-ipcrm: no lock table with key 0x{key:08x} for "
                            f"JBCRELEASEDIR={daemon.instance.root}: nothing to remove\n")


def test_an_attached_process_is_named_and_forced_past(
    table: Instance, attacher: subprocess.Popen[str]
) -> None:
    done = ipcrm()
    assert done.returncode == 3, done
    assert f"pid {attacher.pid} ({sys.executable} -c import sys, time" in done.stderr
    assert "1 other process(es) have it attached" in done.stderr and "--force" in done.stderr
    assert ipc_left(table.key)
    done = ipcrm("--force")
    assert done.returncode == 0, done
    assert done.stderr.startswith(f"dls-ipcrm: warning: forced: removed the lock table 0x{table.key:08x} although "
                                  f"1 other process(es) have it attached: pid {attacher.pid} (")
    assert "removed lock table" in done.stdout
    assert ipc_left(table.key) == [] and ipcs_lines(table.key) == []
    assert attacher.poll() is None  # it keeps its mapping, and is not signalled


def test_a_table_nobody_uses_is_removed(table: Instance) -> None:
    done = ipcrm("--key", f"0x{table.key:08x}")
    assert (done.returncode, done.stderr) == (0, "")
    assert ipc_left(table.key) == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_another_users_table_is_a_permission_problem(
    clean_env: Instance, mode: int
) -> None:
    created, _ = LockTable.create(clean_env.key, geometry_for(100, 10), mode=mode)
    created.close()
    try:
        env = {**os.environ, "DLS_IPC_KEY": f"0x{clean_env.key:08x}"}
        nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        done = ipcrm(env=env, user=nobody)
        assert done.returncode == 5, done
        assert done.stderr == (
            f"dls-ipcrm: permission denied: the lock table 0x{clean_env.key:08x} (shared memory id "
            f"{sysv_ipc.SharedMemory(clean_env.key).id}) belongs to user root (uid 0, mode {mode:04o}); "
            "run dls-ipcrm as that user or as root\n"
        )
        assert len(ipc_left(clean_env.key)) == 2
    finally:
        LockTable.attach(clean_env.key).remove()
    assert ipc_left(clean_env.key) == []


def test_a_lone_semaphore_is_named_not_removed(clean_env: Instance) -> None:
    sem = sysv_ipc.Semaphore(clean_env.key, sysv_ipc.IPC_CREX, 0o600, 1)
    try:
        done = ipcrm()
        assert done.returncode == 1, done
        assert f"only a semaphore (id {sem.id}) is left with key 0x{clean_env.key:08x}" in done.stderr
        assert f"ipcrm -s {sem.id}" in done.stderr
    finally:
        sem.remove()


def test_usage(clean_env: Instance, tmp_path: Path) -> None:
    done = ipcrm("--key", "0xzz")
    assert done.returncode == 2 and "invalid key" in done.stderr
    assert "exit status" in get_parser().format_help()
