"""The lock table's layout in shared memory: the contract between every process that maps it.

One SysV segment holds a header page followed by G groups. A group is its ticket
counter (64 bits: the last ticket given to a slot of the group), an array of N
32-bit resource values (0 marks a free slot), then its N slots; the values come
before the slots so that one ``unpack_from`` answers "is this resource in the
group, and where is a free slot" on the lock path. The counter is the group's,
not the table's, so that requests in different groups share nothing (each set of
groups has its own semaphore: ``semaphores``); a resource lives in one group, so
its tickets still tell its queue's order. A lock's group is its value
mod G, G being prime so that values spread over the groups.

Everything is native byte order: the table never leaves its host.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket
import struct
from typing import NamedTuple

MAGIC = b"DLSTABLE"
#: Version 2 added the KEPT slot state, the KEEP slot flag and the header's lock_delay; version 3 a ticket
#: counter per group (none in the header) and a semaphore per set of groups (the header's ``semaphores``);
#: version 4 a lock's fencing token and the resource's value block in each slot, the CONVERTING and
#: BLOCK_NOT_VALID slot flags, the DEADLOCK slot state and the header's ``block_size``.
LAYOUT_VERSION = 4
HEADER_SIZE = 4096
#: Longest record key kept verbatim; longer keys keep a prefix and a digest.
KEY_MAX = 120
KEY_DIGEST = 16
#: Room for a resource's value block in each slot; a table's own size (``block_size``) is chosen when it is made.
BLOCK_MAX = 64
DEFAULT_BLOCK_SIZE = 32
#: Largest slot index a handle can carry.
INDEX_BITS = 24

DEFAULT_RECORDS = 13000
DEFAULT_PER_GROUP = 50
#: A group's head: its ticket counter.
GROUP_HEAD = struct.Struct("=Q")


class SlotState(enum.IntEnum):
    FREE = 0
    GRANTED = 1
    WAITING = 2
    #: A lock whose lock server ended while its client may live: it conflicts as a granted lock does, owned
    #: by nobody, until its client reclaims it or ``lock_delay`` seconds from its timestamp have passed.
    KEPT = 3
    #: A waiting request chosen as the one to refuse in a cycle of waiters (a deadlock): it blocks nobody, and
    #: its waiter's next look frees it and raises ``mechanism.Deadlock``.
    DEADLOCK = 4


class SlotFlag(enum.IntFlag):
    NONE = 0
    LONG_KEY = 1  # the stored key is a prefix plus a digest of the real key
    KEEP = 2  # a lock server's lock for a remote client: kept (KEPT), not freed, when its lock server ends
    #: Granted by a hand-off and not yet sealed by its lock server (``LockTable.seal``): its client has not
    #: been told, so it is freed, not kept, when its lock server ends (the client could not reclaim it).
    HANDED = 4
    #: A waiting request that had no more than WATCH_AHEAD waiters in its way ahead of it at a look under the
    #: semaphore, so watches every one of them (``Queued.watch``): once first in line, it watches whoever was
    #: handed the lock before it, and the hand-off need not ring it to look again. Once true, true (nobody
    #: joins a queue ahead of a waiter); an older table's waiter without it is rung, as before.
    WATCHES_ALL = 8
    #: A waiting request of an owner that holds the resource already: a conversion of its lock (the slot's
    #: mode is the mode wanted). Conversions form the convert queue, served before the other waiters.
    CONVERTING = 16
    #: The resource's value block is not valid (VALNOTVALID): a PW or EX holder ended abnormally or released
    #: with "invalidate" since it was last written. Kept, as the block itself, in every slot of the resource.
    BLOCK_NOT_VALID = 32
    #: A granted lock whose holder asked for blocking notices (its ``notify`` doorbell) and has been sent one
    #: since the resource last had nobody waiting: it is not sent another until then (or until it converts).
    NOTIFIED = 64
    #: A waiting request of a client that does not know DEADLOCK (protocol version 2 or 3, from ``Owner.legacy``):
    #: the deadlock detector refuses another member of its cycle when there is one (``deadlocks.Cycle.victim``).
    LEGACY = 128


class TableFlag(enum.IntFlag):
    NONE = 0
    PORT_OWNERS = 1  # jdls -P: owners are ports rather than process ids
    TIMESTAMPS = 2  # jdls -T: the display shows each lock's age


#: Header fields, in order. Counters and times are updated in place.
HEADER_FIELDS = (
    ("magic", "8s"),
    ("layout_version", "H"),
    ("header_size", "H"),
    ("flags", "I"),
    ("ngroups", "I"),
    ("per_group", "I"),
    ("slot_size", "I"),
    ("key_max", "I"),
    ("total_size", "Q"),
    ("created", "d"),
    ("monitor_pid", "i"),
    ("listener_pid", "i"),
    ("last_ran", "d"),
    ("last_tidy", "d"),
    ("tidy_period", "I"),
    ("semid", "i"),
    ("lock_retries", "Q"),
    ("tidy_ops", "Q"),
    ("semaphores", "I"),
    ("cpu_user", "d"),
    ("cpu_system", "d"),
    ("lock_delay", "d"),
    ("next_expiry", "d"),
    ("block_size", "I"),
    ("waits_begun", "Q"),
)
HEADER_STRUCT = struct.Struct("=" + "".join(f for _, f in HEADER_FIELDS))
HEADER_OFFSETS = {}
_off = 0
for _name, _fmt in HEADER_FIELDS:
    HEADER_OFFSETS[_name] = _off
    _off += struct.calcsize("=" + _fmt)
assert HEADER_STRUCT.size <= HEADER_SIZE


class Header(NamedTuple):
    magic: bytes
    layout_version: int
    header_size: int
    flags: int
    ngroups: int
    per_group: int
    slot_size: int
    key_max: int
    total_size: int
    created: float
    monitor_pid: int
    listener_pid: int
    last_ran: float
    last_tidy: float
    tidy_period: int
    semid: int
    lock_retries: int
    tidy_ops: int
    #: Members of the semaphore set that guard groups (its first member, besides them, guards the header).
    semaphores: int
    cpu_user: float
    cpu_system: float
    #: Seconds a KEPT lock waits for its client to reclaim it before it is freed (0: nothing is kept).
    lock_delay: float
    #: When the first kept lock is due to be freed (time.time()), 0 when none is known: the monitor's cue.
    next_expiry: float
    #: The size of every resource's value block in this table, in bytes (at most BLOCK_MAX).
    block_size: int
    #: Counts the changes that can close a cycle of waiters: a request that starts to wait, a granted lock
    #: that converts up or is reclaimed by a new lock server. The deadlock detector looks again only when it
    #: moved: without one, no cycle can form (a lock granted at once goes with every waiting request).
    waits_begun: int


assert Header._fields == tuple(n for n, _ in HEADER_FIELDS)

#: A slot: ticket, state, mode, flags, key length, queued count, owner (pid, port,
#: client pid, client ip, thread), file (inode, device), timestamp, doorbell, key, the lock's fencing token,
#: the holder's blocking-notice doorbell, the resource's value block.
SLOT_STRUCT = struct.Struct(f"=QBBBxHHiII16sQQqdQ{KEY_MAX}sQQ{BLOCK_MAX}s")
SLOT_SIZE = SLOT_STRUCT.size
#: The leading part of a slot that unlock checks: ticket, state, mode, flags, key length, queued.
SLOT_HEAD = struct.Struct("=QBBBxHH")
SLOT_QUEUED_OFFSET = 14
SLOT_MODE_OFFSET = 9


class Slot(NamedTuple):
    """One slot as stored, decoded."""

    ticket: int
    state: int
    mode: int
    flags: int
    key_len: int
    queued: int
    pid: int
    port: int
    client_pid: int
    ip: bytes
    thread: int
    inode: int
    device: int
    timestamp: float  # when it was granted (or queued); of a KEPT lock, when it was kept
    doorbell: int
    key: bytes
    #: The fencing token of a granted lock: a number taken from its group's ticket counter when it was granted
    #: or converted up, so strictly increasing per resource for the table's life.
    token: int
    #: The doorbell token to ring when this granted lock blocks a request (0: its holder did not ask).
    notify: int
    #: The resource's value block (BLOCK_MAX bytes; the header's ``block_size`` of them count).
    block: bytes


class Geometry(NamedTuple):
    """Sizes derived from the header, with the offsets the hot path needs."""

    ngroups: int
    per_group: int

    @property
    def values_size(self) -> int:
        return 4 * self.per_group

    @property
    def group_size(self) -> int:
        return GROUP_HEAD.size + self.values_size + SLOT_SIZE * self.per_group

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.ngroups * self.group_size

    @property
    def locks(self) -> int:
        return self.ngroups * self.per_group

    def group_offset(self, group: int) -> int:
        return HEADER_SIZE + group * self.group_size

    def slot_offset(self, index: int) -> int:
        group, pos = divmod(index, self.per_group)
        return self.group_offset(group) + GROUP_HEAD.size + self.values_size + pos * SLOT_SIZE

    def value_offset(self, index: int) -> int:
        group, pos = divmod(index, self.per_group)
        return self.group_offset(group) + GROUP_HEAD.size + 4 * pos


def next_prime(n: int) -> int:
    """The smallest prime at or above n (n >= 2 gives at least 2)."""
    candidate = max(2, n)
    while any(candidate % d == 0 for d in range(2, int(candidate**0.5) + 1)):
        candidate += 1
    return candidate


def geometry_for(records: int, per_group: int) -> Geometry:
    """Sizing as jDLS does it: groups of ``per_group`` locks, the group count a prime.

    13000 records in groups of 50 needs 260 groups, rounded up to the prime 263:
    13150 locks.
    """
    if records < 1 or per_group < 1:
        raise ValueError(f"table size {records},{per_group}: both must be at least 1")
    geometry = Geometry(next_prime(-(-records // per_group)), per_group)
    if geometry.locks >= 1 << INDEX_BITS:
        raise ValueError(f"table size {records},{per_group}: at most {(1 << INDEX_BITS) - 1} locks")
    return geometry


#: The first 12 bytes of an IPv4 address mapped into IPv6.
V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def pack_ip(text: str) -> bytes:
    """An IPv4 or IPv6 address as the 16 bytes a slot keeps (IPv4 mapped into IPv6; an IPv6 zone, ``%eth0``,
    dropped); ValueError if ``text`` is not one.

    By ``inet_pton``, not ``ipaddress``: each lock server packs its client's address as it starts, and the
    Python objects ipaddress runs through would cost each of them the pages they are on (copy-on-write after
    the fork, for their reference counts), about 0.1 MiB a lock server.
    """
    address, percent, zone = text.partition("%")
    try:
        if not percent:
            return V4_MAPPED + socket.inet_pton(socket.AF_INET, address)
    except OSError:
        pass
    try:
        if not percent or (zone and "%" not in zone):  # a zone as ipaddress takes it: IPv6 only, not empty
            return socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        pass
    raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 address")


@functools.lru_cache(maxsize=4096)
def unpack_ip(packed: bytes) -> str:
    """The text form of a slot's address: dotted for IPv4, as jDLS prints it (remembered: a table's many
    locks come from few addresses, and a report of a million locks asks a million times). An IPv4 one by
    ``inet_ntop``: a lock server names its client's address so on its client's first document, and ipaddress
    would cost it the pages of the objects it runs through (see ``pack_ip``)."""
    if len(packed) == 16 and packed[:12] == V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    addr = ipaddress.IPv6Address(packed)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


LOCAL_IP = pack_ip("0.0.0.0")  # noqa: S104 - how jDLS shows a local process, not a bind address
