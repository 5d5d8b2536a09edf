"""The worker processes of a chaos run, by slot: started, killed and replaced, stopped at the end.

A slot's process is replaced by a new incarnation (a new id: ``w<slot>.<incarnation>``, a new log) when
the injector kills it, and when it ends by itself, which is a failure of the run the injector's log
records (``DIED``). Every kill is logged with the time the signal was sent: the checker ends the
killed worker's open section there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .history import BEFORE_WRITING, DIED, KILL, START, WORKER, Log, last_event, read_log
from .worker import WorkerConfig

#: The directory that holds dls_testkit, which worker processes import.
_TESTKIT_PARENT = str(Path(__file__).resolve().parents[2])


@dataclass
class Running:
    """One worker process: its id, its process, its log and where its stderr goes."""

    id: str
    proc: subprocess.Popen[bytes]
    log: Path
    stderr: Path

    def stderr_tail(self, size: int = 2000) -> str:
        try:
            return self.stderr.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""


class Workers:
    """The workers of a run: ``count`` slots, each with its process (see the module docstring)."""

    def __init__(self, directory: Path, env: Mapping[str, str], paths: list[Path], *, max_hold: float, seed: int,
                 faults: Log) -> None:
        self.directory = directory
        self.env = dict(env)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, (_TESTKIT_PARENT, env.get("PYTHONPATH"))))
        self.paths = [str(p) for p in paths]
        self.max_hold = max_hold
        self.seed = seed
        self.faults = faults
        self.stop_file = directory / "stop"
        self.slots: dict[int, Running] = {}
        self._incarnations: dict[int, int] = {}

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- life ----------------------------------------------------------------------------

    def start(self, count: int, timeout: float = 30.0) -> None:
        """Start ``count`` workers; return once each has logged its start."""
        for slot in range(count):
            self.spawn(slot)
        deadline = time.monotonic() + timeout
        for running in self.slots.values():
            while not (running.log.exists() and any(e["ev"] == START for e in read_log(running.log))):
                if running.proc.poll() is not None:
                    raise AssertionError(f"worker {running.id} ended at start ({running.proc.returncode}): "
                                         f"{running.stderr_tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {running.id} did not start within {timeout} s")
                time.sleep(0.02)

    def spawn(self, slot: int) -> Running:
        """A new worker process in ``slot`` (its previous one, if any, must be gone)."""
        n = self._incarnations.get(slot, -1) + 1
        self._incarnations[slot] = n
        wid = f"w{slot}.{n}"
        config = WorkerConfig(id=wid, log=str(self.directory / f"{wid}.jsonl"), records=self.paths,
                              stop=str(self.stop_file), max_hold=self.max_hold, seed=self.seed * 1000 + slot * 100 + n)
        stderr = self.directory / f"{wid}.err"
        with stderr.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "dls_testkit.chaos", config.argument()],
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        running = self.slots[slot] = Running(wid, proc, Path(config.log), stderr)
        return running

    def kill(self, slot: int, *, final: bool = False) -> None:
        """SIGKILL the worker in ``slot`` and reap it; logged (``final``: by the end of the run)."""
        running = self.slots[slot]
        running.proc.send_signal(signal.SIGKILL)
        self.faults.write(KILL, target=WORKER, worker=running.id, pids=[running.proc.pid], final=final)
        running.proc.wait()

    def holding(self) -> list[int]:
        """The slots whose worker is inside a critical section now and has yet to write, as far as its log
        says: where a lost lock does harm."""
        events = {slot: last_event(running.log) for slot, running in self.slots.items()}
        return [slot for slot, event in events.items() if event is not None and event["ev"] in BEFORE_WRITING]

    def replace_dead(self) -> None:
        """Log and replace every worker that ended by itself."""
        for slot, running in list(self.slots.items()):
            status = running.proc.poll()
            if status is not None:
                self.faults.write(DIED, worker=running.id, status=status, detail=running.stderr_tail())
                self.spawn(slot)

    def finish(self, grace: float) -> None:
        """Tell every worker to stop after its section; kill (logged) those still running after ``grace``."""
        self.replace_dead()
        self.stop_file.touch()
        deadline = time.monotonic() + grace
        for slot, running in self.slots.items():
            try:
                status = running.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    running.proc.send_signal(signal.SIGCONT)  # a stopped one, should the injector have left it
                self.kill(slot, final=True)
                continue
            if status != 0:
                self.faults.write(DIED, worker=running.id, status=status, detail=running.stderr_tail())

    def close(self) -> None:
        """Kill and reap whatever still runs (a run that failed half way)."""
        for running in self.slots.values():
            if running.proc.poll() is None:
                running.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                running.proc.wait(timeout=10)
