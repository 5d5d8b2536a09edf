"""Who this client process is, as the service records it.

The port is jBASE's port number: JBCPORTNO when set, else the process id,
which is unique on the host while the process lives.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from .errors import ConfigurationError


def port_number() -> int:
    text = os.environ.get("JBCPORTNO")
    if text is None or text == "":
        return os.getpid()
    if not text.isdigit() or int(text) >= 1 << 32:
        raise ConfigurationError(f"JBCPORTNO={text!r} is not a port number (0 to 4294967295)")
    return int(text)


def thread_id() -> int:
    return threading.get_native_id()


def host_name() -> str:
    return socket.gethostname()[:255]


def program_name() -> str:
    return os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")[:255]
