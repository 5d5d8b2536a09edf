"""Ports for a test's own listeners and for "nobody listens here"."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this host now: bound and closed again, so it may be taken before it is used
    (``Service.start`` tries another then); also a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
