"""SERVER2 without a split: a resilient Client (ResilientRoute) against two in-process fake services.

Each fake service (dls_testkit.FakeLockService) shares one lock table among its connections and keeps a
dropped connection's locks for its lock-delay, as a real service does. What is checked, rule by rule:

- a lock is taken on the primary, then on the secondary (waiting there as long as the request may), and
  granted only when both granted; the secondary's refusal releases the primary's grant and is raised;
- two clients with opposite failures (one loses its primary lock server, the other its secondary's) never
  both hold a lock: each connects again to the service it lost and reclaims there (the old split);
- a service that cannot be reached is done without, tried every second, and given every lock it lacks
  once back; a conflict there is LockLost, and the lock stays held where it still is until its holder
  releases it (nobody else is let in while the holder may still be inside its critical section);
- with no service reachable requests fail, and locks are lost when neither service keeps them any more.

The same against real daemons killed with SIGKILL is in the root tests (test_client_failover.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from dls_client import (
    AcknowledgementTimeout,
    Client,
    Config,
    FileRef,
    HeldLock,
    LockLost,
    LockRefused,
    LockTimeout,
    Server,
    ServiceUnavailable,
)
from dls_client.resilience import RETAKE_WAIT_MS
from dls_proto import InfoPut, Lock, LockFlag, Unlock, UnlockAll
from dls_testkit import FakeLockService, wait_for

PRIMARY = Server("primary", 50002)
SECONDARY = Server("secondary", 50003)
FILE = FileRef(11, "/data/FBNK.ACCOUNT")


class Pair:
    """A primary and a secondary fake service; ``connect`` reaches each by its address."""

    def __init__(self, lock_delay_ms: int = 15000) -> None:
        self.services = {PRIMARY: FakeLockService(lock_delay_ms, first_handle=100),
                         SECONDARY: FakeLockService(lock_delay_ms, first_handle=500)}
        self.primary, self.secondary = self.services[PRIMARY], self.services[SECONDARY]
        self.clients: list[Client] = []

    def connect(self, server: Server, timeout: float = 5.0) -> socket.socket:
        return self.services[server].connect(server, timeout)

    def client(self, *servers: Server, **config: object) -> Client:
        """A client of both services (or of those named), closed at the end."""
        first, *second = servers or (PRIMARY, SECONDARY)
        made = Client(Config(server=first, server2=second[0] if second else None, **config),  # type: ignore[arg-type]
                      connect=self.connect)
        self.clients.append(made)
        return made

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for service in self.services.values():
            service.stop()


@pytest.fixture
def pair(trace: Callable[[], str]) -> Iterator[Pair]:
    made = Pair()
    try:
        yield made
    finally:
        made.stop()


def connection_of(service: FakeLockService, client: Client) -> int:
    """The index, in ``service.connections``, of the connection ``client`` uses now."""
    sockets = [channel.sock for channel in client._route.channels()]
    (index,) = [i for i, fake in enumerate(service.connections) if fake.client_socket in sockets]
    return index


class Told:
    def __init__(self) -> None:
        self.locks: list[HeldLock] = []
        self.event = threading.Event()

    def __call__(self, held: HeldLock) -> None:
        self.locks.append(held)
        self.event.set()


# -- taking a lock ------------------------------------------------------------------------------


def test_a_lock_is_taken_on_the_primary_then_the_secondary_and_released_on_both(pair: Pair) -> None:
    client = pair.client()
    held = client.lock(FILE, "K1")
    assert pair.primary.keys() == pair.secondary.keys() == [b"K1"]
    assert held.handle not in (100, 500)  # the client's own: the two services number apart
    (first,) = pair.primary.requests(Lock)
    (second,) = pair.secondary.requests(Lock)
    assert first.key == second.key == b"K1"  # type: ignore[attr-defined]
    held.release()
    wait_for(lambda: not pair.primary.keys() and not pair.secondary.keys(), 2, "the unlocks to reach both")
    assert [m.handle for m in pair.primary.requests(Unlock)] == [100]  # type: ignore[attr-defined]
    assert [m.handle for m in pair.secondary.requests(Unlock)] == [500]  # type: ignore[attr-defined]
    assert pair.primary.requests(InfoPut) and pair.secondary.requests(InfoPut), "a service was not told"


def test_a_lock_taken_again_is_one_lock_on_both_services(pair: Pair) -> None:
    client = pair.client()
    first = client.lock(FILE, "K1", 3)
    again = client.lock(FILE, "K1", 5)
    assert again.handle == first.handle
    again.release()
    wait_for(lambda: not pair.primary.keys() and not pair.secondary.keys(), 2, "one release to free both")


def test_the_secondary_waits_as_long_as_the_request_may(pair: Pair) -> None:
    """A lock held on the secondary alone (a client of that service only): the resilient request, granted
    on the primary, waits on the secondary, and is granted when it is freed there (no TIMEOUT stall)."""
    client, other = pair.client(timeout=30), pair.client(SECONDARY)
    stray = other.lock(FILE, "K1")
    timer = threading.Timer(1.0, stray.release)
    timer.start()
    start = time.monotonic()
    held = client.lock(FILE, "K1", timeout=10)
    waited = time.monotonic() - start
    timer.join()
    assert 0.9 <= waited < 3.0, waited
    assert pair.secondary.holder(b"K1") is pair.secondary.connections[connection_of(pair.secondary, client)]
    held.release()


def test_a_refusal_by_the_secondary_releases_the_primary_grant_and_is_raised(pair: Pair) -> None:
    client, other = pair.client(), pair.client(SECONDARY)
    other.lock(FILE, "K1")
    with pytest.raises(LockRefused, match="secondary lock service secondary,50003"):
        client.try_lock(FILE, "K1")
    wait_for(lambda: pair.primary.keys() == [], 2, "the primary's grant to be released")
    start = time.monotonic()
    with pytest.raises(LockTimeout):
        client.lock(FILE, "K1", timeout=0.5)
    assert time.monotonic() - start < 2.0
    wait_for(lambda: pair.primary.keys() == [], 2, "the primary's grant to be released")
    assert pair.secondary.keys() == [b"K1"]


# -- no split ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lock_delay_ms", [15000, 0])
def test_two_clients_with_opposite_failures_cannot_both_be_granted(trace: Callable[[], str],
                                                                   lock_delay_ms: int) -> None:
    """The old split: client A loses its secondary lock server, client B its primary one. Each connects
    again to the service it lost (its lock is reclaimed there, or taken again), so both still share both
    services, and B is refused A's lock on each."""
    pair = Pair(lock_delay_ms)
    try:
        a, b = pair.client(), pair.client()
        told = Told()
        held = a.lock(FILE, "K1", on_lost=told)
        b.lock(FILE, "K0").release()
        pair.secondary.drop(connection_of(pair.secondary, a))
        pair.primary.drop(connection_of(pair.primary, b))
        a_on_secondary = lambda: pair.secondary.holder(b"K1") is pair.secondary.connections[-1]  # noqa: E731
        wait_for(a_on_secondary, 3, "A to hold its lock on the secondary again")
        for _ in range(3):
            with pytest.raises(LockRefused):
                b.try_lock(FILE, "K1")
            time.sleep(0.1)
        with pytest.raises(LockRefused):
            b.lock(FILE, "K1", timeout=0.3)
        assert not held.lost and not told.locks
        b.lock(FILE, "K2").release()  # B reconnected to the primary: not alone on the secondary
        assert pair.primary.requests(Lock)[-1].key == b"K2"  # type: ignore[attr-defined]
        held.release()
        b.lock(FILE, "K1").release()
    finally:
        pair.stop()


