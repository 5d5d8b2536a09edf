"""What the end-to-end tests share: a lock service of the test's own, processes, a crew of clients.

Imported by name (the root pyproject puts tests/ on the path): conftest.py
makes fixtures of it, and a test that needs a service started differently, or
the crew of clients hammering a counter, imports what it needs from here.

``Service`` is a private instance (its own JBCRELEASEDIR, hence its own IPC
key) and a free port, started as a real ``jdls``; ``stop_and_check`` stops it
(``-k``), removes its table (``-K``) and fails the test if any process of the
instance is left, or any IPC resource with its key, after cleaning them up,
so a failing test never leaves anything to the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from dls_client import Client, Config, LockRefused, Server
from dls_shm import Instance, LockTable

KEY = "USD163170001"
#: How long the load tests hammer the counter.
LOAD_SECONDS = 3.0

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



# -- processes and clients ------------------------------------------------------------------


def alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def running(*procs: subprocess.Popen[Any]) -> Iterator[None]:
    """End these processes (SIGKILL, which also ends a stopped one) when the block is left, however."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def client_for(service: Service, timeout: float = 10.0) -> Client:
    return Client(Config(server=Server("127.0.0.1", service.port), timeout=timeout))


def data_file(tmp_path: Path, name: str = "FBNK.ACCOUNT") -> Path:
    path = tmp_path / name
    path.touch()
    return path


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def attached(service: Service) -> Iterator[LockTable]:
    """The instance's lock table, let go of at the end (jdls -K refuses while anyone is attached)."""
    table = LockTable.attach(service.key)
    try:
        yield table
    finally:
        table.close()


def slots_of(service: Service, pid: int) -> list[tuple[str, int]]:
    """(key, state) of every slot the process ``pid`` has in the table (read only: nothing is reclaimed)."""
    with attached(service) as table:
        return [(e.slot.key[: e.slot.key_len].decode(), e.slot.state) for e in table.scan() if e.slot.pid == pid]


def header_line(text: str, label: str) -> str:
    """The value of ``label:`` in ``jdls -dv`` output."""
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return line[len(label) + 1:].strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


def holder_of(client: Client, data: Path, key: str) -> Any:
    """Who holds ``key`` (a try_lock that must be refused)."""
    with pytest.raises(LockRefused) as refused:
        client.try_lock(data, key).release()
    return refused.value.holder


def wait_free(client: Client, data: Path, key: str, limit: float, poll: float = 0.25) -> float:
    """Poll try_lock until it is granted (then release it); seconds it took, or more than ``limit``."""
    start = time.monotonic()
    while True:
        try:
            client.try_lock(data, key).release()
            return time.monotonic() - start
        except LockRefused:
            pass
        if time.monotonic() - start > limit:
            return time.monotonic() - start
        time.sleep(poll)


def read_counter(client: Client, counter: Path) -> int:
    """The counter's value, read under its lock (a client already connected, so also a witness)."""
    with client.lock(counter, "counter", timeout=10):
        return int(counter.read_text())


# -- clients hammering one record lock ----------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, os, sys, time
    from dls_client import Client, DlsError

    cfg = json.loads(sys.argv[1])
    report = {"pid": os.getpid(), "cycles": 0, "error": None, "server": None}

    def save(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, path)

    def wait_file(path):
        while not os.path.exists(path):
            time.sleep(0.005)

    counter = cfg["counter"]
    client = Client()
    try:
        report["server"] = client.channel.welcome.server_pid
        if cfg.get("hold"):
            client.lock(counter, cfg["hold"])  # held all along
        save(cfg["ready"])
        wait_file(cfg["go"])
        deadline = time.monotonic() + cfg["seconds"]
        while time.monotonic() < deadline:
            if cfg.get("pause") and os.path.exists(cfg["pause"]):
                # Between two cycles (holding no counter lock): say so, and go on when told.
                save(cfg["paused"])
                wait_file(cfg["resume"])
                deadline = time.monotonic() + 5
                cfg["pause"] = None
            held = client.lock(counter, "counter")
            with open(counter) as f:
                value = int(f.read())
            with open(counter, "w") as f:
                f.write(str(value + 1))
            report["cycles"] += 1
            held.release()
    except DlsError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        save(cfg["report"])
""")


class Crew:
    """``count`` client processes, each doing lock / increment / unlock on one counter for ``seconds``
    once told to go; each reports its successful cycles and the error that stopped it, if any."""

    def __init__(self, service: Service, tmp_path: Path, count: int = 4, seconds: float = LOAD_SECONDS,
                 extra: dict[int, dict[str, str]] | None = None) -> None:
        self.dir = tmp_path / "crew"
        self.dir.mkdir()
        self.counter = tmp_path / "counter"
        self.counter.write_text("0")
        self.go_file = self.dir / "go"
        self.configs = []
        for i in range(count):
            cfg: dict[str, Any] = {
                "counter": str(self.counter), "seconds": seconds, "go": str(self.go_file),
                "ready": str(self.dir / f"{i}.ready"), "report": str(self.dir / f"{i}.report"),
            }
            cfg.update((extra or {}).get(i, {}))
            self.configs.append(cfg)
        self.procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], env=service.env,
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for cfg in self.configs
        ]

    def ready(self, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until every worker is connected (and holds what it was to hold); their first reports."""
        def all_ready() -> bool:
            for proc, cfg in zip(self.procs, self.configs, strict=True):
                if proc.poll() is not None:
                    raise AssertionError(f"worker ended early ({proc.returncode}): {self._stderr(proc)}")
                if not os.path.exists(cfg["ready"]):
                    return False
            return True
        wait_for(all_ready, timeout, "the workers to connect")
        return [json.loads(Path(cfg["ready"]).read_text()) for cfg in self.configs]

    def go(self) -> None:
        self.go_file.touch()

    def finish(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait for every worker to end (status 0); their reports."""
        reports = []
        for proc, cfg in zip(self.procs, self.configs, strict=True):
            status = proc.wait(timeout=timeout)
            assert status == 0, f"worker {proc.pid} exited {status}: {self._stderr(proc)}"
            reports.append(json.loads(Path(cfg["report"]).read_text()))
        return reports

    def value(self) -> int:
        return int(self.counter.read_text())

    @staticmethod
    def _stderr(proc: subprocess.Popen[bytes]) -> str:
        assert proc.stderr is not None
        return proc.stderr.read().decode(errors="replace") if proc.poll() is not None else "(still running)"


@contextlib.contextmanager
def crew(service: Service, tmp_path: Path, **kwargs: Any) -> Iterator[Crew]:
    team = Crew(service, tmp_path, **kwargs)
    with running(*team.procs):
        yield team


def assert_exact(reports: list[dict[str, Any]], value: int) -> None:
    cycles = sum(r["cycles"] for r in reports)
    assert value == cycles, (f"counter {value} but {cycles} cycles were reported ({reports}): "
                             "a lock was granted to two owners at once")


