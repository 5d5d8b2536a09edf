"""The service as a utility on another host sees it (the InfoSnapshot answer to InfoGet).

dls-utils' remote source reads it: every lock of the table and every client's
lock information file, in dls-shm's info format, taken by the lock server that
was asked; OS record locks as entries of the same form.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from dls_shm import info as info_files
from dls_shm import oslock_entries

from .context import ServerContext


def snapshot(ctx: ServerContext) -> bytes:
    """The locks and information files of the service, as JSON; a kept lock says when it expires.

    The locks are the table's, and the OS record locks held in the service's lock directory (all of its record
    locks without a table; beside one, those a lock server of an earlier version still holds for a client
    with JDLS OSLOCKS), joined with the documents (dls_shm.oslock_entries).
    When the OS locks cannot be read, "oslocks_error" says why and the table's locks are still sent.
    """
    table = ctx.table
    delay = table.lock_delay if table is not None else 0.0
    documents = list(info_files.read_all(ctx.instance))
    locks = [info_files.entry_json(e, delay) for e in table.scan()] if table is not None else []
    document: dict[str, Any] = {
        "format": info_files.FORMAT,
        "host": socket.gethostname(),
        "time": time.time(),
        "mechanism": "table" if table is not None else "oslocks",
        "lock_dir": str(ctx.lock_dir),
        "lock_delay": delay,
        "info": documents,
    }
    try:
        locks += oslock_entries.entries_of(ctx.lock_dir, documents, waiting=table is None)
    except OSError as exc:
        document["oslocks_error"] = f"OS file locks in {ctx.lock_dir} not read: {exc.strerror or exc}"
    document["locks"] = locks
    return json.dumps(document).encode()
