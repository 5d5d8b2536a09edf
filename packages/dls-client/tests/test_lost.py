"""The holder is told: a Client's locks after its lock server fails, against in-process fake services.

A fake service (dls_testkit.FakeLockService) keeps the locks of a connection it drops (as a killed lock
server's) for its lock-delay and gives them back to a Reclaim by handle, as a real service does. What
is checked, rule by rule:

- a lock whose connection failed is reclaimed on a new one, found by the watcher with no call from the
  application; one the service no longer keeps, or that cannot be reclaimed before the lock-delay ends,
  is lost: ``lost``, ``on_lost`` within a second, LockLost from ``ensure_held`` and (once) ``release``;
- the ``with`` block raises LockLost on exit when its lock was lost and never masks the body's exception;
- a request after a failure reconnects by itself, one in flight is asked again on the new connection;
- the lock path costs nothing more (no extra request), and the watcher is one thread per client;
- TCP keepalive and TCP_USER_TIMEOUT find a silent server within the dead-server bound.

The same rules against real daemons killed with SIGKILL are in test_lost_processes.py.
"""

from __future__ import annotations

import gc
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from dls_client import Client, Config, DlsError, FileRef, HeldLock, LockLost, Server, ServiceUnavailable
from dls_client.channel import DEAD_SERVER_BOUND, tcp_connect
from dls_proto import InfoPut, Reclaim, Unlock
from dls_testkit import FakeLockService, wait_for

SERVER = Server("fake", 50002)
FILE = FileRef(11, "/data/FBNK.ACCOUNT")


@pytest.fixture
def service(trace: Callable[[], str]) -> Iterator[FakeLockService]:
    made = FakeLockService(lock_delay_ms=15000)
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def client(service: FakeLockService) -> Iterator[Client]:
    with Client(Config(server=SERVER, timeout=5), connect=service.connect) as made:
        yield made


class Told:
    """An on_lost callback that remembers when, and for which lock, it was called."""

    def __init__(self) -> None:
        self.locks: list[HeldLock] = []
        self.at: list[float] = []
        self.event = threading.Event()

    def __call__(self, held: HeldLock) -> None:
        self.locks.append(held)
        self.at.append(time.monotonic())
        self.event.set()

    def wait(self, timeout: float) -> float:
        assert self.event.wait(timeout), f"on_lost was not called within {timeout} s"
        return self.at[0]


def lose_everything(service: FakeLockService) -> None:
    """The service forgets this client: its connection dropped, and nothing kept."""
    service.lock_delay_ms = 0
    service.drop()


# -- reclaimed ---------------------------------------------------------------------------------


def test_a_lock_whose_lock_server_died_is_reclaimed_with_no_call_from_the_application(
        service: FakeLockService, client: Client, trace: Callable[[], str]) -> None:
    told = Told()
    held = client.lock(FILE, "K1", on_lost=told)
    other = client.lock(FILE, "K2")
    service.drop(0)  # no call follows: the watcher finds it, connects again and reclaims
    # At once, the watcher's poll says so; 5 s on a machine busy with a whole suite.
    wait_for(lambda: len(service.reclaims) == 2 and service.holder(b"K1") is service.connections[-1], 5,
             "the watcher to reclaim both locks on a new connection")
    assert [r.handle for r in service.reclaims] == [held.handle, other.handle]
    reclaim = service.reclaims[0]
    assert isinstance(reclaim, Reclaim)
    assert (reclaim.mode, reclaim.inode, reclaim.key, reclaim.thread_id) == (held.mode, 11, b"K1", held.thread)
    assert not held.lost and not told.locks
    held.ensure_held()
    held.release()
    other.release()
    wait_for(lambda: service.keys() == [], 2, "the releases to reach the new connection")
    assert [m.handle for m in service.connections[1].received if isinstance(m, Unlock)] == [  # type: ignore[attr-defined]
        held.handle, other.handle]
    # Said (and the new lock server told) once the recovery ends, which may be a moment after the fake saw the reclaims.
    wait_for(lambda: "2 lock(s) reclaimed on lock service fake,50002" in trace(), 2, "the reclaim to be traced")
    wait_for(lambda: any(isinstance(m, InfoPut) for m in service.connections[1].received), 2,
             "the new lock server to be told what the client holds")


