"""Logging of the jdls processes: one log file per instance, errors also in the error trace.

Monitor, listener and lock servers of one instance all append to the same
``log/jdls.log``; each line carries the pid and the role so the processes can
be told apart. Errors are also appended to the instance's ``jbase_error_trace``,
where jBASE sites look first when something went wrong. Every process
configures logging itself after it has forked, so nothing here is shared
between processes but the files, which are opened in append mode.

With ``--syslog`` the same lines also go to the system log (facility daemon,
ident ``jdls``) through ``/dev/log``, when the system has one; otherwise the
log file says that syslog is not available and logging goes on without it.

``--log-format json`` writes the log file and standard error as JSON lines
(``JsonFormatter``), one object per line, for log collectors: ``time`` (ISO
8601, UTC, milliseconds), ``level``, ``role``, ``pid``, ``client`` (the
address and port a lock server serves, null in the other processes),
``message`` and, when there is one, ``exception``. Everything is escaped by
the JSON encoder (to ASCII), so a client's bytes quoted in a message can
neither end the line nor add a field. The error trace keeps jBASE's text, and
syslog its own text format (syslog stamps time and host itself and has no
fields to fill).

The files are WatchedFileHandlers: when logrotate moves or removes the log,
each process opens the new file at its next line (no signal needed; the
monitor and the listener also reopen on SIGHUP, see ``reopen``). Warnings
and errors of one kind (one message template) are limited to a burst per
window, so that a flood (refused connections, a client repeating a bad
request) cannot fill the disk; the next line of that kind after the window
says how many were left out.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

from dls_shm import Instance, trusted

#: The root of the daemon's loggers; lock servers log under ``jdls.server``.
LOGGER = "jdls"
FORMAT = "%(asctime)s %(process)d %(role)s %(levelname)s %(message)s"
#: Syslog adds the time itself; the ident and pid come first, as syslog tools expect.
SYSLOG_FORMAT = "jdls[%(process)d]: %(role)s %(levelname)s %(message)s"
#: The local syslog socket; $JDLS_SYSLOG_SOCKET names another (tests, containers).
SYSLOG_SOCKET = "/dev/log"
SYSLOG_VARIABLE = "JDLS_SYSLOG_SOCKET"

#: --log-format: the text lines of FORMAT (the default), or JSON objects (JsonFormatter).
FORMATS = ("text", "json")

_role = "jdls"
#: The client a lock server serves ("address:port"), None in the other processes.
_client: str | None = None
#: Warnings and errors of one message template: at most BURST lines in WINDOW seconds, per process.
BURST = 10
WINDOW = 10.0


class _RoleFilter(logging.Filter):
    """Stamps each record with the role of the process that wrote it, and the client a lock server serves
    (changed by ``set_role`` after a fork)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        record.client = _client
        return True


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line (``--log-format json``): the fields the module's docstring
    lists. ``ensure_ascii`` escapes every control character and line separator a message may carry."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, object] = {
            "time": f"{time.strftime('%Y-%m-%dT%H:%M:%S', created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "role": getattr(record, "role", _role),
            "pid": record.process,
            "client": getattr(record, "client", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True)


