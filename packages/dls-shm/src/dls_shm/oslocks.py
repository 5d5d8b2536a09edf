"""OS file locks: the lock mechanism of a lock service that has no lock table.

When the listener runs without the monitor (``jdls -ibD``) there is no shared
memory, and a record lock is a POSIX (``fcntl``) lock taken by the process that
serves it: the kernel drops it when that process dies, however it dies, which
is the release jDLS relies on. The files and bytes locked are a contract like
the table layout (the README says how they are named): every process that
takes OS locks must name them alike.

- A lock file is removed when its last lock goes, under a lock: the process
  letting go of its last lock on the file takes an open-file-description lock
  on the whole file (which conflicts with every POSIX lock, its own process's
  too) and unlinks the file only if that succeeds and the name still names that
  inode. A process that has just opened a file and locked a byte of it looks
  again whether the name still names its inode; if not (removed meanwhile), it
  lets go and opens the new file. So two owners never lock two inodes under one
  name, and files do not pile up. (In a directory of the group, 03770, a file
  made by another user cannot be removed by this one: it is left for its
  maker, or the next one to finish with it.)
- Permissions: the directory is the service group's (``trusted.SHARED``,
  03770, checked like the instance directory: no symlink, no other user's, not
  writable by others) and lock files are made 0660, so that nobody outside the
  group can open, hold or delete a lock file.
- One byte per key, at a digest of the key: different keys of one file lock
  independently; two keys whose digests collide exclude each other needlessly,
  but never both hold incompatible locks.
- ``fcntl`` has two lock types, so the six DLM modes map to none, read or write
  (``OS_CLASS``): exact for jBASE's READ (PR) and WRITE (EX), stricter than the
  DLM matrix for the others, never looser.
- ``fcntl`` locks belong to a process, not to a thread: the kernel never makes a
  process wait for its own locks. So this class keeps its own record of which
  owner (pid, thread) of this process holds what, refuses another thread's
  conflicting request as the table would, and takes for each byte the strongest
  OS lock its owners need. An owner in another process is known only by the
  pid ``F_GETLK`` gives.
- Waiting: there is no descriptor to wait on for an ``fcntl`` lock, and a
  blocking ``F_SETLKW`` would stop a single-threaded lock server. A request that
  must wait is queued here and tried again by ``retry`` after each of
  ``pauses()`` (50 ms, doubling up to 250 ms: a system call or two per look);
  a release by another owner of this process rings the waiters' doorbells at
  once, as the table does. There is no FIFO order between waiters.
- Closing any descriptor of a file releases every lock the process holds on
  it, so a lock file stays open while this object holds or waits for a lock on
  it, and is only ever opened through this object.
- One mechanism per instance: OS record locks serve an instance only while it
  has no lock table. Made with the instance's ``table_key``, this object takes
  each new OS lock, then looks whether a table exists under that key
  (``table_serves``); if one does, it drops the lock again and raises
  TableServes. The monitor does the mirror image ("announce, then look"): it
  creates the table, then looks for OS locks held in the lock directory
  (``oslock_holders``) and removes the table again if it finds one. Whichever
  order the two take, one of them sees the other, so a table and an OS lock
  never both grant one record. The look costs one ``semget`` per OS lock
  taken (a table's semaphore is made before its memory); a lock this process
  already holds at the level needed is not looked at again, since no table
  can have been made while it was held. Binary locks, and record locks a
  client asked for as OS locks beside a table (OSLOCK), are made without
  ``table_key``: they are not the instance's record-lock mechanism.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sysv_ipc
from dls_proto import LOCK_MODES, HolderState, not_a_mode

from . import doorbell, trusted
from .layout import LOCAL_IP
from .mechanism import (
    Conflict,
    Grant,
    Holder,
    LockMechanism,
    NotHeld,
    Owner,
    Queued,
    TableError,
    Unsupported,
    resource_value,
    stored_key,
)

#: What every lock file's name starts with, and the name of the lock file of (inode, device).
LOCK_FILE_PREFIX = "jlock_"
LOCK_FILE_FORMAT = LOCK_FILE_PREFIX + "%08x_%08x"
#: The lock byte of a key is its 64-bit digest cut to this many bits (off_t is signed).
OFFSET_BITS = 62
#: Every handle of an OS lock has this bit set; no lock-table handle has it.
HANDLE_TAG = 1 << 63
#: A polling waiter looks again after RETRY_FIRST seconds, then twice as long each time up to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 0.25

#: How often a lock is tried while its file is being removed (an OFD lock, pid -1), REMOVAL_PAUSE apart.
REMOVAL_TRIES = 50
REMOVAL_PAUSE = 0.0005
#: The pid F_GETLK reports for an open-file-description lock: here only the whole-file lock of a removal.
_OFD_PID = -1

#: The OS lock a mode needs: 0 none (NL), 1 a read lock (CR, PR), 2 a write lock (CW, PW, EX).
NONE, READ, WRITE = 0, 1, 2
OS_CLASS = (NONE, READ, WRITE, READ, WRITE, WRITE)
#: The mode reported for a holder known only by its OS lock: PR for a read lock, EX for a write lock.
_REPORTED = {READ: 3, WRITE: 5}
_LOCKF = (fcntl.LOCK_UN, fcntl.LOCK_SH | fcntl.LOCK_NB, fcntl.LOCK_EX | fcntl.LOCK_NB)
_FCNTL_TYPE = (fcntl.F_UNLCK, fcntl.F_RDLCK, fcntl.F_WRLCK)
#: struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (32 bytes with padding).
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = 32
_OFFSET_MASK = (1 << OFFSET_BITS) - 1
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: Open-file-description locks (Linux): they conflict with every POSIX lock, this process's too.
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
#: Handles are unique in the process, across every OsLocks of it.
_handles = itertools.count(1)


class OsLockError(TableError):
    """A lock file cannot be opened or locked (permissions, no space, no locks left)."""


class TableServes(TableError):
    """A lock table now serves the instance: OS record locks are no longer taken for it (the lock just
    taken was dropped again). A local process switches to the table; a lock server answers an error."""

    def __init__(self, key: int, directory: Path) -> None:
        self.key = key
        super().__init__(f"lock table 0x{key:08x} now serves this instance: no OS file lock is taken in "
                         f"{directory} any more (lock through the table)")


def table_serves(key: int) -> bool:
    """Whether the lock table of ``key`` exists (or is being made): the look of "take, then look".

    A table's semaphore is made before its memory (``LockTable.create``), so when
    there is none, the usual case of a service without a table, one ``semget``
    answers. A semaphore alone is a table being made, whose monitor looks for OS
    locks only once the memory exists, after this: it will see the lock taken.
    """
    try:
        sysv_ipc.Semaphore(key)
    except sysv_ipc.ExistentialError:
        return False
    except sysv_ipc.PermissionsError:
        pass  # another user's: it still exists
    try:
        sysv_ipc.SharedMemory(key).detach()
    except sysv_ipc.ExistentialError:
        return False
    except ValueError:  # shmat's EINVAL: removed (jdls -K) between its lookup and the attach
        return False
    except sysv_ipc.PermissionsError:
        pass
    return True


def lock_file_name(inode: int, device: int) -> str:
    """``jlock_XXXXXXXX_YYYYYYYY``: inode and device in hexadecimal; a negative device as 32 bits (-1: ffffffff)."""
    return LOCK_FILE_FORMAT % (inode, device & 0xFFFFFFFF if device < 0 else device)


def key_offset(key: bytes) -> int:
    """The byte of a lock file that stands for ``key``."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & _OFFSET_MASK


