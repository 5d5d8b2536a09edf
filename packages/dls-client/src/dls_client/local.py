"""Local direct locking: record locks taken on this host itself, not through the listener.

On the lock server itself a process need not go through the listener: with
``dls-client[local]`` installed (it brings dls-shm) it can take its locks in the
instance's shared table directly, as jDLS's local processes do. Such a lock
shows in the table with the address 0.0.0.0 and the process's own pid; a
process that goes through the listener to the service on its own host shows as
127.0.0.1 instead, and a remote client with its address.

Two mechanisms, as jDLS's local processes have (guide, "Lock Mechanisms"):

- the instance's lock table (named by JBCRELEASEDIR, or DLS_IPC_KEY) when it
  exists, that is when the monitor runs (``jdls -ib``);
- otherwise OS file locks, the default "for both distributed locks and local
  process locks" of a service started without the monitor (``jdls -ibD``):
  ``fcntl`` locks in the lock files of the lock server's record lock directory
  (``JDLS_LOCK_DIR``, else ``/tmp/jbase``: set it alike for the service and the
  local processes), through dls-shm's ``OsLocks`` as the lock server takes them.
  Such a lock shows only as the process's pid to another process; a request
  that must wait is tried again on a timer (50 ms doubling to 250 ms) by
  ``OsLocks.acquire``, with the same timeout, try and on_wait behaviour as with
  the table (the same code), and woken at once by a release in this process.
  The kernel drops a process's OS locks when it dies; closing the LocalClient
  releases them too. The DLM modes are mapped to read and write locks (see
  ``dls_shm.oslocks``), and proc/info is written as with the table when the
  instance's settings are valid.

``local_mechanism()`` says which one a LocalClient made now would use. Which
client ``get_client()`` gives:

- JDLS not set and dls-shm importable: a ``LocalClient``, direct locking, in the
  table when it exists, else with OS file locks;
- otherwise the remote ``Client`` as always: with JDLS set, through the
  listener it names (even when that is this host: set ``JDLS`` to go through
  the listener, leave it unset to lock directly).

In a table made with ``jdls -P`` a lock belongs to (port, thread): the port is
JBCPORTNO, else the pid, taken again in a forked child; the thread is the
native thread id, as a remote Client sends it. So one thread of one process is
one owner whether it locks directly or through the listener, and two processes
given the same JBCPORTNO remain two owners (their threads differ).

Both kinds name a record the same way (the file's inode, device -1 and the
key), so local and remote owners respect each other's locks. A local owner
is (pid, thread); when its process dies without releasing, the first request
that blocks on one of its table locks reclaims it, as for any dead owner.

dls-shm is imported here only, and only when a LocalClient is made, so
dls-client works without it.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dls_proto import ErrorCode, Mode

from . import identity
from .client import REMOTE_DEVICE, Client, FileLike, FileRef, HeldLock, Key, LocalBinaryLock, _key_bytes
from .config import Config
from .errors import (
    Holder,
    LockCancelled,
    LockRefused,
    LockTimeout,
    RequestFailed,
    ServiceUnavailable,
)
from .lockinfo import LockInfo

if TYPE_CHECKING:
    import dls_shm

#: The address a process locking directly in the table shows with.
LOCAL_ADDRESS = "0.0.0.0"  # noqa: S104 - how jDLS shows a local process, not a bind address
#: Where the lock server keeps OS record locks (``jdls --lock-dir``): this variable, else DEFAULT_LOCK_DIR.
LOCK_DIR_VARIABLE = "JDLS_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/jbase"  # noqa: S108 - the place jDLS documents, shared with the lock server


def default_lock_dir() -> Path:
    """The record lock directory, chosen as ``jdls`` chooses it when given no ``--lock-dir``."""
    return Path(os.environ.get(LOCK_DIR_VARIABLE) or DEFAULT_LOCK_DIR)


def local_table_key() -> int | None:
    """The IPC key of this host's lock table when direct locking in it is possible, else None.

    None when dls-shm is not installed, the instance's settings are invalid, or
    no table of the instance exists (no monitor on this host).
    """
    try:
        import dls_shm
    except ImportError:
        return None
    try:
        key = dls_shm.Instance.from_environment().key
    except ValueError:
        return None
    return key if dls_shm.LockTable.exists(key) else None


def local_mechanism() -> Literal["table", "oslocks"] | None:
    """How a ``LocalClient()`` made now would lock: in the instance's table, with OS file locks, or
    None when it cannot (dls-shm is not installed)."""
    if local_table_key() is not None:
        return "table"
    try:
        import dls_shm  # noqa: F401 - only whether it is there
    except ImportError:
        return None
    return "oslocks"


class _Locks(Protocol):
    """What LocalClient asks of its mechanism: dls_shm.LockTable, or dls_shm.OsLocks."""

    def acquire(
        self, owner: dls_shm.Owner, inode: int, device: int, key: bytes, mode: int, timeout: float | None = None,
        on_wait: Callable[[dls_shm.Holder], None] | None = None,
    ) -> dls_shm.Grant | dls_shm.Conflict: ...

    def unlock(self, handle: int) -> None: ...

    def status(self, owner: dls_shm.Owner, inode: int, device: int, key: bytes
               ) -> tuple[int, dls_shm.Holder | None]: ...

    def release_owner(self, pid: int, thread: int | None = None) -> int: ...

    def close(self) -> object: ...


def _holder(holder: dls_shm.Holder) -> Holder:
    import dls_shm

    return Holder(holder.mode, holder.pid, holder.port, holder.client_pid, holder.thread,
                  dls_shm.unpack_ip(holder.ip))


#: A lock a local process holds: the same HeldLock as a remote client's.
LocalHeldLock = HeldLock

class LocalClient:
    """Record locks taken directly on this host (needs ``dls-client[local]``): in the lock table, or
    OS file locks when there is none (see the module).

    ``key`` names a table to use (it must exist); without it the instance's
    table when it exists, else OS file locks in ``lock_dir`` (default
    JDLS_LOCK_DIR, else /tmp/jbase). The same calls as ``Client`` for record
    locks; threads may share one. Binary and execution locks are OS file locks
    on this host, as for a ``Client`` without JDLS BINARY.
    """

    def __init__(self, key: int | None = None, *, lock_dir: str | os.PathLike[str] | None = None) -> None:
        try:
            import dls_shm
        except ImportError:
            raise ServiceUnavailable("local direct locking needs dls-shm: pip install 'dls-client[local]'") from None
        try:
            instance: dls_shm.Instance | None = dls_shm.Instance.from_environment()
        except ValueError:
            instance = None  # a table named by its key alone, or OS locks: no proc/info to write to
        if key is None and instance is not None and dls_shm.LockTable.exists(instance.key):
            key = instance.key
        #: The table locked in (its IPC key), or None with OS file locks (in lock_dir).
        self.key = key
        self.table: dls_shm.LockTable | None = None
        self.lock_dir: Path | None = None
        self.locks: _Locks
        #: The OS locks (None with a table): this process's own, made again in a forked child.
        self._oslocks: dls_shm.OsLocks | None = None
        if key is not None:
            try:
                self.table = self.locks = dls_shm.LockTable.attach(key)
            except dls_shm.TableError as exc:
                raise ServiceUnavailable(f"local direct locking: {exc}") from None
        else:
            self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
            self.locks = self._oslocks = dls_shm.OsLocks(self.lock_dir)
        self._port = (os.getpid(), identity.port_number())
        self._ip = dls_shm.LOCAL_IP
        self._closed = False
        #: Binary and execution locks: local OS file locks, as a Client without BINARY takes them.
        self._binary = Client(Config())
        #: What this client knows of its locks, written to proc/info/<port> (see dls_client.lockinfo).
        self.info = LockInfo()
        self._instance = instance
        self._info_file: str | None = None
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
            self._port = pid, port = pid, identity.port_number()
        return port

    def _mechanism(self) -> _Locks:
        """The locks of this process: OS locks are the process's own, so a forked child makes new ones."""
        if self._oslocks is not None and self._oslocks.pid != os.getpid():
            import dls_shm

            assert self.lock_dir is not None
            # The parent's locks are not the child's: none held.
            self.locks = self._oslocks = dls_shm.OsLocks(self.lock_dir)
        return self.locks

    # -- lock information ----------------------------------------------------------------

    def publish_info(self) -> bool:
        """Write this process's lock information to proc/info/<port> if it changed since last written.

        Call it when about to wait for input or to sleep, so that show-item-locks
        shows what this process holds while it idles. True when written.
        """
        if self._closed or self._instance is None:
            return False
        return self.info.publish(self._write_info)

    def _write_info(self, document: dict[str, Any]) -> None:
        from dls_shm import info

        assert self._instance is not None
        pid = os.getpid()
        document.update(pid=pid, ip=LOCAL_ADDRESS, host=identity.host_name(), server_pid=0, updated=time.time())
        path = os.fspath(info.write(self._instance, self.port, document))
        if self._info_file is None:
            atexit.register(self._remove_info)
        self._info_file, self._info_pid = path, pid

    def _publish_quietly(self) -> None:
        try:
            self.publish_info()
        except OSError:
            pass  # advisory: the locks work without it, and the next moment tries again

    def _remove_info(self) -> None:
        """Delete the proc/info file this process wrote (a forked child leaves its parent's alone)."""
        path, self._info_file = self._info_file, None
        if path is not None:
            atexit.unregister(self._remove_info)
            if self._info_pid == os.getpid():
                from dls_shm import info

                info.remove(path)

    # -- the owner -------------------------------------------------------------------

    def _owner(self) -> dls_shm.Owner:
        import dls_shm

        if self._closed:
            raise ServiceUnavailable("this LocalClient is closed")
        pid = os.getpid()
        return dls_shm.Owner(pid=pid, thread=threading.get_native_id(), port=self._port_of(pid), client_pid=pid,
                             ip=self._ip)

    def close(self) -> None:
        """Detach from the table, whose locks stay until released (or this process ends); with OS file
        locks, release them (closing the lock files drops them)."""
        if not self._closed:
            self._closed = True
            self._remove_info()
            if self._oslocks is None or self._oslocks.pid == os.getpid():
                self.locks.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- locks -----------------------------------------------------------------------

    def lock(
        self, file: FileLike, key: Key, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
        on_wait: Callable[[Holder], None] | None = None,
    ) -> HeldLock:
        """Take a record lock; wait for it unless ``wait`` is False, at most ``timeout`` seconds.

        Raises LockRefused (held, not waiting), LockTimeout, LockCancelled (a
        release_all of this process withdrew the request), RequestFailed (the
        table's group is full, a bad mode), ServiceUnavailable (the table is gone).
        ``on_wait`` is called with the holder when the request starts waiting.
        """
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 5:
            raise RequestFailed(f"lock mode {mode!r} is not one of 0..5", ErrorCode.BAD_REQUEST)
        ref = file if isinstance(file, FileRef) else FileRef.of(file)
        kb = _key_bytes(key)
        limit: float | None = 0 if not wait else (None if timeout is None else max(timeout, 0.001))
        what = f"{ref.path} {kb.decode('utf-8', 'replace')}"
        import dls_shm as shm

        owner = self._owner()
        waited: list[int] = []

        def callback(holder: shm.Holder) -> None:  # the request starts waiting: publish that
            waited.append(self.info.wait_started(ref.path, ref.inode, kb, mode, owner.thread))
            self._publish_quietly()
            if on_wait is not None:
                on_wait(_holder(holder))

        result: shm.Grant | shm.Conflict | None = None
        try:
            result = self._mechanism().acquire(owner, ref.inode, REMOTE_DEVICE, kb, mode, limit, on_wait=callback)
        except shm.NotHeld:
            raise LockCancelled(f"{what}: request cancelled", Holder(0, 0, 0, 0, 0, "")) from None
        except shm.GroupFull as exc:
            raise RequestFailed(f"{what}: {exc}", ErrorCode.GROUP_FULL) from None
        except shm.TableError as exc:
            raise ServiceUnavailable(f"{what}: {exc}") from None
        finally:
            if waited:  # no longer waiting, whatever the outcome: publish it
                self.info.wait_ended(waited[0])
                if isinstance(result, shm.Grant):
                    self.info.granted(result.handle, ref.path, ref.inode, kb, result.mode, owner.thread)
                self._publish_quietly()
        if isinstance(result, shm.Grant):
            if not waited:
                self.info.granted(result.handle, ref.path, ref.inode, kb, result.mode, owner.thread)
            return HeldLock(self, result.handle, ref, kb, result.mode, result.value)
        assert result is not None
        holder = _holder(result.holder)
        if wait:
            raise LockTimeout(f"{what}: still held by {holder.describe()} when the wait ended", holder)
        raise LockRefused(f"{what}: held by {holder.describe()}", holder)

    def try_lock(self, file: FileLike, key: Key, mode: int = Mode.EX) -> HeldLock:
        """Take a record lock only if it is free now (LockRefused otherwise)."""
        return self.lock(file, key, mode, wait=False)

    def unlock(self, handle: int) -> None:
        """Release a lock by its handle; one no longer held (released by release_all) is no error."""
        import dls_shm

        if self._closed:
            raise ServiceUnavailable("this LocalClient is closed")
        self.info.released(handle)
        try:
            self._mechanism().unlock(handle)
        except dls_shm.NotHeld:
            pass
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"unlock: {exc}") from None

    def release_all(self, *, all_threads: bool = True) -> int:
        """Release every lock of this process (or of the calling thread); how many were freed."""
        import dls_shm

        owner = self._owner()
        try:
            count = self._mechanism().release_owner(owner.pid, None if all_threads else owner.thread)
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"release of all locks: {exc}") from None
        self.info.released_all(None if all_threads else owner.thread)
        return count

    def status(self, file: FileLike, key: Key) -> tuple[int, Holder | None]:
        """Who holds a record lock: (0 free | 1 this thread | 2 another, the holder)."""
        import dls_shm

        ref = file if isinstance(file, FileRef) else FileRef.of(file)
        try:
            state, holder = self._mechanism().status(self._owner(), ref.inode, REMOTE_DEVICE, _key_bytes(key))
        except dls_shm.TableError as exc:
            raise ServiceUnavailable(f"lock status: {exc}") from None
        return state, (None if holder is None else _holder(holder))

    # -- binary locks: OS file locks on this host --------------------------------------

    def binary_lock(
        self, file: FileLike, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | LocalBinaryLock:
        """A binary (file-level) lock: an OS file lock on ``file`` on this host (see ``Client.binary_lock``)."""
        return self._binary.binary_lock(file, mode, wait=wait, timeout=timeout)

    def execution_lock(
        self, number: int, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | LocalBinaryLock:
        """Execution lock ``number`` (0 to 255): an OS file lock on this host (see ``Client.execution_lock``)."""
        return self._binary.execution_lock(number, mode, wait=wait, timeout=timeout)


__all__ = ["LOCAL_ADDRESS", "LocalClient", "LocalHeldLock", "local_mechanism", "local_table_key"]
