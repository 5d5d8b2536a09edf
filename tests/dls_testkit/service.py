"""A real lock service of the test's own: ``jdls`` as a real program on a private instance and a free port.

``Service(root)`` is the instance at ``root`` (its own JBCRELEASEDIR, hence its own IPC key), a free
port, and the environment its programs run in: the outer environment without what would point them at
another instance or identity, JBCRELEASEDIR, JDLS_PORT and the lock directories beside ``root`` (so no
lock file goes to /tmp/jbase), and, unless told otherwise, a JDLS naming the service, so that a client
started with ``env`` uses it.

``stop_and_check`` stops it (``jdls -k``), removes its table (``jdls -K``, with ``remove_options``)
and fails the test if any process of the instance is left, or any IPC object under its key, after
killing and removing them, so a failing test never leaves anything to the next run. ``running_service``
is the whole life in a ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from dls_client import Client, Config, Server
from dls_shm import Header, Instance, LockTable

from .ipc import ipc_left, ipcs_lines, ipcs_listing, remove_ipc
from .ports import free_port
from .processes import kill_all, processes_of
from .waiting import wait_for

#: The dls-lock command of the interpreter running the tests.
DLS_LOCK = str(Path(sys.executable).parent / "dls-lock")
#: Variables of the outer environment that would point a test at another instance or identity.
FOREIGN = ("DLS_IPC_KEY", "JDLS_PORT", "JDLS", "JBCPORTNO", "JBCRELEASEDIR")
#: ``jdls -ib`` with a small table (1000 locks in groups of 10): what most tests need, quick to make.
SMALL = ("-ibs1000,10",)


def instance_env(root: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without FOREIGN, with JBCRELEASEDIR=root."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in FOREIGN}
    env["JBCRELEASEDIR"] = str(root)
    return env


class Service:
    """A jdls (monitor and listener, or what ``start_options`` ask for) of the test's own instance at
    ``root``; see the module docstring. ``env`` is the base environment (default: this process's);
    ``client_jdls`` says whether ``self.env`` carries JDLS=SERVER=127.0.0.1,port for clients; ``program`` is
    the command that is jdls (default: this interpreter's ``-m dls_daemon``, the checkout's code), another one
    for a test of an installed jdls (a venv's ``bin/jdls``)."""

    def __init__(self, root: Path, *, env: Mapping[str, str] | None = None, start_options: Sequence[str] = SMALL,
                 remove_options: Sequence[str] = (), client_jdls: bool = True,
                 program: Sequence[str] = (sys.executable, "-m", "dls_daemon")) -> None:
        self.root = root
        self.program = tuple(program)
        self.instance = Instance.from_environment(root)
        self.lock_dir = root.parent / "jbase"
        self.binary_lock_dir = root.parent / "jbase_lock"
        self.env = instance_env(root, env)
        self.env.update(JDLS_LOCK_DIR=str(self.lock_dir), JDLS_BINARY_LOCK_DIR=str(self.binary_lock_dir))
        self.start_options = tuple(start_options)
        self.remove_options = tuple(remove_options)
        self.client_jdls = client_jdls
        #: What ``jdls -ib`` printed.
        self.started: list[str] = []
        #: Raw client connections a test made; closed before the service is stopped.
        self.sockets: list[socket.socket] = []
        self.port = 0
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        self.port = port
        self.env["JDLS_PORT"] = str(port)
        if self.client_jdls:
            self.env["JDLS"] = self.jdls_value()

    @property
    def key(self) -> int:
        """The instance's SysV IPC key (shared memory and semaphore)."""
        return self.instance.key

    # -- life ---------------------------------------------------------------------------

    def start(self, *options: str, attempts: int = 5) -> None:
        """``jdls START_OPTIONS OPTIONS --port P``; another free port if this one was taken meanwhile."""
        for _ in range(attempts):
            result = self.jdls(*self.start_options, *options, "--port", str(self.port))
            if result.returncode == 0:
                self.started = result.stdout.splitlines()
                return
            if "cannot listen" not in result.stderr:
                break
            self._use_port(free_port())
        raise AssertionError(f"jdls {' '.join(self.start_options + options)} failed ({result.returncode}): "
                             f"{result.stderr}{result.stdout}")

    def stop_and_check(self) -> None:
        """``jdls -k`` and ``jdls -K REMOVE_OPTIONS``, then fail if anything of the instance is left
        (after killing and removing it)."""
        for sock in self.sockets:
            sock.close()
        problems = []
        for args in (("-k",), ("-K", *self.remove_options)):
            try:
                result = self.jdls(*args)
                if result.returncode != 0:
                    problems.append(f"jdls {' '.join(args)} exited {result.returncode}: {result.stderr}{result.stdout}")
            except subprocess.TimeoutExpired as exc:
                problems.append(f"jdls {' '.join(args)} did not finish: {exc}")
        leftovers = kill_all(self.processes())
        if leftovers:
            problems.append(f"processes of the instance left after jdls -k: {leftovers}")
        if ipc_left(self.key):
            listed = ipcs_lines(self.key)
            remove_ipc(self.key)
            problems.append(f"IPC left after jdls -K: {listed}")
        assert not problems, "\n".join(problems)

    @contextlib.contextmanager
    def checked(self) -> Iterator[Service]:
        """Yield this service (started or not); then ``stop_and_check``, however the block was left."""
        try:
            yield self
        finally:
            self.stop_and_check()

    # -- programs ---------------------------------------------------------------------

    def jdls(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``jdls ARGS`` (``self.program``) to the end."""
        return subprocess.run([*self.program, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start ``jdls ARGS`` (its output piped); the caller must see it ends."""
        return subprocess.Popen([*self.program, *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def dls_lock(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``dls-lock ARGS`` to the end."""
        return subprocess.run([DLS_LOCK, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def dls_lock_popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``dls-lock ARGS``; the caller must see it ends (``running``) even when the test fails."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen([DLS_LOCK, *args], env=self.env, **kwargs)
        return proc

    # -- clients ----------------------------------------------------------------------

    def jdls_value(self, *options: str) -> str:
        """A JDLS value naming this service, with more ``options`` (``WAIT``, ``TIMEOUT=2`` ...)."""
        return ",".join([f"SERVER=127.0.0.1,{self.port}", *options])

    def config(self, **options: Any) -> Config:
        return Config(server=Server("127.0.0.1", self.port), **options)

    def client(self, **options: Any) -> Client:
        """A Client of this service (closed by the caller), with Config ``options``."""
        return Client(self.config(**options))

    # -- what the instance shows --------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.instance.log_file

    def log(self) -> str:
        """The instance log as it is now ("" before the first line)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> str:
        """Wait until a log line matches the regular expression ``pattern``; that line."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.log().splitlines() if re.search(pattern, line)]
            return bool(found)

        wait_for(seen, timeout, f"{pattern!r} in {self.log_path}")
        return found[0]

    def pid(self, role: str) -> int | None:
        """The pid in the monitor's or the listener's pid file."""
        try:
            return int(self.instance.pid_file(role).read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def server_pids(self) -> set[int]:
        """Lock servers listed in run/servers."""
        directory = self.instance.servers_dir
        return {int(p.stem) for p in directory.glob("*.pid") if p.stem.isdigit()} if directory.exists() else set()

    def processes(self) -> list[psutil.Process]:
        """Every live process of this instance (``processes_of``)."""
        return processes_of(self.root)

    def ipc_left(self) -> list[str]:
        """Which IPC objects exist under the instance's key (``ipc_left``)."""
        return ipc_left(self.key)

    @staticmethod
    def ipc_listing() -> str:
        return ipcs_listing()

    def table(self) -> LockTable:
        """The instance's table, attached: close it before the end of the test (-K refuses otherwise)."""
        return LockTable.attach(self.key)

    def header(self) -> Header:
        table = self.table()
        try:
            return table.header()
        finally:
            table.close()


def make_service(base: Path, **options: Any) -> Service:
    """The service of the test directory ``base``: its instance at base/release, lock directories in base."""
    return Service(base / "release", **options)


@contextlib.contextmanager
def running_service(root: Path, *options: str, **settings: Any) -> Iterator[Service]:
    """``Service(root, **settings)`` started with ``options``; stopped and checked when the block is left."""
    with Service(root, **settings).checked() as svc:
        svc.start(*options)
        yield svc
