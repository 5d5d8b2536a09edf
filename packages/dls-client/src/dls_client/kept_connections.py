"""Duplicates of a lock's connections, kept by the watchdog that stops the work done under the lock.

The service frees a lock the moment its connection closes. When the process
that holds it for others' work (dls-lock for its command, the ``--hold``
process for a shell) is killed, the kernel closes that connection at once,
while its watchdog (dls-lock's keeper, the hold process's guard) has yet to
hear of the death and kill the work: for a few milliseconds, or for as long as
the watchdog is stopped, the work would run beside the lock's next holder.
So the holder hands the watchdog duplicates of the connections its lock is
held through (SCM_RIGHTS over a socket pair made before the fork), and again
whenever they change (a connection made again after a failure). The
connection then ends only when both processes have let it go: the watchdog
closes its duplicates by ending, which it does only once the work is dead. A
stopped watchdog keeps the lock held, the safe way round.

The watchdog never reads or writes them; what the service sends meanwhile
waits unread in the kernel.
"""

from __future__ import annotations

import contextlib
import os
import socket

#: The most descriptors one message hands over (SERVER and SERVER2: two; room for a connection being
#: replaced).
_MOST = 8


class KeptConnections:
    """The socket pair; make it before forking the watchdog, then call ``holder_side`` or ``watchdog_side``
    in each process."""

    def __init__(self) -> None:
        self._holder, self._watchdog = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sent: list[tuple[int, int]] = []
        self._kept: list[int] = []

    # -- the holder's side --------------------------------------------------------------

    def holder_side(self) -> None:
        self._watchdog.close()

    def keep(self, fds: list[int]) -> None:
        """Hand the watchdog ``fds`` (the lock's connections now) if they are not those handed last time;
        nothing once the watchdog has ended."""
        identities = []
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile: a connection being replaced
                identities.append((fd, os.fstat(fd).st_ino))
        if identities == self._sent:
            return
        with contextlib.suppress(OSError):
            socket.send_fds(self._holder, [b"k"], [fd for fd, _ in identities])
            self._sent = identities

    # -- the watchdog's side ------------------------------------------------------------

    def watchdog_side(self) -> None:
        self._holder.close()
        self._watchdog.setblocking(False)

    def fileno(self) -> int:
        """What the watchdog may select() on for ``take``."""
        return self._watchdog.fileno()

    def take(self) -> None:
        """Keep what the holder handed over since the last call (the latest set replaces the one kept)."""
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self._watchdog, 1, _MOST)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the holder has ended: what is kept stays kept
            for fd in fds:  # close-on-exec: the command the keeper runs must not get the lock's connection
                os.set_inheritable(fd, False)
            for fd in self._kept:
                os.close(fd)
            self._kept = fds
