"""Where the client says what it does and what went wrong.

VERBOSE sends trace lines to standard error, TRACE=file to that file instead;
communication errors always go to the error trace of the client's instance
($JBCRELEASEDIR/tmp/jbase_error_trace), which is where an operator looks.
"""

from __future__ import annotations

import os
import sys
import time

from dls_proto import Config, environment


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
            with open(path, "a") as f:
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
