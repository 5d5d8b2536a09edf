"""A granted lock, and how the client names what it locks: the vocabulary every client shares.

The clients (remote ``Client``, ``LocalClient``) are factories of ``HeldLock``:
a HeldLock knows only how to be converted and released, through the client that
took it, and whether it was lost, which the client marks; so connection, retry,
reclaim and failover stay in the client (the shape of kazoo's lock recipe and
redis-py's lock).
"""


# No ``from __future__ import annotations`` (as in dls_proto.messages): the NamedTuple's fields would be
# strings, each compiled when the class is made, and the first compile() of a process costs about 2 ms.
import math
import os
from collections.abc import Callable
from types import TracebackType
from typing import Literal, NamedTuple, Protocol

from dls_proto import MAX_KEY, Mode

from .cancel import Cancel
from .errors import DlsError, InvalidRequest, LockLost, NotWritable, Unsupported, describe

#: The device number of every record lock: device numbers of a shared file differ from host to
#: host, so only the inode names the file (the table shows the device as -1).
REMOTE_DEVICE = -1

Key = str | bytes
#: Whose record lock it is (JDLS LOCK=): the application's own ("internal") or an external driver's.
LockKind = Literal["internal", "external"]


class FileRef(NamedTuple):
    """A file as the lock service knows it: its inode, and its name for display."""

    inode: int
    path: str

    @classmethod
    def of(cls, file: "FileLike") -> "FileRef":
        """``file`` itself if a FileRef, else the FileRef of the path (DlsError when it cannot be stat'ed)."""
        if isinstance(file, FileRef):
            return file
        try:
            return cls(os.stat(file).st_ino, display_path(os.fspath(file)))
        except OSError as exc:
            raise DlsError(f"cannot lock records of {display_path(os.fspath(file))!r}: {exc.strerror}") from None


FileLike = FileRef | str | os.PathLike[str]


def key_bytes(key: Key) -> bytes:
    """A record key as the service stores it: bytes, a str encoded as UTF-8; InvalidRequest for a str that
    is not text (lone surrogates) or a key longer than MAX_KEY bytes, which no request can carry."""
    if isinstance(key, str):
        text = key
        try:
            key = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"record key {text.encode('utf-8', 'backslashreplace').decode()!r} is not text "
                                 "(bytes that are not UTF-8, decoded with surrogates): give the key as bytes "
                                 "(os.fsencode)") from None
    elif not isinstance(key, bytes):
        raise InvalidRequest(f"record key {key!r}: a str or bytes is expected, not {type(key).__name__}")
    if len(key) > MAX_KEY:
        raise InvalidRequest(f"record key of {len(key)} bytes: a key is at most {MAX_KEY} bytes")
    return key


def check_timeout(timeout: object) -> None:
    """InvalidRequest unless ``timeout`` is None (no limit) or a finite number of seconds, an int or a float:
    not a bool (True would be 1 s), not a str (``"1"`` used to be read as 1000 digits of milliseconds, about 49
    days), not NaN or infinity (which used to raise a bare ValueError or OverflowError). Checked where a
    request is made, by every client, before anything is sent or taken."""
    if timeout is None:
        return
    if timeout.__class__ is not bool and isinstance(timeout, (int, float)):
        try:
            if math.isfinite(float(timeout)):
                return
        except OverflowError:
            pass
    raise InvalidRequest(f"timeout {timeout!r}: seconds (an int or a float, finite) or None for no limit expected")