def test_a_service_back_before_the_lock_delay_ends_gets_the_locks_reclaimed(
        service: FakeLockService, client: Client, trace: Callable[[], str]) -> None:
    held = client.lock(FILE, "K1")
    service.unreachable = True
    service.drop()
    time.sleep(1.5)  # the watcher tries every second meanwhile
    assert service.attempts >= 3 and not held.lost  # the first connection, then at the failure and a second later
    with pytest.raises(ServiceUnavailable, match="Connection refused"):
        client.echo(b"down")  # a request tries at once, and says the service cannot be reached
    service.unreachable = False
    wait_for(lambda: len(service.reclaims) == 1, 2, "the watcher to reclaim once the service is back")
    assert not held.lost and service.holder(b"K1") is service.connections[-1]
    assert trace().count("cannot connect again to lock service fake,50002") == 1  # said once, not every second
    held.release()


def test_a_lock_released_while_its_service_is_unreachable_is_not_reclaimed(service: FakeLockService,
                                                                          client: Client) -> None:
    held, kept = client.lock(FILE, "K1"), client.lock(FILE, "K2")
    service.unreachable = True
    service.drop()
    wait_for(lambda: service.attempts >= 2, 2, "the watcher to try to connect again")  # the first connection, and one
    held.release()  # the service keeps it until its lock-delay ends: the release is quiet
    assert held.released and not held.lost
    service.unreachable = False
    wait_for(lambda: len(service.reclaims) == 1, 3, "the watcher to reclaim what is still held")
    assert service.reclaims[0].handle == kept.handle  # type: ignore[attr-defined]
    kept.release()


# -- lost ------------------------------------------------------------------------------------


def test_a_service_that_keeps_nothing_loses_the_lock_and_the_holder_is_told_within_a_second(
        service: FakeLockService, client: Client, trace: Callable[[], str]) -> None:
    service.lock_delay_ms = 0  # its Welcome says so
    told = Told()
    held = client.lock(FILE, "K1", on_lost=told)
    client.lock(FILE, "K2")  # lost too, without a callback
    service.drop()
    dropped = time.monotonic()
    assert told.wait(1.0) - dropped < 1.0
    assert told.locks == [held] and held.lost
    with pytest.raises(LockLost) as lost:
        held.ensure_held()
    assert lost.value.path == FILE.path and lost.value.key == b"K1"
    assert "/data/FBNK.ACCOUNT K1" in str(lost.value) and "keeps a lost client's locks 0 s" in str(lost.value)
    with pytest.raises(LockLost):
        held.ensure_held()  # every time
    with pytest.raises(LockLost):
        held.release()
    held.release()  # once: the holder has been told
    assert "lock /data/FBNK.ACCOUNT K1 lost" in trace() and "lock /data/FBNK.ACCOUNT K2 lost" in trace()
    assert client.info.document()["locks"] == []
    assert not service.reclaims, "nothing is reclaimed from a service that keeps nothing"


def test_a_lock_the_service_no_longer_keeps_is_lost_when_reclaimed(service: FakeLockService,
                                                                  client: Client) -> None:
    told = Told()
    held = client.lock(FILE, "K1", on_lost=told)
    service.unreachable = True
    service.drop()
    wait_for(lambda: service.holder(b"K1") == "kept", 2, "the service to keep the lock")
    service.forget_kept()  # restarted without its table, say
    service.unreachable = False
    told.wait(2.0)
    assert len(service.reclaims) == 1
    with pytest.raises(LockLost, match="lock service fake,50002 no longer holds it"):
        held.release()


