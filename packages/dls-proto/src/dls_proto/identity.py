"""Who this process is, as it introduces itself to a lock service in Hello.

The service records a client as its port number (JBCPORTNO, else its pid),
pid, thread, host and program, and shows them to operators; every program
that speaks to the service (the client library, ``jdls -C``, the utilities)
says it the same way.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping

from .environment import port_number
from .messages import PROTOCOL_VERSIONS, Hello

#: Longest host or program name Hello carries (its length is one byte).
NAME_MAX = 255


def thread_id() -> int:
    """The calling thread as the service knows it: its native id."""
    return threading.get_native_id()


def host_name() -> str:
    return socket.gethostname()[:NAME_MAX]


def program_name() -> str:
    return os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")[:NAME_MAX]


def hello(program: str | None = None, *, port: int | None = None, environ: Mapping[str, str] | None = None) -> Hello:
    """This process's Hello (request id 0), offering every protocol version this package speaks.

    ``port`` defaults to JBCPORTNO, else the pid (ConfigurationError when JBCPORTNO is not a number).
    """
    return Hello(0, PROTOCOL_VERSIONS[0], PROTOCOL_VERSIONS[1], 0,
                 port_number(environ) if port is None else port, os.getpid(), thread_id(), host_name(),
                 (program_name() if program is None else program)[:NAME_MAX])
