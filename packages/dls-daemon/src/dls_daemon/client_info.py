"""Lock information a remote client sends (InfoPut), kept in proc/info on its behalf.

The lock server writes it with the address the client really came from and
the server's own figures added (``stats``: what this lock server has done for
the client, see ``lockserver.Stats``), so that a client cannot claim another's
address, and removes it when the client goes. The file is named by that address
and the client's port (dls_shm.info), so two application servers using one
port number keep a document each. A killed lock server cannot remove it: the
listener that reaps it and the monitor's tidy do (``remove_orphans``).

It comes from the network, so it is bounded before it is parsed: at most
MAX_INFO_BYTES, and JSON nested at most MAX_INFO_DEPTH deep (counted by a
scan that skips strings, since a deep enough document would exhaust the
parser's recursion).
"""

from __future__ import annotations

import json
import logging
import re
import time

from dls_proto import Hello
from dls_shm import Instance, PidRecord
from dls_shm import info as info_files

from .context import MAX_INFO_BYTES, MAX_INFO_DEPTH

#: A JSON string (skipped), or a bracket that opens or closes a level.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class Refused(ValueError):
    """The document is not acceptable; the message says why, in words fit for the client."""


def depth(payload: bytes) -> int:
    """How deep JSON text nests (arrays and objects), strings not counted."""
    level = deepest = 0
    for match in _TOKENS.finditer(payload):
        token = match.group()
        if token in (b"[", b"{"):
            level += 1
            deepest = max(deepest, level)
        elif token in (b"]", b"}"):
            level -= 1
    return deepest


def parse(payload: bytes) -> dict[str, object]:
    """A client's lock information as a JSON object; Refused when too large, too deep or not an object."""
    if len(payload) > MAX_INFO_BYTES:
        raise Refused(f"{len(payload)} bytes, at most {MAX_INFO_BYTES} taken")
    if depth(payload) > MAX_INFO_DEPTH:
        raise Refused(f"JSON nested deeper than {MAX_INFO_DEPTH} levels")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise Refused(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Refused("lock information must be a JSON object")
    return document


def write(instance: Instance, hello: Hello, peer_ip: str, server: PidRecord, payload: bytes,
          stats: dict[str, object] | None = None) -> info_files.Written:
    """Keep a client's lock information (a JSON object) under its address and port, with the lock server's
    ``stats`` appended and the lock server named (``server``: its pid and start time, by which the monitor
    knows a document whose writer was killed, info.remove_orphans); the file written. Refused for a document
    the client should not have sent, OSError when it cannot be written."""
    document = parse(payload)
    document.update(
        pid=hello.pid, host=hello.host, server_pid=server.pid, server_started=server.started, updated=time.time(),
    )
    if stats is not None:
        document["stats"] = stats
    return info_files.write(instance, hello.port, document, ip=peer_ip)


def remove_orphans(instance: Instance, log: logging.Logger, when: str) -> None:
    """Remove the proc/info documents of lock servers that were killed (a lock server removes its client's
    when it ends), which would show a client that is gone (show-item-locks, list-open-files); dls-shm's
    ``info.remove_orphans`` says which are surely orphans. ``when`` begins the log line."""
    try:
        removed = info_files.remove_orphans(instance)
    except OSError as exc:
        log.warning("%s: proc/info not tidied: %s", when, exc)
        return
    if removed:
        log.info("%s: removed %d proc/info document(s) of dead lock servers: %s", when, len(removed),
                 ", ".join(removed))


def remove(written: info_files.Written) -> None:
    """Delete the file this lock server wrote (not one another connection of the same address and port wrote
    since)."""
    info_files.remove(written)