def test_a_service_unreachable_until_the_lock_delay_ends_loses_the_locks_on_time(
        service: FakeLockService, client: Client) -> None:
    service.lock_delay_ms = int((DEAD_SERVER_BOUND + 2.5) * 1000)  # 2.5 s to reclaim them
    told = Told()
    held = client.lock(FILE, "K1", on_lost=told)
    service.unreachable = True
    service.drop()
    dropped = time.monotonic()
    after = told.wait(5.0) - dropped
    assert 2.4 <= after < 3.5, f"lost {after:.2f} s after the failure, not 2.5 s"
    assert service.attempts >= 4, "the watcher did not try to connect again every second"  # 1 + at 0, 1, 2 s
    with pytest.raises(LockLost, match=r"could not be made again within 2.5 s"):
        held.release()


def test_a_callback_that_raises_is_logged_and_the_others_still_run(service: FakeLockService, client: Client,
                                                                   trace: Callable[[], str]) -> None:
    def broken(held: HeldLock) -> None:
        raise RuntimeError("application bug")

    told = Told()
    client.lock(FILE, "K1", on_lost=broken)
    client.lock(FILE, "K2", on_lost=told)
    lose_everything(service)
    told.wait(1.0)
    assert "on_lost callback of lock /data/FBNK.ACCOUNT K1 raised RuntimeError: application bug" in trace()
    assert client.lock(FILE, "K3").handle  # the client goes on


def test_a_callback_may_call_the_client(service: FakeLockService, client: Client) -> None:
    """Callbacks run outside every lock of the client: one that takes a lock again does not deadlock."""
    again: list[HeldLock] = []
    client.lock(FILE, "K1", on_lost=lambda held: again.append(client.lock(held.file, held.key)))
    lose_everything(service)
    wait_for(lambda: bool(again), 2, "the callback to take the lock again")
    assert not again[0].lost and service.holder(b"K1") is service.connections[-1]


# -- the with block ------------------------------------------------------------------------------


def test_a_with_block_whose_lock_was_lost_raises_lock_lost_on_exit(service: FakeLockService,
                                                                  client: Client) -> None:
    told = Told()
    with pytest.raises(LockLost, match="K1"), client.lock(FILE, "K1", on_lost=told):
        lose_everything(service)
        told.wait(1.0)
    with client.lock(FILE, "K2") as held:  # not lost: a quiet exit
        pass
    assert held.released and not held.lost


def test_a_with_block_never_masks_the_body_s_own_exception(service: FakeLockService, client: Client) -> None:
    told = Told()
    with pytest.raises(ValueError, match="the body's"), client.lock(FILE, "K1", on_lost=told):
        lose_everything(service)
        told.wait(1.0)
        raise ValueError("the body's")


def test_lock_lost_said_by_release_in_the_block_is_not_said_again_on_exit(service: FakeLockService,
                                                                         client: Client) -> None:
    told = Told()
    with client.lock(FILE, "K1", on_lost=told) as held:
        lose_everything(service)
        told.wait(1.0)
        with pytest.raises(LockLost):
            held.release()
    assert held.lost


def test_ensure_held_of_a_released_lock_says_released(client: Client) -> None:
    held = client.lock(FILE, "K1")
    held.ensure_held()
    held.release()
    with pytest.raises(DlsError, match="was released") as released:
        held.ensure_held()
    assert not isinstance(released.value, LockLost)


# -- requests after and during a failure --------------------------------------------------------------


def test_a_request_after_a_failure_reconnects_by_itself(service: FakeLockService, client: Client) -> None:
    client.lock(FILE, "K1")
    service.drop()
    held = client.lock(FILE, "K2")  # found by the request or by the watcher, whichever came first
    assert service.holder(b"K2") is service.connections[-1] and len(service.connections) == 2
    held.release()


def test_a_request_waiting_when_its_lock_server_dies_is_asked_again(service: FakeLockService,
                                                                     client: Client) -> None:
    with Client(Config(server=SERVER, timeout=5), connect=service.connect) as other:
        blocker = other.lock(FILE, "K1")
        got: list[HeldLock] = []
        waiter = threading.Thread(target=lambda: got.append(client.lock(FILE, "K1", timeout=10)))
        waiter.start()
        wait_for(lambda: len(service.connections) == 2 and bool(service.connections[1].received), 2,
                 "the request to wait")
        service.drop(1)
        wait_for(lambda: len(service.connections) == 3 and len(service.connections[2].received) >= 1, 2,
                 "the request to be asked again on a new connection")
        blocker.release()
        waiter.join(5)
        assert got and service.holder(b"K1") is service.connections[2]
        got[0].release()


