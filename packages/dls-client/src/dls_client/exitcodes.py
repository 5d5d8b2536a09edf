"""The exit statuses of dls-client's commands (dls-lock, dls-test), by name.

BSD's sysexits where one fits (as ``os`` has them), so that a script tells a
bad JDLS from an unreachable service; 126 and 127 are the shell's, for a
command dls-lock cannot run.
"""

from __future__ import annotations

import errno
import os

OK = os.EX_OK
#: dls-test: the string did not come back; dls-lock: the lock was held (unless -E says otherwise).
FAILED = 1
#: A usage error (argparse's own status): dls-lock's KEY too long for a request, too.
USAGE = 2
#: dls-lock: FILE does not exist.
NOINPUT = os.EX_NOINPUT
#: The lock service cannot be reached, or was lost.
UNAVAILABLE = os.EX_UNAVAILABLE
#: JDLS (or JBCPORTNO) is not valid.
CONFIG = os.EX_CONFIG
#: dls-lock: the lock was lost while the command ran (it was stopped), or was found lost when released.
#: sysexits' "temporary failure": the work was cut short by a fault outside the command and may be run
#: again. No other outcome of dls-lock gives it: after 1 (or -E's), 66, 69 or 78 the command never ran
#: (a lock lost before the command started is 69, the service lost).
LOST = os.EX_TEMPFAIL
#: dls-lock: the lock request was refused to break a deadlock (it closed a cycle of waiting requests): the
#: errno of a deadlock (EDEADLK), as the DLM's lock call returns it. The command never ran; run it again.
DEADLOCK = errno.EDEADLK
#: dls-lock --hold: the socket -u reaches the hold process through cannot be made (its directory, under /tmp).
CANT_CREATE = os.EX_CANTCREAT
#: dls-lock: an internal error (its traceback says where).
SOFTWARE = os.EX_SOFTWARE
#: dls-lock: COMMAND exists but cannot be run, or is not found.
CANNOT_RUN = 126
NOT_FOUND = 127


def killed_by(signum: int) -> int:
    """The status a shell reports for a command ended by signal ``signum`` (128 + its number)."""
    return 128 + signum
