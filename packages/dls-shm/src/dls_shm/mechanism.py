"""The lock-mechanism interface: what a record-lock mechanism answers, and how a request waits.

Record locks are taken in the lock table (``table.LockTable``) or, on a service
without one, as OS file locks (``oslocks.OsLocks``). Their users, the daemon's
lock servers and dls-client's local direct locking, take the locks of either
through the one interface here, :class:`LockMechanism`, in its words (Owner,
Holder, Grant, Conflict, Queued and the TableError family), so that neither
knows which mechanism it has beyond choosing it.

Waiting is the part the two mechanisms do differently, and only in one fact:
how long a waiter may sleep before it looks again at its queued request.
The table rings a waiter's doorbell when its lock may be granted and looks
again every RECHECK_INTERVAL only as a safety net; an OS lock released by
another process rings nobody, so its waiters poll (50 ms, doubling up to
250 ms). Each mechanism says so in ``pauses()``, and everyone who waits reads
it there: :class:`LockMechanism`'s own ``acquire`` (a blocking lock on top of
``lock``, ``retry`` and ``cancel``) and the lock server, which cannot block and waits in
its own ``select``.

Keeping is the other. A lock server's locks may outlive it for a while, kept for
its client to reclaim through a new lock server (``keep_owner``, ``reclaim``):
the table can do it, since its locks are not the holder process's; OS locks
cannot, since the kernel frees them with their process, and say so.
"""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import NamedTuple

from . import doorbell, this_process
from .holder_watch import HolderWatch
from .layout import KEY_DIGEST, KEY_MAX, SlotFlag


class TableError(Exception):
    """The mechanism cannot do what was asked; the message says why."""


class TableMissing(TableError):
    """No table exists for this key (the monitor is not running, or it was removed)."""


class UntrustedTable(TableError):
    """A table under the instance's key that someone other than root or the service's user made or owns."""


class HalfTable(TableError):
    """Only one of a table's two IPC objects exists under its key: neither a table to attach nor room to create
    one. Removing it is left to the operator (``ipcrm``, as the message says): under a key of its own it may not
    even be dls's, which is why ``jdls -K`` and dls-ipcrm refuse it too."""

    def __init__(self, key: int, kind: str, ident: int) -> None:
        self.key, self.kind, self.id = key, kind, ident
        what, flag = ("semaphore", "-s") if kind == "sem" else ("shared memory segment", "-m")
        super().__init__(f"only a {what} (id {ident}) is left with key 0x{key:08x}, not a whole lock table: "
                         f"check it with ipcs and remove it with ipcrm {flag} {ident}")


class GroupFull(TableError):
    """Every slot of the resource's group is in use."""


class NotHeld(TableError):
    """The handle names no lock (or no waiting request) of this mechanism any more."""


class Deadlock(TableError):
    """The request was chosen to be refused in a cycle of waiters (a deadlock), so that the others go on: its
    owner still holds what it held (a conversion's lock in its old mode)."""


class Unsupported(TableError):
    """The mechanism cannot do what was asked (OS file locks: no value blocks, conversions queue or deadlock
    detection); the message says what."""


class NotWritable(TableError):
    """Only a PW or EX holder writes (or invalidates) a resource's value block."""


class Cancelled(TableError):
    """The waiting request was withdrawn by its ``Cancel`` (another thread's, say)."""