# -- a service that cannot be reached ------------------------------------------------------------


def test_a_service_that_cannot_be_reached_is_done_without_and_given_its_locks_when_back(
        pair: Pair, trace: Callable[[], str]) -> None:
    client = pair.client()
    before = client.lock(FILE, "K1")
    pair.secondary.unreachable = True
    pair.secondary.drop(connection_of(pair.secondary, client))
    wait_for(lambda: "secondary lock service secondary,50003 cannot be reached" in trace(), 2, "the failure said")
    assert "going on with the primary lock service primary,50002 alone" in trace()
    during = client.lock(FILE, "K2")  # on the primary alone
    assert pair.primary.keys() == [b"K1", b"K2"]
    attempts = pair.secondary.attempts
    time.sleep(1.5)
    assert pair.secondary.attempts >= attempts + 1, "the watcher did not try again every second"
    pair.secondary.unreachable = False
    wait_for(lambda: pair.secondary.keys() == [b"K1", b"K2"] and all(
        pair.secondary.holder(k) is pair.secondary.connections[-1] for k in (b"K1", b"K2")), 3,
        "both locks held on the secondary again")
    assert [r.key for r in pair.secondary.reclaims] == [b"K1"]  # type: ignore[attr-defined]
    # The trace says so once the answers are read, a moment after the fake service recorded the lock.
    wait_for(lambda: "1 lock(s) taken again on secondary lock service secondary,50003" in trace(), 3,
             "the lock taken again said")
    assert not before.lost and not during.lost
    before.release()
    during.release()
    wait_for(lambda: not pair.primary.keys() and not pair.secondary.keys(), 2, "both released on both")