def compatible(requested: int, held: int) -> bool:
    """True when OS locks let ``requested`` be granted while another owner holds ``held`` (modes 0..5)."""
    return OS_CLASS[requested] + OS_CLASS[held] <= 2


class _File:
    __slots__ = ("fd", "name", "resources")

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.resources = 0


class _Resource:
    """One byte of one lock file: who of this process holds it, who waits, which OS lock is taken."""

    __slots__ = ("file", "holders", "level", "offset", "waiters")

    def __init__(self, file: _File, offset: int) -> None:
        self.file = file
        self.offset = offset
        self.level = NONE
        self.holders: dict[tuple[int, int], _Record] = {}
        self.waiters: dict[int, _Record] = {}


class _Record:
    """A lock held, or a request waiting, in this process."""

    __slots__ = ("handle", "mode", "owner", "resource", "token", "value")

    def __init__(self, handle: int, resource: _Resource, owner: Owner, mode: int, value: int, token: int) -> None:
        self.handle = handle
        self.resource = resource
        self.owner = owner
        self.mode = mode
        self.value = value
        self.token = token

    @property
    def holder(self) -> Holder:
        o = self.owner
        return Holder(self.mode, o.pid, o.port, o.client_pid, o.thread, o.ip)


class OsLocks(LockMechanism):
    """Record (or binary) locks of this process as ``fcntl`` locks on lock files in ``directory``.

    A LockMechanism, as LockTable is (see the module for how waiting works); safe
    to share between the threads of the process that made it. The directory is made
    (``trusted.SHARED``, group ``gid``) when the first lock needs it and checked
    before the first lock file is opened (``owners``: who may own it, default root
    and this user); lock files are made ``file_mode`` (default 0660, whatever the
    umask) so that every process of the group can lock them. ``table_key`` (the instance's table key, for its
    record locks): every OS lock taken is dropped again with TableServes once a
    table exists under that key (see the module).
    """

    name = "OS file locks (jdls -ibD)"

    #: The pauses between looks at a queued request (``pauses()``, seconds): the first, and the longest.
    retry_first = RETRY_FIRST
    retry_max = RETRY_MAX

    def __init__(self, directory: str | os.PathLike[str], *, file_mode: int = trusted.GROUP_FILE,
                 table_key: int | None = None, owners: frozenset[int] | None = None, gid: int | None = None) -> None:
        self.directory = Path(directory)
        self._owners = owners
        self._gid = gid
        self._checked = False
        #: The instance's table key: a table under it ends this object's locking (TableServes).
        self.table_key = table_key
        self._prefix = os.path.join(os.fspath(directory), "")  # joined by hand: pathlib is slow on this path
        self.file_mode = file_mode
        self.pid = os.getpid()
        self._files: dict[str, _File] = {}
        self._resources: dict[tuple[str, int], _Resource] = {}
        self._held: dict[int, _Record] = {}
        self._waiting: dict[int, _Record] = {}
        self._mutex = threading.RLock()
        self._local = threading.local()  # each thread's doorbell (LockMechanism.doorbell)

    def path_of(self, inode: int, device: int) -> Path:
        """The lock file of (inode, device)."""
        return self.directory / lock_file_name(inode, device)

    # -- the table's calls -------------------------------------------------------

    def lock(
        self, owner: Owner, inode: int, device: int, key: bytes, mode: int, *, wait_token: int = 0, notify: int = 0,
    ) -> Grant | Conflict | Queued:
        """Take a lock, or say who holds it; with ``wait_token`` a blocked request is queued (to retry). No
        blocking notices (``notify``): Unsupported, as nobody here knows who waits."""
        if notify:
            raise Unsupported(f"{self.name} cannot send blocking notices: the lock table can")
        if mode not in LOCK_MODES:
            raise ValueError(not_a_mode(mode))
        if os.getpid() != self.pid:
            raise OsLockError(f"these OS locks belong to process {self.pid}: make a new OsLocks in a forked child")
        name = lock_file_name(inode, device)
        offset = key_offset(key)
        value = resource_value(inode, device, stored_key(key)[0])
        with self._mutex:
            res = self._resource(name, offset)
            try:
                me = (owner.pid, owner.thread)
                blocker = self._take(res, me, mode)
                if blocker is None:
                    return self._grant(res, me, owner, mode, value, 0)
                if not wait_token:
                    return Conflict(blocker)
                handle = HANDLE_TAG | next(_handles)
                record = _Record(handle, res, owner, mode, value, wait_token)
                res.waiters[handle] = record
                self._waiting[handle] = record
                return Queued(handle, blocker)
            finally:
                self._forget_if_unused(res)

    def retry(self, handle: int) -> Grant | Queued:
        """Try a queued request again: granted now, or still queued (behind whom)."""
        with self._mutex:
            record = self._waiting.get(handle)
            if record is None:
                raise NotHeld(f"handle {handle:#x} is not a queued OS lock request")
            res = record.resource
            me = (record.owner.pid, record.owner.thread)
            try:
                blocker = self._take(res, me, record.mode)
            except TableServes:
                self.cancel(handle)  # the request ends here: its handle names nothing any more
                raise
            if blocker is not None:
                return Queued(handle, blocker)
            del self._waiting[handle]
            del res.waiters[handle]
            return self._grant(res, me, record.owner, record.mode, record.value, handle)

    def cancel(self, handle: int) -> bool:
        """Withdraw a queued request; False when it was no longer queued."""
        with self._mutex:
            record = self._waiting.pop(handle, None)
            if record is None:
                return False
            del record.resource.waiters[handle]
            self._forget_if_unused(record.resource)
            return True

    def unlock(self, handle: int) -> None:
        """Release a granted lock; NotHeld when the handle names none."""
        with self._mutex:
            record = self._held.pop(handle, None)
            if record is None:
                raise NotHeld(f"handle {handle:#x} holds no OS lock")
            tokens = self._drop(record)
        for token in tokens:
            doorbell.ring(token)

    def pauses(self) -> Iterator[float]:
        """Polled: look again after ``retry_first`` seconds, then twice as long each time up to ``retry_max``."""
        pause = self.retry_first
        while True:
            yield pause
            pause = min(pause * 2, self.retry_max)

    def status(self, owner: Owner, inode: int, device: int, key: bytes) -> tuple[int, Holder | None]:
        """Who holds a resource: (HolderState FREE, MINE or OTHER; the holder). Makes no file."""
        name = lock_file_name(inode, device)
        offset = key_offset(key)
        me = (owner.pid, owner.thread)
        if self.table_key is not None and table_serves(self.table_key):  # the table's answer is the true one
            raise TableServes(self.table_key, self.directory)
        with self._mutex:
            res = self._resources.get((name, offset))
            if res is not None and res.holders:
                mine = res.holders.get(me)
                if mine is not None:
                    return HolderState.MINE, mine.holder
                return HolderState.OTHER, next(iter(res.holders.values())).holder
            file = self._files.get(name)
            if file is not None and self._still_named(file):  # else removed: the file now named is asked below
                h = _os_holder(file.fd, offset, WRITE)
                return (HolderState.FREE, None) if h is None or h.pid == _OFD_PID else (HolderState.OTHER, h)
            # No descriptor of this file is open in this process, so none holds a lock that closing could drop.
            try:
                fd = os.open(self._prefix + name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # F_GETLK only
            except FileNotFoundError:
                return HolderState.FREE, None
            except OSError as exc:
                raise OsLockError(f"cannot open lock file {self.directory / name}: {exc.strerror}") from None
            try:
                h = _os_holder(fd, offset, WRITE)
            finally:
                os.close(fd)
            return (HolderState.FREE, None) if h is None or h.pid == _OFD_PID else (HolderState.OTHER, h)

    def release_owner(self, pid: int, thread: int | None = None, *, lost: bool = False) -> int:
        """Free every lock and queued request of an owner process (or one of its threads); how many."""
        tokens: list[int] = []
        count = 0
        with self._mutex:
            for handle, record in list(self._waiting.items()):
                if record.owner.pid == pid and (thread is None or record.owner.thread == thread):
                    self.cancel(handle)
                    count += 1
            for handle, record in list(self._held.items()):
                if record.owner.pid == pid and (thread is None or record.owner.thread == thread):
                    del self._held[handle]
                    tokens += self._drop(record)
                    count += 1
        for token in set(tokens):
            doorbell.ring(token)
        return count

    def keep_owner(self, pid: int) -> int:
        """Nothing can be kept: the kernel frees a process's OS locks when it ends, however it ends. So the
        owner's locks and requests are released, and none is kept (0)."""
        self.release_owner(pid)
        return 0

    def reclaim(self, handle: int, owner: Owner, inode: int, device: int, key: bytes, mode: int) -> Grant:
        """Always NotHeld: no OS lock outlives the process that took it, so none is kept to take back."""
        raise NotHeld("OS file locks cannot be kept: the kernel freed this lock when the lock server holding "
                      "it ended (the service has no lock table)")

    def close(self) -> int:
        """Release every lock and request of this object and close its lock files; how many there were."""
        with self._mutex:
            count = len(self._held) + len(self._waiting)
            for record in list(self._waiting.values()):
                self.cancel(record.handle)
            for record in list(self._held.values()):
                del self._held[record.handle]
                self._drop(record)
            for file in self._files.values():  # none should be left; closing drops whatever is
                os.close(file.fd)
            self._files.clear()
            self._resources.clear()
        return count

    def held(self) -> int:
        """How many locks this object holds."""
        return len(self._held)

    def waiting(self) -> int:
        """How many requests wait in this object."""
        return len(self._waiting)

    # -- inside (mutex held) -----------------------------------------------------

    def _take(self, res: _Resource, me: tuple[int, int], mode: int) -> Holder | None:
        """Give ``me`` the OS lock ``mode`` needs on ``res``, or return who stands in the way."""
        needed = OS_CLASS[mode]
        for who, record in res.holders.items():
            if who != me:
                if not compatible(mode, record.mode):
                    return record.holder
                needed = max(needed, OS_CLASS[record.mode])
        if needed <= res.level:
            if needed < res.level:  # a conversion down: giving up never fails
                self._set(res, needed)
            return None
        before = res.level
        for _ in range(REMOVAL_TRIES):
            if self._set(res, needed):
                if before == NONE and not self._still_named(res.file):
                    self._set(res, NONE)  # removed by its last holder before we locked it: open the new one
                    self._reopen(res.file)
                    continue
                if self.table_key is not None and table_serves(self.table_key):
                    self._set(res, before)
                    raise TableServes(self.table_key, self.directory)
                return None
            holder = _os_holder(res.file.fd, res.offset, needed)
            if holder is not None and holder.pid != _OFD_PID:
                return holder
            if holder is not None:  # the file's last user is removing it (a moment): open the new one
                time.sleep(REMOVAL_PAUSE)
                self._reopen(res.file)
            # Else released between the two calls: try again.
        return Holder(_REPORTED[needed], 0, 0, 0, 0, LOCAL_IP)

    def _set(self, res: _Resource, level: int) -> bool:
        """Put the OS lock of ``res`` at ``level``; False when another process holds a conflicting one."""
        try:
            fcntl.lockf(res.file.fd, _LOCKF[level], 1, res.offset, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise OsLockError(
                f"cannot lock {self.directory / res.file.name} at byte {res.offset}: {exc.strerror}"
            ) from None
        res.level = level
        return True

    def _grant(self, res: _Resource, me: tuple[int, int], owner: Owner, mode: int, value: int,
               handle: int) -> Grant:
        mine = res.holders.get(me)
        if mine is not None:  # a conversion: the lock held takes the new mode
            mine.mode = mode
            return Grant(mine.handle, mode, value)
        record = _Record(handle or HANDLE_TAG | next(_handles), res, owner, mode, value, 0)
        res.holders[me] = record
        self._held[record.handle] = record
        return Grant(record.handle, mode, value)

    def _drop(self, record: _Record) -> list[int]:
        """Take a released lock out of its resource; the doorbells of the waiters to ring."""
        res = record.resource
        del res.holders[(record.owner.pid, record.owner.thread)]
        level = max((OS_CLASS[r.mode] for r in res.holders.values()), default=NONE)
        if level < res.level:
            self._set(res, level)
        tokens = list({w.token for w in res.waiters.values() if w.token})
        self._forget_if_unused(res)
        return tokens

    def _resource(self, name: str, offset: int) -> _Resource:
        res = self._resources.get((name, offset))
        if res is None:
            file = self._files.get(name)
            if file is None:
                file = self._files[name] = _File(name, self._open(name))
            res = self._resources[(name, offset)] = _Resource(file, offset)
            file.resources += 1
        return res

    def _forget_if_unused(self, res: _Resource) -> None:
        if res.holders or res.waiters:
            return
        if res.level:
            self._set(res, NONE)
        del self._resources[(res.file.name, res.offset)]
        file = res.file
        file.resources -= 1
        if not file.resources:  # no lock of this process on the file: closing drops nothing
            del self._files[file.name]
            self._remove_if_free(file)
            os.close(file.fd)

    def _remove_if_free(self, file: _File) -> None:
        """Unlink a lock file nobody holds a lock on (see the module); the whole-file OFD lock taken to be
        sure of that is dropped by the close that follows."""
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0).ljust(_FLOCK_SIZE, b"\0")
        try:
            fcntl.fcntl(file.fd, _OFD_SETLK, probe)
        except OSError:
            return  # held by someone (this process included), or not lockable: leave it
        if self._still_named(file):
            try:
                os.unlink(self._prefix + file.name)
            except OSError:
                pass  # another user's file in the group's sticky directory: its maker removes it

    def _still_named(self, file: _File) -> bool:
        """The lock file's name still names the inode this process has open."""
        try:
            st = os.stat(self._prefix + file.name, follow_symlinks=False)
        except OSError:
            return False
        fst = os.fstat(file.fd)
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    def _reopen(self, file: _File) -> None:
        """Open a lock file's name again (the inode open was removed; this process holds nothing on it)."""
        fd = self._open(file.name)
        os.close(file.fd)
        file.fd = fd

    def _check_directory(self) -> None:
        """The lock directory may be trusted (once per object; a problem is an OsLockError naming it)."""
        if self._checked:
            return
        try:
            trusted.make_dir(self.directory, trusted.SHARED, gid=self._gid, owners=self._owners)
        except FileNotFoundError:
            try:
                self.directory.parent.mkdir(parents=True, exist_ok=True)
                trusted.make_dir(self.directory, trusted.SHARED, gid=self._gid, owners=self._owners)
            except OSError as exc:
                raise OsLockError(f"cannot use the lock directory {self.directory}: {exc}") from None
        except OSError as exc:
            raise OsLockError(f"cannot use the lock directory {exc}"
                              if isinstance(exc, trusted.Untrusted) else
                              f"cannot use the lock directory {self.directory}: {exc.strerror or exc}") from None
        self._checked = True

    def _open(self, name: str) -> int:
        self._check_directory()
        path = self._prefix + name
        for _ in range(REMOVAL_TRIES):
            try:
                fd = os.open(path, _OPEN_FLAGS)  # the usual case: the file exists
                if _check_lock_file(fd, path):
                    return fd
                continue  # removed by its last user between our open and our look: open the new one
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OsLockError(f"cannot open lock file {path}: {exc.strerror}") from None
            try:
                fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, self.file_mode)
            except FileExistsError:  # made by another process meanwhile
                continue
            except OSError as exc:
                raise OsLockError(f"cannot open lock file {path}: {exc.strerror}") from None
            try:
                os.fchmod(fd, self.file_mode)  # whatever the umask
            except OSError:
                pass
            return fd
        raise OsLockError(f"cannot open lock file {path}: it keeps appearing and disappearing")


