"""The lock table: lock, unlock, wait, scan and tidy in SysV shared memory.

``LockTable`` is one of the two lock mechanisms (``mechanism.LockMechanism``);
the other, OS file locks, serves a service that has no table.

A semaphore per set of groups guards the groups (``semaphores``): a resource's
group decides which, so requests for resources in different sets never wait for
each other; the header's counters have a semaphore of their own, taken for a
moment, innermost. Semaphores are taken with SEM_UNDO, so a process killed while
holding one gives it back; writes are ordered so that such a death leaves the
table consistent (a slot's value, which marks it used, is written last when a
lock is added and cleared first when it is removed).

The lock path is kept to one semaphore round trip and three struct calls when
the resource is not already in the table; everything else (conflicts, waiters,
conversions, dead owners) takes the slow path under the same semaphore.

Owners: a lock belongs to (pid, thread), or to (port, thread, client address) in a table created
with TableFlag.PORT_OWNERS (``jdls -P``); that identity decides conflicts,
re-entrancy and conversions. Only the slow path looks at it: the fast path
runs when no slot of the resource exists, so no owner needs comparing.

Waiting: a request that must wait is recorded as a WAITING slot, behind the
locks it conflicts with, in FIFO order (a request never overtakes an earlier
incompatible waiter). The waiter sleeps on its doorbell; whoever frees or
cancels a lock grants it there and then to the waiters that can now have it, in
queue order (a hand-off: the slot becomes GRANTED under the semaphore), and rings
them after letting go of the semaphore; a woken waiter finds its slot granted
without taking the semaphore (``retry``). A waiter that converts a lock it holds
is rung, not granted: it makes the conversion itself. A ring lost with a process
killed between the two is why a waiter still looks every RECHECK_INTERVAL
(``pauses()``); a requester that gives up (``cancel``) after being handed a lock
it has not yet seen gives the lock back.

Kept locks: a lock server's locks for a remote client are keepable (SlotFlag.KEEP,
from ``Owner.keep``), because the client may outlive its lock server. When the lock
server ends without the client having gone (``keep_owner``), or is found dead (by a
blocked request, or the tidy), they become KEPT: still in everyone's way, their own
client's too, owned by nobody, until the client takes them back through a new lock
server (``reclaim``, proving it with the handle) or the header's ``lock_delay`` has
passed since they were kept; whoever looks first then frees them (a blocked request,
a reclaim, the tidy the monitor runs at the header's ``next_expiry``). Nobody rings a
waiter at an expiry, so a waiter is told when it comes (``Queued.expires``). Other
slots of a dead process (a local process's, a lock server's queued requests) are
freed at once, as before.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import operator
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import sysv_ipc
from dls_proto import HolderState
from dls_proto.text import amount

from . import deadlocks, doorbell, modes, semaphores
from .layout import (
    BLOCK_MAX,
    DEFAULT_BLOCK_SIZE,
    GROUP_HEAD,
    HEADER_FIELDS,
    HEADER_OFFSETS,
    HEADER_SIZE,
    HEADER_STRUCT,
    INDEX_BITS,
    KEY_MAX,
    LAYOUT_VERSION,
    MAGIC,
    SLOT_HEAD,
    SLOT_SIZE,
    SLOT_STRUCT,
    Geometry,
    Header,
    Slot,
    SlotFlag,
    SlotState,
    TableFlag,
)
from .liveness import Liveness
from .mechanism import (
    Conflict,
    Deadlock,
    Grant,
    GroupFull,
    HalfTable,
    Holder,
    LockMechanism,
    NotHeld,
    NotWritable,
    Owner,
    Queued,
    TableError,
    TableMissing,
    UntrustedTable,
    resource_value,
    stored_key,
)
from .semaphores import semop as _semop

#: Longest a waiter sleeps between looks at the table even if never rung: a
#: safety net for a ring lost with a process killed between unlock and ring.
RECHECK_INTERVAL = 1.0
#: How many of the waiters ahead of it (those it cannot share the lock with) a waiting request watches,
#: beside the holders in its way. One that had no more than this many ahead at a look watches every one
#: (SlotFlag.WATCHES_ALL), so whoever is handed the lock before it; others are rung to look again when they
#: come first in line (``_may_not_watch``).
WATCH_AHEAD = 8
#: The mode of the table's shared memory and semaphore: the service's group (jdls --group) and nobody else.
TABLE_MODE = 0o660
#: How much of the table a scan or sweep copies per hold of the semaphore (whole groups, at least one: 25
#: groups of 50): a copy of 256 KiB takes about 20 µs, and nothing is decoded, nor any object made, while the
#: semaphore is held (decoding a group inside it let the garbage collector run there: holds of 50-100 ms on
#: a table of 100,000 locks, 2026-12-01).
SCAN_BYTES = 1 << 18
#: Most slots a sweep frees or keeps per hold of the semaphore, each checked unchanged since the copy and
#: its resource's waiters settled: about 1 ms.
SWEEP_CHANGES = 64

_INDEX_MASK = (1 << INDEX_BITS) - 1
#: What is sent when a semaphore is given back: a waiter's doorbell token to ring, or a blocking notice
#: (the holder's notice doorbell token, the blocking lock's handle, the mode wanted).
Ring = int | tuple[int, int, int]
_T = TypeVar("_T")
_KEEP = int(SlotFlag.KEEP)
_HANDED = int(SlotFlag.HANDED)
_WATCHES_ALL = int(SlotFlag.WATCHES_ALL)
_CONVERTING = int(SlotFlag.CONVERTING)
_NOT_VALID = int(SlotFlag.BLOCK_NOT_VALID)
_NOTIFIED = int(SlotFlag.NOTIFIED)
_LEGACY = int(SlotFlag.LEGACY)
_DEADLOCK = int(SlotState.DEADLOCK)
#: The modes whose holder writes the value block, and whose abnormal end makes it not valid.
_WRITERS = (modes.PW, modes.EX)
_FLAGS_OFFSET = 10
_GRANTED, _WAITING, _KEPT, _FREE = (int(s) for s in (SlotState.GRANTED, SlotState.WAITING, SlotState.KEPT,
                                                        SlotState.FREE))
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_WAITING_BYTE = bytes([int(SlotState.WAITING)])
_F64 = struct.Struct("=d")
_U64 = struct.Struct("=Q")
_BYTE = struct.Struct("=B")
_H = struct.Struct("=H")
_STATE_OFFSET = 8
_QUEUED_OFFSET = 14
_MODE_OFFSET = 9
_PID_OFFSET = SLOT_HEAD.size  # the owner pid follows the head
_TOKEN_OFFSET = SLOT_STRUCT.size - BLOCK_MAX - 16  # the fencing token, then the notice doorbell, then the block
_BLOCK_OFFSET = _TOKEN_OFFSET + 16
_TIME_OFFSET = _TOKEN_OFFSET - KEY_MAX - 16  # timestamp, then doorbell, then key
_SEAL_OFFSET = _TIME_OFFSET + 8  # a granted or kept lock's seal is in its doorbell field
_SEALED_HEAD = struct.Struct("=QB")  # ticket, state
_TICKET = GROUP_HEAD  # a group's ticket counter, at its start
_G = GROUP_HEAD.size  # where a group's values start, from the group's start
_LOCK_DELAY_OFFSET = HEADER_OFFSETS["lock_delay"]
_NEXT_EXPIRY_OFFSET = HEADER_OFFSETS["next_expiry"]
_WAITS_BEGUN_OFFSET = HEADER_OFFSETS["waits_begun"]
#: Who owns a lock, read from a Slot or an Owner: (pid, thread) by default, (port, thread, address) with jdls -P.
_BY_PID = operator.attrgetter("pid", "thread")
#: With -P the client's address is part of the owner: a port names a client of one host (a local process
#: shows 0.0.0.0), so a peer elsewhere, or on loopback, naming a local process's port is not that process.
_BY_PORT = operator.attrgetter("port", "thread", "ip")


class Tidied(NamedTuple):
    """What a tidy did: locks freed (their owner gone, or kept past the lock-delay), and locks kept."""

    freed: int
    kept: int


class Entry(NamedTuple):
    """A used slot, as ``scan`` reports it."""

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the slot's number
    group: int
    value: int
    slot: Slot


def _surely_dead(pid: int) -> bool:
    """The cheap check used while a request is blocked: no process has this pid, or a zombie.

    A zombie counts as dead: its parent may be the very process waiting for
    the lock, unable to reap it while it waits.
    """
    if _no_such_process(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        # Gone between the two looks (its zombie reaped): dead. A waiter woken by its end that took it for
        # alive stopped watching it and waited for its next look (seen once in the audit of issue 13).
        return _no_such_process(pid)
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def _no_such_process(pid: int) -> bool:
    """The one-system-call check (no zombie check: see ``_surely_dead``) made before a lock is handed on."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _keepable(slot: Slot) -> bool:
    """A granted lock of a lock server whose client may reclaim it: one it was told of (not HANDED)."""
    return slot.state == _GRANTED and slot.flags & (_KEEP | _HANDED) == _KEEP


def _holder(slot: Slot) -> Holder:
    return Holder(slot.mode, slot.pid, slot.port, slot.client_pid, slot.thread, slot.ip)


def _lone_semaphore(key: int) -> int | None:
    """The id of the semaphore under ``key`` when it exists without its shared memory, else None."""
    try:
        sysv_ipc.SharedMemory(key).detach()
        return None
    except sysv_ipc.ExistentialError:
        pass
    try:
        return int(sysv_ipc.Semaphore(key).id)
    except sysv_ipc.ExistentialError:
        return None


