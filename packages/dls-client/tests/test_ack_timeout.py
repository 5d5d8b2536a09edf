"""The client's acknowledgement timeout (JDLS TIMEOUT) and its lock server's interim messages (issue 12, item 6).

Against a fake service (dls_testkit.FakeService): a lock server of protocol version 3 is told the timeout
(Settings, right after Welcome); one of version 2 cannot be told and sends its interim messages every 5 s,
so the client waits for its answers an interim period and a half rather than TIMEOUT, and says so in the
error trace; and an acknowledgement timeout is written to the error trace.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from dls_client import AcknowledgementTimeout, Client, Config, Server
from dls_client.channel import VERSION2_ACK_TIMEOUT, VERSION2_INTERIM_PERIOD, Channel
from dls_client.trace import Tracer
from dls_proto import Granted, Lock, Message, Settings, Waiting, Welcome
from dls_testkit import FakeService, hello
from dls_testkit.fake_service import welcome

SERVER = Server("fake-host", 50002)


def version_2(h: Message) -> list[Any]:
    """A lock server that speaks version 2 at most (as dls-daemon before 0.7 did)."""
    return [w._replace(version=2) if isinstance(w, Welcome) else w for w in welcome(h)]


def channel_to(fake: FakeService, ack_timeout: float | None, tracer: Tracer | None = None) -> Channel:
    return Channel(SERVER, hello(4242), ack_timeout=ack_timeout, unsolicited=lambda _m: None,
                   connect=lambda _server, _timeout: fake.client_socket, tracer=tracer)


def wait_until(what: Callable[[], object], timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "not within the time"
        time.sleep(0.01)


@pytest.mark.parametrize(("timeout", "ms"), [(2.0, 2000), (0.5, 500), (30.0, 30000), (86400.0, 86_400_000)])
def test_a_version_3_service_is_told_the_timeout(timeout: float, ms: int) -> None:
    with FakeService() as fake:
        channel = channel_to(fake, timeout)
        wait_until(lambda: fake.settings is not None)
        assert fake.settings == Settings(fake.settings.request_id, 0, ms)  # type: ignore[union-attr]
        assert channel.ack_timeout == timeout
        channel.close()


def test_with_wait_nothing_is_told() -> None:
    """JDLS WAIT: no interim messages (each Lock says NO_INTERIM) and no timeout, so no Settings."""
    with FakeService() as fake:
        channel = channel_to(fake, None)
        fake.send(Granted(99, 1, 5, 0))  # unsolicited: something after the point a Settings would have come
        time.sleep(0.2)
        assert fake.settings is None and fake.received == []
        channel.close()


def test_a_version_2_service_gets_a_longer_wait_said_in_the_error_trace(trace: Callable[[], str]) -> None:
    with FakeService(greeting=version_2) as fake:
        channel = channel_to(fake, 2.0, Tracer(Config()))
        assert channel.welcome.version == 2
        assert channel.ack_timeout == VERSION2_ACK_TIMEOUT > VERSION2_INTERIM_PERIOD
        assert fake.settings is None
        assert "speaks protocol version 2" in trace() and "not TIMEOUT=2" in trace(), trace()
        channel.close()
    with FakeService(greeting=version_2) as fake:  # a TIMEOUT long enough already is kept as it is
        channel = channel_to(fake, 10.0)
        assert channel.ack_timeout == 10.0
        channel.close()


@pytest.mark.timeout(30)
def test_a_contended_wait_on_a_version_2_service_outlasts_a_short_timeout(trace: Callable[[], str]) -> None:
    """TIMEOUT=1 against a version-2 lock server whose interim messages come every 5 s: granted after the
    second, not given up after a second of silence."""
    with FakeService(greeting=version_2) as fake:
        client = Client(Config(server=SERVER, timeout=1.0), connect=lambda _server, _timeout: fake.client_socket)

        def serve() -> None:
            request = fake.next_request(5)
            while not isinstance(request, Lock):  # the lock information (InfoPut) first
                request = fake.next_request(5)
            fake.send(Waiting(request.request_id, 0, 5, 1, 2, 3, 4, "10.0.0.9"))
            time.sleep(VERSION2_INTERIM_PERIOD)
            fake.send(Waiting(request.request_id, 5000, 5, 1, 2, 3, 4, "10.0.0.9"))
            time.sleep(1.0)
            fake.send(Granted(request.request_id, 7, 5, 0))

        server = threading.Thread(target=serve)
        server.start()
        try:
            held = client.lock(__file__, "K")
            assert held.handle == 7
        finally:
            server.join()
            client.close()


def test_an_acknowledgement_timeout_is_in_the_error_trace(trace: Callable[[], str]) -> None:
    with FakeService() as fake:
        client = Client(Config(server=SERVER, timeout=0.5), connect=lambda _server, _timeout: fake.client_socket)
        try:
            with pytest.raises(AcknowledgementTimeout):
                client.lock(__file__, "K")  # the fake never answers
        finally:
            client.close()
    assert "did not answer within 0.5 seconds" in trace(), trace()
