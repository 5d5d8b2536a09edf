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

from .__about__ import __version__

if TYPE_CHECKING:
    from dls_proto import Mode

    from .binary import LocalBinaryLock
    from .cancel import Cancel
    from .client import Client
    from .config import DEFAULT_PORT, Config, Server, parse
    from .errors import (
        AcknowledgementTimeout,
        Cancelled,
        ConfigurationError,
        Deadlock,
        DlsError,
        Holder,
        InvalidRequest,
        LockCancelled,
        LockLost,
        LockRefused,
        LockTimeout,
        NotWritable,
        RequestFailed,
        ServiceLost,
        ServiceUnavailable,
        Unsupported,
    )
    from .local import LocalClient, LocalHeldLock
    from .locks import REMOTE_DEVICE, FileRef, HeldLock

__all__ = [
    "DEFAULT_PORT", "REMOTE_DEVICE", "AcknowledgementTimeout", "Cancel", "Cancelled", "Client", "Config",
    "ConfigurationError", "Deadlock",
    "DlsError", "FileRef", "HeldLock", "Holder", "InvalidRequest", "LocalBinaryLock", "LocalClient", "LocalHeldLock",
    "LockCancelled", "LockLost", "LockRefused", "LockTimeout",
    "Mode", "NotWritable", "RequestFailed", "Server", "ServiceLost", "ServiceUnavailable", "Unsupported",
    "__version__", "get_client", "parse",
]

#: Where each public name lives. They are imported when first asked for, so that importing a submodule
#: (``dls_client.lock_command``, whose --help must answer at once) costs nothing of the rest: the wire
#: codecs and construct, ssl; and local direct locking, which brings dls-shm (sysv_ipc, psutil), is
#: never loaded by a process locking through the service.
_HOMES = {
    "Mode": "dls_proto",
    "LocalBinaryLock": ".binary",
    "Client": ".client",
    "Cancel": ".cancel",
    **dict.fromkeys(("DEFAULT_PORT", "Config", "Server", "parse"), ".config"),
    **dict.fromkeys(("AcknowledgementTimeout", "Cancelled", "ConfigurationError", "Deadlock", "DlsError", "Holder",
                     "InvalidRequest", "LockCancelled", "LockLost", "LockRefused", "LockTimeout", "NotWritable",
                     "RequestFailed", "ServiceLost", "ServiceUnavailable", "Unsupported"), ".errors"),
    **dict.fromkeys(("LocalClient", "LocalHeldLock"), ".local"),
    **dict.fromkeys(("REMOTE_DEVICE", "FileRef", "HeldLock"), ".locks"),
}


def __getattr__(name: str) -> Any:
    """The public names of ``_HOMES``, imported on first use (and kept, so this runs once a name)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


_process_client: Client | LocalClient | None = None
_process_pid = 0
_process_lock = threading.Lock()


def get_client() -> Client | LocalClient:
    """This process's client, connected on first use (a forked child gets its own).

    With JDLS unset and dls-shm installed (``dls-client[local]``), a LocalClient
    locking directly on this host (shown as 0.0.0.0): in the instance's table when
    it exists, else as OS file locks where the lock servers take them: the
    directory the instance's listener recorded (run/lock-dir), else
    $JDLS_LOCK_DIR (default /tmp/jbase), as a lock service without a table does. Otherwise a Client through the listener
    JDLS names.
    """
    global _process_client, _process_pid
    with _process_lock:
        if _process_client is None or _process_pid != os.getpid():
            if "JDLS" in os.environ:
                from .client import Client

                _process_client = Client()
            else:
                _process_client = _local_or_remote()
            _process_pid = os.getpid()
        return _process_client


def _local_or_remote() -> Client | LocalClient:
    from .client import Client
    from .local import LocalClient, local_mechanism

    return Client() if local_mechanism() is None else LocalClient()
