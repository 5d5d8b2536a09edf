"""Lock information a remote client sends (InfoPut), kept in proc/info on its behalf.

The lock server writes it with the address the client really came from and
the server's own figures added, so that a client cannot claim another's
address, and removes it when the client goes.
"""

from __future__ import annotations

import json
import time

from dls_proto import Hello
from dls_shm import Instance
from dls_shm import info as info_files


def write(instance: Instance, hello: Hello, peer_ip: str, server_pid: int, payload: bytes) -> str:
    """Keep a client's lock information (a JSON object); the path of its file."""
    document = json.loads(payload)
    if not isinstance(document, dict):
        raise ValueError("lock information must be a JSON object")
    document.update(
        pid=hello.pid, ip=peer_ip, host=hello.host, server_pid=server_pid, updated=time.time(),
    )
    return str(info_files.write(instance, hello.port, document))


def remove(path: str) -> None:
    info_files.remove(path)