class RateLimit(logging.Filter):
    """Lets at most ``burst`` WARNING-or-worse lines of one message template through per ``window`` seconds;
    the first line let through after that says how many were left out. One instance serves every handler
    of a logger: the decision is made once per record."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        #: template -> [window start (monotonic), lines in this window, lines left out]
        self._seen: dict[tuple[int, str], list[float]] = {}
        self._last: tuple[logging.LogRecord | None, bool] = (None, True)

    def filter(self, record: logging.LogRecord) -> bool:
        last, verdict = self._last
        if record is last:
            return verdict
        verdict = self._decide(record)
        self._last = (record, verdict)
        return verdict

    def _decide(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        key = (record.levelno, str(record.msg))
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window:
            if len(self._seen) > 1000:  # templates are few; this only bounds a pathological case
                self._seen.clear()
            if seen is not None and seen[2]:
                record.msg = (f"{record.getMessage()} (and {int(seen[2])} more like it in the last "
                              f"{now - seen[0]:.0f} s, left out of the log)")
                record.args = None
            self._seen[key] = [now, 1, 0]
            return True
        seen[1] += 1
        if seen[1] <= self.burst:
            return True
        seen[2] += 1
        return False


def set_role(role: str, client: str | None = None) -> None:
    """Name this process in log lines from now on (a forked lock server is no longer the listener), and the
    client it serves (a lock server's)."""
    global _role, _client
    _role = role
    _client = client


def syslog_socket() -> str:
    return os.environ.get(SYSLOG_VARIABLE) or SYSLOG_SOCKET


def _syslog_handler() -> tuple[logging.Handler | None, str | None]:
    """A handler for the local syslog, or None and why there is none."""
    address = syslog_socket()
    if not os.path.exists(address):
        return None, f"syslog not available: {address} does not exist"
    try:
        handler = logging.handlers.SysLogHandler(address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError as exc:
        return None, f"syslog not available: {address}: {exc.strerror or exc}"
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return handler, None


class TrustedFileHandler(logging.handlers.WatchedFileHandler):
    """A log file opened without following a symlink and checked (``trusted``), made with ``mode`` whatever
    the umask: a planted ``log/jdls.log -> /etc/shadow`` is refused, not appended to, also when the file is
    opened again after logrotate moved it (a WatchedFileHandler). The error trace is made 0660 (``mode``),
    because the application's processes of the service's group append to it too."""

    def __init__(self, path: Path, *, mode: int = trusted.FILE) -> None:
        self.file_mode = mode
        super().__init__(path, encoding="utf-8", delay=False)

    def _open(self) -> io.TextIOWrapper:
        shared = self.file_mode == trusted.GROUP_FILE  # the error trace: any process of the group may make it
        fd = trusted.open_file(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode=self.file_mode,
                               shared=shared, owners=trusted.ANY_OWNER if shared else None)
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")  # a client's undecodable bytes, escaped


def setup(
    instance: Instance, role: str, *, verbosity: int = 0, to_stderr: bool = False, syslog: bool = False,
    log_format: str = "text",
) -> logging.Logger:
    """Send the ``jdls`` loggers to the instance's log file (and stderr in the foreground, and syslog).

    ``verbosity`` 0 logs INFO and above, 1 or more DEBUG; ``log_format`` is one of FORMATS, for the log
    file and stderr (the error trace and syslog keep their text).
    """
    set_role(role)
    instance.make_dirs()
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    logger.propagate = False
    text = logging.Formatter(FORMAT)
    formatter = JsonFormatter() if log_format == "json" else text
    role_filter = _RoleFilter()
    limit = RateLimit()
    handlers: list[logging.Handler] = [TrustedFileHandler(instance.log_file)]
    trace = TrustedFileHandler(instance.error_trace, mode=trusted.GROUP_FILE)
    trace.setLevel(logging.ERROR)
    trace.setFormatter(text)  # jBASE's error trace is read by people and jBASE's tools: always text
    handlers.append(trace)
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        if handler is not trace:
            handler.setFormatter(formatter)
        handler.addFilter(limit)
        handler.addFilter(role_filter)
        logger.addHandler(handler)
    if syslog:
        system, why_not = _syslog_handler()
        if system is not None:
            system.addFilter(limit)
            system.addFilter(role_filter)
            logger.addHandler(system)
        else:
            logger.warning("%s: logging to %s only", why_not, instance.log_file)
    return logger


def get(name: str | None = None) -> logging.Logger:
    """The daemon's logger, or one of its children (``get("server")`` is ``jdls.server``)."""
    return logging.getLogger(LOGGER if name is None else f"{LOGGER}.{name}")


def reopen() -> None:
    """Close and open again every log file of this process (SIGHUP, for log rotation)."""
    for handler in logging.getLogger(LOGGER).handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()


def flush() -> None:
    """Flush every handler: a forked process leaves with ``os._exit``, which flushes nothing."""
    for handler in logging.getLogger(LOGGER).handlers:
        handler.flush()