def display_path(path: str) -> str:
    """A file's name as the service is told it (for display only: the inode names the file): a name that
    is not UTF-8 (os.fsdecode's surrogates) with each such byte written \\xNN, so that it can be sent."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


#: The modes whose holder writes (or invalidates) the resource's value block.
WRITERS = frozenset((Mode.PW, Mode.EX))


class Unlocker(Protocol):
    """What a held lock needs of the client that took it: a way to let it go (writing the value block as
    it goes), to convert it, and to look whether it is still there when that costs no round trip."""

    def unlock_held(self, held: "HeldLock", block: bytes | None = None, invalidate: bool = False) -> None: ...

    def convert_held(self, held: "HeldLock", mode: int, wait: bool, timeout: float | None, block: bytes | None,
                     invalidate: bool, cancel: Cancel | None) -> None:
        """Convert ``held`` (held, not lost, ``block``/``invalidate`` asked of a PW or EX lock only) and set its
        ``mode``, ``token`` and, when it reads them, ``value_block`` and ``value_block_valid``; raise as
        ``HeldLock.convert`` says, the lock unchanged but for a block written."""

    def verify(self, held: "HeldLock") -> None: ...

    def let_go(self, held: "HeldLock") -> None: ...


#: Told, with the lock, that a lock was lost (``client.lock(..., on_lost=...)``).
OnLost = Callable[["HeldLock"], None]
#: Told, with the lock and the mode another request wants, that the lock blocks someone
#: (``client.lock(..., on_blocking=...)``), on the client's notice thread (``blocking``).
OnBlocking = Callable[["HeldLock", int], None]


class LockState:
    """What a granted lock is, whichever client took it: its names, mode, token, value block, and whether
    it was released or lost. ``HeldLock`` (a thread's) and ``dls_client.aio.AsyncHeldLock`` (an asyncio
    task's) add the calls, blocking or awaited; the state and its rules are kept here once."""

    __slots__ = ("file", "handle", "key", "lost_reason", "mode", "on_lost", "released", "thread", "token", "value",
                 "value_block", "value_block_valid")

    def __init__(self, handle: int, file: FileRef, key: bytes, mode: int, value: int, thread: int = 0,
                 on_lost: OnLost | None = None, *, token: int = 0, value_block: bytes | None = None,
                 value_block_valid: bool = True) -> None:
        self.handle = handle
        self.file = file
        self.key = key
        #: The lock's mode now.
        self.mode = mode
        self.value = value
        #: The fencing token of the lock's latest grant or conversion up (0: the mechanism has none).
        self.token = token
        #: The resource's value block as last read (None: the lock does not read it).
        self.value_block = value_block
        #: False when the value block read is not valid (VALNOTVALID); True when valid or not read.
        self.value_block_valid = value_block_valid
        #: The owner thread (its native id; an asyncio task's own number), as the service knows it.
        self.thread = thread
        self.on_lost = on_lost
        self.released = False
        #: Why the lock was lost; None while it is held (or once released by its owner).
        self.lost_reason: str | None = None

    @property
    def lost(self) -> bool:
        """Whether the lock was lost (not released by its owner): nobody may rely on it any more."""
        return self.lost_reason is not None

    def _may_write(self) -> None:
        """NotWritable unless the lock's mode writes the value block."""
        if self.mode not in WRITERS:
            raise NotWritable(f"lock {describe(self.file.path, self.key)} is held in {Mode(self.mode).name}: only a "
                              "PW or EX holder writes or invalidates the value block")

    def lose(self, reason: str) -> bool:
        """Mark the lock lost (its client found out); False if it was released or lost already."""
        if self.released or self.lost_reason is not None:
            return False
        self.lost_reason = reason
        return True

    def lost_error(self) -> LockLost:
        return LockLost(self.file.path, self.key, self.lost_reason or "lost")

    def took_over(self, new: "LockState") -> None:
        """``new`` is a grant under this lock's handle to the same owner: the record locked again, which
        converts the lock it holds (as jDLS does). This lock takes the new mode (and token, and value block
        when read), so that the application keeps one lock object, not a second one that would leave the
        first saying the old mode, and held after the second's release."""
        self.mode, self.token, self.value = new.mode, new.token, new.value
        if new.value_block is not None:
            self.value_block, self.value_block_valid = new.value_block, new.value_block_valid

    def __repr__(self) -> str:
        state = " LOST" if self.lost else " released" if self.released else ""
        return (f"<{type(self).__name__} {self.file.path}:{self.key!r} {Mode(self.mode).name} 0x{self.value:08x} "
                f"token {self.token}{state}>")


class HeldLock(LockState):
    """A granted lock. Release it with ``release()`` or by leaving its ``with`` block.

    A lock lost for any reason other than its own release (the client finds that out, see
    dls_client.route) says so: ``lost`` is true, ``ensure_held()`` raises LockLost, and so does the
    first ``release()`` and the end of a ``with`` block whose body raised nothing (the body's own
    exception is never replaced). ``on_lost`` is run once, by whichever thread found the loss.

    ``mode`` is the lock's mode now (``convert`` changes it); ``token`` its fencing token, which strictly
    increases per resource at each grant and each conversion up (0 where the mechanism has none: OS file
    locks), for a store to refuse the writes of a holder older than the last it saw. ``value_block`` is the
    resource's value block as read at the grant and at each conversion when the lock was asked with
    ``value_block=True`` (None otherwise), and ``value_block_valid`` False when that block is not valid
    (VALNOTVALID: the last value written, read after a PW or EX holder ended abnormally or invalidated it).
    """

    __slots__ = ("client",)

    def __init__(self, client: Unlocker, handle: int, file: FileRef, key: bytes, mode: int, value: int,
                 thread: int = 0, on_lost: OnLost | None = None, *, token: int = 0, value_block: bytes | None = None,
                 value_block_valid: bool = True) -> None:
        self.client = client
        super().__init__(handle, file, key, mode, value, thread, on_lost, token=token, value_block=value_block,
                         value_block_valid=value_block_valid)

    def ensure_held(self) -> None:
        """Raise LockLost if the lock was lost, DlsError if it was released; costs no round trip.

        For a long critical section: call it before each step that must not run without the lock.
        """
        if self.lost_reason is None and not self.released:
            self.client.verify(self)
        if self.lost_reason is not None:
            raise self.lost_error()
        if self.released:
            raise DlsError(f"lock {describe(self.file.path, self.key)} was released")

    def convert(self, mode: int, *, wait: bool = True, timeout: float | None = None, value_block: bytes | None = None,
                invalidate: bool = False, cancel: Cancel | None = None) -> None:
        """Convert the lock to ``mode`` in place: it is never released meanwhile (the DLM's conversion).

        A conversion down (to a mode that goes with everything the old one does: EX to PR, PR to NL) is
        granted at once, and lets in the waiters it no longer blocks. One up (or sideways, CW to PR) is
        granted when ``mode`` goes with every other holder's; otherwise it waits, unless ``wait`` is False, at
        most ``timeout`` seconds, in the resource's convert queue, which is served before the requests
        waiting for a new lock (both first come, first served). A conversion up takes a new ``token``; one
        down, or to the mode it has, keeps it.

        A PW or EX holder may write the value block as it converts (``value_block``: at most the table's or
        the service's block size, 32 bytes by default), or mark it not valid (``invalidate``), before the
        conversion, whether or not that is granted; another mode raises NotWritable and nothing is done.
        A lock asked with ``value_block=True`` reads the block again at the conversion.

        Raises, the lock still held in its old mode: LockRefused (``wait`` False and not grantable now),
        LockTimeout, Deadlock (the conversion closed a cycle of waiters and was chosen to be refused),
        Cancelled (``cancel`` was called), Unsupported (OS file locks, an older service: nothing done),
        ServiceUnavailable (a Client's connection lost while the conversion waited: the lock is reclaimed, if
        it is, in its old mode, or said lost); LockLost if the lock was lost, DlsError if it was released.
        """
        self.ensure_held()
        if value_block is not None or invalidate:
            self._may_write()
        check_timeout(timeout)
        self.client.convert_held(self, mode, wait, timeout, value_block, invalidate, cancel)

    def release(self, value_block: bytes | None = None, invalidate: bool = False) -> None:
        """Release the lock; LockLost (once) if it had been lost meanwhile. Releasing again does nothing.

        A PW or EX holder may write the resource's value block as it goes (``value_block``), or mark it not
        valid (``invalidate``: what it describes may be half done); another mode raises NotWritable, and a
        mechanism without value blocks (OS file locks, an older service) Unsupported: the lock is still
        held then, nothing done.
        """
        if self.released:
            return
        if self.lost_reason is None:
            if value_block is not None or invalidate:
                self._may_write()
            try:
                self.client.unlock_held(self, value_block, invalidate)  # which may find the loss itself
            except (NotWritable, Unsupported, InvalidRequest):
                raise  # refused before anything was done: the lock is still held
            except BaseException:
                self.released = True
                raise
        else:
            self.client.let_go(self)  # what a service may still hold of it for this holder goes only now
        self.released = True
        if self.lost_reason is not None:  # lost before, or found by the unlock
            raise self.lost_error()

    def __enter__(self) -> "HeldLock":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.release()  # LockLost if the lock was lost inside the block
            return
        try:
            self.release()
        except DlsError:
            pass  # the body's own exception is the one the caller must see


def tell_lost(locks: list[HeldLock], log: Callable[[str], None]) -> None:
    """Run the ``on_lost`` callback of each lock just marked lost, in the thread that found the loss and
    outside every lock of the client (a callback may call the client); what a callback raises is logged,
    never raised: the loss is already said by the lock itself."""
    for held in locks:
        if held.on_lost is None:
            continue
        try:
            held.on_lost(held)
        except Exception as exc:
            log(f"Client: on_lost callback of lock {describe(held.file.path, held.key)} raised "
                f"{type(exc).__name__}: {exc}")