def test_a_request_while_the_service_is_unreachable_raises_and_the_next_one_reconnects(
        service: FakeLockService, client: Client) -> None:
    client.lock(FILE, "K1").release()
    service.unreachable = True
    service.drop()
    with pytest.raises(ServiceUnavailable, match="Connection refused"):
        client.lock(FILE, "K2")
    service.unreachable = False
    client.lock(FILE, "K2").release()


def test_a_release_all_or_a_close_releases_the_locks_it_freed(service: FakeLockService, client: Client) -> None:
    first = client.lock(FILE, "K1")
    assert client.release_all() == 1
    first.release()  # freed already: nothing is sent, and it is no error
    assert not [m for m in service.connections[0].received if isinstance(m, Unlock)]
    second = client.lock(FILE, "K2")
    client.close()
    assert second.released and not second.lost
    second.release()
    assert len(service.connections) == 1, "a release after close() connected again"


# -- what it costs ---------------------------------------------------------------------------------


def test_the_lock_path_sends_nothing_more(service: FakeLockService, client: Client) -> None:
    for _ in range(3):
        client.lock(FILE, "K1").release()
    client.echo(b"sync")
    kinds = [type(m).__name__ for m in service.connections[0].received if not isinstance(m, InfoPut)]
    assert kinds == ["Lock", "Unlock"] * 3 + ["Echo"], kinds


def test_a_release_looks_at_its_socket_with_the_channels_own_poll(
        service: FakeLockService, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release on a healthy connection still looks whether its socket hung up (one poll() of it, see
    test_lost_processes), through the poll its channel made once: a poll object made at every release cost
    the lock/unlock cycle a tenth of the client's own time (issue 13)."""
    client.lock(FILE, "K1").release()  # connected
    me, made = threading.get_ident(), []
    poll = select.poll

    def counted() -> select.poll:
        if threading.get_ident() == me:  # not the watcher's
            made.append(1)
        return poll()

    monkeypatch.setattr(select, "poll", counted)
    looked = []
    channel = client.connect()
    monkeypatch.setattr(channel, "hung_up", lambda: looked.append(1) or False)
    for _ in range(3):
        client.lock(FILE, "K1").release()
    assert (len(made), len(looked)) == (0, 3)
    client.echo(b"sync")
    assert sum(isinstance(m, Unlock) for m in service.connections[0].received) == 4


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dls-client-watcher"]


def test_one_watcher_thread_per_client_from_its_first_connection_to_close(service: FakeLockService) -> None:
    gc.collect()
    wait_for(lambda: not _watchers(), 3, "watchers of other tests' clients to end")
    client = Client(Config(server=SERVER), connect=service.connect)
    assert not _watchers(), "a watcher before any connection"
    client.lock(FILE, "K1").release()
    client.lock(FILE, "K2").release()
    (watcher,) = _watchers()
    assert watcher.daemon
    client.close()
    assert not watcher.is_alive()
    client.echo(b"again")  # used again: connects again, and is watched again
    assert len(_watchers()) == 1
    del client
    gc.collect()
    wait_for(lambda: not _watchers(), 10, "the watcher of a client nobody holds to end")  # 3 s: short when busy


def test_a_silent_server_is_found_within_the_dead_server_bound() -> None:
    """The client's TCP connections give up on a server that stops acknowledging within DEAD_SERVER_BOUND:
    keepalive probes while idle, TCP_USER_TIMEOUT while something is unacknowledged."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sock = tcp_connect(Server("127.0.0.1", listener.getsockname()[1]))
        with sock:
            option = sock.getsockopt
            assert option(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle, interval, count = (option(socket.IPPROTO_TCP, o) for o in (
                socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT))
            assert idle + interval * count <= DEAD_SERVER_BOUND
            assert option(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == DEAD_SERVER_BOUND * 1000
            assert option(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
