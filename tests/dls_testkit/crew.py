"""A crew of client processes hammering one record lock: lock, increment a counter file, unlock.

A counter that ends equal to the sum of the cycles the clients report proves no lock was ever granted to
two owners at once, whatever the test killed meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .processes import running
from .service import Service
from .waiting import wait_for

#: How long the load tests hammer the counter.
LOAD_SECONDS = 3.0

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
        report["server"] = client.connect().welcome.server_pid
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


