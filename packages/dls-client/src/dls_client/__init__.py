"""dls-client: record locks through the dls lock service, configured by JDLS.

    from dls_client import get_client
    with get_client().lock("data/FBNK.ACCOUNT", "USD163170001"):
        ...  # the record is yours on every application server

This is the package's public face: everything an application uses is here,
and ``get_client()`` keeps the one client of the process.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from dls_proto import Mode

from .__about__ import __version__
from .binary import LocalBinaryLock
from .client import Client
from .config import DEFAULT_PORT, Config, Server, parse
from .errors import (
    AcknowledgementTimeout,
    ConfigurationError,
    DlsError,
    Holder,
    LockCancelled,
    LockLost,
    LockRefused,
    LockTimeout,
    RequestFailed,
    ServiceLost,
    ServiceUnavailable,
)
from .locks import REMOTE_DEVICE, FileRef, HeldLock

if TYPE_CHECKING:
    from .local import LocalClient, LocalHeldLock

__all__ = [
    "DEFAULT_PORT", "REMOTE_DEVICE", "AcknowledgementTimeout", "Client", "Config", "ConfigurationError",
    "DlsError", "FileRef", "HeldLock", "Holder", "LocalBinaryLock", "LocalClient", "LocalHeldLock",
    "LockCancelled", "LockLost", "LockRefused", "LockTimeout",
    "Mode", "RequestFailed", "Server", "ServiceLost", "ServiceUnavailable", "__version__", "get_client", "parse",
]


def __getattr__(name: str) -> Any:
    """LocalClient and LocalHeldLock, imported when first asked for: local direct locking brings
    dls-shm (sysv_ipc, psutil), which a process locking through the service never needs to load."""
    if name in ("LocalClient", "LocalHeldLock"):
        from . import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_process_client: Client | LocalClient | None = None
_process_pid = 0
_process_lock = threading.Lock()


def get_client() -> Client | LocalClient:
    """This process's client, connected on first use (a forked child gets its own).

    With JDLS unset and dls-shm installed (``dls-client[local]``), a LocalClient
    locking directly on this host (shown as 0.0.0.0): in the instance's table when
    it exists, else as OS file locks in $JDLS_LOCK_DIR (default /tmp/jbase), as a
    lock service without a table does. Otherwise a Client through the listener
    JDLS names.
    """
    global _process_client, _process_pid
    with _process_lock:
        if _process_client is None or _process_pid != os.getpid():
            _process_client = Client() if "JDLS" in os.environ else _local_or_remote()
            _process_pid = os.getpid()
        return _process_client


def _local_or_remote() -> Client | LocalClient:
    from .local import LocalClient, local_mechanism

    return Client() if local_mechanism() is None else LocalClient()
