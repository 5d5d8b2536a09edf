"""The lock table's semaphores: one SysV set, its first member for the header, one more per set of groups.

One semaphore for the whole table made every process queue behind every other,
whatever record each wanted: eight processes on their own keys locked at half the
rate of one (2026-12-01). With a semaphore per set of groups, requests for records
in different groups do not meet. The members live in one SysV set under the
table's key, so that the table is still two IPC objects (``ipcs``, ``jdls -K``,
``dls-ipcrm`` see the same), and a scan can take the members of a batch of groups
in one atomic ``semop``.

sysv_ipc speaks only to a set's first member, so the operations go to the C
library's ``semop`` through ctypes, with prebuilt operation buffers: the lock path
passes an address and a count, nothing is built per call. Every operation that
takes a member is SEM_UNDO, as before: a process killed while holding one gives
it back.

Order, against deadlock: a process takes group members (one, or several at once
in one ``semop``) and then, for a moment, the header's; never a group member while
holding the header's, and never group members one after another.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterable

import sysv_ipc

#: Most group members a table has (fewer when it has fewer groups, or the kernel allows fewer in a set):
#: a request meets another only when both records' groups share a member, and a scan takes at most
#: ``BATCH_MEMBERS`` at a time.
MOST_GROUP_MEMBERS = 128
#: Most members one ``semop`` takes (the kernel's SEMOPM, 32 on the oldest kernels, 500 today).
BATCH_MEMBERS = 32
#: The set member that guards the header (a group member m is set member 1 + m).
HEADER_MEMBER = 0

_IPC_CREAT = 0o1000
_IPC_EXCL = 0o2000
_SEM_UNDO = 0x1000


class _SemBuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


_libc = ctypes.CDLL(None, use_errno=True)
#: semop(semid, address of the operations, how many): 0, or -1 with the error in ctypes.get_errno().
semop = _libc.semop
semop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
semop.restype = ctypes.c_int
_semget = _libc.semget
_semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_semget.restype = ctypes.c_int
_semctl = _libc.semctl
_semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_semctl.restype = ctypes.c_int
_GETVAL = 12
_GETPID = 11
_SIZE = ctypes.sizeof(_SemBuf)


class SemaphoresGone(Exception):
    """The set was removed (jdls -K) or is no longer what its id named."""


def kernel_members_limit() -> int:
    """The most members a set may have here (SEMMSL), 250 when it cannot be read."""
    try:
        with open("/proc/sys/kernel/sem", "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 250


def members_for(ngroups: int) -> int:
    """How many group members a table of ``ngroups`` groups gets."""
    return max(1, min(ngroups, MOST_GROUP_MEMBERS, kernel_members_limit() - 1))


def create(key: int, group_members: int) -> sysv_ipc.Semaphore:
    """Make the set (mode 0600, every member 0: closed until ``open_all``); sysv_ipc's view of it for its
    id, owner, mode and removal. ExistentialError when a set with ``key`` exists."""
    semid = _semget(key, 1 + group_members, _IPC_CREAT | _IPC_EXCL | 0o600)
    if semid < 0:
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise sysv_ipc.ExistentialError(f"a semaphore with the key 0x{key & 0xFFFFFFFF:08x} already exists")
        raise OSError(code, f"semget: {os.strerror(code)}")
    return sysv_ipc.Semaphore(key)


class Semaphores:
    """A table's set, for the table's own operations on it."""

    def __init__(self, semid: int, group_members: int) -> None:
        self.id = semid
        self.group_members = group_members
        count = 1 + group_members
        self._take = (_SemBuf * count)(*(_SemBuf(n, -1, _SEM_UNDO) for n in range(count)))
        self._give = (_SemBuf * count)(*(_SemBuf(n, 1, _SEM_UNDO) for n in range(count)))
        base_take, base_give = ctypes.addressof(self._take), ctypes.addressof(self._give)
        #: Per group member, the address of its one-operation buffer (what the lock path passes).
        self.take_of = [base_take + _SIZE * (1 + n) for n in range(group_members)]
        self.give_of = [base_give + _SIZE * (1 + n) for n in range(group_members)]

    def member_of(self, group: int) -> int:
        """The group member (0-based among the group members) that guards ``group``."""
        return group % self.group_members

    def take(self, address: int) -> None:
        """Take the member whose buffer is at ``address`` (``take_of``), waiting as long as it takes."""
        while semop(self.id, address, 1) != 0:
            self._failed()

    def give(self, address: int) -> None:
        while semop(self.id, address, 1) != 0:
            self._failed()

    def take_header(self) -> None:
        self.take(ctypes.addressof(self._take) + _SIZE * HEADER_MEMBER)

    def give_header(self) -> None:
        self.give(ctypes.addressof(self._give) + _SIZE * HEADER_MEMBER)

    def take_groups(self, groups: Iterable[int]) -> tuple[int, ...]:
        """Take, in one ``semop``, the members of ``groups`` (at most BATCH_MEMBERS distinct ones); what to
        give back (``give_members``)."""
        members = tuple(sorted({self.member_of(g) for g in groups}))
        self._many(members, -1)
        return members

    def give_members(self, members: tuple[int, ...]) -> None:
        self._many(members, 1)

    def value(self, number: int) -> int:
        """The value of member ``number`` of the set (0: the header's; 1 + m: group member m): 1 free, 0 held."""
        return self._ctl(number, _GETVAL)

    def taken_here(self, numbers: Iterable[int]) -> bool:
        """Whether this process holds each member of ``numbers`` (set numbers: 0 the header's, 1 + m group
        member m): asked when an exception (Ctrl-C: a signal handler's) came as a take returned, before its
        caller could know it had taken them. Known only in a process of one thread: in another, a thread of
        the same process may hold them (the kernel records processes, not threads), and False is said."""
        if threading.active_count() != 1:
            return False
        me = os.getpid()
        try:
            return all(self.value(n) == 0 and self._ctl(n, _GETPID) == me for n in numbers)
        except (OSError, SemaphoresGone):
            return False

    def _ctl(self, number: int, command: int) -> int:
        """semctl's answer for member ``number`` (GETVAL: its value; GETPID: the last process to operate on it)."""
        while (got := _semctl(self.id, number, command)) < 0:
            self._failed()
        return int(got)

    def open_all(self) -> None:
        """Set every member to 1 (not SEM_UNDO): the table is ready."""
        count = 1 + self.group_members
        ops = (_SemBuf * count)(*(_SemBuf(n, 1, 0) for n in range(count)))
        while semop(self.id, ctypes.addressof(ops), count) != 0:
            self._failed()

    def give_numbers(self, numbers: tuple[int, ...]) -> None:
        """Give back the set members ``numbers`` (0 the header's, 1 + m group member m), in one operation."""
        self._ops(numbers, 1)

    def _many(self, members: tuple[int, ...], op: int) -> None:
        self._ops(tuple(1 + m for m in members), op)

    def _ops(self, numbers: tuple[int, ...], op: int) -> None:
        if len(numbers) > BATCH_MEMBERS + 1:
            raise ValueError(f"{len(numbers)} semaphores in one operation: at most {BATCH_MEMBERS}")
        ops = (_SemBuf * len(numbers))(*(_SemBuf(n, op, _SEM_UNDO) for n in numbers))
        while semop(self.id, ctypes.addressof(ops), len(numbers)) != 0:
            self._failed()

    def _failed(self) -> None:
        """After a failed ``semop``: return to try again (a signal came), or raise."""
        code = ctypes.get_errno()
        if code == errno.EINTR:
            return
        if code in (errno.EIDRM, errno.EINVAL):
            raise SemaphoresGone(f"semaphore set {self.id} was removed")
        raise OSError(code, f"semop on semaphore set {self.id}: {os.strerror(code)}")
