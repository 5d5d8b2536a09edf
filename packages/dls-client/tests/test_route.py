"""Where a Client's requests go and what a failed server means (Route, ResilientRoute), against in-process
fake services: one server, and SERVER2's primary and secondary, each failing at chosen moments.

Milliseconds each: the fakes (dls_testkit.FakeService) answer as a lock server that grants every lock
unless told otherwise, and close the connection where a test says. The same rules against real daemons
killed with SIGKILL stay in the root tests (test_client_failover.py).
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from dls_client import Client, Config, FileRef, ServiceLost
from dls_proto import (
    Echo,
    EchoReply,
    Granted,
    InfoPut,
    Lock,
    Message,
    Refused,
    RefuseReason,
    Server,
    Unlock,
    UnlockAll,
    Unlocked,
)
from dls_testkit import FakeService, wait_for
from dls_testkit.fake_service import CLOSE, Reply

PRIMARY = Server("primary", 50002)
SECONDARY = Server("secondary", 50003)
FILE = FileRef(11, "/data/FBNK.ACCOUNT")


class LockServer:
    """A fake's answers: every lock granted (unless its key is refused), released, counted; ``fail_on``
    closes the connection at the request it picks, as a lock server killed there would."""

    def __init__(self, first_handle: int) -> None:
        self._handles = itertools.count(first_handle)
        self._lock = threading.Lock()
        self.held: dict[int, bytes] = {}
        self.refuse: set[bytes] = set()
        self.fail_on: Callable[[Message], bool] = lambda request: False
        self.unlock_all_count: int | None = None

    def __call__(self, request: Message) -> Sequence[Reply]:
        if self.fail_on(request):
            return [CLOSE]
        with self._lock:
            if isinstance(request, Lock):
                if request.key in self.refuse:
                    return [Refused(request.request_id, RefuseReason.BUSY, 5, 77, 7, 78, 1, "10.0.0.7")]
                handle = next(self._handles)
                self.held[handle] = request.key
                return [Granted(request.request_id, handle, request.mode, 0x1234)]
            if isinstance(request, Unlock):
                self.held.pop(request.handle, None)
                return []
            if isinstance(request, UnlockAll):
                count = len(self.held) if self.unlock_all_count is None else self.unlock_all_count
                self.held.clear()
                return [Unlocked(request.request_id, count)]
            if isinstance(request, Echo):
                return [EchoReply(request.request_id, request.data)]
            return []  # InfoPut: kept, unanswered

    def keys(self) -> list[bytes]:
        with self._lock:
            return sorted(self.held.values())


class Services:
    """Fake lock services by address; ``connect`` is the Client's way to reach them (each once)."""

    def __init__(self) -> None:
        self.servers = {PRIMARY: LockServer(100), SECONDARY: LockServer(500)}
        self.fakes = {address: FakeService(answer=server) for address, server in self.servers.items()}
        self.connects: list[Server] = []
        self.unreachable: set[Server] = set()

    def connect(self, server: Server, timeout: float = 5.0) -> socket.socket:
        self.connects.append(server)
        if server in self.unreachable:
            raise ConnectionRefusedError(111, "Connection refused")
        assert self.connects.count(server) == 1, f"{server} contacted again after it failed"
        return self.fakes[server].client_socket

    def requests(self, server: Server, kind: type[Message]) -> list[Message]:
        return [m for m in self.fakes[server].received if isinstance(m, kind)]

    def stop(self) -> None:
        for fake in self.fakes.values():
            fake.stop()


@pytest.fixture
def services(trace: Callable[[], str]) -> Iterator[Services]:
    made = Services()
    try:
        yield made
    finally:
        made.stop()


def resilient(services: Services) -> Client:
    return Client(Config(server=PRIMARY, server2=SECONDARY, timeout=2), connect=services.connect)


def test_a_resilient_lock_is_held_on_both_servers_and_released_on_both(services: Services) -> None:
    client = resilient(services)
    held = client.lock(FILE, "K1")
    primary, secondary = services.servers[PRIMARY], services.servers[SECONDARY]
    assert primary.keys() == secondary.keys() == [b"K1"]
    (first,) = services.requests(SECONDARY, Lock)
    assert services.requests(PRIMARY, Lock)[0].key == first.key  # the secondary asked after the primary
    assert held.handle not in (100, 500)  # the client's own handle: the two servers number apart
    held.release()
    wait_for(lambda: not primary.keys() and not secondary.keys(), 2, "the unlocks to reach both servers")
    assert [m.handle for m in services.requests(PRIMARY, Unlock)] == [100]  # type: ignore[attr-defined]
    assert [m.handle for m in services.requests(SECONDARY, Unlock)] == [500]  # type: ignore[attr-defined]
    client.close()


