"""dls-shm: the lock table in SysV shared memory, one of the two contracts between dls packages.

Other packages import from here only: the lock-mechanism interface (LockMechanism,
its answers and errors, the waiting loop) and its two mechanisms (LockTable,
OsLocks), the table's layout, the instance naming, the lock modes, the doorbells
waiters sleep on, the text report of a table that jdls -dvL and dls-dump
both print, who holds OS file locks in a lock directory (``proc_locks``), and
those locks as lock entries joined with proc/info (``oslock_entries``).
"""

from . import deadlocks, info, modes, oslock_entries, pidfiles, proc_locks, queues, report, this_process, trusted
from .__about__ import __version__
from .doorbell import Doorbell, NoticeBell, readable, ring
from .holder_watch import HolderWatch
from .instance import DEFAULT_RELEASE_DIR, LABELS, LISTENER, MONITOR, ROLES, Instance, ipc_key_for, parse_ipc_key
from .layout import (
    BLOCK_MAX,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_PER_GROUP,
    DEFAULT_RECORDS,
    INDEX_BITS,
    KEY_MAX,
    LOCAL_IP,
    Geometry,
    Header,
    Slot,
    SlotFlag,
    SlotState,
    TableFlag,
    geometry_for,
    next_prime,
    pack_ip,
    unpack_ip,
)
from .liveness import owner_gone
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
    Unsupported,
    UntrustedTable,
    resource_value,
)
from .occupancy import (
    IpcObject,
    Occupancy,
    Occupant,
    Refusal,
    command_line,
    maps_a_table,
    running_role,
    running_servers,
    service_processes,
)
from .oslocks import OsLockError, OsLocks, TableServes, key_offset, lock_file_name, table_serves
from .pidfiles import AlreadyRunning, HeldPidFile, PidRecord
from .proc_locks import OsLock, OsLockHolder, oslock_holders, oslocks_held
from .table import RECHECK_INTERVAL, Entry, LockTable, Tidied

__all__ = [
    "LABELS", "LISTENER", "MONITOR", "ROLES",
    "IpcObject", "Occupancy", "Occupant", "Refusal", "command_line", "maps_a_table", "running_role", "running_servers",
    "service_processes",
    "AlreadyRunning", "HeldPidFile", "PidRecord",
    "OsLock", "OsLockError", "OsLockHolder", "OsLocks", "oslocks_held",
    "TableServes", "key_offset", "lock_file_name", "oslock_holders",
    "table_serves",
    "BLOCK_MAX", "DEFAULT_BLOCK_SIZE",
    "DEFAULT_PER_GROUP", "DEFAULT_RECORDS", "DEFAULT_RELEASE_DIR", "INDEX_BITS", "KEY_MAX", "LOCAL_IP",
    "RECHECK_INTERVAL",
    "Deadlock", "NotWritable", "Unsupported",
    "NoticeBell",
    "Conflict", "Doorbell", "Entry", "Geometry", "Grant", "GroupFull", "HalfTable", "Header", "Holder", "HolderWatch",
    "Instance", "LockMechanism", "LockTable", "NotHeld", "Owner", "Queued", "Slot", "SlotFlag", "SlotState",
    "TableError", "TableFlag", "TableMissing", "Tidied", "UntrustedTable",
    "__version__", "geometry_for", "ipc_key_for", "modes", "next_prime", "owner_gone", "pack_ip", "parse_ipc_key",
    "readable", "resource_value", "deadlocks", "info", "oslock_entries", "pidfiles", "proc_locks", "queues", "report",
    "ring", "this_process",
    "trusted",
    "unpack_ip",
]
