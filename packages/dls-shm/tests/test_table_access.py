"""Who may reach a lock table: its shared memory and semaphore are 0660 in the service's group, a table of an
older version (0666) is put right by the monitor (``set_access``), and a user outside the group is refused
with a clear TableError (real SysV IPC, a real other user through a forked child)."""

from __future__ import annotations

from collections.abc import Callable

import sysv_ipc
from dls_shm import LockTable, TableError
from dls_shm.table import TABLE_MODE
from dls_testkit import SERVICE_GID, as_user

MakeTable = Callable[..., LockTable]


def modes(key: int) -> list[tuple[int, int]]:
    memory, semaphore = sysv_ipc.SharedMemory(key), sysv_ipc.Semaphore(key)
    memory.detach()
    return [(made.mode & 0o777, made.gid) for made in (memory, semaphore)]


def test_a_table_is_made_0660_in_the_group_and_an_old_one_is_put_right(make_table: MakeTable) -> None:
    table = make_table(gid=SERVICE_GID)
    assert modes(table.key) == [(TABLE_MODE, SERVICE_GID)] * 2
    old = make_table(mode=0o666)
    assert modes(old.key) == [(0o666, 0)] * 2
    assert old.set_access(SERVICE_GID)
    assert modes(old.key) == [(TABLE_MODE, SERVICE_GID)] * 2
    assert not old.set_access(SERVICE_GID), "nothing left to change"


def test_a_user_outside_the_group_is_refused_a_member_attaches(make_table: MakeTable) -> None:
    key = make_table(gid=SERVICE_GID).key

    def attach() -> int:
        try:
            LockTable.attach(key).close()
        except TableError as exc:
            print(exc, flush=True)
            return 3
        return 0

    assert LockTable.exists(key)
    code, output = as_user(attach)
    assert code == 3, output
    assert output.strip() == (f"lock table 0x{key:08x}: permission denied (its shared memory and semaphore are "
                              "mode 0660 in the service's group, jdls --group: run as a member of it)")
    code, output = as_user(attach, groups=[SERVICE_GID])
    assert code == 0, output
