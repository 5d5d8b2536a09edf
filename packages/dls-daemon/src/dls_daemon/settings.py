"""What ``jdls -i`` asked for, as the monitor and the listener need it.

The daemons take this plain record rather than argparse's namespace, so they
can be started and tested without a command line, and so the command line can
change its spelling without touching them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from dls_proto import environment, jdls
from dls_shm import DEFAULT_PER_GROUP, DEFAULT_RECORDS, Geometry, Instance, TableFlag, geometry_for

from . import tls
from .context import DEFAULT_ADMIN_ALLOW, Limits, Network

DEFAULT_BIND = "0.0.0.0"  # noqa: S104 - a lock service serves the other application servers
#: jDLS tidies orphaned locks every five minutes unless told otherwise (-t).
DEFAULT_TIDY_MINUTES = 5
#: How long the table keeps the locks of a client whose lock server ended without it (seconds): Consul's
#: default, and longer than a client takes to find its lock server dead (5 s) plus a restart of the
#: service, so that a live client reclaims in time; the price is that a waiter behind a crashed lock
#: server's lock waits that long.
DEFAULT_LOCK_DELAY = 15.0
#: How long a stop waits for a process to go before it is killed.
DEFAULT_STOP_TIMEOUT = 5.0
#: How long ``jdls -ib`` waits for a started daemon to say it is ready.
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Settings:
    """What ``jdls -i`` asked for, defaults filled in: the table's size and flags, where to listen, the
    limits and the lock directories. The monitor and the listener start from it and nothing else."""

    instance: Instance
    #: Table size as -s gave it (records, locks per group); None when not given.
    size: tuple[int, int] | None = None
    tidy_seconds: int = DEFAULT_TIDY_MINUTES * 60
    #: --lock-delay: seconds a lost client's locks are kept for it to reclaim (0: freed at once).
    lock_delay: float = DEFAULT_LOCK_DELAY
    #: --value-block-size: the bytes of every resource's value block in a table made now (None: not given,
    #: the default size).
    block_size: int | None = None
    port_owners: bool = False  # -P
    timestamps: bool = False  # -T
    bind: str = DEFAULT_BIND
    port: int = jdls.DEFAULT_PORT
    verbosity: int = 0
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    #: What one client may ask of a lock server, and how many clients the listener serves.
    limits: Limits = field(default_factory=Limits)
    #: Where the OS file-lock mechanism keeps record locks, and binary locks.
    lock_dir: Path = Path(environment.DEFAULT_LOCK_DIR)
    binary_lock_dir: Path = Path(environment.DEFAULT_BINARY_LOCK_DIR)
    #: --allow: the networks clients may connect from; empty: any address (a warning at start).
    allow: tuple[Network, ...] = ()
    #: --admin-allow: the networks that may read the lock snapshot.
    admin_allow: tuple[Network, ...] = DEFAULT_ADMIN_ALLOW
    #: Log to syslog too (--syslog).
    syslog: bool = False
    #: --group: the gid of the table's IPC objects and the instance's directories; None: the instance's.
    group: int | None = None
    #: TLS on the port: the certificate and its key (--tls-cert, --tls-key), and the CA client certificates
    #: must be signed by (--tls-client-ca; None: no client certificate asked for). No certificate: plain TCP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: --http: the address and port the monitor serves /metrics and the status page on; None: no HTTP server.
    http: tuple[str, int] | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """The port's TLS context, None without --tls-cert; TlsSetupError names the file that cannot be used."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return tls.server_context(self.tls_cert, self.tls_key, self.tls_client_ca)

    @property
    def gid(self) -> int:
        """The service's group: --group, else the group of the instance directory (``Instance.group``)."""
        return self.instance.group() if self.group is None else self.group

    @property
    def geometry(self) -> Geometry:
        records, per_group = self.size or (DEFAULT_RECORDS, DEFAULT_PER_GROUP)
        return geometry_for(records, per_group)

    @property
    def table_flags(self) -> int:
        flags = TableFlag.NONE
        if self.port_owners:
            flags |= TableFlag.PORT_OWNERS
        if self.timestamps:
            flags |= TableFlag.TIMESTAMPS
        return int(flags)
