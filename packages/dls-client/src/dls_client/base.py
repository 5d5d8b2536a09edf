"""What every client offers the application, whatever carries its locks: the calls and their checks.

``Client`` (through the lock service) and ``LocalClient`` (directly on this
host) take the same arguments, refuse the same mistakes and give the same
HeldLock; each supplies only how a record lock is taken, released and looked up.
Binary and execution locks are local OS file locks unless a client says
otherwise (a Client with JDLS BINARY sends them to the service).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Self

from dls_proto import Mode

from . import binary
from .cancel import Cancel
from .errors import DlsError, Holder, Unsupported
from .locks import FileLike, FileRef, HeldLock, Key, LockKind, OnBlocking, OnLost, check_timeout, key_bytes

#: How many locks a client remembers (``BaseClient._live``) before it drops the lost ones.
PRUNE_AT = 1024
#: Every lock kind; a Client's JDLS LOCK= may send fewer of them to the service.
ALL_KINDS = frozenset(("internal", "external"))


class BaseClient(ABC):
    """The calls common to Client and LocalClient; subclasses supply ``_lock``, ``unlock``, ``_status``,
    ``release_all``, ``publish_info`` and ``close``."""

    #: The locks this client holds, by handle (``lock`` fills it, releases empty it): a grant under the handle
    #: of one of them is that lock, converted (``_locked_again``). Each subclass's ``__init__`` makes it.
    _live: dict[int, HeldLock]
    #: How many ``_live`` may hold before the lost among them are dropped (``_prune``).
    _prune_at: int = PRUNE_AT

    #: The record-lock kinds this client takes (the others are refused, see ``lock``).
    _kinds: frozenset[str] = ALL_KINDS

    def lock(
        self, file: FileLike, key: Key, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
        on_wait: Callable[[Holder], None] | None = None, kind: LockKind = "internal", on_lost: OnLost | None = None,
        value_block: bool = False, cancel: Cancel | None = None, on_blocking: OnBlocking | None = None,
    ) -> HeldLock:
        """Take a record lock; wait for it unless ``wait`` is False, at most ``timeout`` seconds.

        Raises LockRefused (held, not waiting), LockTimeout, LockCancelled (a release_all withdrew
        the request), ServiceUnavailable, RequestFailed (an error from the service or the table: a
        full group, a bad mode, a limit). ``on_wait`` is called with the holder when the request
        waits (a Client: whenever the service says it still waits). ``kind`` says whose lock it is:
        "internal" (the application's own records, the default) or "external" (one an external
        database driver would otherwise take with its own lock handler); a kind that JDLS ``LOCK=``
        does not send to the service raises DlsError, and nothing is sent.

        ``on_lost`` is called with the lock if it is lost for any reason other than its own release
        (see HeldLock): promptly, from the thread that found the loss (a Client's watcher thread when
        the application makes no call), so it must be quick and must not block.

        ``value_block``: read the resource's value block at the grant (``held.value_block``, and
        ``held.value_block_valid``). ``cancel``: a dls_client.Cancel that withdraws the request while it
        waits, called from any thread (the call raises Cancelled). ``on_blocking(held, mode)``: called when
        the lock blocks another request (``mode``: the mode it wants), once until nobody waits for the record
        or the lock converts, on a thread of the client's own (a slow callback holds up only later notices):
        what lets an application keep a lock while nobody else wants it. Each raises Unsupported where the
        mechanism cannot do it (OS file locks, an older service), nothing taken. The lock's fencing token
        is ``held.token``.
        """
        if kind not in self._kinds:
            raise self._kind_refused(kind)
        ref = file if isinstance(file, FileRef) else FileRef.of(file)  # the test saves a call on the lock path
        if timeout is not None:
            check_timeout(timeout)
        if value_block or cancel is not None or on_blocking is not None:
            held = self._lock(ref, key_bytes(key), mode, wait, timeout, on_wait, on_lost, value_block=value_block,
                              cancel=cancel, on_blocking=on_blocking)
        else:
            held = self._lock(ref, key_bytes(key), mode, wait, timeout, on_wait, on_lost)  # the common path
        live = self._live
        old = live.get(held.handle)
        if old is None:
            live[held.handle] = held
            if len(live) > self._prune_at:
                self._prune()
            return held
        return self._locked_again(old, held)

    def _prune(self) -> None:
        """Drop the locks lost (never released by their holders: a lost lock's release lets go of nothing
        here) from ``_live``; prune next at twice the locks held then, so that a process holding many pays
        for it rarely."""
        self._live = {h: held for h, held in self._live.items() if not held.released and not held.lost}
        self._prune_at = max(PRUNE_AT, 2 * len(self._live))

    def _locked_again(self, old: HeldLock, new: HeldLock) -> HeldLock:
        """A grant under the handle of a lock this client holds already: the same thread locked the record
        again, which converts the lock it holds (as jDLS does). The application gets the HeldLock it has
        already, in its new mode (and token, and value block when read), not a second one that would leave
        the first saying the old mode, and held after the second's release."""
        if old is new or old.released or old.lost:
            self._live[new.handle] = new
            return new
        old.took_over(new)
        return old

    def _forget_all(self, thread: int | None) -> None:
        """Every lock (of ``thread``; None: of every thread) was released at once (``release_all``)."""
        self._live = {} if thread is None else {h: held for h, held in self._live.items() if held.thread != thread}

    def _forget(self, held: HeldLock) -> None:
        """``held`` is released: a later grant under its handle is another lock."""
        if self._live.get(held.handle) is held:
            del self._live[held.handle]

    def try_lock(self, file: FileLike, key: Key, mode: int = Mode.EX, *, on_lost: OnLost | None = None) -> HeldLock:
        """Take a record lock only if it is free now (LockRefused otherwise)."""
        return self.lock(file, key, mode, wait=False, on_lost=on_lost)

    def status(self, file: FileLike, key: Key) -> tuple[int, Holder | None]:
        """Who holds a record lock: (0 free | 1 this thread | 2 another, the holder)."""
        return self._status(FileRef.of(file), key_bytes(key))

    def binary_lock(
        self, file: FileLike, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | binary.LocalBinaryLock:
        """Take a binary (whole-file) lock on ``file``: an OS file lock on this host (see dls_client.binary)."""
        return binary.binary_lock(file, mode, wait=wait, timeout=timeout)

    def execution_lock(
        self, number: int, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | binary.LocalBinaryLock:
        """Take execution lock ``number`` (0 to 255): an OS file lock on ``execution_lock_NNN`` in
        $JDLS_BINARY_LOCK_DIR (default /tmp/jbase_lock, made on first use) on this host."""
        return binary.execution_lock(number, mode, wait=wait, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- what each client supplies --------------------------------------------------------

    @abstractmethod
    def _lock(self, ref: FileRef, key: bytes, mode: int, wait: bool, timeout: float | None,
              on_wait: Callable[[Holder], None] | None, on_lost: OnLost | None, *, value_block: bool = False,
              cancel: Cancel | None = None, on_blocking: OnBlocking | None = None) -> HeldLock:
        raise NotImplementedError

    @abstractmethod
    def _status(self, ref: FileRef, key: bytes) -> tuple[int, Holder | None]:
        raise NotImplementedError

    @abstractmethod
    def unlock(self, handle: int) -> None:
        """Release a lock by its handle."""
        raise NotImplementedError

    def unlock_held(self, held: HeldLock, block: bytes | None = None, invalidate: bool = False) -> None:
        """Release ``held`` (HeldLock.release calls it), writing ``block`` or invalidating the value block (a
        PW or EX lock's); a client that can find a loss here marks it."""
        if block is not None or invalidate:
            raise Unsupported("this client cannot write value blocks")
        self.unlock(held.handle)

    def convert_held(self, held: HeldLock, mode: int, wait: bool, timeout: float | None, block: bytes | None,
                     invalidate: bool, cancel: Cancel | None) -> None:
        """Convert ``held`` in place (HeldLock.convert calls it; see ``locks.Unlocker.convert_held``)."""
        raise Unsupported("this client cannot convert locks")

    def verify(self, held: HeldLock) -> None:  # noqa: B027 - a default: a client with nothing to look at
        """Mark ``held`` lost if a look that costs no round trip says it is (HeldLock.ensure_held calls
        it)."""

    def let_go(self, held: HeldLock) -> None:  # noqa: B027 - a default: only a remote client keeps lost locks
        """``held`` was lost and its holder now releases it (HeldLock.release calls it): let go whatever of
        it is still held for this holder. A lost lock is held nowhere, unless the client kept it where it
        still was so as not to hand it on before its holder was done with it (SERVER2)."""

    @abstractmethod
    def release_all(self, *, all_threads: bool = True) -> int:
        """Release every lock of this process (or of the calling thread); how many were held."""
        raise NotImplementedError

    @abstractmethod
    def publish_info(self) -> bool:
        """Publish this client's lock information if it changed since last published; True when it was.

        Call it when about to wait for input or to sleep, so that show-item-locks shows what this
        process holds while it idles.
        """
        raise NotImplementedError

    @abstractmethod
    def close(self) -> None:
        """Let go of the connection (or the table); a remote client's locks go with its connection."""
        raise NotImplementedError

    def _kind_refused(self, kind: str) -> Exception:
        return kind_refused(kind)


def kind_refused(kind: str, setting: str | None = None) -> Exception:
    """Why a record lock of ``kind`` is not taken: not a kind at all (ValueError), or one the lock service is
    not sent (JDLS LOCK=``setting``, when a client of the service says it)."""
    if kind not in ALL_KINDS:
        return ValueError(f"lock kind {kind!r} is not 'internal' or 'external'")
    told = "" if setting is None else f" (JDLS LOCK={setting})"
    return DlsError(f"record locks of kind {kind!r} are not handled by the lock service{told}; the caller's own "
                    "lock handler must take them")
