"""A lock service of its own for every end-to-end test: real processes, real TCP, real SysV IPC.

The ``service`` fixture gives the test a private instance (its own
JBCRELEASEDIR, hence its own IPC key) and a free port, starts
``jdls -ibs1000,10 --port P`` there as a real program, and at the end stops
it (``-k``) and removes its table (``-K``). The teardown fails the test if
any process of the instance is left, or any IPC resource with its key; it
cleans them up first, so a failing test never leaves anything to the next run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from dls_shm import Instance

#: The dls-lock command of the interpreter running the tests.
DLS_LOCK = str(Path(sys.executable).parent / "dls-lock")
#: Variables of the outer environment that would point a test at another instance or identity.
FOREIGN = ("DLS_IPC_KEY", "JDLS_PORT", "JDLS", "JBCPORTNO", "JBCRELEASEDIR")
#: Two start times closer than this are the same process (as the daemon's pid files mean it).
SAME_START = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 5.0, what: str = "condition",
             poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def _within(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


@dataclass
class Service:
    root: Path
    port: int
    env: dict[str, str]
    instance: Instance
    started: list[str] = field(default_factory=list)  # what `jdls -ib` printed

    @property
    def key(self) -> int:
        """The instance's SysV IPC key (shared memory and semaphore)."""
        return self.instance.key

    instance_key = key

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "jdls.log"

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

    # -- programs ---------------------------------------------------------------------

    def jdls(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dls_daemon", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def dls_lock(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``dls-lock ARGS`` to the end."""
        return subprocess.run([DLS_LOCK, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def dls_lock_popen(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``dls-lock ARGS``; the caller must see it ends (``stop``) even when the test fails."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([DLS_LOCK, *args], env=self.env, **kwargs)  # type: ignore[call-overload,no-any-return]

    # -- processes and IPC of the instance ----------------------------------------------

    def pid(self, role: str) -> int | None:
        """The pid in the monitor's or the listener's pid file."""
        try:
            return int(self.instance.pid_file(role).read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def server_pids(self) -> set[int]:
        """Lock servers listed in run/servers."""
        directory = self.root / "run" / "servers"
        return {int(p.stem) for p in directory.glob("*.pid") if p.stem.isdigit()} if directory.exists() else set()

    def processes(self) -> list[psutil.Process]:
        """Every live process of this instance: listed in a pid file under run/, or with an environment
        (JBCRELEASEDIR) or working directory that refers to it. Zombies and this process do not count."""
        found: dict[int, psutil.Process] = {}
        run = self.root / "run"
        for path in [*run.glob("*.pid"), *run.glob("servers/*.pid")] if run.exists() else []:
            try:
                lines = path.read_text().split()
                pid, started = int(lines[0]), float(lines[1])
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < SAME_START:
                    found[pid] = proc
            except (OSError, IndexError, ValueError, psutil.Error):
                continue
        me = os.getpid()
        for proc in psutil.process_iter(["status"]):
            if proc.pid == me or proc.pid in found or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if proc.environ().get("JBCRELEASEDIR") == str(self.root) or _within(proc.cwd(), self.root):
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        return list(found.values())

    def ipc_listing(self) -> str:
        """``ipcs -m -s``: shared memory segments and semaphore arrays of the machine."""
        return subprocess.run(["ipcs", "-m", "-s"], capture_output=True, text=True, check=True).stdout

    def ipc_left(self) -> list[str]:
        """Lines of ``ipcs -m -s`` with this instance's key."""
        hexkey = f"0x{self.key:08x}"
        return [line for line in self.ipc_listing().splitlines() if line.split()[:1] == [hexkey]]

    # -- life ---------------------------------------------------------------------------

    def start(self, attempts: int = 5) -> None:
        """``jdls -ibs1000,10 --port P``; another free port if this one was taken meanwhile."""
        for _ in range(attempts):
            result = self.jdls("-ibs1000,10", "--port", str(self.port))
            if result.returncode == 0:
                self.started = result.stdout.splitlines()
                return
            if "cannot listen" not in result.stderr:
                break
            self.port = free_port()
            self.env["JDLS"] = f"SERVER=127.0.0.1,{self.port}"
        raise AssertionError(f"jdls -ib failed ({result.returncode}): {result.stderr}{result.stdout}")

    def stop_and_check(self) -> None:
        """``jdls -k`` and ``jdls -K``, then fail if anything of the instance is left (after removing it)."""
        problems = []
        for args in (("-k",), ("-K",)):
            try:
                result = self.jdls(*args)
                if result.returncode != 0:
                    problems.append(f"jdls {args[0]} exited {result.returncode}: {result.stderr}{result.stdout}")
            except subprocess.TimeoutExpired as exc:
                problems.append(f"jdls {args[0]} did not finish: {exc}")
        leftovers = self.processes()
        for proc in leftovers:  # do not leave them to the next run, but still fail
            try:
                proc.kill()
            except psutil.Error:
                pass
        if leftovers:
            described = []
            for proc in leftovers:
                try:
                    described.append(f"{proc.pid} {proc.cmdline()}")
                except psutil.Error:
                    described.append(str(proc.pid))
            problems.append(f"processes of the instance left after jdls -k: {described}")
        ipc = self.ipc_left()
        if ipc:
            key = f"0x{self.key:08x}"
            subprocess.run(["ipcrm", "-M", key], capture_output=True)
            subprocess.run(["ipcrm", "-S", key], capture_output=True)
            problems.append(f"IPC left after jdls -K: {ipc}")
        assert not problems, "\n".join(problems)


def make_service(tmp_path: Path) -> Service:
    root = tmp_path / "release"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(JBCRELEASEDIR=str(root), JDLS=f"SERVER=127.0.0.1,{port}", JDLS_LOCK_DIR=str(root / "jbase"),
               JDLS_BINARY_LOCK_DIR=str(root / "jbase_lock"))
    return Service(root, port, env, Instance.from_environment(root))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A running lock service of the test's own (monitor and listener), stopped and checked at the end."""
    svc = make_service(tmp_path)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop_and_check()
