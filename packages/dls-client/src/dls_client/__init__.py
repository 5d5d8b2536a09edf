"""dls-client: record locks through the dls lock service, configured by JDLS.

    from dls_client import get_client
    with get_client().lock("data/FBNK.ACCOUNT", "USD163170001"):
        ...  # the record is yours on every application server
"""

from dls_proto import Mode

from .__about__ import __version__
from .client import REMOTE_DEVICE, Client, FileRef, HeldLock, LocalBinaryLock, get_client
from .config import DEFAULT_PORT, Config, Server, parse
from .errors import (
    AcknowledgementTimeout,
    ConfigurationError,
    DlsError,
    Holder,
    LockCancelled,
    LockRefused,
    LockTimeout,
    RequestFailed,
    ServiceLost,
    ServiceUnavailable,
)
from .local import LocalClient, LocalHeldLock

__all__ = [
    "DEFAULT_PORT", "REMOTE_DEVICE", "AcknowledgementTimeout", "Client", "Config", "ConfigurationError",
    "DlsError", "FileRef", "HeldLock", "Holder", "LocalBinaryLock", "LocalClient", "LocalHeldLock",
    "LockCancelled", "LockRefused", "LockTimeout",
    "Mode", "RequestFailed", "Server", "ServiceLost", "ServiceUnavailable", "__version__", "get_client", "parse",
]
