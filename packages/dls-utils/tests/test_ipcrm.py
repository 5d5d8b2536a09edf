"""dls-ipcrm against real tables, a real jdls and real attached processes, run as real programs.

One test runs dls-ipcrm as another user (``nobody``, through setpriv). That user may not be able to read
the clone, its venv or the interpreter (a clone or a pyenv under a 0700 directory; /tmp/pytest-of-root
is 0700 too), so the test gives it a copy of what dls-ipcrm imports, in a directory every user can read,
and an interpreter of the same version that it can run (the venv's, the base one, one on the system's
PATH, else a copy of the base one beside the packages); the directory is removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


#: How much of a command line dls-ipcrm shows when it names a process (dls_shm.occupancy.COMMAND_WIDTH).
COMMAND_LINE_SHOWN = 60
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
#: Prints the directories and files of the modules that dls-utils' modules load from outside the standard
#: library (site-packages, the editable packages' src), one per top-level name. Every module is imported, so
#: that what one imports only when it runs is found too.
IMPORTED_FROM = (
    "import importlib, json, pkgutil, sys, sysconfig\n"
    "from pathlib import Path\n"
    "import dls_utils\n"
    "for module in pkgutil.walk_packages(dls_utils.__path__, 'dls_utils.'):\n"
    "    if module.name.endswith('__main__'):\n"
    "        continue  # a program, not a module to import\n"
    "    try:\n"
    "        importlib.import_module(module.name)\n"
    "    except ImportError:\n"
    "        pass  # an optional dependency that is not installed\n"
    "stdlib = [Path(sysconfig.get_path(n)) for n in ('stdlib', 'platstdlib')]\n"
    "def outside(path):\n"
    "    p = Path(path)\n"
    "    return not any(p.is_relative_to(s) for s in stdlib) or {'site-packages', 'dist-packages'} & set(p.parts)\n"
    "roots = set()\n"
    "for name, module in list(sys.modules.items()):\n"
    "    if '.' not in name:\n"
    "        file = getattr(module, '__file__', None)\n"
    "        paths = list(getattr(module, '__path__', None) or ([file] if file else []))\n"
    "        roots.update(str(p) for p in paths if outside(p))\n"
    "print(json.dumps(sorted(roots)))\n"
)


def ipcrm(*args: str, env: dict[str, str] | None = None,
          python: Sequence[str] = (sys.executable,)) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*python, "-m", "dls_utils.ipcrm", *args], env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/")


@dataclass(frozen=True)
class OtherUser:
    """How to run a Python program as ``nobody`` wherever the clone and the interpreter live."""

    python: tuple[str, ...]  #: setpriv ... <an interpreter nobody can run>
    env: dict[str, str]  #: what its environment needs on top (PYTHONPATH, perhaps PYTHONHOME)


def _shared_directory() -> Path:
    """A directory that every user can pass through, for what ``nobody`` runs."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        path = Path(candidate).resolve()
        if path.is_dir() and all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            return path
    pytest.fail("no temporary directory that every user can pass through (/tmp?)")


def _readable_by_all(top: Path) -> None:
    for directory, _, files in os.walk(top):
        os.chmod(directory, 0o755)
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.stat().st_mode & 0o100 else 0))


def _copy_packages(site: Path) -> None:
    """What dls-utils imports from outside the standard library, copied into ``site``."""
    found = subprocess.run([sys.executable, "-c", IMPORTED_FROM], capture_output=True, text=True, check=True,
                           timeout=60, cwd="/")
    site.mkdir()
    for root in map(Path, json.loads(found.stdout)):
        if root.is_dir():
            shutil.copytree(root, site / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(root, site / root.name)


def _copy_interpreter(home: Path) -> tuple[str, dict[str, str]]:
    """The base interpreter (its binary, libpython, the standard library) copied under ``home``."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    binary = home / "bin" / version
    binary.parent.mkdir(parents=True)
    shutil.copy2(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), binary)
    lib = home / "lib"
    shutil.copytree(sysconfig.get_path("stdlib"), lib / version, ignore=shutil.ignore_patterns(
        "__pycache__", "site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip"))
    library = sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and library:
        shutil.copy2(Path(sysconfig.get_config_var("LIBDIR")) / library, lib / library)
    return str(binary), {"PYTHONHOME": str(home), "LD_LIBRARY_PATH": str(lib)}


def _runs_as_nobody(python: str, env: dict[str, str]) -> bool:
    done = subprocess.run([*NOBODY, python, "-c", "import dls_utils.ipcrm"], env={**os.environ, **env},
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/", check=False)
    return done.returncode == 0


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    """``nobody``, with an interpreter it can run and a copy of the packages it can read; removed after."""
    shared = Path(tempfile.mkdtemp(prefix="dls-ipcrm-nobody-", dir=_shared_directory()))
    try:
        _copy_packages(shared / "site")
        _readable_by_all(shared)
        env = {"PYTHONPATH": str(shared / "site")}
        base = getattr(sys, "_base_executable", sys.executable)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [sys.executable, base, os.path.realpath(base),
                      shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")]
        for python in dict.fromkeys(c for c in candidates if c):
            if _runs_as_nobody(python, env):
                yield OtherUser((*NOBODY, python), env)
                return
        python, home_env = _copy_interpreter(shared / "python")
        _readable_by_all(shared)
        env.update(home_env)
        assert _runs_as_nobody(python, env), f"nobody cannot run a copy of {base} either"
        yield OtherUser((*NOBODY, python), env)
    finally:
        shutil.rmtree(shared)


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


def test_a_running_service_named_by_its_key_alone_is_refused_by_its_header(daemon: Any, tmp_path: Path) -> None:
    """``--key`` of another instance's table: no pid files, so the header's monitor and listener, attached to
    it, are the service at work; both are named, and the sentence agrees with them."""
    daemon.start()
    key = daemon.instance.key
    elsewhere = {**os.environ, "JBCRELEASEDIR": str(tmp_path / "elsewhere")}
    done = ipcrm("--key", f"0x{key:08x}", env=elsewhere)
    monitor, listener = daemon.pid("monitor"), daemon.pid("listener")
    assert (done.returncode, done.stderr) == (4, (
        f"dls-ipcrm: cannot remove the lock table 0x{key:08x} while the lock monitor (pid {monitor}) and lock "
        f"listener (pid {listener}) run: stop the service first (jdls -k)\n"))
    assert len(ipcs_lines(key)) == 2


def test_an_attached_process_is_named_and_forced_past(
    table: Instance, attacher: subprocess.Popen[str]
) -> None:
    done = ipcrm()
    assert done.returncode == 3, done
    command_line = f"{sys.executable} -c {ATTACHER}".strip()
    assert f"pid {attacher.pid} ({command_line[:COMMAND_LINE_SHOWN]})" in done.stderr
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
    clean_env: Instance, mode: int, other_user: OtherUser
) -> None:
    created, _ = LockTable.create(clean_env.key, geometry_for(100, 10), mode=mode)
    created.close()
    try:
        env = {**os.environ, **other_user.env, "DLS_IPC_KEY": f"0x{clean_env.key:08x}"}
        done = ipcrm(env=env, python=other_user.python)
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
