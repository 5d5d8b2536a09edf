"""The trace's lines (VERBOSE, TRACE=file): one readable line per request and reply, keys escaped; nothing
formatted while the trace is off."""

from __future__ import annotations

import pytest
from dls_client import Config, Server
from dls_client.channel import Channel
from dls_client.trace import Tracer, reply_line, request_line
from dls_proto import (
    ALL_THREADS,
    WAIT_FOREVER,
    Echo,
    Error,
    ErrorCode,
    Granted,
    InfoGet,
    InfoPut,
    Lock,
    LockFlag,
    Message,
    Reclaim,
    Refused,
    RefuseReason,
    Settings,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
    Waiting,
)
from dls_testkit import FakeService, hello

HOLDER = (5, 999, 7, 998, 1, "10.0.0.9")


@pytest.mark.parametrize(("message", "line"), [
    (Lock(3, 5, 0, WAIT_FOREVER, 1, 42, -1, b"K\x1b[2J\n", "/data/F\tX"),
     r"Lock #3 /data/F\x09X (inode 42) key 'K\x1b[2J\x0a' EX, wait forever"),
    (Lock(4, 3, LockFlag.OSLOCK | LockFlag.NO_INTERIM, 1500, 1, 42, -1, b"K", "/f"),
     "Lock #4 /f (inode 42) key 'K' PR, wait 1.5 s, no interim+OS lock"),
    (Lock(5, 5, 0, 0, 1, 42, -1, b"\xff", "/f"), r"Lock #5 /f (inode 42) key '\xff' EX, no wait"),
    (Unlock(6, 0x64), "Unlock #6 handle 0x64"),
    (UnlockAll(7, ALL_THREADS), "UnlockAll #7 thread all"),
    (Reclaim(8, 0x64, 5, 1, 42, -1, b"K"), "Reclaim #8 handle 0x64 inode 42 key 'K' EX"),
    (Status(9, 1, 42, -1, b"K"), "Status #9 inode 42 key 'K'"),
    (InfoPut(10, b"{}"), "InfoPut #10 2 bytes"),
    (InfoGet(11, 0), "InfoGet #11"),
    (Echo(12, b"ping"), "Echo #12 4 bytes"),
    (Settings(13, 0, 2000), "Settings #13 acknowledgement timeout 2 s"),
])
def test_request_lines(message: Message, line: str) -> None:
    assert request_line(message) == line


@pytest.mark.parametrize(("message", "line"), [
    (Granted(3, 0x64, 5, 1), "Granted #3 granted EX, handle 0x64"),
    (Refused(3, RefuseReason.TIMEOUT, *HOLDER),
     "Refused #3 refused (still held when the wait ended), held EX by port 7, pid 998 on 10.0.0.9 "
     "(lock server pid 999)"),
    (Refused(3, 77, *HOLDER[:-1], "\x1b]0;x\x07"), r"Refused #3 refused (reason 77), held EX by port 7, pid 998 on "
     r"\x1b]0;x\x07 (lock server pid 999)"),
    (Waiting(3, 5000, *HOLDER), "Waiting #3 still waiting after 5 s, held EX by port 7, pid 998 on 10.0.0.9 "
     "(lock server pid 999)"),
    (StatusReply(9, 0, 0, 0, 0, 0, 0, ""), "StatusReply #9 free"),
    (Unlocked(7, 2), "Unlocked #7 released 2 lock(s)"),
    (Error(6, ErrorCode.NOT_HELD, "not held\n"), r"Error #6 error (not held): not held\x0a"),
])
def test_reply_lines(message: Message, line: str) -> None:
    assert reply_line(message) == line


@pytest.mark.parametrize(("config", "on"), [(Config(), False), (Config(verbose=True), True),
                                            (Config(trace="/nonexistent/trace"), True)])
def test_a_channel_formats_nothing_while_the_trace_is_off(config: Config, on: bool) -> None:
    with FakeService() as fake:
        channel = Channel(Server("fake-host", 50002), hello(4242), ack_timeout=None, unsolicited=lambda _m: None,
                          connect=lambda _server, _timeout: fake.client_socket, tracer=Tracer(config))
        assert (channel._trace is not None) is on
        channel.close()
