"""The exit statuses of jdls and of the processes it starts, by name.

The command line documents 0, 1 and 2 (``jdls -h``); 70 is BSD's EX_SOFTWARE,
the status of a daemon or lock server that failed with an unexpected
exception, so that it is never mistaken for a refusal.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a jdls command or a daemon process says with its exit status."""

    #: Done (a daemon: stopped when asked).
    OK = 0
    #: Failed, with the reason printed or logged: already running, port in use, no table...
    FAILED = 1
    #: The command line was wrong (argparse's status).
    USAGE = 2
    #: A configuration no dls program can use (EX_CONFIG): a $JBCRELEASEDIR that cannot be an instance's
    #: directory, a bad $DLS_IPC_KEY; for -C, a JDLS or JBCPORTNO that clients refuse.
    CONFIG = 78
    #: An unexpected exception (EX_SOFTWARE): a bug, logged with its traceback.
    CRASHED = 70


def killed_by(signum: int) -> int:
    """The status a shell reports for a process ended by signal ``signum`` (128 + its number)."""
    return 128 + signum
