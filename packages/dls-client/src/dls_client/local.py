"""Local direct locking: record locks taken on this host itself, in the lock table or as OS file locks.

This is the one module of dls-client that imports dls-shm, and dls-shm is
optional (``dls-client[local]``): without it the import below fails quietly,
``local_mechanism()`` says None, and ``get_client()`` gives a remote Client.

A LocalClient locks through the same mechanism as the instance's lock
servers (one mechanism per instance): the table when the monitor made one,
else OS file locks in the lock servers' record lock directory (the one the
listener recorded, else JDLS_LOCK_DIR).
It follows a table made later: its OS locks are dls-shm's OsLocks made with
the instance's table key, which refuse (TableServes) once a table exists, and
a client that then holds no OS lock switches to the table and asks again; one
that holds some cannot (the table does not know them) and raises
ServiceUnavailable. (A monitor makes no table while an OS lock is held, so
that happens only in a race with a monitor that then refuses.)
It names a record as a remote client does (inode, device -1, key), so local
and remote owners exclude each other. Its owner is (pid, thread), or (port,
thread) in a ``jdls -P`` table, the port and thread taken as a remote Client
sends them, so one thread is one owner whichever way it locks.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from dls_proto import LOCK_MODES, ErrorCode, Mode, environment, identity, not_a_mode

from .base import BaseClient
from .blocking import BlockingNotices
from .cancel import Cancel
from .config import Config, port_number
from .errors import (
    Cancelled,
    ConfigurationError,
    Deadlock,
    DlsError,
    Holder,
    InvalidRequest,
    LockCancelled,
    LockRefused,
    LockTimeout,
    NotWritable,
    RequestFailed,
    ServiceUnavailable,
    Unsupported,
    describe,
)
from .lockinfo import LockInfo
from .locks import REMOTE_DEVICE, FileRef, HeldLock, OnBlocking, OnLost, tell_lost
from .trace import Tracer

try:
    import dls_shm
except ImportError:  # dls-client without its local extra: remote locking only
    HAVE_SHM = False
else:
    HAVE_SHM = True

#: The modes a lock may be asked in (as ints: a set test, which a bool passes too, so it is tested apart).
_MODES = frozenset(int(mode) for mode in LOCK_MODES)
#: The address a process locking directly shows with (as jDLS shows a local process; not a bind address).
LOCAL_ADDRESS = "0.0.0.0"  # noqa: S104
#: A lock a local process holds: the same HeldLock as a remote client's.
LocalHeldLock = HeldLock
#: How many times one request follows a table that appears (and may go again, refused by its monitor).
FOLLOW_ATTEMPTS = 3

T = TypeVar("T")


def local_table_key() -> int | None:
    """The IPC key of this host's lock table when direct locking in it is possible, else None.

    None when dls-shm is not installed or no table of the instance exists (no monitor on this host).
    ConfigurationError when the instance's settings (DLS_IPC_KEY) are not valid: guessing would lock
    through another mechanism than the service's, unseen by its clients.
    """
    if not HAVE_SHM:
        return None
    key = _instance().key
    return key if dls_shm.LockTable.exists(key) else None


def _instance() -> dls_shm.Instance:
    """The instance the environment names (JBCRELEASEDIR, DLS_IPC_KEY); ConfigurationError when invalid."""
    try:
        return dls_shm.Instance.from_environment()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


#: Said once per process: JDLS_LOCK_DIR names another directory than the instance's listener recorded.
_disagreement_told = threading.Lock()


def _lock_dir_of(instance: dls_shm.Instance | None) -> Path:
    """Where this process takes OS record locks: the directory the instance's listener recorded in
    run/lock-dir (the service's --lock-dir, where its lock servers lock for remote clients), else
    JDLS_LOCK_DIR, else /tmp/jbase.

    The record wins over JDLS_LOCK_DIR: a local process locking elsewhere than the lock servers would hold
    a record that they grant again (two holders). A disagreement is written once to the error trace. A
    record that is not to be trusted (a symbolic link, not a directory, owned by another user than root,
    this user or the service's, writable by others) is a ConfigurationError: locking anywhere else would
    not exclude the service's clients.
    """
    assert instance is not None  # OS locks only for a known instance
    try:
        recorded = instance.trusted_lock_dir()
    except dls_shm.trusted.Untrusted as exc:
        raise ConfigurationError(
            f"local direct locking: the lock directory the listener recorded in {instance.lock_dir_file} is not "
            f"to be trusted: {exc}") from None
    chosen = environment.lock_dir()
    if recorded is None:
        return chosen
    if os.environ.get(environment.LOCK_DIR) and os.path.abspath(chosen) != os.fspath(recorded) \
            and _disagreement_told.acquire(blocking=False):
        Tracer(Config()).error(  # the instance's error trace, where an operator looks
            f"LocalClient: {environment.LOCK_DIR}={chosen} disagrees with the lock directory the instance's "
            f"listener recorded ({recorded}, in {instance.lock_dir_file}): locking in {recorded}, as its lock "
            "servers do")
    return recorded


def local_mechanism() -> Literal["table", "oslocks"] | None:
    """How a ``LocalClient()`` made now would lock: in the instance's table, with OS file locks, or
    None when it cannot (dls-shm is not installed)."""
    if not HAVE_SHM:
        return None
    return "oslocks" if local_table_key() is None else "table"


def _holder(holder: dls_shm.Holder) -> Holder:
    return Holder(holder.mode, holder.pid, holder.port, holder.client_pid, holder.thread,
                  dls_shm.unpack_ip(holder.ip))


#: The holder a LockCancelled names: nobody (the request was withdrawn, not refused by a holder).
_NOBODY = Holder(0, 0, 0, 0, 0, "")


def _failure(exc: dls_shm.TableError, what: str) -> DlsError:
    """The client's exception for the mechanism's ``exc`` about a request for ``what`` (a lock or a
    conversion), outside the table's own vanishing (which the callers handle first)."""
    if isinstance(exc, dls_shm.NotHeld):
        return LockCancelled(f"{what}: request cancelled", _NOBODY)
    if isinstance(exc, dls_shm.mechanism.Cancelled):
        return Cancelled(f"{what}: request cancelled by its Cancel")
    if isinstance(exc, dls_shm.Deadlock):
        return Deadlock(f"{what}: {exc}")
    if isinstance(exc, dls_shm.Unsupported):
        return Unsupported(f"{what}: {exc}")
    if isinstance(exc, dls_shm.NotWritable):
        return NotWritable(f"{what}: {exc}")
    if isinstance(exc, dls_shm.GroupFull):
        return RequestFailed(f"{what}: {exc}", ErrorCode.GROUP_FULL)
    return ServiceUnavailable(f"{what}: {exc}")


def _refusal(what: str, conflict: dls_shm.Conflict, waited: bool) -> LockRefused:
    """A request not granted: LockTimeout when it waited, LockRefused when it would not."""
    holder = _holder(conflict.holder)
    if waited:
        return LockTimeout(f"{what}: still held by {holder.describe()} when the wait ended", holder)
    return LockRefused(f"{what}: held by {holder.describe()}", holder)


class _WaitNotes:
    """What a conversion's wait tells the client's lock information (show-item-locks): that it waits (and the
    caller's ``on_wait``), published once it has waited LONG_WAIT, and its end (published if the start was,
    or if the lock granted is the first in its file). ``LocalClient._lock`` does the same with closures, made
    without a call: its path is the common lock's (opcodes per lock/release cycle, 2026-12-01: 729 before
    issue 14, 800 with a _WaitNotes, 772 with the closures)."""

    __slots__ = ("client", "key", "mode", "on_wait", "published", "ref", "thread", "token")

    def __init__(self, client: LocalClient, ref: FileRef, key: bytes, mode: int, thread: int,
                 on_wait: Callable[[Holder], None] | None) -> None:
        self.client, self.ref, self.key, self.mode, self.thread, self.on_wait = client, ref, key, mode, thread, on_wait
        self.token: int | None = None
        self.published = False

    def started(self, holder: dls_shm.Holder) -> None:
        self.token = self.client.info.wait_started(self.ref.path, self.ref.inode, self.key, self.mode, self.thread)
        if self.on_wait is not None:
            self.on_wait(_holder(holder))

    def long(self) -> None:
        self.published = True
        self.client._publish_quietly()

    def ended(self, new_file: bool) -> None:
        if self.token is not None:
            self.client.info.wait_ended(self.token)
        if self.published or new_file:
            self.client._publish_quietly()


class LocalClient(BaseClient):
    """Record locks taken directly on this host (needs ``dls-client[local]``), with the calls of Client.

    ``key`` names a table to use (it must exist); without it the instance's
    table when it exists, else OS file locks in ``lock_dir``: by default the
    directory the instance's listener recorded (its --lock-dir, in
    $JBCRELEASEDIR/run/lock-dir), which wins over JDLS_LOCK_DIR (a disagreement
    is written once to the error trace), else JDLS_LOCK_DIR, else /tmp/jbase.
    Threads may share one. Binary and execution
    locks are OS file locks on this host, as for a Client without JDLS BINARY.
    """

    def __init__(self, key: int | None = None, *, lock_dir: str | os.PathLike[str] | None = None) -> None:
        if not HAVE_SHM:
            raise ServiceUnavailable("local direct locking needs dls-shm: pip install 'dls-client[local]'")
        try:
            instance: dls_shm.Instance | None = _instance()
        except ConfigurationError:
            if key is None:
                raise  # no table named, and the environment's cannot be known: not OS locks by guess
            instance = None  # a table named by its key alone: no proc/info to write to
        if key is None and instance is not None and dls_shm.LockTable.exists(instance.key):
            key = instance.key
        #: The table locked in (its IPC key), or None with OS file locks (in lock_dir).
        self.key = key
        self.table: dls_shm.LockTable | None = None
        self.lock_dir: Path | None = None
        self.locks: dls_shm.LockMechanism
        #: The OS locks (None with a table): this process's own, made again in a forked child.
        self._oslocks: dls_shm.OsLocks | None = None
        #: The lock directory of the OS locks this client left for a table made later (None otherwise).
        self._followed_from: Path | None = None
        self._instance = instance
        #: Held while this client switches from OS locks to a table that now serves the instance.
        self._switching = threading.Lock()
        #: Blocking notices (made with the first lock taken with on_blocking): the doorbell the table sends
        #: them to, the thread that hears it, and the callbacks' own thread (``blocking``).
        self._notices: _LocalNotices | None = None
        self._notices_made = threading.Lock()
        self._live = {}
        if key is not None:
            try:
                self.table = self.locks = dls_shm.LockTable.attach(
                    key, owners=instance.owners() if instance is not None else dls_shm.trusted.trusted_owners())
            except dls_shm.TableError as exc:
                raise ServiceUnavailable(f"local direct locking: {exc}") from None
        else:
            self.lock_dir = Path(lock_dir) if lock_dir is not None else _lock_dir_of(instance)
            self.locks = self._oslocks = self._new_oslocks()
        self._port = (os.getpid(), port_number())
        #: Each thread's Owner (see _owner).
        self._owners = threading.local()
        self._closed = False
        #: What this client knows of its locks, written to proc/info/<port>@0.0.0.0 (see dls_client.lockinfo).
        self.info = LockInfo()
        self._info_file: dls_shm.info.Written | None = None
        self._info_pid = 0
        self._publish_quietly()  # initialised

    @property
    def mechanism(self) -> Literal["table", "oslocks"]:
        """What this client locks with: the lock table, or OS file locks (no table)."""
        return "oslocks" if self.table is None else "table"

    @property
    def port(self) -> int:
        """This process's port: JBCPORTNO, else its pid (taken again in a forked child)."""
        return self._port_of(os.getpid())

    def _port_of(self, pid: int) -> int:
        """The port of this process, whose pid (os.getpid()) the caller has at hand."""
        was, port = self._port
        if was != pid:
            self._port = pid, port = pid, port_number()
        return port

    def _mechanism(self) -> dls_shm.LockMechanism:
        """The locks of this process: OS locks are the process's own, so a forked child makes new ones."""
        if self._oslocks is not None and self._oslocks.pid != dls_shm.this_process.pid:
            # The parent's locks are not the child's: none held.
            self.locks = self._oslocks = self._new_oslocks()
        return self.locks

    def _new_oslocks(self) -> dls_shm.OsLocks:
        """OS locks of this process in lock_dir, which refuse once a table serves the instance."""
        assert self.lock_dir is not None and self._instance is not None  # OS locks only for a known instance
        return dls_shm.OsLocks(self.lock_dir, table_key=self._instance.key, owners=self._instance.owners())

    def _again(self, exc: dls_shm.TableError, call: Callable[[dls_shm.LockMechanism], T], what: str) -> T:
        """``call(mechanism)`` again after ``exc``: in the table when one now serves the instance (TableServes:
        ``_to_table``), with OS locks when a table this client followed into went before it held anything there
        (TableMissing: its monitor refused, ``_back_to_oslocks``); ``exc`` itself when neither applies.

        Only a failed call comes here, so the lock path itself is the mechanism's call and nothing more.
        """
        for _ in range(FOLLOW_ATTEMPTS):
            if isinstance(exc, dls_shm.TableServes):
                self._to_table(exc, what)
            elif not self._back_to_oslocks():
                raise exc
            try:
                return call(self._mechanism())
            except (dls_shm.TableServes, dls_shm.TableMissing) as again:
                exc = again
        raise ServiceUnavailable(f"{what}: a lock table keeps appearing and going again (a lock monitor starting "
                                 "and refusing?): try again")

    def _to_table(self, served: dls_shm.TableServes, what: str) -> None:
        """Lock in the table that now serves the instance, if this client holds no OS lock (and none waits);
        ServiceUnavailable if it does: the table does not know them, so they cannot move there."""
        with self._switching:
            oslocks = self._oslocks
            if oslocks is None:
                return  # another thread switched meanwhile
            busy = oslocks.held() + oslocks.waiting()
            if busy:
                raise ServiceUnavailable(
                    f"{what}: {served}, but this process holds or waits for {busy} OS file lock(s) taken before, "
                    "which the table does not know: release them (or close this LocalClient) and lock again"
                )
            try:
                table = dls_shm.LockTable.attach(served.key, owners=self._instance.owners() if self._instance
                                                 is not None else dls_shm.trusted.trusted_owners())
            except dls_shm.TableMissing:
                return  # made and removed again by a monitor that refused: OS locks still serve
            except dls_shm.TableError as exc:
                raise ServiceUnavailable(f"{what}: {exc}") from None
            oslocks.close()
            self._followed_from, self.lock_dir = self.lock_dir, None
            self.key = served.key
            self.table = self.locks = table
            self._oslocks = None

    def _back_to_oslocks(self) -> bool:
        """The table this client followed into is gone: back to OS locks if it held nothing there (True),
        else False (its locks went with the table)."""
        with self._switching:
            if self.table is None:
                return True  # another thread went back meanwhile
            if self._followed_from is None or self.info.held:
                return False
            # The gone table is not detached: another thread may still be in it; its mapping goes with it.
            self.lock_dir, self._followed_from = self._followed_from, None
            self.key = self.table = None
            self.locks = self._oslocks = self._new_oslocks()
            return True

    # -- lock information ----------------------------------------------------------------

    def publish_info(self) -> bool:
        """Write this process's lock information to proc/info/<port>@0.0.0.0 if it changed since last written.

        Call it when about to wait for input or to sleep, so that show-item-locks
        shows what this process holds while it idles. True when written.
        """
        if self._closed or self._instance is None:
            return False
        return self.info.publish(self._write_info)

    def _write_info(self, document: dict[str, Any]) -> None:
        assert self._instance is not None
        pid = os.getpid()
        document.update(pid=pid, ip=LOCAL_ADDRESS, host=identity.host_name(), server_pid=0, updated=time.time())
        written = dls_shm.info.write(self._instance, self.port, document, ip=LOCAL_ADDRESS)
        if self._info_file is None:
            atexit.register(self._remove_info)
        self._info_file, self._info_pid = written, pid

    def _publish_quietly(self) -> None:
        try:
            self.publish_info()
        except OSError:
            pass  # advisory: the locks work without it, and the next moment tries again

    def _remove_info(self) -> None:
        """Delete the proc/info file this process wrote (a forked child leaves its parent's alone, and a file
        another process of this port wrote since is left to it)."""
        written, self._info_file = self._info_file, None
        if written is not None:
            atexit.unregister(self._remove_info)
            if self._info_pid == os.getpid():
                dls_shm.info.remove(written)

    # -- the owner -------------------------------------------------------------------

    def _owner(self) -> dls_shm.Owner:
        """The calling thread's owner, made once per thread (and again in a forked child): the lock path
        takes it on every lock."""
        if self._closed:
            raise ServiceUnavailable("this LocalClient is closed")
        owner: dls_shm.Owner | None = getattr(self._owners, "owner", None)
        pid = dls_shm.this_process.pid
        if owner is None or owner.pid != pid:
            owner = self._owners.owner = dls_shm.Owner(pid=pid, thread=threading.get_native_id(),
                                                       port=self._port_of(pid), client_pid=pid,
                                                       ip=dls_shm.LOCAL_IP)
        return owner

    def close(self) -> None:
        """Detach from the table, whose locks stay until released (or this process ends); with OS file
        locks, release them (closing the lock files drops them)."""
        if not self._closed:
            self._closed = True
            self._remove_info()
            if self._notices is not None:
                self._notices.close()
            if self._oslocks is None or self._oslocks.pid == os.getpid():
                self.locks.close()

    # -- locks -----------------------------------------------------------------------

    def _lock(self, ref: FileRef, key: bytes, mode: int, wait: bool, timeout: float | None,
              on_wait: Callable[[Holder], None] | None, on_lost: OnLost | None, *, value_block: bool = False,
              cancel: Cancel | None = None, on_blocking: OnBlocking | None = None) -> HeldLock:
        if mode not in _MODES or mode.__class__ is bool:
            raise RequestFailed(not_a_mode(mode), ErrorCode.BAD_REQUEST)
        notify = 0
        if on_blocking is not None:
            self._table_for(describe(ref.path, key))  # OS file locks send none: refused before anything is taken
            notify = self._notice_bell()
        if value_block:
            self._table_for(describe(ref.path, key))  # before anything is taken
        limit: float | None = 0 if not wait else (None if timeout is None else max(timeout, 0.001))
        owner = self._owner()
        # What _WaitNotes does, as closures: a _WaitNotes would cost the common lock path two calls.
        waited: list[int] = []
        published: list[bool] = []

        def started(holder: dls_shm.Holder) -> None:  # the request starts waiting
            waited.append(self.info.wait_started(ref.path, ref.inode, key, mode, owner.thread))
            if on_wait is not None:
                on_wait(_holder(holder))

        def long() -> None:  # still waiting: worth publishing for show-item-locks
            published.append(True)
            self._publish_quietly()

        withdraw: dls_shm.mechanism.Cancel | None = None
        result: dls_shm.Grant | dls_shm.Conflict | None = None
        new_file = False
        if cancel is not None and wait:  # a request that does not wait has nothing to withdraw
            withdraw = dls_shm.mechanism.Cancel()
            cancel.hook(withdraw)
        try:
            try:
                result = self._mechanism().acquire(owner, ref.inode, REMOTE_DEVICE, key, mode, limit,
                                                   on_wait=started, on_long_wait=long, cancel=withdraw,
                                                   notify=notify)
            except (dls_shm.TableServes, dls_shm.TableMissing) as exc:
                result = self._again(
                    exc, lambda m: m.acquire(owner, ref.inode, REMOTE_DEVICE, key, mode, limit, on_wait=started,
                                             on_long_wait=long, cancel=withdraw, notify=notify),
                    describe(ref.path, key))
        except dls_shm.TableError as exc:
            raise _failure(exc, describe(ref.path, key)) from None
        finally:
            if cancel is not None and withdraw is not None:
                cancel.unhook(withdraw)
            if isinstance(result, dls_shm.Grant):
                new_file = self.info.granted(result.handle, ref.path, ref.inode, key, result.mode, owner.thread)
            if waited:
                self.info.wait_ended(waited[0])
            # No longer waiting, whatever the outcome (once that was published); or the first lock in this file:
            # its name is published once.
            if published or new_file:
                self._publish_quietly()
        if isinstance(result, dls_shm.Grant):
            held = HeldLock(self, result.handle, ref, key, result.mode, result.value, owner.thread, on_lost,
                            token=result.token)
            if value_block:
                self._read_block(held)
            if on_blocking is not None and self._notices is not None:
                self._notices.callbacks.watch(held, on_blocking)
            return held
        assert result is not None
        raise _refusal(describe(ref.path, key), result, wait)

    def _table_for(self, what: str) -> dls_shm.LockTable:
        """The table, for what only it does (value blocks); Unsupported with OS file locks."""
        if self.table is None:
            raise Unsupported(f"{what}: OS file locks (a lock service run with jdls -ibD) cannot keep value blocks "
                              "or send blocking notices: only the lock table does")
        return self.table

    def _read_block(self, held: HeldLock) -> None:
        """Read the value block of ``held``'s resource into it (granted just now in the table): the lock is
        given up if that fails, as if never granted."""
        try:
            held.value_block, held.value_block_valid = self._table_for(describe(held.file.path, held.key)) \
                .value_block(held.handle)
        except BaseException as exc:
            self.unlock(held.handle)
            if isinstance(exc, dls_shm.TableError):
                raise _failure(exc, describe(held.file.path, held.key)) from None
            raise

    def _written(self, held: HeldLock, block: bytes | None) -> tuple[dls_shm.LockTable, bytes | None]:
        """The table and the block to write as ``held``'s resource's value block (the caller checked its mode):
        Unsupported with OS file locks, InvalidRequest for a block longer than the table's."""
        table = self._table_for(describe(held.file.path, held.key))
        if block is not None:
            block = bytes(block)
            if len(block) > table.block_size:
                raise InvalidRequest(f"a value block of {len(block)} bytes for {describe(held.file.path, held.key)}: "
                                     f"this lock table's are {table.block_size} bytes")
        return table, block

    def convert_held(self, held: HeldLock, mode: int, wait: bool, timeout: float | None, block: bytes | None,
                     invalidate: bool, cancel: Cancel | None) -> None:
        """Convert ``held`` in the table (see HeldLock.convert); OS file locks cannot (Unsupported)."""
        if self._closed:
            raise ServiceUnavailable("this LocalClient is closed")
        if mode not in _MODES or mode.__class__ is bool:
            raise RequestFailed(not_a_mode(mode), ErrorCode.BAD_REQUEST)
        what = describe(held.file.path, held.key)
        if block is not None or invalidate:
            block = self._written(held, block)[1]
        limit: float | None = 0 if not wait else (None if timeout is None else max(timeout, 0.001))
        notes = _WaitNotes(self, held.file, held.key, mode, held.thread, None)
        withdraw: dls_shm.mechanism.Cancel | None = None
        if cancel is not None and wait:  # a request that does not wait has nothing to withdraw
            withdraw = dls_shm.mechanism.Cancel()
            cancel.hook(withdraw)
        try:
            result = self._mechanism().change(held.handle, mode, limit, block=block, invalidate=invalidate,
                                              on_wait=notes.started, on_long_wait=notes.long, cancel=withdraw)
        except dls_shm.TableMissing as exc:
            self._lose(held, exc)
            raise held.lost_error() from None
        except dls_shm.NotHeld:
            raise LockCancelled(f"{what}: not held any more (released by release_all?)", _NOBODY) from None
        except dls_shm.TableError as exc:
            raise _failure(exc, what) from None
        finally:
            if cancel is not None and withdraw is not None:
                cancel.unhook(withdraw)
            notes.ended(False)
        if isinstance(result, dls_shm.Conflict):
            raise _refusal(f"{what}: conversion to {Mode(mode).name}", result, wait)
        held.mode, held.token = result.mode, result.token
        self.info.granted(held.handle, held.file.path, held.file.inode, held.key, result.mode, held.thread)
        if held.value_block is not None:  # a lock that reads its block reads it at each conversion
            try:
                held.value_block, held.value_block_valid = self._table_for(what).value_block(held.handle)
            except dls_shm.TableError as exc:
                raise _failure(exc, what) from None

    def unlock(self, handle: int) -> None:
        """Release a lock by its handle; one no longer held (released by release_all) is no error."""
        if self._closed:
            raise ServiceUnavailable("this LocalClient is closed")
        self.info.released(handle)
        try:
            self._mechanism().unlock(handle)
        except dls_shm.NotHeld:
            pass
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"unlock: {exc}") from None

    def unlock_held(self, held: HeldLock, block: bytes | None = None, invalidate: bool = False) -> None:
        """Release ``held``, writing ``block`` or invalidating the value block as it goes (the lock table's: a
        PW or EX lock, HeldLock checked); a table removed under it lost it (HeldLock.release then raises
        LockLost)."""
        if self._closed:
            raise ServiceUnavailable("this LocalClient is closed")
        table = None
        if block is not None or invalidate:
            table, block = self._written(held, block)  # refused before the lock is let go
        self.info.released(held.handle)
        self._forget(held)
        if self._notices is not None:
            self._notices.callbacks.forget(held.handle)
        try:
            if table is None:
                self._mechanism().unlock(held.handle)
            else:
                table.unlock(held.handle, block=block, invalidate=invalidate)
        except dls_shm.NotHeld:
            pass
        except dls_shm.TableMissing as exc:
            self._lose(held, exc)
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"unlock: {exc}") from None

    def verify(self, held: HeldLock) -> None:
        """Whether the table ``held`` is in is still there (a look in shared memory, no round trip): the one
        way a local lock is lost, since a local process's locks live as long as it does."""
        if self.table is None or self._closed:
            return  # OS file locks: the kernel keeps them while this process lives
        try:
            self.table.status(self._owner(), held.file.inode, REMOTE_DEVICE, held.key)
        except dls_shm.TableMissing as exc:
            self._lose(held, exc)
        except dls_shm.TableError:
            pass  # another trouble with the table is for the next call to say

    def _notice_bell(self) -> int:
        """The token of this process's notice doorbell, made (with its thread) on first use."""
        with self._notices_made:
            if self._notices is None or self._notices.pid != os.getpid():
                self._notices = _LocalNotices(self._table_for("blocking notices").notices_due, Tracer(Config()).error)
            return self._notices.bell.token

    def _lose(self, held: HeldLock, exc: dls_shm.TableError) -> None:
        if held.lose(f"{exc}: every lock in it went with it"):
            self.info.released(held.handle)
            trace = Tracer(Config())  # the instance's error trace, where an operator looks
            trace.error(f"Client: lock {describe(held.file.path, held.key)} lost: {held.lost_reason}")
            tell_lost([held], trace.error)

    def release_all(self, *, all_threads: bool = True) -> int:
        """Release every lock of this process (or of the calling thread); how many were freed."""
        owner = self._owner()
        try:
            count = self._mechanism().release_owner(owner.pid, None if all_threads else owner.thread)
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"release of all locks: {exc}") from None
        self.info.released_all(None if all_threads else owner.thread)
        self._forget_all(None if all_threads else owner.thread)
        return count

    def _status(self, ref: FileRef, key: bytes) -> tuple[int, Holder | None]:
        owner = self._owner()
        try:
            try:
                state, holder = self._mechanism().status(owner, ref.inode, REMOTE_DEVICE, key)
            except (dls_shm.TableServes, dls_shm.TableMissing) as exc:
                state, holder = self._again(exc, lambda m: m.status(owner, ref.inode, REMOTE_DEVICE, key),
                                            "lock status")
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"lock status: {exc}") from None
        return state, (None if holder is None else _holder(holder))