def test_a_primary_lost_under_a_request_promotes_the_secondary_which_answers_it(
        services: Services, trace: Callable[[], str]) -> None:
    services.servers[PRIMARY].fail_on = lambda request: isinstance(request, Lock) and request.key == b"K2"
    client = resilient(services)
    before = client.lock(FILE, "K1")
    after = client.lock(FILE, "K2")  # no error: asked again on the promoted secondary
    assert services.servers[SECONDARY].keys() == [b"K1", b"K2"]
    text = trace()
    assert "primary lock service primary,50002 lost" in text and "promoted to primary" in text
    client.lock(FILE, "K3").release()
    before.release()
    after.release()
    wait_for(lambda: not services.servers[SECONDARY].keys(), 2, "the secondary to release everything")
    assert [m.key for m in services.requests(PRIMARY, Lock)] == [b"K1", b"K2"]  # nothing more after it failed
    assert services.connects == [PRIMARY, SECONDARY]
    info = services.requests(SECONDARY, InfoPut)
    assert info, "the promoted secondary was not told the client's lock information"
    client.close()


def test_a_secondary_lost_leaves_the_primary_alone_and_no_longer_resilient(
        services: Services, trace: Callable[[], str]) -> None:
    services.servers[SECONDARY].fail_on = lambda request: isinstance(request, Lock) and request.key == b"K2"
    client = resilient(services)
    client.lock(FILE, "K1")
    client.lock(FILE, "K2")
    client.lock(FILE, "K3")
    assert services.servers[PRIMARY].keys() == [b"K1", b"K2", b"K3"]
    assert [m.key for m in services.requests(SECONDARY, Lock)] == [b"K1", b"K2"]
    assert "secondary lock service secondary,50003 lost" in trace()
    assert client.release_all() == 3
    client.close()


def test_with_both_servers_lost_every_request_raises_service_lost(services: Services,
                                                                   trace: Callable[[], str]) -> None:
    for server in services.servers.values():
        server.fail_on = lambda request: isinstance(request, Lock) and request.key == b"K2"
    client = resilient(services)
    client.lock(FILE, "K1")
    with pytest.raises(ServiceLost) as lost:
        client.lock(FILE, "K2")
    for request in (lambda: client.lock(FILE, "K3"), lambda: client.echo(b"x"), client.release_all):
        with pytest.raises(ServiceLost) as again:
            request()
        assert again.value is lost.value
    assert "must wrap up" in str(lost.value) and "must wrap up" in trace()
    client.close()


def test_a_secondary_that_refuses_is_a_difference_and_the_lock_is_gone_with_the_primary(
        services: Services, trace: Callable[[], str]) -> None:
    services.servers[SECONDARY].refuse.add(b"K1")
    client = resilient(services)
    held = client.lock(FILE, "K1")  # the primary's answer stands
    assert services.servers[PRIMARY].keys() == [b"K1"] and not services.servers[SECONDARY].keys()
    assert "lock responses differ for /data/FBNK.ACCOUNT K1" in trace()
    services.servers[PRIMARY].fail_on = lambda request: isinstance(request, Echo)
    client.echo(b"x")  # found the primary lost, answered by the secondary
    assert "K1 was held on the failed primary alone" in trace()
    held.release()  # held nowhere now: nothing to send
    client.close()


def test_an_unreachable_secondary_at_start_is_dropped_and_said(services: Services,
                                                                trace: Callable[[], str]) -> None:
    services.unreachable.add(SECONDARY)
    client = resilient(services)
    client.lock(FILE, "K1").release()
    text = trace()
    assert "secondary lock service secondary,50003 cannot be reached" in text
    assert "this process is not resilient" in text
    client.close()


def test_an_unreachable_primary_at_start_leaves_the_secondary_alone(services: Services) -> None:
    services.unreachable.add(PRIMARY)
    client = resilient(services)
    client.lock(FILE, "K1")
    assert services.servers[SECONDARY].keys() == [b"K1"]
    client.close()


def test_release_all_answers_are_compared(services: Services, trace: Callable[[], str]) -> None:
    client = resilient(services)
    client.lock(FILE, "K1")
    client.lock(FILE, "K2")
    services.servers[SECONDARY].unlock_all_count = 1
    assert client.release_all() == 2  # the primary's count
    assert "lock responses differ for release of all locks" in trace()
    client.close()


def test_a_closed_client_connects_again_when_used(trace: Callable[[], str]) -> None:
    fakes: list[FakeService] = []

    def connect(server: Server, timeout: float = 5.0) -> socket.socket:
        fakes.append(FakeService(answer=LockServer(1)))
        return fakes[-1].client_socket

    client = Client(Config(server=PRIMARY), connect=connect)
    try:
        client.lock(FILE, "K1")
        assert client.connected
        client.close()
        assert not client.connected
        client.lock(FILE, "K1")
        assert client.connected and len(fakes) == 2
        client.close()
    finally:
        for fake in fakes:
            fake.stop()
