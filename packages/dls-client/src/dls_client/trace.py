"""Where the client says what it does and what went wrong.

VERBOSE sends trace lines to standard error, TRACE=file to that file instead;
communication errors always go to the error trace of the client's instance
($JBCRELEASEDIR/tmp/jbase_error_trace), which is where an operator looks.

The error trace is shared with the service and the other processes of its
group (tmp/ is mode 03770 there), so it is appended to without following a
symlink, only when it is a regular file with one link that others cannot
write, and a trace this process makes is made 0660 whatever the umask.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from dls_proto import Config, environment

#: The error trace's mode: the service's group appends to it, nobody else sees it.
TRACE_MODE = 0o660


class Tracer:
    """The trace of one client: VERBOSE or TRACE=file lines, and the instance's error trace."""

    def __init__(self, config: Config) -> None:
        self.enabled = config.verbose or config.trace is not None
        self.path = config.trace

    def verbose(self, line: str) -> None:
        if self.enabled:
            self._write(line)

    def error(self, line: str) -> None:
        """A communication error: to the error trace always, and to the trace when on."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            path = environment.error_trace()
            os.makedirs(path.parent, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, TRACE_MODE)
            with open(fd, "a") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_mode & stat.S_IWOTH:
                    return  # not a trace to trust: a device, a hard link to another file, open to all
                if st.st_size == 0 and st.st_uid == os.geteuid():
                    os.fchmod(fd, TRACE_MODE)
                f.write(f"{stamp} pid {os.getpid()}: {line}\n")
        except OSError:
            pass  # an unwritable trace must not take the application down
        self.verbose(line)

    def _write(self, line: str) -> None:
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
                return
            except OSError:
                pass
        print(line, file=sys.stderr, flush=True)
