"""SpinningReader with real sockets: polls when it pays, sleeps otherwise, never loses data."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest
from dls_proto import transport
from dls_proto.transport import SpinningReader


@pytest.fixture
def idle_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with a core to spare, whatever the test run around it is doing."""
    monkeypatch.setattr(transport, "_runnable", lambda: 1)


@pytest.fixture
def pair() -> object:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_data_already_there_is_read_by_the_poll(pair: tuple[socket.socket, socket.socket],
                                                 idle_machine: None) -> None:
    a, b = pair
    b.sendall(b"granted")
    reader = SpinningReader(a)
    assert reader.read() == b"granted"
    assert reader._misses == 0


def test_no_data_during_the_poll_falls_back_to_a_sleeping_recv(pair: tuple[socket.socket, socket.socket],
                                                                idle_machine: None) -> None:
    a, b = pair
    threading.Timer(0.05, b.sendall, (b"late",)).start()
    reader = SpinningReader(a)
    start = time.monotonic()
    assert reader.read() == b"late"
    assert time.monotonic() - start >= 0.04
    assert reader._misses == 1


def test_it_rests_after_polls_that_keep_finding_nothing(pair: tuple[socket.socket, socket.socket],
                                                        idle_machine: None) -> None:
    """Polls that never find data (the answer always comes after the poll) stop after MISSES in a row.

    The socket is faked so that the test does not depend on how the machine schedules it: a poll
    (MSG_DONTWAIT) never has data, a sleeping read always has.
    """
    a, _b = pair
    reader = SpinningReader(a, spin=1e-5)
    polls = 0

    def fake_recv(size: int, flags: int = 0) -> bytes:
        nonlocal polls
        if flags & socket.MSG_DONTWAIT:
            polls += 1
            raise BlockingIOError
        return b"x"

    reader._recv = fake_recv  # type: ignore[method-assign]
    for _ in range(transport.MISSES + 5):
        assert reader.read() == b"x"
    polled_reads = polls  # each polled read polls many times within its window
    assert reader._rest == transport.REST - 5  # rested after MISSES misses in a row
    for _ in range(3):
        reader.read()
    assert polls == polled_reads  # still resting: no poll at all
    assert reader._misses == 0


def test_no_poll_while_the_machine_has_no_core_to_spare(pair: tuple[socket.socket, socket.socket],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setattr(transport, "_runnable", lambda: transport._CORES + 3)
    reader = SpinningReader(a)
    monkeypatch.setattr(reader, "_poll", lambda: pytest.fail("polled on a busy machine"))
    b.sendall(b"y")
    assert reader.read() == b"y"


def test_runnable_reads_the_kernels_count() -> None:
    assert transport._runnable() >= 1  # this process is running while it asks
    assert transport._runnable() >= 1  # and again, through the descriptor it keeps open


def test_a_forked_child_keeps_no_copy_of_the_load_descriptor() -> None:
    """A lock server is forked from its listener: it must not keep the listener's /proc/loadavg descriptor
    beside its own (one descriptor more in each of thousands of lock servers)."""
    transport._runnable()
    inherited = transport._loadavg_fd
    assert inherited >= 0
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            closed = transport._loadavg_fd == -1
            try:
                os.fstat(inherited)
            except OSError:
                pass
            else:
                closed = closed and os.readlink(f"/proc/self/fd/{inherited}") != "/proc/loadavg"
            code = 0 if closed and transport._runnable() >= 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _fake_socket(reader: SpinningReader, *, ready: bool) -> list[str]:
    """Fake ``reader``'s socket: a poll (MSG_DONTWAIT) always has data when ``ready``, never otherwise; a
    sleeping read always has. What was done, in order ("poll", "recv")."""
    done: list[str] = []

    def fake_recv(size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_DONTWAIT:
            done.append("poll")
            if not ready:
                raise BlockingIOError
        else:
            done.append("recv")
        return b"x"

    reader._recv = fake_recv  # type: ignore[method-assign]
    return done


def test_the_poll_gives_the_core_to_others_between_two_looks(pair: tuple[socket.socket, socket.socket],
                                                             idle_machine: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that needs the core (the lock server the reader waits for, another client) runs before the
    reader looks again: the reader yields the processor after each empty poll."""
    a, _b = pair
    reader = SpinningReader(a, spin=0.02)  # long enough to poll more than once on a busy machine
    done = _fake_socket(reader, ready=False)
    monkeypatch.setattr(transport, "_yield", lambda: done.append("yield"))
    assert reader.read() == b"x"
    assert done.count("poll") >= 2, done
    assert done[-1] == "recv"
    assert "poll,poll" not in ",".join(done), done  # a yield between every two polls


def test_a_machine_that_becomes_busy_stops_the_polls_within_a_few_reads(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """How busy the machine is, is looked at again every SAMPLE_EVERY reads (8; it was 64): once other
    processes need the cores, a reader whose polls pay stops polling within that many reads."""
    a, _b = pair
    runnable = [1]
    monkeypatch.setattr(transport, "_runnable", lambda: runnable[0])
    reader = SpinningReader(a)
    done = _fake_socket(reader, ready=True)
    reader.read()
    assert done == ["poll"]  # idle: it polls, and finds the data
    runnable[0] = transport._CORES + 2
    for _ in range(9):
        reader.read()
    done.clear()
    reader.read()
    assert done == ["recv"]


# -- over TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_pair() -> object:
    """Two ends of a TLS connection over a socketpair (a throwaway certificate): (client, server)."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("dls.test").configure_cert(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_context)
    a, b = socket.socketpair()
    server = server_context.wrap_socket(b, server_side=True, do_handshake_on_connect=False)
    shaking = threading.Thread(target=server.do_handshake)
    shaking.start()
    client = client_context.wrap_socket(a, server_hostname="dls.test")
    shaking.join()
    yield client, server
    client.close()
    server.close()


def test_decrypted_bytes_are_read_before_any_poll(tls_pair: tuple[socket.socket, socket.socket],
                                                  idle_machine: None) -> None:
    """What a record left in the SSL object is invisible to poll: the reader takes it at once, without
    counting the empty poll it would otherwise make."""
    client, server = tls_pair
    server.sendall(b"granted, and more")
    reader = SpinningReader(client, size=7)
    assert reader.read() == b"granted"
    assert client.pending() > 0  # type: ignore[attr-defined]
    started = time.perf_counter()
    assert reader.read() == b", and m"
    assert reader.read() == b"ore"
    assert time.perf_counter() - started < 0.5
    assert reader._misses == 0


def test_a_timeout_over_tls_is_the_blocking_error_of_a_plain_receive_timeout(
        tls_pair: tuple[socket.socket, socket.socket], idle_machine: None) -> None:
    client, server = tls_pair
    client.settimeout(0.05)
    reader = SpinningReader(client)
    with pytest.raises(BlockingIOError):
        reader.read()
    server.sendall(b"late")
    assert reader.read() == b"late"


def test_a_socket_is_no_tls_one_while_ssl_is_half_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread importing ssl (a client's first connection failure) leaves it in sys.modules half made,
    without SSLSocket yet: a reader made meanwhile for a plain socket must not fail (it raised AttributeError
    to callers of lock(), audit of issue 13)."""
    import types

    monkeypatch.setitem(sys.modules, "ssl", types.ModuleType("ssl"))
    a, b = socket.socketpair()
    try:
        assert transport.tls_socket(a) is None
    finally:
        a.close()
        b.close()
