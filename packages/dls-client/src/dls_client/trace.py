"""Where the client says what it does and what went wrong.

VERBOSE sends trace lines to standard error, TRACE=file to that file instead;
communication errors always go to the error trace of the client's instance
($JBCRELEASEDIR/tmp/jbase_error_trace), which is where an operator looks.

The trace has one line per event, each readable alone: every request sent and
every reply received (``sent``, ``received``: its kind, request id, record,
mode, outcome and, for a reply, the time since its request was sent), each
connection made (with what its Welcome said), failed, made again, and each
switch between SERVER and SERVER2. Nothing is formatted while the trace is
off: a channel asks for a line only when ``enabled``.

The error trace is shared with the service and the other processes of its
group (tmp/ is mode 03770 there), so it is appended to without following a
symlink, only when it is a regular file with one link that others cannot
write, and a trace this process makes is made 0660 whatever the umask. A
TRACE file is opened the same way (made 0640: it is the user's own), and only
when this process's user owns it: another user's file is theirs to read, and
the trace names files, keys, pids and handles. When it cannot be opened, the
client says so once on standard error, naming the file and why, and traces to
standard error instead.

Each line is written with one write() of the whole line and its newline: the
threads of SERVER and SERVER2 trace at once, and their lines must not be glued
together.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from dls_proto import (
    WAIT_FOREVER,
    Acquired,
    BlockStatus,
    Cancel,
    Config,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Granted,
    Hello,
    HolderState,
    InfoGet,
    InfoPut,
    InfoSnapshot,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    Mode,
    Reclaim,
    Refused,
    RefuseReason,
    Release,
    Settings,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
    Waiting,
    Welcome,
    environment,
)
from dls_proto.text import printable

#: The error trace's mode: the service's group appends to it, nobody else sees it.
TRACE_MODE = 0o660
#: A TRACE file's mode when the client makes it: the user's own trace, which the group may read.
TRACE_FILE_MODE = 0o640


def append_safely(path: str | os.PathLike[str], mode: int, *, own: bool = False) -> int:
    """Open ``path`` to append to it (made with ``mode`` whatever the umask): the descriptor. Not through a
    symlink someone planted, and only a regular file with one link that others cannot write (not a device, a
    hard link to another file, a file open to all); with ``own``, only a file of this process's user (a TRACE
    file another user made is theirs to read). OSError says why not (``trusted.Untrusted``: what is wrong)."""
    from dls_proto import trusted

    return trusted.open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode=mode, shared=True,
                             owners=frozenset({os.geteuid()}) if own else trusted.ANY_OWNER)


def write_line(fd: int, line: str) -> None:
    """Write ``line`` and its newline with one write(): lines of several threads never interleave."""
    data = (line + "\n").encode(errors="backslashreplace")
    while data:
        data = data[os.write(fd, data):]


class Tracer:
    """The trace of one client: VERBOSE or TRACE=file lines, and the instance's error trace."""

    def __init__(self, config: Config) -> None:
        self.enabled = config.verbose or config.trace is not None
        self.path = config.trace
        self._untold = threading.Lock()  # held once it was said that the TRACE file cannot be opened

    def verbose(self, line: str) -> None:
        if self.enabled:
            self._write(line)

    def error(self, line: str) -> None:
        """A communication error: to the error trace always, and to the trace when on."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            path = environment.error_trace()
            os.makedirs(path.parent, exist_ok=True)
            fd = append_safely(path, TRACE_MODE)
            try:
                write_line(fd, f"{stamp} pid {os.getpid()}: {line}")
            finally:
                os.close(fd)
        except OSError:
            pass  # an unwritable trace must not take the application down
        self.verbose(line)

    def _write(self, line: str) -> None:
        if self.path:
            try:
                fd = append_safely(self.path, TRACE_FILE_MODE, own=True)
            except OSError as exc:
                if self._untold.acquire(blocking=False):  # the first failure only, whatever the thread
                    problem = getattr(exc, "problem", None)
                    reason = ("a symbolic link, not followed" if problem == "is a symbolic link" else problem
                              or exc.strerror or str(exc))
                    _stderr(f"Client: JDLS TRACE: cannot append to {printable(self.path)} ({reason}): tracing to "
                            "standard error instead")
            else:
                try:
                    write_line(fd, line)
                    return
                except OSError:
                    pass
                finally:
                    os.close(fd)
        _stderr(line)


def _stderr(line: str) -> None:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by an object with no descriptor: its own write()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return
    with contextlib.suppress(OSError):
        write_line(fd, line)


def mode_name(mode: int) -> str:
    """A lock mode as the trace and the messages name it (EX, PR ...; a number no mode has, as itself)."""
    try:
        return Mode(mode).name
    except ValueError:
        return str(mode)


def record(path: str, inode: int, key: bytes) -> str:
    """A record lock as a trace line names it: file, inode and key, escaped (they may hold anything)."""
    return f"{printable(path) or '?'} (inode {inode}) key {_key(key)}"


def _key(key: bytes) -> str:
    """A key, quoted, with control characters (and bytes that are not UTF-8) escaped."""
    return f"'{printable(key.decode('utf-8', 'backslashreplace'))}'"


_FLAG_NAMES = ((LockFlag.NO_INTERIM, "no interim"), (LockFlag.OSLOCK, "OS lock"), (LockFlag.BINARY, "binary"),
               (LockFlag.VALUE_BLOCK, "value block"), (LockFlag.NOTIFY, "notify"))
_BLOCK_STATES: dict[int, str] = {BlockStatus.VALID: "value block valid", BlockStatus.NOT_VALID: "value block NOT VALID"}


_STATES: dict[int, str] = {HolderState.FREE: "free", HolderState.MINE: "held by this client", HolderState.OTHER: "held"}
_REASONS: dict[int, str] = {RefuseReason.BUSY: "held by another, and the request would not wait",
                             RefuseReason.TIMEOUT: "still held when the wait ended",
                             RefuseReason.CANCELLED: "the request was cancelled",
                             RefuseReason.DEADLOCK: "a deadlock"}
_CODES: dict[int, str] = {code: code.name.lower().replace("_", " ") for code in ErrorCode}
_MECHANISMS: dict[int, str] = {Mechanism.TABLE: "lock table", Mechanism.OSLOCKS: "OS file locks"}


def _seconds_ms(ms: int) -> str:
    return f"{ms / 1000:g} s"


def _holder(reply: Refused | Waiting | StatusReply) -> str:
    return (f"held {mode_name(reply.holder_mode)} by port {reply.holder_port}, pid {reply.holder_client_pid} on "
            f"{printable(reply.holder_ip)} (lock server pid {reply.holder_pid})")


def request_line(message: Message) -> str:
    """What a request says, for the trace line of its sending."""
    kind = type(message).__name__
    head = f"{kind} #{message.request_id}"
    if isinstance(message, Lock):
        wait = ("no wait" if message.timeout_ms == 0 else "wait forever" if message.timeout_ms == WAIT_FOREVER
                else f"wait {_seconds_ms(message.timeout_ms)}")
        flags = [name for flag, name in _FLAG_NAMES if message.flags & flag]
        extra = f", {'+'.join(flags)}" if flags else ""
        return f"{head} {record(message.path, message.inode, message.key)} {mode_name(message.mode)}, {wait}{extra}"
    if isinstance(message, Convert):
        return f"{head} handle {message.handle:#x} to {mode_name(message.mode)}, value flags {message.value_flags}"
    if isinstance(message, Release):
        return f"{head} handle {message.handle:#x}, value flags {message.value_flags}"
    if isinstance(message, Cancel):
        return f"{head} of #{message.target}"
    if isinstance(message, Reclaim):
        mode = mode_name(message.mode)
        return f"{head} handle {message.handle:#x} inode {message.inode} key {_key(message.key)} {mode}"
    if isinstance(message, Unlock):
        return f"{head} handle {message.handle:#x}"
    if isinstance(message, UnlockAll):
        return f"{head} thread {'all' if message.thread_id == 0xFFFFFFFFFFFFFFFF else message.thread_id}"
    if isinstance(message, Status):
        return f"{head} inode {message.inode} key {_key(message.key)}"
    if isinstance(message, (InfoPut, Echo)):
        return f"{head} {len(message.payload if isinstance(message, InfoPut) else message.data)} bytes"
    if isinstance(message, InfoGet):
        return head
    if isinstance(message, Settings):
        return f"{head} acknowledgement timeout {_seconds_ms(message.ack_timeout_ms)}"
    if isinstance(message, Hello):
        return (f"{head} versions {message.min_version}..{message.max_version}, port {message.port}, pid "
                f"{message.pid}, host '{printable(message.host)}'")
    return head


def reply_line(message: Message) -> str:
    """What a reply says, for the trace line of its arrival: its kind, request id and outcome."""
    head = f"{type(message).__name__} #{message.request_id}"
    said = outcome(message)
    return f"{head} {said}" if said else head


def outcome(message: Message) -> str:
    """What a reply says, in words, as an operator reads it ("" when nothing but its kind): the trace's, and the
    error trace's when two services of SERVER2 answered one request differently."""
    if isinstance(message, Granted):
        return f"granted {mode_name(message.mode)}, handle {message.handle:#x}"
    if isinstance(message, Acquired):
        block = _BLOCK_STATES.get(message.block_status)
        return (f"granted {mode_name(message.mode)}, handle {message.handle:#x}, token {message.token}"
                + (f", {block}" if block else ""))
    if isinstance(message, Refused):
        why = _REASONS.get(message.reason, f"reason {message.reason}")
        return f"refused ({why}), {_holder(message)}"
    if isinstance(message, Waiting):
        return f"still waiting after {_seconds_ms(message.waited_ms)}, {_holder(message)}"
    if isinstance(message, StatusReply):
        state = _STATES.get(message.state, f"state {message.state}")
        return f"{state}, {_holder(message)}" if message.state else state
    if isinstance(message, Unlocked):
        return f"released {message.count} lock(s)"
    if isinstance(message, (InfoSnapshot, EchoReply)):
        return f"{len(message.payload if isinstance(message, InfoSnapshot) else message.data)} bytes"
    if isinstance(message, Error):
        code = _CODES.get(message.code, f"code {message.code}")
        return f"error ({code}): {printable(message.reason)}"
    if isinstance(message, Welcome):
        mechanism = _MECHANISMS.get(message.mechanism, f"mechanism {message.mechanism}")
        return (f"protocol version {message.version}, lock server pid {message.server_pid}, {mechanism}, "
                f"lock-delay {_seconds_ms(message.lock_delay_ms)}")
    return ""
