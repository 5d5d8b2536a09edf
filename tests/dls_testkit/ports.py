"""Ports for a test's own listeners and for "nobody listens here"."""

from __future__ import annotations

import random
import socket

#: Where the kernel picks the local ports of outgoing connections (Linux's default if unreadable).
_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
#: Ports below this are left to the system's services.
_LOWEST = 10000


def _ephemeral_start() -> int:
    try:
        with open(_EPHEMERAL, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on this host now, below the ephemeral range: the kernel never gives such a port to an
    outgoing connection, so only another listener can take it before it is used (``Service.start`` tries
    another then), however busy the machine. Also a port nobody listens on."""
    top = _ephemeral_start()
    choice = random.SystemRandom()
    for _ in range(200):
        port = choice.randrange(_LOWEST, top) if top > _LOWEST + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all addresses, as the daemon listens
            except OSError:
                continue
            return int(s.getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