class LockTable(LockMechanism):
    """A process's view of one lock table. Not to be shared between threads for
    waiting (each thread gets its own doorbell); the lock calls themselves are safe."""

    name = "the lock table"

    def __init__(self, shm: sysv_ipc.SharedMemory, sem: sysv_ipc.Semaphore) -> None:
        self._shm = shm
        self._sem = sem  # sysv_ipc's view of the set: its id, owner, mode, removal
        self._mv = memoryview(shm)
        header = self.header()
        if header.magic != MAGIC:
            raise TableError(f"shared memory 0x{shm.key:08x} is not a dls lock table")
        if header.layout_version != LAYOUT_VERSION or header.slot_size != SLOT_SIZE or header.key_max != KEY_MAX:
            raise TableError(
                f"lock table 0x{shm.key:08x} has layout version {header.layout_version} (slot {header.slot_size} "
                f"bytes), made by another version of dls; this dls-shm reads version {LAYOUT_VERSION} (slot "
                f"{SLOT_SIZE} bytes): stop the service that made it and remove the table (jdls -k, then jdls -K), "
                "then start the service again"
            )
        if not 1 <= header.block_size <= BLOCK_MAX:
            raise TableError(f"lock table 0x{shm.key:08x}: its header names value blocks of {header.block_size} bytes")
        if not 1 <= header.semaphores < semaphores.kernel_members_limit():
            raise TableError(f"lock table 0x{shm.key:08x}: its header names {header.semaphores} group semaphores")
        self._sems = semaphores.Semaphores(sem.id, header.semaphores)
        self._take_of = self._sems.take_of
        self._give_of = self._sems.give_of
        self._nsems = header.semaphores
        self.geometry = Geometry(header.ngroups, header.per_group)
        self.key = shm.key
        self._ngroups = header.ngroups
        self._per_group = header.per_group
        self._group_size = self.geometry.group_size
        self._values_size = self.geometry.values_size
        self._vals = struct.Struct(f"={header.per_group}I")
        self._local = threading.local()
        #: The owner identity used for conflicts and re-entrancy, fixed when the table was created:
        #: with PORT_OWNERS (jdls -P) two lock requests of one port and thread are the same owner,
        #: whichever process (a reconnected client's new lock server, say) sends them.
        self.port_owners = bool(header.flags & TableFlag.PORT_OWNERS)
        self._ident: Callable[[Any], tuple[Any, ...]] = _BY_PORT if self.port_owners else _BY_PID
        #: How many bytes of a resource's value block count in this table (chosen when it was made).
        self.block_size = header.block_size
        #: The header's ``waits_begun`` at this object's last look for deadlocks that confirmed what it found.
        self._waits_seen: int | None = None

    # -- creating, attaching, removing --------------------------------------------

    @classmethod
    def create(
        cls, key: int, geometry: Geometry, *, flags: int = 0, tidy_period: int = 300, mode: int = TABLE_MODE,
        gid: int | None = None, lock_delay: float = 0.0, owners: frozenset[int] | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> tuple[LockTable, bool]:
        """Create the table, or attach the existing one as it is: (table, created).

        Both IPC objects are made 0600 and only then given group ``gid`` (default
        this process's) and ``mode``, so nobody outside the group is ever let in,
        not even for a moment. HalfTable when only one of the two IPC objects
        exists under ``key``. An existing table is attached only when ``owners``
        made and own it (see ``attach``).
        """
        if not 1 <= block_size <= BLOCK_MAX:
            raise ValueError(f"value block size {block_size}: it must be 1 to {BLOCK_MAX} bytes")
        group_members = semaphores.members_for(geometry.ngroups)
        try:
            sem = semaphores.create(key, group_members)
        except sysv_ipc.ExistentialError:
            try:
                return cls.attach(key, owners=owners), False
            except TableMissing:
                lone = _lone_semaphore(key)
                if lone is None:
                    raise
                raise HalfTable(key, "sem", lone) from None
        try:
            shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, geometry.total_size, init_character=b"\0")
            for made in (sem, shm):
                if gid is not None:
                    made.gid = gid
                made.mode = mode
        except sysv_ipc.ExistentialError:
            sem.remove()
            try:
                left = sysv_ipc.SharedMemory(key)
                lone = int(left.id)
                left.detach()
            except sysv_ipc.ExistentialError:  # removed meanwhile: nothing is left now
                raise TableError(f"shared memory with key 0x{key:08x} came and went: try again") from None
            raise HalfTable(key, "shm", lone) from None
        except (sysv_ipc.Error, OSError) as exc:
            sem.remove()
            with contextlib.suppress(NameError, sysv_ipc.Error):
                shm.remove()
            raise TableError(f"cannot create a lock table of {geometry.total_size} bytes: {exc}") from None
        values: dict[str, Any] = dict.fromkeys(Header._fields, 0)
        values.update(
            magic=MAGIC, layout_version=LAYOUT_VERSION, header_size=HEADER_SIZE, flags=flags,
            ngroups=geometry.ngroups, per_group=geometry.per_group, slot_size=SLOT_SIZE, key_max=KEY_MAX,
            total_size=geometry.total_size, created=time.time(), tidy_period=tidy_period, semid=sem.id,
            semaphores=group_members,
            cpu_user=0.0, cpu_system=0.0, last_ran=0.0, last_tidy=0.0, lock_delay=lock_delay, next_expiry=0.0,
            block_size=block_size, waits_begun=0,
        )
        mv = memoryview(shm)
        HEADER_STRUCT.pack_into(mv, 0, *(values[name] for name in Header._fields))
        mv.release()
        sem.undo = True
        table = cls(shm, sem)
        table._sems.open_all()  # the table is ready: open the gates
        return table, True

    @classmethod
    def attach(cls, key: int, *, wait: float = 5.0, owners: frozenset[int] | None = None) -> LockTable:
        """Attach an existing table; TableMissing when there is none.

        With ``owners`` (uids) a table whose shared memory or semaphore was made (creator) or is owned by
        anyone else is refused (UntrustedTable): the key is known in advance, so another local user could
        make the objects first and, as their creator, open them to himself again at any time.
        """
        try:
            shm = sysv_ipc.SharedMemory(key)
            sem = sysv_ipc.Semaphore(key)
        except sysv_ipc.ExistentialError:
            raise TableMissing(f"no lock table with key 0x{key:08x} (is the jdls monitor running?)") from None
        except sysv_ipc.PermissionsError:
            raise TableError(f"lock table 0x{key:08x}: permission denied (its shared memory and semaphore are "
                             "mode 0660 in the service's group, jdls --group: run as a member of it)") from None
        if owners is not None:
            for what, made in (("shared memory", shm), ("semaphore", sem)):
                if made.uid not in owners or made.cuid not in owners:
                    with contextlib.suppress(sysv_ipc.Error):
                        shm.detach()
                    raise UntrustedTable(
                        f"lock table 0x{key:08x}: its {what} (id {made.id}) was made by uid {made.cuid} and is "
                        f"owned by uid {made.uid}, not by root or this service's user: refused (remove it with "
                        "ipcrm as root once nothing uses it, then start the service again)")
        sem.undo = True
        # A creator still writing the header holds the gates (the header's first of them): wait for it once.
        try:
            sem.acquire(wait)
            sem.release()
        except sysv_ipc.BusyError:
            raise TableError(f"lock table 0x{key:08x} stayed locked for {amount(wait, 'second')}") from None
        return cls(shm, sem)

    @staticmethod
    def remove_key(key: int) -> tuple[int, int]:
        """Remove the shared memory and the semaphore set under ``key`` whatever they hold, without reading
        the table (jdls -K, dls-ipcrm: a table left by another version of dls is removed too, once the
        caller has checked that nothing uses it): their ids. TableMissing when neither exists."""
        ids = []
        for kind in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
            try:
                made = kind(key)
            except sysv_ipc.ExistentialError:
                ids.append(-1)
                continue
            except sysv_ipc.Error as exc:
                raise TableError(f"lock table 0x{key:08x}: {exc}") from None
            ids.append(int(made.id))
            try:
                made.remove()
            except sysv_ipc.ExistentialError:
                pass
            except sysv_ipc.Error as exc:
                raise TableError(f"cannot remove the lock table 0x{key:08x}: {exc}") from None
            finally:
                if isinstance(made, sysv_ipc.SharedMemory):
                    with contextlib.suppress(sysv_ipc.Error):
                        made.detach()
        if ids == [-1, -1]:
            raise TableMissing(f"no lock table with key 0x{key:08x}")
        return ids[0], ids[1]

    @staticmethod
    def exists(key: int) -> bool:
        try:
            sysv_ipc.SharedMemory(key).detach()
            return True
        except sysv_ipc.ExistentialError:
            return False
        except sysv_ipc.PermissionsError:
            return True  # there, but not this user's to attach: attach says so

    def close(self) -> None:
        """Detach from the table (the table itself stays)."""
        self._mv.release()
        try:
            self._shm.detach()
        except sysv_ipc.Error:
            pass

    def remove(self) -> None:
        """Remove the table's shared memory and semaphore (jdls -K)."""
        self._mv.release()
        for resource in (self._sem, self._shm):
            try:
                resource.remove()
            except sysv_ipc.ExistentialError:
                pass
        try:
            self._shm.detach()
        except sysv_ipc.Error:
            pass

    def set_access(self, gid: int, mode: int = TABLE_MODE) -> bool:
        """Give the table's IPC objects group ``gid`` and ``mode`` when they differ (a table made by an older
        version was 0666, or --group changed): True when something changed; TableError when not allowed."""
        changed = False
        for made in (self._sem, self._shm):
            try:
                if made.gid != gid:
                    made.gid = gid
                    changed = True
                if made.mode & 0o777 != mode:
                    made.mode = mode
                    changed = True
            except (sysv_ipc.Error, OSError) as exc:
                raise TableError(f"cannot set the group and mode of lock table 0x{self.key:08x}: {exc}") from None
        return changed

    @property
    def semaphore_ids(self) -> tuple[int, ...]:
        return (self._sem.id,)

    @property
    def shm_id(self) -> int:
        return int(self._shm.id)

    @property
    def attached(self) -> int:
        """Processes attached to the table's shared memory (this one included)."""
        return int(self._shm.number_attached)

    # -- header ----------------------------------------------------------------

    def header(self) -> Header:
        return Header._make(HEADER_STRUCT.unpack_from(self._mv, 0))

    def set_header(self, **fields: float) -> None:
        """Write some header fields in place (pids, times, settings)."""
        fmt = dict(HEADER_FIELDS)
        for name, value in fields.items():
            struct.pack_into("=" + fmt[name], self._mv, HEADER_OFFSETS[name], value)

    @property
    def lock_delay(self) -> float:
        """Seconds a kept lock waits for its client to reclaim it before it is freed (0: nothing is kept)."""
        return float(_F64.unpack_from(self._mv, _LOCK_DELAY_OFFSET)[0])

    def _bump(self, name: str, by: int = 1) -> None:
        """Add to a header counter (under the header's semaphore, for a moment: see ``semaphores``)."""
        off = HEADER_OFFSETS[name]
        with self._header_held():
            _U64.pack_into(self._mv, off, _U64.unpack_from(self._mv, off)[0] + by)

    def _next_ticket(self, goff: int) -> int:
        """The next ticket of the group at ``goff`` (its semaphore held)."""
        ticket: int = _TICKET.unpack_from(self._mv, goff)[0] + 1
        _TICKET.pack_into(self._mv, goff, ticket)
        return ticket

    # -- locking ---------------------------------------------------------------

    def lock(
        self, owner: Owner, inode: int, device: int, key: bytes, mode: int, *, wait_token: int = 0, notify: int = 0,
    ) -> Grant | Conflict | Queued:
        """Take a lock, or say who holds it; with ``wait_token`` a blocked request is queued. ``notify``: the
        token of the doorbell that hears this lock's blocking notices (``doorbell.notice``: once it blocks a
        request, once until nobody waits for the resource or the lock converts)."""
        if len(key) >= KEY_MAX:
            key, kflags = stored_key(key)
            if owner.keep:
                kflags |= _KEEP
        else:
            kflags = _KEEP if owner.keep else 0
        value = resource_value(inode, device, key)
        group = value % self._ngroups
        goff = HEADER_SIZE + group * self._group_size
        mv = self._mv
        member = group % self._nsems
        semid = self._sems.id
        try:
            if _semop(semid, self._take_of[member], 1):  # the C call itself: the lock path's semaphore round trip
                self._take(member)
        except BaseException:
            self._give_if_taken((1 + member,))
            raise
        try:
            vals = self._vals.unpack_from(mv, goff + _G)
            if value in vals:
                result, tokens = self._lock_slow(owner, inode, device, key, kflags, mode, wait_token, value, group,
                                                 notify)
            else:
                try:
                    pos = vals.index(0)
                except ValueError:
                    raise self._full(group) from None
                # The slot is written here as _new_slot writes it, not by calling it: the call costs
                # 3.5% of the table's lock+unlock rate (194,600/s inline, 187,800/s called; 2026-11-30).
                ticket = _TICKET.unpack_from(mv, goff)[0] + 1
                _TICKET.pack_into(mv, goff, ticket)
                SLOT_STRUCT.pack_into(
                    mv, goff + _G + self._values_size + pos * SLOT_SIZE, ticket, 1, mode, kflags, len(key), 0,
                    owner.pid, owner.port, owner.client_pid, owner.ip, owner.thread, inode, device,
                    time.time(), 0, key, ticket, notify, b"",  # its fencing token: its ticket, the group's newest
                )
                _U32.pack_into(mv, goff + _G + 4 * pos, value)
                return Grant(ticket << INDEX_BITS | (group * self._per_group + pos), mode, value, ticket)
        finally:
            if _semop(semid, self._give_of[member], 1):
                self._give(member)
        _ring(tokens)
        return result

    def retry(self, handle: int) -> Grant | Queued:
        """Look again at a queued request: granted now, or still queued (behind whom).

        A request still waiting behind a live holder is told so without the semaphore
        (``_live_holder_in_the_way``, which never answers a grant). A grant is read under the semaphore only:
        CPython reads and writes a slot's fields a byte at a time, so a slot read without it can be torn, and a
        waiting slot freed under its waiter (a LocalClient's release_all from another of its threads) and taken
        at once by another process's lock could read as this request's ticket (the old bytes) with that lock's
        GRANTED state (the new byte): a lock it does not hold. Under the semaphore a slot is whole. That costs
        the woken waiter one hold of the semaphore, which its ringer gave back before it rang. The state is one
        byte, written last by a hand-off, which rings after giving the semaphore back: a WAITING read just
        before a grant is followed by a ring, and a look after it reads GRANTED; none is missed."""
        index = handle & _INDEX_MASK
        if index < self._ngroups * self._per_group:
            group, pos = divmod(index, self._per_group)
            goff = HEADER_SIZE + group * self._group_size
            soff = goff + _G + self._values_size + pos * SLOT_SIZE
            ticket, state, *_ = SLOT_HEAD.unpack_from(self._mv, soff)
            if ticket == handle >> INDEX_BITS and state == _WAITING:
                queued = self._live_holder_in_the_way(handle, group, _U32.unpack_from(self._mv, goff + _G + 4 * pos)[0],
                                                      Slot._make(SLOT_STRUCT.unpack_from(self._mv, soff)))
                if queued is not None:
                    return queued
        with self._group_held(index // self._per_group if index < self.geometry.locks else 0):
            result, tokens = self._retry_locked(handle)
        _ring(tokens)
        return result

    def rung(self, handles: Sequence[int]) -> set[int]:
        """Of the queued requests ``handles``, that all wait on one doorbell which rang (a lock server's, for
        every request of its client), those the ring may be for: to look at again now.

        The table rings (``_settle``, ``break_deadlocks``) a request handed its lock (its slot GRANTED),
        refused (DEADLOCK), free to convert a lock its owner holds (nothing in its way, ``deadlocks.blockers``),
        or first in its resource's queue (to watch a holder in its way: ``_may_not_watch``). So these are the
        requests whose slot is not WAITING under their ticket, and, of each resource, the first of them in queue
        order and those nothing blocks, found under the group's semaphore: one hold and one scan a resource.
        Looking at each of N waiters of one resource costs N scans of N slots a hand-off instead (500 waiters
        of one connection: 2 hand-offs a second). The others wait on as at their last look: a change that
        concerns them rings again, or is due at one of their timers (a kept lock's expiry, the next pause)."""
        look: set[int] = set()
        waiting_on: dict[tuple[int, int], set[int]] = {}  # (group, value) -> handles: a resource, or a few
        mv, per_group, locks = self._mv, self._per_group, self.geometry.locks
        for handle in handles:
            index = handle & _INDEX_MASK
            if index >= locks:
                look.add(handle)  # its retry says what is wrong
                continue
            group, pos = divmod(index, per_group)
            goff = HEADER_SIZE + group * self._group_size
            # No semaphore yet: the state is one byte, and what else is misread is read again under it.
            ticket, state, *_ = SLOT_HEAD.unpack_from(mv, goff + _G + self._values_size + pos * SLOT_SIZE)
            if ticket != handle >> INDEX_BITS or state != _WAITING:
                look.add(handle)
                continue
            waiting_on.setdefault((group, _U32.unpack_from(mv, goff + _G + 4 * pos)[0]), set()).add(handle)
        for (group, value), mine in waiting_on.items():
            with self._group_held(group):
                while mine:
                    seen = mine.pop()
                    index = seen & _INDEX_MASK
                    me = self._slot(index)
                    if me.ticket != seen >> INDEX_BITS or me.state != _WAITING or self._value(index) != value:
                        look.add(seen)
                        continue
                    look.add(seen)  # found below, as it ought to be; if not, looked at all the same
                    granted, waiting = self._matching(group, value, me.inode, me.device, me.key[: me.key_len])
                    first = True
                    for index, slot in waiting:  # in queue order
                        handle = slot.ticket << INDEX_BITS | index
                        if handle == seen:
                            look.discard(seen)
                        elif handle not in mine:
                            continue
                        mine.discard(handle)
                        if first or self._blocker(self._ident(slot), slot.mode, slot.ticket, granted, waiting) is None:
                            look.add(handle)
                        first = False
        return look

    def _live_holder_in_the_way(self, handle: int, group: int, value: int, me: Slot) -> Queued | None:
        """Without the semaphore: a live process's granted lock that keeps waiting request ``me`` waiting, or
        None (look under the semaphore). Such a request can be granted only by a hand-off, which its slot
        shows: one rung to learn who holds the lock now (after a hand-off to another) need not queue for the
        semaphore behind the new holder's release. Nothing is written; a torn read only sends it there."""
        granted, waiting = self._matching(group, value, me.inode, me.device, me.key[: me.key_len])
        ident = self._ident
        mine = ident(me)
        found: Slot | None = None
        for _index, slot in granted:
            if slot.state == _GRANTED and ident(slot) == mine:
                return None  # a conversion: it looks under the semaphore
            if found is None and not modes.compatible(me.mode, slot.mode):
                if slot.state != _GRANTED:
                    return None  # kept for its client: when it expires is said under the semaphore
                found = slot
        if found is None or _surely_dead(found.pid):  # a zombie too: the end a watching waiter was woken by
            return None
        return Queued(handle, _holder(found), 0.0, _watch(me, granted, waiting))

    def cancel(self, handle: int) -> bool:
        """Withdraw a queued request, or give back the lock it was handed meanwhile (its requester gives up
        before it saw the grant: a timeout, an interrupt, its client gone); False when it was neither."""
        index = handle & _INDEX_MASK
        if index >= self.geometry.locks:
            return False
        group = index // self._per_group
        with self._group_held(group):
            slot = self._slot(index)
            if slot.ticket != handle >> INDEX_BITS or slot.state not in (_WAITING, _GRANTED, _DEADLOCK):
                return False
            value = self._value(index)
            self._free(index)
            tokens = self._settle(group, value, slot)
        _ring(tokens)
        return True

    def unlock(self, handle: int, *, block: bytes | None = None, invalidate: bool = False) -> None:
        """Release a granted lock; NotHeld when the handle names none. A PW or EX holder may write the
        resource's value block as it goes (``block``), or mark it not valid (``invalidate``): NotWritable for
        another mode, ValueError for a block longer than the table's, and the lock is still held then."""
        if block is not None or invalidate:
            self._release(handle, block, invalidate, lost=False)
            return
        index = handle & _INDEX_MASK
        if index >= self._ngroups * self._per_group:
            raise NotHeld(f"handle {handle:#x} names no slot of this table")
        group, pos = divmod(index, self._per_group)
        goff = HEADER_SIZE + group * self._group_size + _G
        soff = goff + self._values_size + pos * SLOT_SIZE
        mv = self._mv
        tokens: list[Ring] = []
        member = group % self._nsems
        semid = self._sems.id
        try:
            if _semop(semid, self._take_of[member], 1):
                self._take(member)
        except BaseException:
            self._give_if_taken((1 + member,))
            raise
        try:
            ticket, state, _mode, _flags, _klen, queued = SLOT_HEAD.unpack_from(mv, soff)
            if ticket != handle >> INDEX_BITS or state != 1:
                raise NotHeld(f"handle {handle:#x} holds no lock")
            value = _U32.unpack_from(mv, goff + 4 * pos)[0]
            _U32.pack_into(mv, goff + 4 * pos, 0)
            _BYTE.pack_into(mv, soff + _STATE_OFFSET, 0)
            if queued:
                tokens = self._settle(group, value, self._slot(index))
        finally:
            if _semop(semid, self._give_of[member], 1):
                self._give(member)
        if tokens:
            _ring(tokens)

    def abandon(self, handle: int) -> None:
        """Release the lock of a holder that ended abnormally (a lock server's client lost while it held it):
        a PW or EX lock leaves the resource's value block not valid, as its holder may have been half-way
        through what the block describes. NotHeld when the handle names none."""
        self._release(handle, None, False, lost=True)

    def _release(self, handle: int, block: bytes | None, invalidate: bool, *, lost: bool) -> None:
        """``unlock`` with a value block written or invalidated, or ``abandon``: under the semaphore."""
        index = self._index_of(handle)
        group = index // self._per_group
        with self._group_held(group):
            held = self._held(handle, index)
            value = self._value(index)
            if lost:
                if held.mode in _WRITERS and not held.flags & _HANDED:
                    self._write_block(group, value, held, None, invalidate=True)
            else:
                self._write_block(group, value, held, block, invalidate)
            self._free(index)
            tokens = self._settle(group, value, held) if held.queued else []
        _ring(tokens)

    def convert(
        self, handle: int, mode: int, *, wait_token: int = 0, block: bytes | None = None, invalidate: bool = False,
    ) -> Grant | Conflict | Queued:
        """Convert the granted lock ``handle`` to ``mode`` in place (it is never released meanwhile).

        A conversion down (``modes.covers``) is granted at once. One up is granted when ``mode`` goes with
        every other granted lock and with every conversion queued before it (the convert queue, served before
        the other waiters; FIFO); otherwise a Conflict, or with ``wait_token`` a Queued conversion, retried as
        any queued request is: its Grant names the lock's own ``handle``. A conversion up takes a new fencing
        token. ``block``/``invalidate``: as ``unlock``, written before the conversion (a PW or EX holder's).
        NotHeld when the handle names no granted lock."""
        index = self._index_of(handle)
        group = index // self._per_group
        with self._group_held(group):
            result, tokens = self._convert_locked(handle, index, group, mode, wait_token, block, invalidate)
        _ring(tokens)
        return result

    def _convert_locked(
        self, handle: int, index: int, group: int, mode: int, wait_token: int, block: bytes | None, invalidate: bool,
    ) -> tuple[Grant | Conflict | Queued, list[Ring]]:
        held = self._held(handle, index)
        value = self._value(index)
        if block is not None or invalidate:
            self._write_block(group, value, held, block, invalidate)
            held = self._slot(index)
        converted = (held.mode, held._replace(mode=mode))
        if modes.covers(mode, held.mode):  # down (or the same mode): at once, the token kept
            self._set_mode(index, group, held, mode)
            return Grant(handle, mode, value, held.token), self._settle(group, value, held, converted=converted)
        me = self._ident(held)
        key = held.key[: held.key_len]
        expires: float | None = 0.0
        while True:
            granted, waiting = self._matching(group, value, held.inode, held.device, key)
            blocker = self._blocker(me, mode, None, granted, waiting)
            if blocker is None or (expires := self._clear_blocker(blocker, thorough=not wait_token)) is not None:
                break
        if blocker is None:
            token = self._set_mode(index, group, held, mode)
            return Grant(handle, mode, value, token), self._settle(group, value, held, converted=converted)
        if not wait_token:
            return Conflict(_holder(blocker[1])), []
        owner = Owner(held.pid, held.thread, held.port, held.client_pid, held.ip)
        kflags = held.flags & (SlotFlag.LONG_KEY | _KEEP) | _CONVERTING
        if len(_ahead_in_way(mode, None, waiting)) <= WATCH_AHEAD:
            kflags |= _WATCHES_ALL
        queued, ticket = self._new_slot(group, value, owner, held.inode, held.device, key, kflags, mode, _WAITING,
                                        wait_token, like=held)
        self._bump("waits_begun")
        self._count_queued(granted, len(waiting) + 1)
        me_slot = self._slot(queued)
        return Queued(ticket << INDEX_BITS | queued, _holder(blocker[1]), expires or 0.0,
                      _watch(me_slot, granted, waiting)), self._notices(granted, [(queued, me_slot)])

    def value_block(self, handle: int) -> tuple[bytes, bool]:
        """The value block of the resource of granted lock ``handle``, and whether it is valid (False:
        VALNOTVALID, the last value written before a PW or EX holder ended abnormally or invalidated it).
        All zero until first written. Read under the semaphore: a CR or NL holder's block may be written
        meanwhile by a PW holder beside it. NotHeld when the handle names no granted lock."""
        index = self._index_of(handle)
        with self._group_held(index // self._per_group):
            held = self._held(handle, index)
        return held.block[: self.block_size], not held.flags & _NOT_VALID

    def notices_due(self, handles: Iterable[int]) -> list[tuple[int, int]]:
        """Of the granted locks ``handles`` (their holder's, which asked for notices), those whose notice was
        sent (NOTIFIED), with the mode wanted by the first request each blocks: what a holder whose notice
        doorbell overflowed asks (``Doorbell.overflowed``), since a notice lost there is not sent again."""
        due = []
        for handle in handles:
            index = handle & _INDEX_MASK
            if index >= self.geometry.locks:
                continue
            group = index // self._per_group
            with self._group_held(group):
                slot = self._slot(index)
                if slot.ticket != handle >> INDEX_BITS or slot.state != _GRANTED or not slot.flags & _NOTIFIED:
                    continue
                _granted, waiting = self._matching(group, self._value(index), slot.inode, slot.device,
                                                  slot.key[: slot.key_len])
            owner = self._ident(slot)
            wanted = next((w.mode for _, w in waiting
                           if not modes.compatible(w.mode, slot.mode) and self._ident(w) != owner), None)
            if wanted is not None:
                due.append((handle, wanted))
        return due

    def _index_of(self, handle: int) -> int:
        index = handle & _INDEX_MASK
        if index >= self.geometry.locks:
            raise NotHeld(f"handle {handle:#x} names no slot of this table")
        return index

    def _held(self, handle: int, index: int) -> Slot:
        """The granted slot ``handle`` names (its group's semaphore held); NotHeld otherwise."""
        slot = self._slot(index)
        if slot.ticket != handle >> INDEX_BITS or slot.state != _GRANTED or not self._value(index):
            raise NotHeld(f"handle {handle:#x} holds no lock")
        return slot

    def _set_mode(self, index: int, group: int, held: Slot, mode: int) -> int:
        """Give granted slot ``held`` the mode ``mode``: a conversion up takes a new fencing token (the group's
        next ticket), one down keeps its own; the token it has now."""
        soff = self.geometry.slot_offset(index)
        _BYTE.pack_into(self._mv, soff + _MODE_OFFSET, mode)
        if held.flags & _NOTIFIED:  # converted: the situation changed, a request it still blocks is told of again
            _BYTE.pack_into(self._mv, soff + _FLAGS_OFFSET, held.flags & ~_NOTIFIED)
        if modes.covers(mode, held.mode):
            return held.token
        self._bump("waits_begun")  # a lock converted up may now be in the way of requests that wait
        token = self._next_ticket(HEADER_SIZE + group * self._group_size)
        _U64.pack_into(self._mv, soff + _TOKEN_OFFSET, token)
        return token

    def _write_block(self, group: int, value: int, held: Slot, block: bytes | None, invalidate: bool) -> None:
        """Write ``block`` as the value block of ``held``'s resource, or mark it not valid, in every slot of the
        resource (the block lives with the resource's slots, and a new one copies it from them)."""
        if held.mode not in _WRITERS:
            raise NotWritable(f"a {modes.NAMES[held.mode]} lock cannot write the value block: only a PW or EX "
                              "holder does")
        if block is not None and len(block) > self.block_size:
            raise ValueError(f"a value block of {len(block)} bytes: this table's are {self.block_size} bytes")
        granted, waiting = self._matching(group, value, held.inode, held.device, held.key[: held.key_len])
        for index, slot in granted + waiting:
            soff = self.geometry.slot_offset(index)
            if block is not None:
                struct.pack_into(f"{BLOCK_MAX}s", self._mv, soff + _BLOCK_OFFSET, block)
            flags = slot.flags | _NOT_VALID if invalidate else slot.flags & ~_NOT_VALID
            _BYTE.pack_into(self._mv, soff + _FLAGS_OFFSET, flags)

    def _lost_writer(self, group: int, value: int, slot: Slot) -> None:
        """A lock freed because its holder ended abnormally (``slot`` as it was): if it was a PW or EX lock its
        holder was told of, the resource's value block is left not valid (in its remaining slots)."""
        if slot.state in (_GRANTED, _KEPT) and slot.mode in _WRITERS and not slot.flags & _HANDED:
            granted, waiting = self._matching(group, value, slot.inode, slot.device, slot.key[: slot.key_len])
            for index, other in granted + waiting:
                _BYTE.pack_into(self._mv, self.geometry.slot_offset(index) + _FLAGS_OFFSET, other.flags | _NOT_VALID)

    def pauses(self) -> Iterator[float]:
        """A waiter is rung when its lock may be granted; it looks every RECHECK_INTERVAL as a safety net."""
        return itertools.repeat(RECHECK_INTERVAL)

    def status(self, owner: Owner, inode: int, device: int, key: bytes) -> tuple[int, Holder | None]:
        """Who holds a resource: (HolderState FREE, MINE or OTHER; the holder)."""
        key, _ = stored_key(key)
        value = resource_value(inode, device, key)
        group = value % self._ngroups
        with self._group_held(group):
            granted, _waiting = self._matching(group, value, inode, device, key)
        me = self._ident(owner)
        for _pos, slot in granted:
            if slot.state == _GRANTED and self._ident(slot) == me:
                return HolderState.MINE, _holder(slot)
        if granted:
            return HolderState.OTHER, _holder(granted[0][1])
        return HolderState.FREE, None

    def release_owner(self, pid: int, thread: int | None = None, *, lost: bool = False) -> int:
        """Free every lock and queued request of a process (or of one of its threads). Kept locks are
        nobody's any more, whatever pid they show: they are left for their client to reclaim. ``lost``: its
        holder ended abnormally (its PW and EX locks leave their value blocks not valid), not released them."""
        freed, _ = self._sweep(lambda slot: _FREE if slot.pid == pid and slot.state != _KEPT
                               and (thread is None or slot.thread == thread) else None, lost=lost)
        return freed

    def keep_owner(self, pid: int) -> int:
        """A lock server ends while its client may live: its keepable granted locks become KEPT (from
        now), to be reclaimed within the lock-delay; the rest of its locks and its queued requests are
        freed (a table whose lock-delay is 0 keeps nothing). How many were kept."""
        delay = self.lock_delay

        def decide(slot: Slot) -> int | None:
            if slot.pid != pid or slot.state == _KEPT:
                return None
            return _KEPT if delay > 0 and _keepable(slot) else _FREE

        _, kept = self._sweep(decide)
        return kept

    def reclaim(self, handle: int, owner: Owner, inode: int, device: int, key: bytes, mode: int, *,
                secret: int | None = None) -> Grant:
        """Take back, for ``owner`` (a new lock server of the same client), the kept lock that ``handle``
        names: it is granted again, to ``owner``, under the same handle.

        Allowed for a KEPT lock within the lock-delay, and for a keepable lock whose lock server is
        dead but not yet noticed; the client (port, client pid, thread, and the address it connects from:
        the rest of it is told to anyone its lock is in the way of), the file, the key and the mode must
        be the lock's. NotHeld otherwise, saying no more than the asking client may know:
        who else holds what is not told. With ``secret`` (a lock server's reclaim: the handle its client
        knows carries the secret its grant was sealed with, see ``seal``) the lock must have been sealed with
        it, and ``handle`` names only the slot; the Grant then has the lock's own handle.
        """
        stored, _ = stored_key(key)
        index = handle & _INDEX_MASK
        unknown = f"no lock of this client, file, key and mode is kept under handle {handle:#x}"
        if index >= self.geometry.locks:
            raise NotHeld(unknown)
        delay = self.lock_delay
        tokens: list[Ring] = []
        with self._group_held(index // self._per_group):
            slot = self._slot(index)
            value = self._value(index)
            proven = slot.ticket == handle >> INDEX_BITS if secret is None else secret != 0 and slot.doorbell == secret
            if (not value or not proven or slot.state not in (_GRANTED, _KEPT)
                    or not slot.flags & _KEEP
                    or (slot.port, slot.client_pid, slot.thread, slot.ip)
                    != (owner.port, owner.client_pid, owner.thread, owner.ip)
                    or (slot.inode, slot.device, slot.mode) != (inode, device, mode)
                    or slot.key[: slot.key_len] != stored):
                raise NotHeld(unknown)
            now = time.time()
            own = slot.ticket << INDEX_BITS | index  # the lock's handle (``handle`` may be a sealed one)
            if slot.state == _GRANTED and slot.pid == owner.pid:
                return Grant(own, slot.mode, value, slot.token)  # asked twice: it is this lock server's already
            if slot.state == _GRANTED and not _surely_dead(slot.pid):
                raise NotHeld(f"the lock under handle {handle:#x} is still held by the lock server that took it "
                              f"(pid {slot.pid}), which has not ended")
            if slot.state == _KEPT and now >= slot.timestamp + delay:
                self._free(index)
                self._lost_writer(index // self._per_group, value, slot)
                self._bump("tidy_ops")
                tokens = self._settle(index // self._per_group, value, slot)
            else:
                self._bump("waits_begun")  # its owner is another process now: whoever waits for it waits for it
                SLOT_STRUCT.pack_into(
                    self._mv, self.geometry.slot_offset(index), slot.ticket, _GRANTED, slot.mode,
                    slot.flags & ~_KEEP | (_KEEP if owner.keep else 0), slot.key_len, slot.queued, owner.pid,
                    slot.port, slot.client_pid, owner.ip, owner.thread, slot.inode, slot.device, now, slot.doorbell,
                    slot.key, slot.token, slot.notify, slot.block,
                )
                return Grant(own, slot.mode, value, slot.token)
        _ring(tokens)
        raise NotHeld(f"the lock under handle {handle:#x} was kept {delay:g} s for its client to reclaim, "
                      "and has been freed")

    def seal(self, handle: int, secret: int) -> None:
        """Write ``secret`` into the granted lock ``handle`` (this process's): what a reclaim of it must show
        (``reclaim(secret=)``). It stays while the lock is kept, in the slot's doorbell field, which only a
        waiting request uses."""
        group, pos = divmod(handle & _INDEX_MASK, self._per_group)  # slot_offset, without its calls: lock path
        soff = HEADER_SIZE + group * self._group_size + _G + self._values_size + pos * SLOT_SIZE
        ticket, state = _SEALED_HEAD.unpack_from(self._mv, soff)
        if ticket == handle >> INDEX_BITS and state == _GRANTED:
            _U64.pack_into(self._mv, soff + _SEAL_OFFSET, secret)
            flags = self._mv[soff + _FLAGS_OFFSET]
            if flags & _HANDED:  # its client is told now: keepable from here on
                self._mv[soff + _FLAGS_OFFSET] = flags & ~_HANDED

    def tidy(self, gone: Callable[[int, float], bool] | None = None) -> Tidied:
        """Free the locks and requests of owners that no longer exist, but keep (KEPT) the keepable
        locks among them, and free the kept locks whose lock-delay has passed; counted in the header,
        which then says when the next kept lock is due (``next_expiry``).

        ``gone(pid, since)`` says whether the owner of a lock taken at ``since`` has gone; by default a
        ``Liveness`` of this tidy, which asks the system once per pid (the start time guards against a
        reused pid)."""
        gone = gone or Liveness(self.shm_id)
        delay = self.lock_delay
        now = time.time()
        with self._header_held():
            self.set_header(next_expiry=0.0)  # found again below, or written by whoever keeps a lock meanwhile
        staying: list[float] = []

        def decide(slot: Slot) -> int | None:
            if slot.state == _KEPT:
                if now >= slot.timestamp + delay:
                    return _FREE
                staying.append(slot.timestamp + delay)
                return None
            if not gone(slot.pid, slot.timestamp):
                return None
            return _KEPT if delay > 0 and _keepable(slot) else _FREE

        done = Tidied(*self._sweep(decide))
        self._bump("tidy_ops", done.freed + done.kept)
        with self._header_held():
            self.set_header(last_tidy=time.time())
        if staying:
            self._note_expiry(min(staying))
        return done

    def break_deadlocks(self, *, always: bool = False) -> list[Entry]:
        """Refuse one request of each cycle of waiters (``deadlocks``): its slot becomes DEADLOCK, in nobody's
        way, and its waiter is rung, to raise Deadlock. The cycles are found in a copy of the groups that have
        waiters, and each is confirmed, with the semaphores of all its groups held, before its victim is
        refused: a cycle seen in copies made at different moments may have gone meanwhile, one still there
        cannot go by itself. The requests refused, as they were.

        Nothing is copied when the header's ``waits_begun`` has not moved since the last look of this object
        that confirmed every cycle it found (none can have formed since); ``always`` looks all the same."""
        begun = int(_U64.unpack_from(self._mv, _WAITS_BEGUN_OFFSET)[0])
        if begun == self._waits_seen and not always:
            return []
        unconfirmed = False
        refused = []
        for cycle in deadlocks.cycles(self.wait_for(self.waiting_entries())):
            groups = sorted({w.group for w in cycle.waiters})
            tokens = []
            with self._groups_held(groups[: semaphores.BATCH_MEMBERS]):
                if len(groups) <= semaphores.BATCH_MEMBERS and self._still_a_cycle(cycle):
                    victim = cycle.victim
                    _BYTE.pack_into(self._mv, self.geometry.slot_offset(victim.at) + _STATE_OFFSET, _DEADLOCK)
                    tokens.append(victim.slot.doorbell)
                    refused.append(Entry(victim.at, victim.group, victim.value, victim.slot))
                else:
                    unconfirmed = True  # gone meanwhile, or in too many groups at once: looked at again next time
            _ring([t for t in tokens if t])
        self._waits_seen = None if unconfirmed else begun
        return refused

    def waiting_entries(self) -> list[Entry]:
        """The used slots of the groups that have a waiting request (copied a batch of groups at a time, as
        ``scan`` copies them; a batch without one is not decoded): all the wait-for graph is made of."""
        return [e for first, data in self._copies() if _WAITING_BYTE in data for e in self._decode_waiting(first, data)]

    def wait_for(self, entries: Iterable[Entry]) -> list[tuple[deadlocks.Waiter, frozenset[deadlocks.Owner]]]:
        """Who waits for whom among ``entries`` (``deadlocks.wait_for``, with this table's owner identity):
        each waiting request and the owners it waits for, by the one rule the lock path and the detector use."""
        return deadlocks.wait_for(((e.index, e.group, e.value, e.slot) for e in entries), self._ident)

    def owner_of(self, slot: Slot) -> tuple[Any, ...]:
        """The owner identity of ``slot`` in this table: (pid, thread), or (port, thread, ip) with jdls -P."""
        return self._ident(slot)

    def _still_a_cycle(self, cycle: deadlocks.Cycle) -> bool:
        """Whether every request of ``cycle`` still waits, unchanged, for the next one's owner (the semaphores of
        their groups held)."""
        ring = cycle.waiters
        for n, waiter in enumerate(ring):
            slot = self._slot(waiter.at)
            if (slot.ticket, slot.state, slot.mode) != (waiter.slot.ticket, _WAITING, waiter.slot.mode) \
                    or self._value(waiter.at) != waiter.value:
                return False
            granted, waiting = self._matching(waiter.group, waiter.value, slot.inode, slot.device,
                                              slot.key[: slot.key_len])
            after = ring[(n + 1) % len(ring)].owner
            if not any(self._ident(b) == after and b.state != _KEPT for _, b in
                       deadlocks.blockers(self._ident, waiter.owner, slot.mode, slot.ticket, granted, waiting)):
                return False
        return True

    def _decode_waiting(self, first: int, data: bytes) -> list[Entry]:
        """The used slots of the groups of a batch (``_copies``) that have a waiting request."""
        size, values_size, per_group = self._group_size, self._values_size, self._per_group
        found = []
        for n in range(len(data) // size):
            states = n * size + _G + values_size + _STATE_OFFSET
            if _WAITING_BYTE in data[states : states + per_group * SLOT_SIZE : SLOT_SIZE]:
                found.extend(self._decode(first + n, data[n * size : (n + 1) * size]))
        return found

    def scan(self) -> Iterator[Entry]:
        """Every used slot, by group and in a group by position, each batch of groups a consistent snapshot.

        A batch (``SCAN_BYTES``) is copied under the semaphore and decoded after it is given back, and the
        next is copied only when the caller asks for more: a caller that writes each entry out as it comes
        holds the semaphore a fraction of a millisecond at a time, however big the table and however slow
        its reader, and never holds a million entries."""
        for first, data in self._copies():
            yield from self._decode(first, data)

    def slots_in_use(self) -> int:
        """How many slots are in use, counted from the groups' values alone (copied a batch of groups at a
        time under the semaphore, as ``scan`` copies them): what a report must say before its rows."""
        size, values_size, mv = self._group_size, self._values_size, self._mv
        free = 0
        for first, start, end in self._batches():
            with self._groups_held(range(first, first + (end - start) // size)):
                values = b"".join([mv[at + _G : at + _G + values_size] for at in range(start, end, size)])
            free += array.array("I", values).count(0)
        return self.geometry.locks - free

    def tickets_issued(self) -> int:
        """The tickets (fencing tokens) the groups have issued since the table was made: one for every lock granted
        at once, request queued, grant to a waiter and conversion up, local processes' included (the metrics'
        count of the table's grants). Each group's counter is read with its batch's semaphores held, as a scan
        copies them (for no longer than the reads): CPython's struct does not read an 8-byte word whole, and a
        counter read half way through a write could go backwards (a counter reset, to Prometheus)."""
        mv, size, ticket = self._mv, self._group_size, _TICKET
        total = 0
        for first, start, end in self._batches():
            with self._groups_held(range(first, first + (end - start) // size)):
                total += sum(ticket.unpack_from(mv, offset)[0] for offset in range(start, end, size))
        return total

    def _batches(self) -> Iterator[tuple[int, int, int]]:
        """The groups in batches of SCAN_BYTES (whole groups, at least one): (first group, start, end offset)."""
        size = self._group_size
        per_batch = max(1, min(SCAN_BYTES // size, semaphores.BATCH_MEMBERS))
        for first in range(0, self._ngroups, per_batch):
            start = HEADER_SIZE + first * size
            yield first, start, start + min(per_batch, self._ngroups - first) * size

    def _copies(self) -> Iterator[tuple[int, bytes]]:
        """The groups, a batch at a time, copied under the semaphore: (the batch's first group, its bytes)."""
        mv = self._mv
        for first, start, end in self._batches():
            with self._groups_held(range(first, first + (end - start) // self._group_size)):
                data = mv[start:end].tobytes()
            yield first, data

    def _decode(self, first: int, data: bytes) -> list[Entry]:
        """The used slots of a batch copied by ``_copies``."""
        size, values_size, per_group = self._group_size, self._values_size, self._per_group
        unpack_values, unpack_slot, make = self._vals.unpack_from, SLOT_STRUCT.unpack_from, Slot._make
        found: list[Entry] = []
        for n in range(len(data) // size):
            goff = n * size + _G
            vals = unpack_values(data, goff)
            if not any(vals):
                continue
            group = first + n
            soff = goff + values_size
            found.extend(
                Entry(group * per_group + pos, group, value, make(unpack_slot(data, soff + pos * SLOT_SIZE)))
                for pos, value in enumerate(vals) if value
            )
        return found

    # -- the slow path (semaphore held) ----------------------------------------------

    def _take(self, member: int) -> None:
        """Take the semaphore of group member ``member`` (a group's: ``group % self._nsems``); the lock path
        calls ``semop`` itself and comes here only when that failed (a signal came: try again; or an error)."""
        with self._told():
            self._sems.take(self._take_of[member])

    def _give_if_taken(self, numbers: tuple[int, ...]) -> None:
        """After an exception as a take of set members ``numbers`` returned (Ctrl-C then): give them back if
        this process took them, or its own next request would wait for them forever, and every other process
        until it exits."""
        if self._sems.taken_here(numbers):
            with self._told():
                self._sems.give_numbers(numbers)

    def _give(self, member: int) -> None:
        """Give a semaphore back. Removed meanwhile (jdls -K -o), the table is gone with every lock in it:
        what was just done in it counts for nothing, and a lock just written there must not be granted."""
        with self._told():
            self._sems.give(self._give_of[member])

    @contextlib.contextmanager
    def _told(self) -> Iterator[None]:
        """A semaphore operation's failure in this module's terms: the table removed, or another error."""
        try:
            yield
        except semaphores.SemaphoresGone:
            raise TableMissing(f"lock table 0x{self.key:08x} was removed") from None
        except OSError as exc:
            raise TableError(f"lock table 0x{self.key:08x}: {exc}") from None

    @contextlib.contextmanager
    def _holding(self, take: Callable[[], _T], give: Callable[[_T], None], numbers: tuple[int, ...]) -> Iterator[None]:
        """Hold what ``take`` takes (set members ``numbers``) while the body runs."""
        try:
            with self._told():
                taken = take()
        except BaseException:
            self._give_if_taken(numbers)
            raise
        try:
            yield
        finally:
            with self._told():
                give(taken)

    def _group_held(self, group: int) -> contextlib.AbstractContextManager[None]:
        """Hold the semaphore of ``group`` (the slow paths' way; the lock path takes and gives it inline)."""
        member = group % self._nsems
        return self._holding(lambda: self._sems.take(self._take_of[member]),
                             lambda _: self._sems.give(self._give_of[member]), (1 + member,))

    def _groups_held(self, groups: Iterable[int]) -> contextlib.AbstractContextManager[None]:
        """Hold the semaphores of several groups (at most BATCH_MEMBERS of them), taken in one operation."""
        groups = tuple(groups)
        numbers = tuple(sorted({1 + self._sems.member_of(g) for g in groups}))
        return self._holding(lambda: self._sems.take_groups(groups), self._sems.give_members, numbers)

    def _header_held(self) -> contextlib.AbstractContextManager[None]:
        """Hold the header's semaphore, for a moment, innermost (a group's may be held already)."""
        return self._holding(self._sems.take_header, lambda _: self._sems.give_header(), (semaphores.HEADER_MEMBER,))

    def _full(self, group: int) -> GroupFull:
        return GroupFull(
            f"lock group {group} is full ({self._per_group} locks): start the table larger (jdls -K, then -s)"
        )

    def _slot(self, index: int) -> Slot:
        return Slot._make(SLOT_STRUCT.unpack_from(self._mv, self.geometry.slot_offset(index)))

    def _value(self, index: int) -> int:
        return int(_U32.unpack_from(self._mv, self.geometry.value_offset(index))[0])

    def _free(self, index: int) -> None:
        _U32.pack_into(self._mv, self.geometry.value_offset(index), 0)
        _BYTE.pack_into(self._mv, self.geometry.slot_offset(index) + _STATE_OFFSET, 0)

    def _matching(
        self, group: int, value: int, inode: int, device: int, key: bytes
    ) -> tuple[list[tuple[int, Slot]], list[tuple[int, Slot]]]:
        """Granted and waiting slots of one resource, waiters in queue order: the convert queue, then the wait
        queue, each FIFO (by ticket)."""
        goff = HEADER_SIZE + group * self._group_size + _G
        vals = self._vals.unpack_from(self._mv, goff)
        granted: list[tuple[int, Slot]] = []
        waiting: list[tuple[int, Slot]] = []
        pos = -1
        while True:
            try:
                pos = vals.index(value, pos + 1)
            except ValueError:
                break
            slot = Slot._make(SLOT_STRUCT.unpack_from(self._mv, goff + self._values_size + pos * SLOT_SIZE))
            if slot.inode != inode or slot.device != device or slot.key[: slot.key_len] != key:
                continue  # another resource with the same value
            index = group * self._per_group + pos
            if slot.state == _DEADLOCK:
                continue  # refused, in nobody's way: its waiter frees it when it looks
            (waiting if slot.state == _WAITING else granted).append((index, slot))  # a kept lock is held
        waiting.sort(key=_queue_order)
        return granted, waiting

    def _blocker(
        self, me: tuple[Any, ...], mode: int, ticket: int | None,
        granted: list[tuple[int, Slot]], waiting: list[tuple[int, Slot]],
    ) -> tuple[int, Slot] | None:
        """The first lock or earlier waiter that keeps the request of owner ``me`` (queued under ``ticket``;
        None: not yet) from being granted (``deadlocks.blockers`` says which: the one rule of who waits for
        whom, which the deadlock detector follows too).

        A kept lock is nobody's, whoever it names: it blocks its own client too until reclaimed.
        """
        return next(deadlocks.blockers(self._ident, me, mode, ticket, granted, waiting), None)

    def _clear_blocker(self, item: tuple[int, Slot], *, thorough: bool = True) -> float | None:
        """Settle a blocking slot left by a process that is gone, counted as a tidy-up: a keepable lock is
        kept (its client may still reclaim it), anything else is freed, and so is a kept lock whose
        lock-delay has passed. None when it was freed (look again); else when it expires (0: never).

        Not ``thorough``, a zombie is not looked for (reading /proc takes tens of microseconds, with the
        semaphore held, on every request that queues): a request about to wait watches the blocking process
        and looks again, thoroughly, when it ends (``mechanism.acquire``, the lock server)."""
        index, slot = item
        if slot.state == _KEPT:
            expires = slot.timestamp + self.lock_delay
            if time.time() < expires:
                return expires
        elif not (_surely_dead(slot.pid) if thorough else _no_such_process(slot.pid)):
            return 0.0
        elif _keepable(slot) and self.lock_delay > 0:
            self._bump("tidy_ops")
            expires = self._keep(index)
            self._note_expiry(expires)
            return expires
        value = self._value(index)
        self._free(index)
        self._lost_writer(index // self._per_group, value, slot)
        self._bump("tidy_ops")
        return None

    def _lock_slow(
        self, owner: Owner, inode: int, device: int, key: bytes, kflags: int, mode: int,
        wait_token: int, value: int, group: int, notify: int,
    ) -> tuple[Grant | Conflict | Queued, list[Ring]]:
        me = self._ident(owner)
        expires: float | None = 0.0
        while True:
            granted, waiting = self._matching(group, value, inode, device, key)
            blocker = self._blocker(me, mode, None, granted, waiting)
            if blocker is None or (expires := self._clear_blocker(blocker, thorough=not wait_token)) is not None:
                break
        mine = [item for item in granted if item[1].state == _GRANTED and self._ident(item[1]) == me]
        if blocker is None and mine:
            index, slot = mine[0]
            token = self._set_mode(index, group, slot, mode)
            # A conversion down may let waiters in; one up may newly be in the first waiter's way.
            return Grant(slot.ticket << INDEX_BITS | index, mode, value, token), self._settle(
                group, value, slot, converted=(slot.mode, slot._replace(mode=mode)))
        if blocker is not None and not wait_token:
            return Conflict(_holder(blocker[1])), []
        state = SlotState.GRANTED if blocker is None else SlotState.WAITING
        if blocker is not None and len(_ahead_in_way(mode, None, waiting)) <= WATCH_AHEAD:
            kflags |= _WATCHES_ALL
        if blocker is not None and mine:
            kflags |= _CONVERTING
        if blocker is not None and owner.legacy:
            kflags |= _LEGACY
        like = granted[0][1] if granted else waiting[0][1] if waiting else None
        index, ticket = self._new_slot(group, value, owner, inode, device, key, kflags, mode, state, wait_token,
                                       like=like, notify=notify)
        if blocker is None:
            return Grant(ticket << INDEX_BITS | index, mode, value, ticket), []
        self._bump("waits_begun")
        self._count_queued(granted, len(waiting) + 1)
        me_slot = self._slot(index)
        return Queued(ticket << INDEX_BITS | index, _holder(blocker[1]), expires or 0.0,
                      _watch(me_slot, granted, waiting)), self._notices(granted, [(index, me_slot)])

    def _new_slot(
        self, group: int, value: int, owner: Owner, inode: int, device: int, key: bytes, kflags: int,
        mode: int, state: int, token: int, *, like: Slot | None = None, notify: int = 0,
    ) -> tuple[int, int]:
        """A new slot (the group's semaphore held): its index and ticket. A granted one's fencing token is its
        ticket; the resource's value block and its validity are copied from ``like``, a slot of the resource
        (none: a new resource's block, all zero)."""
        goff = HEADER_SIZE + group * self._group_size
        vals = self._vals.unpack_from(self._mv, goff + _G)
        try:
            pos = vals.index(0)
        except ValueError:
            raise self._full(group) from None
        ticket = self._next_ticket(goff)
        SLOT_STRUCT.pack_into(
            self._mv, goff + _G + self._values_size + pos * SLOT_SIZE, ticket, state, mode, kflags, len(key), 0,
            owner.pid, owner.port, owner.client_pid, owner.ip, owner.thread, inode, device, time.time(),
            token, key, ticket if state == _GRANTED else 0, notify, b"" if like is None else like.block,
        )
        if like is not None and like.flags & _NOT_VALID:
            self._mv[goff + _G + self._values_size + pos * SLOT_SIZE + _FLAGS_OFFSET] = kflags | _NOT_VALID
        _U32.pack_into(self._mv, goff + _G + 4 * pos, value)
        return group * self._per_group + pos, ticket

    def _retry_locked(self, handle: int) -> tuple[Grant | Queued, list[Ring]]:
        index = handle & _INDEX_MASK
        if index >= self.geometry.locks:
            raise NotHeld(f"handle {handle:#x} names no slot of this table")
        me = self._slot(index)
        if me.ticket == handle >> INDEX_BITS and me.state == _GRANTED:  # handed its lock meanwhile
            return Grant(handle, me.mode, self._value(index), me.token), []
        if me.ticket == handle >> INDEX_BITS and me.state == _DEADLOCK:
            self._free(index)
            raise Deadlock(f"the request {handle:#x} would have waited in a cycle of waiters (a deadlock): it was "
                           "chosen to be refused so that the others go on")
        if me.ticket != handle >> INDEX_BITS or me.state != SlotState.WAITING:
            raise NotHeld(f"handle {handle:#x} is not a queued request (tidied away?)")
        group = index // self._per_group
        value = self._value(index)
        key = me.key[: me.key_len]
        who = self._ident(me)
        expires: float | None = 0.0
        while True:
            granted, waiting = self._matching(group, value, me.inode, me.device, key)
            blocker = self._blocker(who, me.mode, me.ticket, granted, waiting)
            if blocker is None or (expires := self._clear_blocker(blocker)) is not None:
                break
        if blocker is not None:
            self._bump("lock_retries")
            if not me.flags & _WATCHES_ALL and len(_ahead_in_way(me.mode, me.ticket, waiting)) <= WATCH_AHEAD:
                _BYTE.pack_into(self._mv, self.geometry.slot_offset(index) + _FLAGS_OFFSET, me.flags | _WATCHES_ALL)
            return Queued(handle, _holder(blocker[1]), expires or 0.0, _watch(me, granted, waiting)), []
        mine = [item for item in granted if item[1].state == _GRANTED and self._ident(item[1]) == who]
        if mine:  # a conversion: the held lock takes the new mode, the request goes
            held_index, held = mine[0]
            token = self._set_mode(held_index, group, held, me.mode)
            self._free(index)
            grant = Grant(held.ticket << INDEX_BITS | held_index, me.mode, value, token)
            return grant, self._settle(group, value, me, converted=(held.mode, held._replace(mode=me.mode)))
        token = self._grant_waiter(index, group, me)
        return Grant(handle, me.mode, value, token), self._settle(group, value, me)

    def _grant_waiter(self, index: int, group: int, slot: Slot) -> int:
        """Grant waiting slot ``slot`` (its group's semaphore held), from now and with a new fencing token (the
        group's next ticket, so greater than every token its resource had); that token."""
        soff = self.geometry.slot_offset(index)
        token = self._next_ticket(HEADER_SIZE + group * self._group_size)
        struct.pack_into("=dQ", self._mv, soff + _TIME_OFFSET, time.time(), 0)
        _U64.pack_into(self._mv, soff + _TOKEN_OFFSET, token)
        if slot.flags & _KEEP:
            _BYTE.pack_into(self._mv, soff + _FLAGS_OFFSET, slot.flags | _HANDED)
        _BYTE.pack_into(self._mv, soff + _STATE_OFFSET, _GRANTED)  # the last write: now it is granted
        return token

    def _settle(self, group: int, value: int, like: Slot, *, converted: tuple[int, Slot] | None = None) -> list[Ring]:
        """After a change to a resource (``converted``: a granted lock's mode before, and the lock in its mode
        now): hand it to the waiters that
        can have it now, in queue order, recount its queue, and name the waiters to ring (those granted, those
        that may now convert a lock they hold, which they do themselves, and a first waiter that may not watch
        every holder in its way, ``_may_not_watch``)."""
        granted, waiting = self._matching(group, value, like.inode, like.device, like.key[: like.key_len])
        ident = self._ident
        still: list[tuple[int, Slot]] = []
        tokens: list[Ring] = []
        for item in waiting:
            index, slot = item
            who = ident(slot)
            if self._blocker(who, slot.mode, slot.ticket, granted, still) is not None:
                still.append(item)  # alive or not: looked at when its turn comes (a system call a waiter)
                continue
            if _no_such_process(slot.pid):  # a waiter killed while it waited: not to be handed anything
                self._free(index)
                self._bump("tidy_ops")
                continue
            if slot.doorbell:
                tokens.append(slot.doorbell)
            if any(s.state == _GRANTED and ident(s) == who for _, s in granted):
                still.append(item)  # a conversion: rung, and it converts on its own
                continue
            self._grant_waiter(index, group, slot)
            granted.append((index, slot._replace(state=_GRANTED, doorbell=0)))
        if converted is not None:
            for index, slot in still:  # no longer sure to watch every holder in their way: rung when first
                if slot.flags & _WATCHES_ALL and _into_the_way(slot, converted):
                    _BYTE.pack_into(self._mv, self.geometry.slot_offset(index) + _FLAGS_OFFSET,
                                    slot.flags & ~_WATCHES_ALL)
        if still and still[0][1].doorbell not in (0, *tokens) and _may_not_watch(
                still[0][1], still[0] is not waiting[0], granted, converted):
            # The first waiter may not watch a holder in its way: it looks again, to watch it, as that holder's
            # death must wake it at once. A hand-off to the waiters just ahead of it rings nobody else.
            tokens.append(still[0][1].doorbell)
        self._count_queued(granted, len(still))
        if still:
            tokens.extend(self._notices(granted, still))
        return tokens

    def _notices(self, granted: list[tuple[int, Slot]], waiting: list[tuple[int, Slot]]) -> list[Ring]:
        """The blocking notices due (the semaphore held): to each granted lock whose holder asked for them and
        has not been sent one yet, that blocks one of ``waiting`` (the first in queue order it cannot go with);
        each is marked NOTIFIED as it is sent."""
        found: list[Ring] = []
        ident = self._ident
        for index, slot in granted:
            if not slot.notify or slot.flags & _NOTIFIED or slot.state != _GRANTED:
                continue
            owner = ident(slot)
            for _, waiter in waiting:
                if not modes.compatible(waiter.mode, slot.mode) and ident(waiter) != owner:
                    _BYTE.pack_into(self._mv, self.geometry.slot_offset(index) + _FLAGS_OFFSET, slot.flags | _NOTIFIED)
                    found.append((slot.notify, slot.ticket << INDEX_BITS | index, waiter.mode))
                    break
        return found

    def _count_queued(self, granted: list[tuple[int, Slot]], queued: int) -> None:
        """Write into each held lock of a resource how many requests wait for it (the display's 'queued')."""
        for index, slot in granted:
            if slot.queued != queued:
                _H.pack_into(self._mv, self.geometry.slot_offset(index) + _QUEUED_OFFSET, min(queued, 0xFFFF))
            if not queued and slot.flags & _NOTIFIED:  # nobody waits now: the next to wait is told of again
                _BYTE.pack_into(self._mv, self.geometry.slot_offset(index) + _FLAGS_OFFSET, slot.flags & ~_NOTIFIED)

    def _keep(self, index: int) -> float:
        """Make a granted slot KEPT from now; when it expires (for the caller to note: ``_note_expiry``)."""
        now = time.time()
        soff = self.geometry.slot_offset(index)
        _BYTE.pack_into(self._mv, soff + _STATE_OFFSET, _KEPT)
        _F64.pack_into(self._mv, soff + _TIME_OFFSET, now)  # the doorbell field keeps the lock's seal
        return now + self.lock_delay

    def _note_expiry(self, when: float) -> None:
        """The header's ``next_expiry`` becomes ``when`` if that is sooner (or none was noted)."""
        with self._header_held():
            noted = _F64.unpack_from(self._mv, _NEXT_EXPIRY_OFFSET)[0]
            if not noted or when < noted:
                _F64.pack_into(self._mv, _NEXT_EXPIRY_OFFSET, when)

    def _sweep(self, decide: Callable[[Slot], int | None], *, lost: bool = True) -> tuple[int, int]:
        """Free (FREE) or keep (KEPT) every slot as ``decide`` says (None: leave it), ringing the waiters
        that can go on; (freed, kept). ``lost``: the slots freed are of holders that ended abnormally, whose
        PW and EX locks leave their resources' value blocks not valid.

        ``decide`` sees the scan's copy, outside the semaphore (it may ask the system about the owner), a
        batch of groups at a time; the changes it asks for are made ``SWEEP_CHANGES`` at a time under the
        semaphore, where a slot that changed meanwhile (another ticket, state or owner) is left for the next
        sweep, and the waiters are rung once it is given back.
        """
        freed = kept = 0
        for first, data in self._copies():
            changes = [(entry, new) for entry in self._decode(first, data) if (new := decide(entry.slot)) is not None]
            for start in range(0, len(changes), SWEEP_CHANGES):
                f, k = self._change(changes[start : start + SWEEP_CHANGES], lost)
                freed += f
                kept += k
        return freed, kept

    def _change(self, changes: list[tuple[Entry, int]], lost: bool) -> tuple[int, int]:
        """Make ``_sweep``'s changes to slots still as the scan saw them, under one hold; (freed, kept)."""
        freed = kept = 0
        soonest = 0.0
        settle: dict[tuple[int, int, int, int, bytes], Slot] = {}
        with self._groups_held({entry.group for entry, _ in changes}):
            for entry, new in changes:
                index, seen = entry.index, entry.slot
                soff = self.geometry.slot_offset(index)
                ticket, state, _mode, _flags, _key_len, queued = SLOT_HEAD.unpack_from(self._mv, soff)
                if ((ticket, state) != (seen.ticket, seen.state)
                        or _I32.unpack_from(self._mv, soff + _PID_OFFSET)[0] != seen.pid
                        or self._value(index) != entry.value):
                    continue  # changed since the scan
                if new == _KEPT:
                    expires = self._keep(index)
                    soonest = soonest or expires  # the first kept expires first
                    kept += 1
                    continue
                self._free(index)
                freed += 1
                if lost:
                    self._lost_writer(entry.group, entry.value, seen)
                if state == _WAITING or queued:  # as unlock: nobody waits for a lock nobody queued for (now)
                    settle[(entry.group, entry.value, seen.inode, seen.device, seen.key)] = seen
            tokens = [token for (group, value, *_), slot in settle.items()
                      for token in self._settle(group, value, slot)]
        if soonest:
            self._note_expiry(soonest)
        _ring(tokens)
        return freed, kept


def _queue_order(item: tuple[int, Slot]) -> tuple[bool, int]:
    """Where a waiting slot stands in its resource's queue: conversions first, then the rest, each by ticket."""
    slot = item[1]
    return not slot.flags & _CONVERTING, slot.ticket


def _ahead_in_way(mode: int, ticket: int | None, waiting: list[tuple[int, Slot]]) -> list[int]:
    """The pids of the waiters ahead of a request of ``mode`` (queued under ``ticket``; None: not yet, all are
    ahead) that it cannot share the lock with, in queue order (a conversion is ahead of every other request)."""
    return [s.pid for _, s in waiting if (ticket is None or s.ticket < ticket or s.flags & _CONVERTING)
            and s.ticket != ticket and not modes.compatible(mode, s.mode)]


def _watch(me: Slot, granted: list[tuple[int, Slot]], waiting: list[tuple[int, Slot]]) -> tuple[int, ...]:
    """The processes waiting request ``me`` watches (``Queued.watch``): those of the live locks in its way
    and of the nearest WATCH_AHEAD waiters ahead of it that it cannot share the lock with (granted first,
    their release leads to it). With no more than that ahead it watches them all (``SlotFlag.WATCHES_ALL``)."""
    mode, pid = me.mode, me.pid
    pids = {s.pid for _, s in granted if s.state == _GRANTED and not modes.compatible(mode, s.mode)}
    pids.update(_ahead_in_way(mode, me.ticket, waiting)[-WATCH_AHEAD:])
    pids.discard(pid)  # another thread's request of this same process
    return tuple(pids)


def _into_the_way(waiter: Slot, converted: tuple[int, Slot]) -> bool:
    """Whether a conversion (the lock's mode before, the lock now) put another process's lock in the way of
    ``waiter`` that was not before: one the waiter had no reason to watch."""
    before, lock = converted
    return (lock.pid != waiter.pid and modes.compatible(waiter.mode, before)
            and not modes.compatible(waiter.mode, lock.mode))


def _may_not_watch(
    first: Slot, new_first: bool, granted: list[tuple[int, Slot]], converted: tuple[int, Slot] | None,
) -> bool:
    """Whether the first waiter of a resource may not watch a live holder in its way, after a change: a lock
    that converted into its way (compatible with it before, so unwatched), or, for a waiter new at the head of
    the queue that did not watch every waiter ahead of it (SlotFlag.WATCHES_ALL), any holder in its way (it
    may have been handed the lock from farther ahead than the waiter watched). A waiter watches every holder in
    its way at each look, and the waiters ahead when they were few enough: whoever gets the lock before it
    comes from there, or converts."""
    if converted is not None and _into_the_way(first, converted):
        return True
    if not new_first or first.flags & _WATCHES_ALL:
        return False
    return any(s.state == _GRANTED and s.pid != first.pid and not modes.compatible(first.mode, s.mode)
               for _, s in granted)


def _ring(tokens: Sequence[Ring]) -> None:
    """Ring the waiters handed a lock (or to convert one), then give the processor up once: the scheduler
    tends to wake a rung process on the ringer's own processor, where it would wait until the ringer sleeps
    or its time slice ends (a hand-off took 165 µs on two cores, 24 µs with the yield; 8 processes on one
    key, 6,051 against 42,733 locks a second, 2026-12-01). Only a release that hands a lock on pays it."""
    for token in tokens:
        if type(token) is int:
            doorbell.ring(token)
        else:
            doorbell.notice(*token)  # type: ignore[misc]
    if tokens:
        os.sched_yield()
