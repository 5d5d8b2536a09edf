"""Binary (whole-file) and execution locks taken on this host alone, as OS file locks.

A client without JDLS BINARY (and every LocalClient) takes binary locks here,
with fcntl on the file itself; execution locks 0-255 are the files
``execution_lock_NNN`` in the binary lock directory (JDLS_BINARY_LOCK_DIR, made
on first use). That directory is the service group's (mode 03770: members lock
there, nobody else even looks in), made and checked as the service's own lock
directories are (``dls_proto.trusted``): a user who could rename or remove its
files could give an execution lock two holders, so it is refused (naming it,
its owner and mode) when it is a symlink, is owned by a user other than root
and this process's user, is writable by others, or by its group without the
sticky bit. On a host whose users share execution locks, root makes it
(``install -d -m 3770 -g GROUP /tmp/jbase_lock``), or each user is given their
own with JDLS_BINARY_LOCK_DIR. Its files are made 0660, never opened through a
symlink, and refused when another hard link or write by others could let
someone outside the group swap them.
With BINARY a Client sends them to the service instead (``Client.binary_lock``).
Open-file-description locks are used where the OS has them (Linux): owned by
the open file, so two locks of one process exclude each other and closing
another descriptor of the file does not drop them; they conflict with POSIX
fcntl locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from types import TracebackType

from dls_proto import Mode, environment

from .errors import DlsError, Holder, LockRefused, LockTimeout
from .locks import FileLike, FileRef

#: The binary lock directory (made on first use) and its execution-lock files: the service's group only.
LOCK_DIR_MODE = 0o3770
LOCK_FILE_MODE = 0o660
#: Execution locks are numbered 0 to 255, as jBASE's.
EXECUTION_LOCKS = range(256)

_SETLK = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)
_SETLKW = getattr(fcntl, "F_OFD_SETLKW", fcntl.F_SETLKW)
_FLOCK = "hhqqi4x"  # struct flock (l_type, l_whence, l_start, l_len, l_pid) on 64-bit Linux
_BUSY = (errno.EAGAIN, errno.EACCES)
#: Shared locally (read locks); the other modes are exclusive (write locks).
_SHARED = (Mode.NL, Mode.CR, Mode.PR)
#: The holder reported for a local binary lock: the OS does not say who (pid 0).
_LOCAL_HOLDER = Holder(0, 0, 0, 0, 0, "this host")


def execution_number(number: int) -> int:
    """``number`` if it names an execution lock (0 to 255), else ValueError."""
    if isinstance(number, bool) or not isinstance(number, int) or number not in EXECUTION_LOCKS:
        raise ValueError(f"execution lock number {number!r} is not in the range 0 to 255")
    return number


def binary_lock(file: FileLike, mode: int, *, wait: bool, timeout: float | None) -> LocalBinaryLock:
    """The binary lock of ``file`` on this host (the file must exist)."""
    path = file.path if isinstance(file, FileRef) else os.fspath(file)
    return LocalBinaryLock.take(path, mode, wait=wait, timeout=timeout, create=False)


def execution_lock(number: int, mode: int, *, wait: bool, timeout: float | None) -> LocalBinaryLock:
    """Execution lock ``number`` on this host: ``execution_lock_NNN`` in the binary lock directory."""
    path = os.path.join(lock_directory(), f"execution_lock_{execution_number(number):03d}")
    return LocalBinaryLock.take(path, mode, wait=wait, timeout=timeout, create=True)


def lock_directory() -> str:
    """The binary lock directory, made (LOCK_DIR_MODE, its parents as the umask makes them) or checked: owned
    by root or this user, a directory and not a symlink, that others cannot write (see the module); DlsError
    names it and what is wrong."""
    from dls_proto import trusted

    directory = environment.binary_lock_dir()
    try:
        try:
            trusted.make_dir(directory, LOCK_DIR_MODE)
        except FileNotFoundError:
            os.makedirs(directory.parent, exist_ok=True)
            trusted.make_dir(directory, LOCK_DIR_MODE)
    except trusted.Untrusted as exc:
        st = os.lstat(directory)
        raise DlsError(f"cannot use the binary lock directory {exc} (owner {trusted.owner_name(st.st_uid)}, mode "
                       f"{stat.S_IMODE(st.st_mode):04o}): it must be a directory of root or of this process's user "
                       f"({trusted.owner_name(os.geteuid())}) that others cannot write") from None
    except OSError as exc:
        raise DlsError(f"cannot make the binary lock directory {os.fspath(directory)!r}: {exc.strerror}") from None
    return os.fspath(directory)


def _open(path: str, flags: int, create: bool) -> int:
    """Open a file to lock it: the caller's own file as named (``create`` False), or an execution lock file of
    the binary lock directory, made LOCK_FILE_MODE if missing, never through a symlink, and refused when it
    has another link or others may write it (``create`` True; Untrusted names what is wrong)."""
    if not create:
        return os.open(path, flags | os.O_CLOEXEC)
    from dls_proto import trusted

    return trusted.open_file(path, flags | os.O_CREAT, mode=LOCK_FILE_MODE, shared=True, owners=trusted.ANY_OWNER)


class LocalBinaryLock:
    """A binary lock taken as an OS file lock (fcntl, the whole file) on this host."""

    __slots__ = ("fd", "mode", "path", "released")

    def __init__(self, fd: int, path: str, mode: int) -> None:
        self.fd = fd
        self.path = path
        self.mode = mode
        self.released = False

    @classmethod
    def take(cls, path: str, mode: int, *, wait: bool, timeout: float | None, create: bool) -> LocalBinaryLock:
        """Lock ``path`` whole: shared for NL, CR and PR, exclusive for CW, PW and EX."""
        shared = mode in _SHARED
        try:
            try:
                fd = _open(path, os.O_RDWR, create)
            except PermissionError:
                if not shared:
                    raise
                fd = _open(path, os.O_RDONLY, create)
        except OSError as exc:
            why = getattr(exc, "problem", None) or exc.strerror  # trusted.Untrusted says what is wrong
            raise DlsError(f"cannot take the binary lock of {path!r}: {why}") from None
        arg = struct.pack(_FLOCK, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        deadline = None if timeout is None or not wait else time.monotonic() + timeout
        pause = 0.005
        try:
            while True:
                try:
                    fcntl.fcntl(fd, _SETLKW if wait and deadline is None else _SETLK, arg)
                    return cls(fd, path, mode)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno not in _BUSY:
                        raise DlsError(f"cannot take the binary lock of {path!r}: {exc.strerror}") from None
                if not wait:
                    raise LockRefused(f"binary lock {path}: held by another process on this host", _LOCAL_HOLDER)
                assert deadline is not None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(f"binary lock {path}: still held by another process on this host "
                                      "when the wait ended", _LOCAL_HOLDER)
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        if not self.released:
            self.released = True
            os.close(self.fd)  # closing the descriptor releases its lock

    def __enter__(self) -> LocalBinaryLock:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<LocalBinaryLock {self.path} {Mode(self.mode).name}>"