def test_an_unreachable_primary_at_start_leaves_the_secondary_alone_until_it_answers(
        pair: Pair, trace: Callable[[], str]) -> None:
    pair.primary.unreachable = True
    client = pair.client()
    held = client.lock(FILE, "K1")
    assert pair.secondary.keys() == [b"K1"] and pair.primary.keys() == []
    assert "primary lock service primary,50002 cannot be reached" in trace()
    pair.primary.unreachable = False
    wait_for(lambda: pair.primary.keys() == [b"K1"], 3, "the lock taken on the primary once it answers")
    assert client.echo(b"x")[1] >= 0
    taken_again = pair.primary.requests(Lock)[-1]
    assert (taken_again.timeout_ms, taken_again.flags) == (  # type: ignore[attr-defined]
        RETAKE_WAIT_MS, LockFlag.NO_INTERIM)  # a short wait, without interim messages
    held.release()


def test_a_conflict_when_a_lock_is_taken_again_is_lock_lost_and_released_on_both_by_its_holder(
        pair: Pair, trace: Callable[[], str]) -> None:
    client, stray = pair.client(), pair.client(SECONDARY)
    pair.secondary.unreachable = True
    told = Told()
    held = client.lock(FILE, "K1", on_lost=told)  # the secondary cannot be reached: on the primary alone
    assert pair.secondary.keys() == []
    pair.secondary.unreachable = False
    stray.lock(FILE, "K1")  # two faults' worth: someone took it on the secondary meanwhile
    assert told.event.wait(3), "on_lost was not called"
    assert held.lost
    time.sleep(0.3)
    assert pair.primary.keys() == [b"K1"], "the lost lock was let go on the primary before its holder released it"
    with pytest.raises(LockLost, match="secondary lock service secondary,50003 refused to take it again"):
        held.release()
    wait_for(lambda: pair.primary.keys() == [], 2, "the lock released on the primary by the holder's release")


def test_a_lock_lost_where_it_is_taken_again_lets_nobody_in_before_its_holder_releases_it(
        pair: Pair, trace: Callable[[], str]) -> None:
    """One fault: the primary cannot be reached by anyone for a while. A takes K1 on the secondary alone.
    The primary is back; B, first there, is granted K1 on the primary and waits on the secondary. A's
    watcher is refused K1 on the primary: A's lock is lost. B must not be granted while A, told, may
    still be inside its critical section: the secondary keeps A's lock until A releases it."""
    primary_for_a = threading.Event()

    def connect_a(server: Server, timeout: float = 5.0) -> socket.socket:
        if server == PRIMARY and not primary_for_a.is_set():
            raise ConnectionRefusedError("the primary is down")
        return pair.connect(server, timeout)

    a = Client(Config(server=PRIMARY, server2=SECONDARY), connect=connect_a)
    pair.clients.append(a)
    b = pair.client(timeout=30)
    told = Told()
    held = a.lock(FILE, "K1", on_lost=told)
    assert pair.secondary.keys() == [b"K1"] and pair.primary.keys() == []
    granted: list[HeldLock] = []
    waiter = threading.Thread(target=lambda: granted.append(b.lock(FILE, "K1", timeout=20)), daemon=True)
    waiter.start()
    wait_for(lambda: pair.primary.keys() == [b"K1"], 3, "B granted K1 on the primary, waiting on the secondary")
    primary_for_a.set()  # A's watcher reaches the primary again, and is refused K1 there
    assert told.event.wait(3), "on_lost was not called"
    assert held.lost
    waiter.join(1.0)
    assert not granted, "B was let in while A, just told, may still be inside its critical section"
    assert pair.secondary.holder(b"K1") is pair.secondary.connections[connection_of(pair.secondary, a)]
    with pytest.raises(LockLost, match="primary lock service primary,50002 refused to take it again"):
        held.release()
    waiter.join(5)
    assert granted and not granted[0].lost, "B was not granted once A released"
    granted[0].release()


def test_with_no_service_reachable_requests_fail_and_locks_are_lost_when_neither_keeps_them(
        trace: Callable[[], str]) -> None:
    pair = Pair(lock_delay_ms=6500)  # 1.5 s to reclaim
    try:
        client = pair.client()
        told = Told()
        held = client.lock(FILE, "K1", on_lost=told)
        for service in pair.services.values():
            service.unreachable = True
            service.drop()
        dropped = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="no lock service can be reached"):
            client.lock(FILE, "K2")
        assert told.event.wait(4), "on_lost was not called"
        assert 1.3 < time.monotonic() - dropped < 3.0
        with pytest.raises(LockLost):
            held.ensure_held()
        for service in pair.services.values():
            service.unreachable = False
        client.lock(FILE, "K2").release()  # back: the next request connects by itself
    finally:
        pair.stop()


