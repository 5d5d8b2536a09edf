"""This process's pid, kept up to date across forks, for the lock path.

Whatever a process makes for itself (its owner record, its doorbell, its OS locks) a
forked child must make again, so the lock path compares a pid on every lock; asking
the system (``os.getpid``, a system call: about 0.2 µs) two or three times a lock was
a tenth of LocalClient's cost over the raw table's. ``pid`` is read instead: set at
import and again in the child of every ``os.fork`` (``os.register_at_fork``; a fork
that runs no Python in the child, as subprocess's, needs nothing).
"""

from __future__ import annotations

import os

#: The pid of the process running this.
pid = os.getpid()


def _forked() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