__all__ = ["HAVE_SHM", "LOCAL_ADDRESS", "LocalClient", "LocalHeldLock", "local_mechanism", "local_table_key"]


class _LocalNotices:
    """A LocalClient's blocking notices: the doorbell its locks name to the table (``lock(notify=)``), a thread
    that hears it, and the callbacks' own thread (``blocking.BlockingNotices``). The hearing thread looks at
    its closed flag every HEAR_PAUSE seconds: a doorbell's socket closed under a poll is not noticed."""

    HEAR_PAUSE = 0.5

    def __init__(self, due: Callable[[list[int]], list[tuple[int, int]]], report: Callable[[str], None]) -> None:
        self.pid = os.getpid()
        self.bell = dls_shm.NoticeBell()
        self.callbacks = BlockingNotices(report)
        #: Which of the watched locks' notices stand (the table's ``notices_due``).
        self._due = due
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._hear, name="dls-notice-doorbell", daemon=True)
        self._thread.start()

    def _hear(self) -> None:
        fd = self.bell.fileno()
        while not self._closed.is_set():
            if dls_shm.readable([fd], self.HEAR_PAUSE):
                for handle, mode in self.bell.heard(self._standing):
                    self.callbacks.deliver(handle, mode)
        self.bell.close()

    def _standing(self) -> list[tuple[int, int]]:
        """Which of the watched locks' notices stand (the table's word; none when it cannot be asked)."""
        try:
            return self._due(self.callbacks.handles())
        except dls_shm.TableError:
            return []

    def close(self) -> None:
        self._closed.set()
        self.callbacks.close()
