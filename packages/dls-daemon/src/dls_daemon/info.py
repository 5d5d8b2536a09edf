"""Lock information on behalf of remote clients, and snapshots for remote utilities.

A remote client's lock server writes the client's information to proc/info,
with the address the client really came from and the server's own figures
added (a client cannot claim another's address), and removes it when the
client goes.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from dls_proto import Hello
from dls_shm import Instance
from dls_shm import info as info_files

from .context import ServerContext


def write_client_info(instance: Instance, hello: Hello, peer_ip: str, server_pid: int, payload: bytes) -> str:
    document = json.loads(payload)
    if not isinstance(document, dict):
        raise ValueError("lock information must be a JSON object")
    document.update(
        pid=hello.pid, ip=peer_ip, host=hello.host, server_pid=server_pid, updated=time.time(),
    )
    return str(info_files.write(instance, hello.port, document))


def remove_client_info(path: str) -> None:
    info_files.remove(path)


def snapshot(ctx: ServerContext) -> bytes:
    """The service as a utility on another host needs it: locks and information files."""
    document: dict[str, Any] = {
        "format": info_files.FORMAT,
        "host": socket.gethostname(),
        "time": time.time(),
        "mechanism": "table" if ctx.table is not None else "oslocks",
        "locks": [info_files.entry_json(e) for e in ctx.table.scan()] if ctx.table is not None else [],
        "info": list(info_files.read_all(ctx.instance)),
    }
    return json.dumps(document).encode()