class Cancel:
    """Withdraws a waiting request from any thread: calling it makes the wait it was given to (``acquire``,
    ``change``) cancel the request and raise Cancelled, at once (it rings the waiter's doorbell), or, called
    before the wait begins, as soon as it begins. It does nothing to a request already granted."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._bell = 0

    def __call__(self) -> None:
        self._event.set()
        if self._bell:
            doorbell.ring(self._bell)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def _watching(self, bell: int) -> None:
        self._bell = bell


class Owner(NamedTuple):
    """Who a lock belongs to. ``pid`` is the process in the table (a lock server for a
    remote client); ``client_pid``, ``port`` and ``ip`` say who it acts for. The owner
    identity is (pid, thread), or (port, thread, address) in a table with PORT_OWNERS.

    ``keep``: the owner may outlive ``pid`` (a remote client outlives its lock server), so
    its locks are keepable (SlotFlag.KEEP): when ``pid`` ends without the client having gone
    they are kept for the client to reclaim, not freed. A local process is gone when its
    pid is, so its locks are not. It rides in the Owner, which the lock path already reads,
    so that saying it costs that path nothing it can measure."""

    pid: int
    thread: int
    port: int
    client_pid: int
    ip: bytes
    keep: bool = False
    #: The owner's client does not know DEADLOCK (a client of protocol version 2 or 3): its request is refused
    #: to break a deadlock only when every member of the cycle is such a client (SlotFlag.LEGACY).
    legacy: bool = False


class Holder(NamedTuple):
    """The owner of a conflicting lock, as reported to a refused requester."""

    mode: int
    pid: int
    port: int
    client_pid: int
    thread: int
    ip: bytes


class Grant(NamedTuple):
    """Granted: ``handle`` releases it, ``value`` is the resource's value (the same in every mechanism).

    ``token``: the lock's fencing token, strictly increasing per resource for the table's life (a new one at
    each grant and each conversion up); 0 from a mechanism that has none (OS file locks)."""

    handle: int
    mode: int
    value: int
    token: int = 0


class Conflict(NamedTuple):
    """Not granted and not queued: the request would have had to wait."""

    holder: Holder


class Queued(NamedTuple):
    """Not granted yet: the request waits under ``handle``, to be retried or cancelled.

    ``expires``: when the lock in the way (a kept lock) is freed by itself (``time.time()``), 0 when
    it is not: a waiter looks again then rather than up to a pause later, as nobody rings for it.
    ``watch``: the processes whose end may let the request on, to be watched while it waits (the holders
    in its way and the nearest waiters ahead of it, which may hold the lock when it is first in line;
    see ``holder_watch``); empty: the holder's alone.
    """

    handle: int
    holder: Holder
    expires: float = 0.0
    watch: tuple[int, ...] = ()

    def watched(self) -> tuple[int, ...]:
        """The processes to watch while this request waits."""
        return self.watch or (self.holder.pid,)


def stored_key(key: bytes) -> tuple[bytes, int]:
    """The key as a slot keeps it, and a resource's value is computed over it: verbatim, or a prefix
    and a digest when too long (with the slot flag that says so).

    A key of exactly KEY_MAX bytes is digested too, so that a stored key of
    that length is always a digest and never equal to a verbatim key.
    """
    if len(key) < KEY_MAX:
        return key, 0
    digest = hashlib.blake2b(key, digest_size=KEY_DIGEST).digest()
    return key[: KEY_MAX - KEY_DIGEST] + digest, SlotFlag.LONG_KEY


def resource_value(inode: int, device: int, key: bytes) -> int:
    """The 32-bit value of a resource (never 0, which marks a free slot), of its stored key."""
    return zlib.crc32(key, (inode * 0x9E3779B1 + device) & 0xFFFFFFFF) or 1


#: How long a request waits before ``acquire`` calls its ``on_long_wait`` (seconds).
LONG_WAIT = 0.05


class LockMechanism(ABC):
    """A way of taking record locks: LockTable and OsLocks are the two, and derive from this.

    ``lock`` answers at once: a Grant, a Conflict, or (given a ``wait_token``,
    the token of the doorbell to ring) a Queued request that the caller
    ``retry``-s after each of ``pauses()`` or a ring, or ``cancel``-s.
    ``acquire`` does that waiting itself, on this thread's ``doorbell``: the one
    way of waiting of every mechanism, written here once (a ring of the doorbell
    ends a pause early). A mechanism supplies the abstract methods, and sets
    ``self._local = threading.local()`` in ``__init__`` for the doorbells.
    """

    _local: threading.local

    @abstractmethod
    def lock(
        self, owner: Owner, inode: int, device: int, key: bytes, mode: int, *, wait_token: int = 0, notify: int = 0,
    ) -> Grant | Conflict | Queued:
        """Take a lock, or say who holds it; with ``wait_token`` a blocked request is queued; with ``notify``
        (a doorbell's token) the lock's holder is sent blocking notices there (Unsupported where none are)."""

    @abstractmethod
    def retry(self, handle: int) -> Grant | Queued:
        """Look again at a queued request: granted now, or still queued (behind whom); NotHeld when gone."""

    def rung(self, handles: Sequence[int]) -> Collection[int]:
        """Of the queued requests ``handles``, that all wait on one doorbell which rang, those the ring may be
        for: to ``retry`` now (the others wait on as at their last look). Here every one; the lock table,
        which knows whom it rings, says fewer (``LockTable.rung``)."""
        return handles

    @abstractmethod
    def cancel(self, handle: int) -> bool:
        """Withdraw a queued request; False when it was no longer queued."""

    @abstractmethod
    def unlock(self, handle: int) -> None:
        """Release a granted lock; NotHeld when the handle names none."""

    @abstractmethod
    def status(self, owner: Owner, inode: int, device: int, key: bytes) -> tuple[int, Holder | None]:
        """Who holds a resource: (dls-proto's HolderState: FREE, MINE or OTHER; the holder)."""

    @abstractmethod
    def release_owner(self, pid: int, thread: int | None = None, *, lost: bool = False) -> int:
        """Free every lock and queued request of a process (or of one of its threads); how many. ``lost``: the
        holder ended abnormally (value blocks of its PW and EX locks become not valid, where there are any)."""

    def abandon(self, handle: int) -> None:
        """Release the lock of a holder that ended abnormally; as ``unlock`` where there are no value blocks."""
        self.unlock(handle)

    def convert(
        self, handle: int, mode: int, *, wait_token: int = 0, block: bytes | None = None, invalidate: bool = False,
    ) -> Grant | Conflict | Queued:
        """Convert a granted lock in place (see ``LockTable.convert``); Unsupported where it cannot be done."""
        raise Unsupported(f"{self.name} cannot convert a lock in place (no convert queue): the lock table can")

    def value_block(self, handle: int) -> tuple[bytes, bool]:
        """The value block of a granted lock's resource and whether it is valid; Unsupported where none."""
        raise Unsupported(f"{self.name} cannot keep value blocks: the lock table does")

    #: What the mechanism is called in the errors it gives.
    name = "this lock mechanism"

    @abstractmethod
    def keep_owner(self, pid: int) -> int:
        """The process ``pid`` (a lock server) ends while its client may live: its keepable granted locks
        are kept (KEPT, from now) for the client to reclaim, the rest of its locks and its queued requests
        are freed; how many were kept."""

    @abstractmethod
    def reclaim(self, handle: int, owner: Owner, inode: int, device: int, key: bytes, mode: int) -> Grant:
        """Take back, for ``owner``, the kept lock that ``handle`` names: a Grant with the same handle.
        NotHeld (its reason fit for the asking client's eyes) when no lock is kept under ``handle`` for
        this client (port, client pid, thread), file, key and mode."""

    @abstractmethod
    def pauses(self) -> Iterator[float]:
        """The longest sleep before each next look at a queued request (an endless iterator)."""

    @abstractmethod
    def close(self) -> object:
        """Let go of the mechanism: the table is detached (its locks stay), OS locks are released."""

    def acquire(
        self, owner: Owner, inode: int, device: int, key: bytes, mode: int,
        timeout: float | None = None, on_wait: Callable[[Holder], None] | None = None,
        on_long_wait: Callable[[], None] | None = None, cancel: Cancel | None = None, notify: int = 0,
    ) -> Grant | Conflict:
        """Take a lock, waiting at most ``timeout`` seconds (None: as long as it takes, 0: not at all).

        ``on_wait`` is called once when the request starts waiting, with the holder; ``on_long_wait`` once
        it has waited LONG_WAIT seconds (what is worth a write for others to see: most waits on a busy
        lock are a few hand-offs, far shorter than anyone could look).
        A request still queued when the timeout ends (or when ``on_wait`` or the
        wait raises) is cancelled; one cancelled meanwhile by ``release_owner``
        makes ``retry`` raise NotHeld, one refused to break a deadlock Deadlock, and one withdrawn by its
        ``cancel`` (from any thread) Cancelled.
        """
        if timeout is not None and timeout <= 0 and cancel is None:
            result = self.lock(owner, inode, device, key, mode, notify=notify)
            assert not isinstance(result, Queued)
            return result
        bell = self.doorbell()
        return self._wait(self.lock(owner, inode, device, key, mode, wait_token=bell.token, notify=notify), bell,
                          timeout, on_wait, on_long_wait, cancel)

    def change(
        self, handle: int, mode: int, timeout: float | None = None, *, block: bytes | None = None,
        invalidate: bool = False, on_wait: Callable[[Holder], None] | None = None,
        on_long_wait: Callable[[], None] | None = None, cancel: Cancel | None = None,
    ) -> Grant | Conflict:
        """Convert granted lock ``handle`` to ``mode``, waiting at most ``timeout`` seconds, as ``acquire``
        waits (a Conflict when not granted in time: the lock stays held in its old mode)."""
        if timeout is not None and timeout <= 0 and cancel is None:
            result = self.convert(handle, mode, block=block, invalidate=invalidate)
            assert not isinstance(result, Queued)
            return result
        bell = self.doorbell()
        return self._wait(self.convert(handle, mode, wait_token=bell.token, block=block, invalidate=invalidate),
                          bell, timeout, on_wait, on_long_wait, cancel)

    def _wait(
        self, queued: Grant | Conflict | Queued, bell: doorbell.Doorbell, timeout: float | None,
        on_wait: Callable[[Holder], None] | None, on_long_wait: Callable[[], None] | None, cancel: Cancel | None,
    ) -> Grant | Conflict:
        """Wait for a request just made with this thread's doorbell (``acquire``, ``change``)."""
        if not isinstance(queued, Queued):
            return queued
        if cancel is not None:
            cancel._watching(bell.token)
        watch = self._holder_watch()
        watch.drop_ended()
        ended: set[int] = set()  # processes found ended whose locks stay in the way (kept for their clients)
        try:
            if on_wait is not None:
                on_wait(queued.holder)
            deadline = None if timeout is None else time.monotonic() + timeout
            long_from = None if on_long_wait is None else time.monotonic() + LONG_WAIT
            for pause in self.pauses():
                if cancel is not None and cancel.requested:
                    if self.cancel(queued.handle):
                        raise Cancelled(f"the request {queued.handle:#x} was cancelled while it waited")
                    queued = self.retry(queued.handle)  # granted meanwhile: the grant stands
                    if not isinstance(queued, Queued):
                        return queued
                if long_from is not None:
                    now = time.monotonic()
                    if now >= long_from:
                        assert on_long_wait is not None
                        long_from = None
                        on_long_wait()
                    else:
                        pause = min(pause, long_from - now)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.cancel(queued.handle)
                        return Conflict(queued.holder)
                    pause = min(pause, left)
                if queued.expires:
                    pause = min(pause, max(0.0, queued.expires - time.time()))
                # Woken by a ring, or by a watched process's end: a lock nobody frees otherwise.
                fds, gone = watch.follow(() if queued.expires else
                                         [pid for pid in queued.watched() if pid not in ended])
                if gone:
                    ended.update(gone)  # look again now, once: it clears the ended processes' locks
                else:
                    ended.update(watch.ended(bell.wait(pause, fds)))
                queued = self.retry(queued.handle)
                if not isinstance(queued, Queued):
                    return queued
        except BaseException:
            if isinstance(queued, Queued):
                self.cancel(queued.handle)
            raise
        raise AssertionError("pauses() ended")  # it never does

    def doorbell(self) -> doorbell.Doorbell:
        """This thread's doorbell, made on first use (and again in a forked child)."""
        bell: doorbell.Doorbell | None = getattr(self._local, "bell", None)
        if bell is None or self._local.pid != this_process.pid:
            bell = self._local.bell = doorbell.Doorbell()
            self._local.watch = HolderWatch()
            self._local.pid = this_process.pid
        return bell

    def _holder_watch(self) -> HolderWatch:
        """This thread's watch of the processes its waits wait on, made with its doorbell. It is kept from
        one wait to the next, its descriptors with it: a process on a busy lock waits on the same few
        others again and again (a pidfd each, opened once, not at each wait)."""
        self.doorbell()
        watch: HolderWatch = self._local.watch
        return watch
