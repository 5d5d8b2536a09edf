"""What a lock server inherits from the listener that forked it.

The listener builds one ServerContext and hands it to every lock server it
forks; a lock server needs nothing else from its parent, which is why stopping
or restarting the listener does not disturb it.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from dls_proto import DEFAULT_MAX_FRAME, environment
from dls_shm import Instance, LockTable

#: Defaults of the limits below; each has a jdls long option (a frame's: dls-proto's DEFAULT_MAX_FRAME).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_LOCKS_PER_CLIENT = 100_000
#: Seconds between interim Waiting messages to a client whose request waits.
DEFAULT_INTERIM_PERIOD = 5.0
#: Clients served at once by one listener.
DEFAULT_MAX_CLIENTS = 1000
#: Longest a client host may vanish without a word before its lock server gives it up (seconds); its locks are
#: then kept for the table's lock-delay, for the client to reclaim should it come back.
DEFAULT_DEAD_CLIENT_BOUND = 15.0


@dataclass
class Limits:
    """What one client may ask of its lock server, and how many clients the listener serves."""

    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_locks_per_client: int = DEFAULT_MAX_LOCKS_PER_CLIENT
    interim_period: float = DEFAULT_INTERIM_PERIOD
    max_clients: int = DEFAULT_MAX_CLIENTS
    dead_client_bound: float = DEFAULT_DEAD_CLIENT_BOUND


@dataclass
class ServerContext:
    """Everything a lock server needs from the listener that forked it: the instance, the table (None:
    OS file locks), where OS locks live, the limits, where to log, and the TLS context when the port
    speaks TLS (the lock server does the handshake)."""

    instance: Instance
    table: LockTable | None
    log: logging.Logger
    limits: Limits = field(default_factory=Limits)
    lock_dir: Path = Path(environment.DEFAULT_LOCK_DIR)
    binary_lock_dir: Path = Path(environment.DEFAULT_BINARY_LOCK_DIR)
    #: The service's group (jdls --group): a lock directory made on first use belongs to it.
    gid: int | None = None
    tls: ssl.SSLContext | None = None
