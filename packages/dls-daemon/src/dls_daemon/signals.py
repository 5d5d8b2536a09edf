"""Signals as events of the main loop, never as work done inside a handler.

A handler that did real work (remove a pid file, write the table header, fork)
could run in the middle of the same work in the main loop. Here the handlers
only note the signal; ``signal.set_wakeup_fd`` writes its number into a pipe,
so a main loop sleeping in ``select`` wakes at once and handles it in order.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from types import FrameType


def block(signals: Iterable[int]) -> None:
    """Hold ``signals`` back (around a fork: the child must not run the parent's handlers)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))


def unblock(signals: Iterable[int]) -> None:
    """Let ``signals`` through again; any that came meanwhile are delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))


class SignalWatch:
    """The signals a daemon cares about, readable from ``fileno()`` once they arrive."""

    def __init__(self, signals: Iterable[int]) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._noted: set[int] = set()
        self.signals = tuple(signals)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in self.signals:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._noted.add(signum)

    def fileno(self) -> int:
        return self._read

    def take(self) -> set[int]:
        """The signals that arrived since the last call (each once, however often it came)."""
        try:
            while True:
                data = os.read(self._read, 512)
                if not data:
                    break
                self._noted.update(data)
        except BlockingIOError:
            pass
        taken, self._noted = self._noted, set()
        return taken

    def close(self, *, default_handlers: bool = False) -> None:
        """Stop watching. In a forked child, ``default_handlers`` gives the signals their default action back."""
        signal.set_wakeup_fd(-1)
        if default_handlers:
            for signum in self.signals:
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
