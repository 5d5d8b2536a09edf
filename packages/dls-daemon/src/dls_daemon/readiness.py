"""How a starting daemon tells ``jdls -i`` that it is ready, or why it is not.

``jdls -ib`` must not return before the monitor's table exists and the
listener's port is bound, and a failure (port in use, already running) must
reach the user's terminal, not only a log file. A daemon started in the
background has no terminal, so it reports over a pipe to the process that
started it; run in the foreground it prints the same report itself. Either way
a daemon reports through the same three calls.
"""

from __future__ import annotations

import os
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol, TextIO


class Report(Protocol):
    def warn(self, text: str) -> None:
        """Something the user should know; start-up goes on."""

    def ready(self, text: str) -> None:
        """Started: ``text`` says what (printed by the starter)."""

    def fail(self, text: str) -> None:
        """Not started: ``text`` says why."""


class PrintReport:
    """The report of a daemon in the foreground: straight to its own terminal."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def warn(self, text: str) -> None:
        print(f"jdls: warning: {text}", file=self.err, flush=True)

    def ready(self, text: str) -> None:
        print(f"jdls: {text}", file=self.out, flush=True)

    def fail(self, text: str) -> None:
        print(f"jdls: {text}", file=self.err, flush=True)


class PipeReport:
    """The report of a daemon in the background: lines on a pipe, which closes after ready or fail."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def _line(self, kind: str, text: str) -> None:
        if self._fd < 0:
            return
        # A path that is not UTF-8 (a --lock-dir of os.fsdecode's surrogates) goes as its bytes: the reader shows
        # them replaced, rather than the report failing the start.
        data = f"{kind}\t{' '.join(text.splitlines())}\n".encode("utf-8", "surrogateescape")
        try:
            os.write(self._fd, data)
        except OSError:
            pass  # the starter gave up waiting: the log has it all
        if kind != "warn":
            os.close(self._fd)
            self._fd = -1

    def warn(self, text: str) -> None:
        self._line("warn", text)

    def ready(self, text: str) -> None:
        self._line("ready", text)

    def fail(self, text: str) -> None:
        self._line("fail", text)


@dataclass
class Outcome:
    ok: bool
    text: str
    warnings: list[str] = field(default_factory=list)


def collect(fd: int, timeout: float, what: str) -> Outcome:
    """Read a PipeReport from ``fd`` (closing it): how the start of ``what`` went."""
    deadline = time.monotonic() + timeout
    buffer = b""
    warnings: list[str] = []
    try:
        while True:
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                kind, _, text = line.decode(errors="replace").partition("\t")
                if kind == "warn":
                    warnings.append(text)
                else:
                    return Outcome(kind == "ready", text, warnings)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return Outcome(False, f"the {what} did not report ready within {timeout:g} s", warnings)
            chunk = os.read(fd, 4096)
            if not chunk:
                return Outcome(False, f"the {what} exited while starting (see the log)", warnings)
            buffer += chunk
    finally:
        os.close(fd)