def _check_lock_file(fd: int, path: str) -> bool:
    """A lock file opened may be locked: a regular file with one link that others cannot write (any member
    of the group may have made it); else the descriptor is closed and OsLockError says why. False (closed
    too) when the file has just been removed (no link left)."""
    st = os.fstat(fd)
    problem = None
    if st.st_nlink == 0:
        os.close(fd)
        return False
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links"
    elif st.st_mode & (stat.S_IWOTH | stat.S_IROTH):
        problem = f"open to others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        os.close(fd)
        raise OsLockError(f"cannot use lock file {path}: {problem}")
    return True


def _os_holder(fd: int, offset: int, level: int) -> Holder | None:
    """The process whose OS lock on byte ``offset`` would block a lock of ``level`` (F_GETLK), or None."""
    probe = _FLOCK.pack(_FCNTL_TYPE[level], os.SEEK_SET, offset, 1, 0).ljust(_FLOCK_SIZE, b"\0")
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError as exc:
        raise OsLockError(f"cannot ask who locks byte {offset}: {exc.strerror}") from None
    kind, _whence, _start, _length, pid = _FLOCK.unpack_from(answer)
    if kind == fcntl.F_UNLCK:
        return None
    return Holder(_REPORTED[READ if kind == fcntl.F_RDLCK else WRITE], pid, 0, 0, 0, LOCAL_IP)
