"""The client's Channel against an in-process fake service (dls_testkit.FakeService): no daemon, no port.

Each test scripts the service's side of one connection (Welcome or not, then Granted, Refused, Waiting,
Error, garbage, a close or silence) and checks what Channel makes of it: replies to their requests,
interim messages, replies for other threads' requests, unsolicited ones, and every way the service can
fail (closed, bad frames, no answer within the acknowledgement timeout). Milliseconds each; the same
paths against a real jdls stay in test_client.py and the root tests.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dls_client import AcknowledgementTimeout, Server, ServiceUnavailable
from dls_client.channel import Channel
from dls_proto import (
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Granted,
    Lock,
    Message,
    Refused,
    RefuseReason,
    Unlock,
    Waiting,
    encode,
)
from dls_testkit import FakeService, hello
from dls_testkit.fake_service import CLOSE, SERVER_PID

EX = 5
SERVER = Server("fake-host", 50002)
HEADER = struct.Struct(">IBBHI")
#: A frame of a kind no protocol version uses: skipped by the reader, the conversation goes on.
UNKNOWN_FRAME = HEADER.pack(2, 1, 0x7E, 0, 0) + b"\x01\x02"


class Opened:
    """A Channel on a FakeService, and what the channel passed on: unsolicited replies, failure notes."""

    def __init__(self, fake: FakeService, ack_timeout: float | None = 1.0) -> None:
        self.fake = fake
        self.unsolicited: list[Message] = []
        self.failures: list[str] = []
        self.channel = Channel(SERVER, hello(4242), ack_timeout=ack_timeout, unsolicited=self.unsolicited.append,
                               on_failure=self.failures.append,
                               connect=lambda _server, _timeout: fake.client_socket)

    def lock(self, key: bytes = b"K1", thread: int = 1) -> Lock:
        return Lock(self.channel.next_id(), EX, 0, 0, thread, 11, -1, key, "/data/FILE")


@pytest.fixture
def fake() -> Iterator[FakeService]:
    with FakeService() as service:
        yield service


@pytest.fixture
def opened(fake: FakeService) -> Iterator[Opened]:
    made = Opened(fake)
    try:
        yield made
    finally:
        made.channel.close()


def refused(rid: int) -> Refused:
    return Refused(rid, RefuseReason.BUSY, EX, 999, 7, 998, 1, "10.0.0.9")


def waiting(rid: int, waited_ms: int = 5000) -> Waiting:
    return Waiting(rid, waited_ms, EX, 999, 7, 998, 1, "10.0.0.9")


# -- the greeting ------------------------------------------------------------------------------------


def test_the_welcome_is_kept_and_the_hello_is_what_the_client_said(opened: Opened, fake: FakeService) -> None:
    assert opened.channel.welcome.server_pid == SERVER_PID
    assert fake.hello == hello(4242)
    assert opened.channel.failure is None


@pytest.mark.parametrize(("greeting", "says"), [
    (lambda h: [Error(h.request_id, ErrorCode.LIMIT, "limit of 1 clients reached")],
     "refused the connection: limit of 1 clients reached"),
    (lambda h: [encode(Granted(h.request_id, 1, EX, 2))], "sent bad data"),
    (lambda h: [CLOSE], "closed the connection"),
    (lambda h: [b"not dls at all, not at all"], "sent bad data"),
], ids=["error", "granted", "close", "garbage"])
def test_a_greeting_other_than_welcome_is_service_unavailable(greeting: Any, says: str) -> None:
    with FakeService(greeting=greeting) as fake, pytest.raises(ServiceUnavailable, match=says):
        Opened(fake)


def test_no_welcome_within_the_acknowledgement_timeout() -> None:
    with FakeService(greeting=lambda h: []) as fake:
        started = time.monotonic()
        with pytest.raises(AcknowledgementTimeout, match=r"did not answer within 0\.1 seconds"):
            Opened(fake, ack_timeout=0.1)
        assert time.monotonic() - started < 1.0


# -- requests and their replies ---------------------------------------------------------------------------


def test_request_returns_the_reply_to_it(opened: Opened, fake: FakeService) -> None:
    lock = opened.lock()
    fake_answers = threading.Thread(target=lambda: fake.send(Granted(fake.next_request().request_id, 7, EX, 99)))
    fake_answers.start()
    assert opened.channel.request(lock) == Granted(lock.request_id, 7, EX, 99)
    fake_answers.join()
    assert fake.received == [lock]


def test_scripted_answers_granted_refused_and_error_replies_are_returned_as_they_are() -> None:
    def answer(request: Message) -> list[Message]:
        assert isinstance(request, Lock), request
        rid = request.request_id
        replies: dict[bytes, Message] = {b"A": Granted(rid, 1, EX, 5), b"B": refused(rid),
                                          b"C": Error(rid, ErrorCode.BAD_REQUEST, "no such handle")}
        return [replies[request.key]]

    with FakeService(answer=answer) as fake:
        opened = Opened(fake)
        first, second, third = opened.lock(b"A"), opened.lock(b"B"), opened.lock(b"C")
        assert opened.channel.request(first) == Granted(first.request_id, 1, EX, 5)
        assert opened.channel.request(second) == refused(second.request_id)
        assert opened.channel.request(third) == Error(third.request_id, ErrorCode.BAD_REQUEST, "no such handle")
        assert opened.channel.failure is None  # an Error reply is an answer, not a lost service
        opened.channel.close()


def test_interim_waiting_messages_come_first_then_the_grant(opened: Opened, fake: FakeService) -> None:
    lock = opened.lock()
    opened.channel.register(lock.request_id)
    opened.channel.send(lock)
    rid = fake.next_request().request_id
    fake.send(waiting(rid, 5000), waiting(rid, 10000), Granted(rid, 3, EX, 1))
    assert opened.channel.expect(rid) == waiting(rid, 5000)
    assert opened.channel.expect(rid) == waiting(rid, 10000)
    assert opened.channel.expect(rid) == Granted(rid, 3, EX, 1)


def test_a_frame_of_an_unknown_kind_is_skipped(opened: Opened, fake: FakeService) -> None:
    echo = Echo(opened.channel.next_id(), b"ping")
    opened.channel.send(echo)
    fake.next_request()
    fake.send(UNKNOWN_FRAME, EchoReply(echo.request_id, b"ping"))
    assert opened.channel.expect(echo.request_id) == EchoReply(echo.request_id, b"ping")
    assert opened.channel.failure is None


def test_a_reply_nobody_awaits_goes_to_unsolicited(opened: Opened, fake: FakeService) -> None:
    unlock = Unlock(opened.channel.next_id(), 12345)
    opened.channel.send(unlock)  # answered only if it fails
    fake.next_request()
    echo = Echo(opened.channel.next_id(), b"after")
    opened.channel.send(echo)
    fake.next_request()
    fake.send(Error(unlock.request_id, ErrorCode.NOT_HELD, "no lock with handle 12345"),
              EchoReply(echo.request_id, b"after"))
    assert opened.channel.expect(echo.request_id) == EchoReply(echo.request_id, b"after")
    assert opened.unsolicited == [Error(unlock.request_id, ErrorCode.NOT_HELD, "no lock with handle 12345")]


def test_request_ids_are_distinct_and_never_zero(opened: Opened) -> None:
    ids = [opened.channel.next_id() for _ in range(100)]
    assert len(set(ids)) == 100 and 0 not in ids


# -- several threads on one connection ---------------------------------------------------------------------


def test_replies_for_other_threads_requests_reach_them_in_any_order(opened: Opened, fake: FakeService) -> None:
    """Three threads wait on one connection; the service answers in the reverse order. Whichever thread
    reads hands the others their replies."""
    locks = [opened.lock(f"K{i}".encode(), thread=i) for i in range(3)]
    got: dict[int, Message] = {}
    errors: list[BaseException] = []

    def ask(lock: Lock) -> None:
        try:
            got[lock.request_id] = opened.channel.request(lock)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    requests = [fake.next_request() for _ in locks]
    assert sorted(r.request_id for r in requests) == sorted(lock.request_id for lock in locks)
    for handle, lock in reversed(list(enumerate(locks))):
        fake.send(Granted(lock.request_id, handle, EX, handle))
        time.sleep(0.01)
    for thread in threads:
        thread.join(5)
    assert not errors
    assert got == {lock.request_id: Granted(lock.request_id, handle, EX, handle) for handle, lock in enumerate(locks)}


def test_a_thread_whose_lock_waits_does_not_keep_another_from_its_answer(opened: Opened, fake: FakeService) -> None:
    waiter, other = opened.lock(b"HELD", thread=1), opened.lock(b"FREE", thread=2)
    first: list[Message] = []
    reader = threading.Thread(target=lambda: first.append(opened.channel.request(waiter)))
    reader.start()
    fake.next_request()
    fake.send(waiting(waiter.request_id))
    reader.join(5)
    assert first == [waiting(waiter.request_id)]
    opened.channel.register(other.request_id)
    opened.channel.send(other)
    fake.next_request()
    fake.send(Granted(other.request_id, 2, EX, 2))
    assert opened.channel.expect(other.request_id) == Granted(other.request_id, 2, EX, 2)
    fake.send(Granted(waiter.request_id, 1, EX, 1))
    assert opened.channel.expect(waiter.request_id) == Granted(waiter.request_id, 1, EX, 1)


# -- the service fails --------------------------------------------------------------------------------


def test_the_service_closing_fails_the_waiting_request_and_every_later_one(opened: Opened, fake: FakeService) -> None:
    lock = opened.lock()
    opened.channel.register(lock.request_id)
    opened.channel.send(lock)
    fake.next_request()
    fake.close()
    with pytest.raises(ServiceUnavailable, match="closed the connection") as lost:
        opened.channel.expect(lock.request_id)
    assert opened.channel.failure is lost.value
    assert opened.failures == [f"Client: lock service {SERVER} closed the connection"]
    with pytest.raises(ServiceUnavailable) as again:
        opened.channel.request(opened.lock(b"K2"))
    assert again.value is lost.value
    assert opened.failures == [f"Client: lock service {SERVER} closed the connection"]  # told once


@pytest.mark.parametrize("bad", [
    b"\x00\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00",  # frame version 9
    HEADER.pack(64 * 1024 * 1024, 1, 0x10, 0, 1),  # longer than the client accepts
    encode(hello(1)),  # a request kind, from the server
], ids=["frame-version", "too-long", "request-kind"])
def test_bad_frames_are_a_lost_service(opened: Opened, fake: FakeService, bad: bytes) -> None:
    lock = opened.lock()
    opened.channel.register(lock.request_id)
    opened.channel.send(lock)
    fake.next_request()
    fake.send(bad)
    with pytest.raises(ServiceUnavailable, match=f"lock service {SERVER} sent bad data"):
        opened.channel.expect(lock.request_id)
    assert opened.failures and "sent bad data" in opened.failures[0]
    fake.closed_by_client.wait(2)
    assert fake.closed_by_client.is_set()  # the client let the connection go


def test_the_service_closing_in_the_middle_of_a_frame(opened: Opened, fake: FakeService) -> None:
    lock = opened.lock()
    opened.channel.register(lock.request_id)
    opened.channel.send(lock)
    fake.next_request()
    fake.send(encode(Granted(lock.request_id, 1, EX, 1))[:-3], CLOSE)
    with pytest.raises(ServiceUnavailable, match=f"lock service {SERVER} sent bad data: connection closed in the "
                                                 "middle of a frame"):
        opened.channel.expect(lock.request_id)


def test_silence_is_an_acknowledgement_timeout_and_not_a_lost_service(fake: FakeService) -> None:
    opened = Opened(fake, ack_timeout=0.1)
    lock = opened.lock()
    started = time.monotonic()
    timed_out = re.escape(f"lock service {SERVER} did not answer within 0.1 seconds")
    with pytest.raises(AcknowledgementTimeout, match=timed_out):
        opened.channel.request(lock)
    assert 0.1 <= time.monotonic() - started < 1.0
    assert opened.channel.failure is None  # the caller decides what a timeout means
    echo = Echo(opened.channel.next_id(), b"still there?")
    opened.channel.register(echo.request_id)
    opened.channel.send(echo)
    fake.next_request()
    fake.next_request()
    fake.send(EchoReply(echo.request_id, b"still there?"))
    assert opened.channel.expect(echo.request_id) == EchoReply(echo.request_id, b"still there?")
    opened.channel.close()


def test_without_an_acknowledgement_timeout_a_reader_waits_past_the_receive_slices(fake: FakeService) -> None:
    opened = Opened(fake, ack_timeout=None)
    lock = opened.lock()
    got: list[Message] = []
    reader = threading.Thread(target=lambda: got.append(opened.channel.request(lock)))
    reader.start()
    fake.next_request()
    time.sleep(1.2)  # longer than one receive-timeout slice (1 s)
    assert not got and reader.is_alive()
    fake.send(Granted(lock.request_id, 1, EX, 1))
    reader.join(5)
    assert got == [Granted(lock.request_id, 1, EX, 1)]
    opened.channel.close()


def test_close_ends_the_connection_and_later_sends_fail(opened: Opened, fake: FakeService) -> None:
    opened.channel.close()
    assert fake.closed_by_client.wait(2)
    with pytest.raises(ServiceUnavailable, match=f"connection to lock service {SERVER} was closed"):
        opened.channel.send(opened.lock())
    assert opened.failures == []  # closing is not a failure of the service
