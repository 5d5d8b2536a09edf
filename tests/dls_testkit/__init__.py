"""The test harness of every dls package: one place for what the tests of all five packages share.

On the root pytest ``pythonpath``, so any test module or conftest imports it by name
(``from dls_testkit import Service, wait_for``). Its modules, each for one thing:

- ``ports``: ``free_port``;
- ``waiting``: ``wait_for``, a condition with a deadline;
- ``ipc``: the SysV objects of a key (``ipc_left``, ``ipcs_lines``, ``remove_ipc``), ``free_key``,
  ``own_table`` (a table removed and checked at the end);
- ``processes``: ``alive``/``gone``, ``running`` (end what a test started), ``processes_of`` an instance,
  ``Children`` (forked, always reaped) and ``Pipe``;
- ``service``: ``Service``, a real jdls of the test's own instance, stopped and checked at the end;
- ``clients``: a data file, clients of a service, who holds a lock, the table's slots;
- ``crew``: client processes hammering one record lock, and the counter that proves exclusion;
- ``users``: code run as another local user (``as_user``, ``NOBODY``), a directory that user can reach;
- ``wire``: a client speaking the protocol by hand over a socket;
- ``fake_service``: an in-process lock service over a socketpair, scripted by the test, for the client's
  connection code without a daemon;
- ``fake_lock_service``: fake services of many connections sharing one lock table, with the lock-delay and
  Reclaim, for the client's recovery rules without a daemon;
- ``tools``: ``load_tool``, a script of tools/ loaded as a module (tools/ is no package);
- ``readme``: the client README's examples of a section, for a test to run as they are written;
- ``chaos`` (a subpackage, imported as ``dls_testkit.chaos``): fault injection with a history checker, worker
  processes, the chaos loop and the checker of their logs (tests/test_chaos.py, ``./dev chaos``).
"""

from .clients import (
    KEY,
    attached,
    client_for,
    data_file,
    header_line,
    holder_of,
    lock_holder,
    read_counter,
    slots_of,
    wait_free,
)
from .crew import LOAD_SECONDS, Crew, assert_exact, crew
from .fake_lock_service import FakeLockService
from .fake_service import FakeService
from .ipc import free_key, ipc_left, ipcs_lines, own_table, remove_ipc
from .ports import free_port
from .processes import Children, Pipe, alive, gone, processes_of, running
from .service import DLS_LOCK, FOREIGN, Service, instance_env, make_service, running_service
from .tools import load_tool
from .users import NOBODY, SERVICE_GID, as_user, reachable_dir
from .waiting import wait_for
from .wire import dribble, greet, hello, receive

__all__ = [
    "NOBODY", "SERVICE_GID", "as_user", "reachable_dir",
    "DLS_LOCK", "FOREIGN", "KEY", "LOAD_SECONDS", "Children", "Crew", "FakeLockService", "FakeService", "Pipe",
    "Service", "alive", "assert_exact", "attached", "client_for", "crew", "data_file", "free_key", "free_port", "gone",
    "dribble", "greet", "header_line", "hello", "holder_of", "instance_env", "ipc_left", "ipcs_lines", "lock_holder",
    "load_tool",
    "make_service",
    "own_table", "processes_of", "read_counter", "receive", "remove_ipc", "running", "running_service", "slots_of",
    "wait_for", "wait_free",
]
