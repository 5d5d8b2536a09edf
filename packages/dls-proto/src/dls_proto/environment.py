"""The environment variables every dls program reads, and what they mean when unset: one place.

A client, the daemon and the tools must agree on who a client is (JBCPORTNO),
where an instance lives (JBCRELEASEDIR) and where OS file locks are kept
(JDLS_LOCK_DIR, JDLS_BINARY_LOCK_DIR); two programs that read them differently
would lock in different places without seeing each other. The service's address
is in JDLS (see ``jdls``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import numerals
from .errors import ConfigurationError

if TYPE_CHECKING:
    from pathlib import Path

PORT_NUMBER = "JBCPORTNO"
RELEASE_DIR = "JBCRELEASEDIR"
LOCK_DIR = "JDLS_LOCK_DIR"
BINARY_LOCK_DIR = "JDLS_BINARY_LOCK_DIR"

#: The instance used when JBCRELEASEDIR is not set.
DEFAULT_RELEASE_DIR = "/var/tmp/dls"  # noqa: S108 - a documented fixed place, not a temp file
#: Where OS file locks of records and of binary locks are kept: the places jDLS documents.
DEFAULT_LOCK_DIR = "/tmp/jbase"  # noqa: S108
DEFAULT_BINARY_LOCK_DIR = "/tmp/jbase_lock"  # noqa: S108
#: The error trace of an instance, relative to its release directory: where jBASE sites look first.
ERROR_TRACE = "tmp/jbase_error_trace"
#: Largest port number JBCPORTNO may give (it travels as 32 bits).
MAX_PORT_NUMBER = (1 << 32) - 1


def _get(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name) or ""


def _path(text: str) -> Path:
    """``text`` as a Path, pathlib imported on first use: with urllib.parse and ipaddress it costs a client's
    start-up (dls-lock's) milliseconds, and a client that takes no OS file lock needs none of these paths."""
    from pathlib import Path

    return Path(text)


def port_number(environ: Mapping[str, str] | None = None) -> int:
    """This process's port number: JBCPORTNO when set, else its pid (unique on the host while it lives)."""
    text = _get(PORT_NUMBER, environ)
    if not text:
        return os.getpid()
    number = numerals.integer(text)
    if number is None or number > MAX_PORT_NUMBER:
        raise ConfigurationError(f"{PORT_NUMBER}={text!r} is not a port number (0 to {MAX_PORT_NUMBER})")
    return number


def release_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The instance's release directory: JBCRELEASEDIR, else DEFAULT_RELEASE_DIR."""
    return _path(_get(RELEASE_DIR, environ) or DEFAULT_RELEASE_DIR)


def error_trace(environ: Mapping[str, str] | None = None) -> Path:
    """The instance's error trace (clients write it too, without the instance's other files)."""
    return release_dir(environ) / ERROR_TRACE


def lock_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where OS file locks of records are kept: JDLS_LOCK_DIR, else DEFAULT_LOCK_DIR."""
    return _path(_get(LOCK_DIR, environ) or DEFAULT_LOCK_DIR)


def binary_lock_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where OS file locks of binary locks are kept: JDLS_BINARY_LOCK_DIR, else DEFAULT_BINARY_LOCK_DIR."""
    return _path(_get(BINARY_LOCK_DIR, environ) or DEFAULT_BINARY_LOCK_DIR)
