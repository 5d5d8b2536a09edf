"""The service as a utility on another host sees it (the InfoSnapshot answer to InfoGet).

dls-utils' remote source reads it: every lock of the table and every client's
lock information file, in dls-shm's info format, taken by the lock server that
was asked.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from dls_shm import info as info_files

from .context import ServerContext


def snapshot(ctx: ServerContext) -> bytes:
    """The locks and information files of the service, as JSON; a kept lock says when it expires."""
    table = ctx.table
    delay = table.lock_delay if table is not None else 0.0
    document: dict[str, Any] = {
        "format": info_files.FORMAT,
        "host": socket.gethostname(),
        "time": time.time(),
        "mechanism": "table" if table is not None else "oslocks",
        "lock_delay": delay,
        "locks": [info_files.entry_json(e, delay) for e in table.scan()] if table is not None else [],
        "info": list(info_files.read_all(ctx.instance)),
    }
    return json.dumps(document).encode()