def test_release_all_goes_to_both_and_their_answers_are_compared(pair: Pair, trace: Callable[[], str]) -> None:
    client = pair.client()
    client.lock(FILE, "K1")
    client.lock(FILE, "K2")
    assert client.release_all() == 2
    assert pair.primary.requests(UnlockAll) and pair.secondary.requests(UnlockAll)
    assert pair.primary.keys() == pair.secondary.keys() == []
    assert "differ" not in trace()


def test_a_closed_client_connects_again_when_used(pair: Pair) -> None:
    client = pair.client(PRIMARY)
    client.lock(FILE, "K1")
    assert client.connected
    client.close()
    assert not client.connected
    client.lock(FILE, "K1")
    assert client.connected and len(pair.primary.connections) == 2


def test_a_silent_secondary_is_given_up_not_the_primary(pair: Pair, trace: Callable[[], str]) -> None:
    """The secondary says nothing for TIMEOUT while a request waits there (the fake sends no interim
    messages): its connection is given up, and only its (the primary's is the one the request came through,
    and it answered). Every lock stays held, on the primary, and is taken again on the secondary."""
    client, other = pair.client(timeout=2), pair.client(SECONDARY)  # 2 s: the primary answers in time, loaded
    kept = client.lock(FILE, "K0")
    other.lock(FILE, "K1")
    with pytest.raises(AcknowledgementTimeout, match="secondary,50003 did not answer"):
        client.lock(FILE, "K1")
    assert not pair.primary.connections[0].closed_by_client.is_set(), "the primary's connection was given up"
    assert connection_of(pair.primary, client) == 0
    wait_for(lambda: pair.secondary.connections[0].closed_by_client.is_set(), 5, "the secondary to be given up")
    kept.ensure_held()
    wait_for(lambda: b"K0" in pair.secondary.keys(), 10, "K0 to be taken again on the secondary")


def test_a_lock_taken_again_where_its_given_up_connection_still_holds_it_is_not_lost(pair: Pair) -> None:
    """The secondary given up (silent for TIMEOUT) frees the lock of the closed connection a moment after
    the client asks for it again through a new one (found flaky under load): refused by its own earlier
    grant, the lock taken again waits for that (up to resilience.RETAKE_WAIT_MS), and is not lost."""
    pair.secondary.close_seen_after = 0.5
    client, other = pair.client(timeout=2), pair.client(SECONDARY)
    kept = client.lock(FILE, "K0")
    other.lock(FILE, "K1")
    with pytest.raises(AcknowledgementTimeout, match="secondary,50003 did not answer"):
        client.lock(FILE, "K1")
    wait_for(lambda: len(pair.secondary.connections) > 2 and b"K0" in pair.secondary.keys(), 10,
             "K0 to be asked again on the secondary")
    kept.ensure_held()
    wait_for(lambda: pair.secondary.holder(b"K0") is pair.secondary.connections[-1], 10,
             "K0 to be held on the secondary through the new connection")
    kept.ensure_held()


def test_a_difference_between_the_services_is_logged_in_words(pair: Pair, trace: Callable[[], str]) -> None:
    """The guide compares the two services' answers and logs a difference: which service said what about which
    record, as an operator reads it (no message reprs)."""
    client, other = pair.client(), pair.client(SECONDARY)
    other.lock(FILE, "K1")
    with pytest.raises(LockRefused):
        client.try_lock(FILE, "K1")
    line = next(line for line in trace().splitlines() if "answered differently" in line)
    assert "for /data/FBNK.ACCOUNT K1:" in line, line
    assert "the primary lock service primary,50002 granted EX" in line, line
    assert "the secondary lock service secondary,50003 refused (held by another, and the request would not wait)" \
        in line, line
    assert "Refused(" not in trace() and "request_id" not in trace(), trace()
    client.lock(FILE, "K2")
    pair.secondary._held.clear()  # type: ignore[attr-defined]  # the secondary forgot K2: its UnlockAll frees none
    assert client.release_all() == 1
    line = next(line for line in trace().splitlines() if "release of all locks" in line)
    assert ("the primary lock service primary,50002 released 1 lock(s); the secondary lock service "
            "secondary,50003 released 0 lock(s)") in line, line


def test_verbose_says_where_requests_go_when_they_fail_over_and_back(pair: Pair,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pair.primary.unreachable = True
    client = pair.client(verbose=True)
    client.lock(FILE, "K1").release()
    err = capsys.readouterr().err
    assert ("Client: requests go to the secondary lock service secondary,50003 now (the primary lock service "
            "primary,50002 cannot be reached)") in err, err
    assert "Client: to secondary,50003: Lock #" in err, err
    pair.primary.unreachable = False
    wait_for(lambda: client._route.links[0].live() is not None, 3, "the primary to be reached again")
    client.lock(FILE, "K2").release()
    err = capsys.readouterr().err
    assert "Client: requests go to the primary lock service primary,50002 now\n" in err, err
    assert "Client: to primary,50002: Lock #" in err, err
