"""TLS on the lock service's port, end to end: a real jdls with a certificate made for the test (trustme), real
clients over TLS, and the peers it must refuse.

Each refusal is checked from both ends: the peer is not served, the log says why, and the service goes on
serving a good client afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from dls_client import Client, DlsError, LockLost, ServiceUnavailable
from dls_client.config import parse
from dls_proto import Welcome, jdls
from dls_testkit import Service, data_file, dribble, greet, running_service

KEY = "USD163170001"
SHOW_ITEM_LOCKS = str(Path(sys.executable).parent / "show-item-locks")


class Pki:
    """A CA, the server's certificate (for 127.0.0.1 and localhost), a client's, and another CA's client,
    written as PEM files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        ca = trustme.CA()
        other = trustme.CA()
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.other_ca = self._write("other-ca.pem", other.cert_pem.bytes())
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert = self._write("server.pem", b"".join(b.bytes() for b in server.cert_chain_pems))
        self.server_key = self._write("server.key", server.private_key_pem.bytes(), 0o600)
        client = ca.issue_cert("client@example.com")
        self.client_cert = self._write("client.pem", b"".join(b.bytes() for b in client.cert_chain_pems))
        self.client_key = self._write("client.key", client.private_key_pem.bytes(), 0o600)
        stranger = other.issue_cert("stranger@example.com")
        self.stranger_cert = self._write("stranger.pem", b"".join(b.bytes() for b in stranger.cert_chain_pems))
        self.stranger_key = self._write("stranger.key", stranger.private_key_pem.bytes(), 0o600)

    def _write(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def server_options(self, *, client_ca: bool = False) -> tuple[str, ...]:
        options = ("--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key))
        return (*options, "--tls-client-ca", str(self.ca)) if client_ca else options

    def jdls(self, service: Service, *, ca: Path | None = None, cert: Path | None = None,
             key: Path | None = None, host: str = "127.0.0.1") -> str:
        """A JDLS value for ``service`` over TLS, verifying against ``ca`` (default: the test's CA)."""
        options = [f"SERVER={host},{service.port}", "TLS", f"CA={ca or self.ca}"]
        if cert is not None:
            options.append(f"CERT={cert}")
        if key is not None:
            options.append(f"KEY={key}")
        return ",".join(options)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_service(tmp_path: Path, pki: Pki) -> Iterator[Service]:
    with running_service(tmp_path / "release", *pki.server_options(), "--lock-delay", "0") as svc:
        yield svc


@pytest.fixture
def mutual_service(tmp_path: Path, pki: Pki) -> Iterator[Service]:
    with running_service(tmp_path / "release", *pki.server_options(client_ca=True)) as svc:
        yield svc


def client_of(value: str) -> Client:
    """A client configured by the JDLS ``value``."""
    return Client(parse(value))


def assert_serves(service: Service, pki: Pki, **options: Path) -> None:
    """A good TLS client locks and unlocks there."""
    with client_of(pki.jdls(service, **options)) as client:
        client.lock(data_file(service.root.parent), KEY).release()


# -- served -----------------------------------------------------------------------------------------------------


def test_a_tls_client_locks_and_unlocks(tls_service: Service, pki: Pki) -> None:
    with client_of(pki.jdls(tls_service)) as client:
        held = client.lock(data_file(tls_service.root.parent), KEY)
        assert held.handle
        held.release()
    assert "TLS with" in tls_service.log()  # the listener's start line


def _started(body: Callable[[int], None], count: int = 8) -> list[threading.Thread]:
    """``body(n)`` run in ``count`` threads, each started."""
    threads = [threading.Thread(target=body, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    return threads


def test_threads_share_one_tls_connection(tls_service: Service, pki: Pki) -> None:
    """Threads of one client read and write the one SSL socket at once (one reads while another sends):
    every cycle of every thread completes."""
    data = data_file(tls_service.root.parent)
    failures: list[BaseException] = []

    def cycles(client: Client, n: int) -> None:
        try:
            for i in range(200):
                client.lock(data, f"{KEY}-{n}-{i % 7}").release()
        except BaseException as exc:
            failures.append(exc)

    with client_of(pki.jdls(tls_service)) as client:
        for t in _started(lambda n: cycles(client, n)):
            t.join(60)
        assert not failures, failures
        assert len(client._route.channels()) == 1


def test_threads_of_a_tls_client_whose_lock_server_is_killed_see_only_dls_errors(
        tls_service: Service, pki: Pki) -> None:
    """Eight threads lock and release over one TLS connection while its lock server is SIGKILLed, again and
    again: each call ends in a grant or a DlsError (the lost service, a lost lock), never another exception.
    A thread sending as another closed the failed connection met its closed socket (ValueError from poll's
    register of descriptor -1: audit of issue 13)."""
    data = data_file(tls_service.root.parent)
    strays: list[BaseException] = []
    stop = time.monotonic() + 4.0

    def cycles(client: Client, n: int) -> None:
        while time.monotonic() < stop:
            try:
                client.lock(data, f"{KEY}-{n}", timeout=2).release()
            except DlsError:
                pass
            except BaseException as exc:
                strays.append(exc)

    with client_of(pki.jdls(tls_service)) as client:
        threads = _started(lambda n: cycles(client, n))
        for _ in range(5):
            time.sleep(0.6)
            for pid in tls_service.server_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
    assert not strays, [f"{type(exc).__name__}: {exc}" for exc in strays[:5]]


def test_no_two_threads_use_the_ssl_object_at_once(tls_service: Service, pki: Pki,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL forbids two threads in one SSL object at once: while one thread waits for its grant (reading),
    another locks and unlocks (sending) through the same connection, and no call of the one overlaps a
    call of the other (each SSLSocket call is watched)."""
    inside: dict[int, int] = {}
    overlaps: list[str] = []
    watch = threading.Lock()

    def watched(name: str) -> Any:
        real = getattr(ssl.SSLSocket, name)

        def call(self: ssl.SSLSocket, *args: Any, **kwargs: Any) -> Any:
            with watch:
                if inside.get(id(self)):
                    overlaps.append(name)
                inside[id(self)] = inside.get(id(self), 0) + 1
            try:
                return real(self, *args, **kwargs)
            finally:
                with watch:
                    inside[id(self)] -= 1
        return call

    for name in ("recv", "recv_into", "send", "sendall", "pending"):
        monkeypatch.setattr(ssl.SSLSocket, name, watched(name))
    data = data_file(tls_service.root.parent)
    with client_of(pki.jdls(tls_service)) as holder, client_of(pki.jdls(tls_service)) as client:
        held = holder.lock(data, KEY)
        waited: list[object] = []
        waiter = threading.Thread(target=lambda: waited.append(client.lock(data, KEY, timeout=30)))
        waiter.start()
        for i in range(300):
            client.lock(data, f"other-{i % 5}").release()
        held.release()
        waiter.join(30)
        assert waited and not isinstance(waited[0], BaseException)
    assert overlaps == [], f"{len(overlaps)} calls overlapped another thread's on one SSL socket: {overlaps[:5]}"

def test_a_client_certificate_of_the_ca_is_served(mutual_service: Service, pki: Pki) -> None:
    assert_serves(mutual_service, pki, cert=pki.client_cert, key=pki.client_key)


def test_jdls_minus_c_and_dls_test_speak_tls(tls_service: Service, pki: Pki) -> None:
    env = {**tls_service.env, "JDLS": pki.jdls(tls_service)}
    minus_c = subprocess.run([sys.executable, "-m", "dls_daemon", "-C", "hello"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert minus_c.returncode == 0, minus_c.stderr + minus_c.stdout
    assert "the server's certificate verified for '127.0.0.1'" in minus_c.stdout
    assert "received 'hello'" in minus_c.stdout
    dls_test = subprocess.run([str(Path(sys.executable).parent / "dls-test")], env=env, capture_output=True,
                              text=True, timeout=30)
    assert dls_test.returncode == 0, dls_test.stderr + dls_test.stdout
    plain = tls_service.jdls("-C", "hello")  # the service's own JDLS says no TLS
    assert plain.returncode == 1, plain.stdout + plain.stderr


def test_remote_show_item_locks_over_tls(mutual_service: Service, pki: Pki) -> None:
    value = pki.jdls(mutual_service, cert=pki.client_cert, key=pki.client_key)
    with client_of(value) as client:
        client.lock(data_file(mutual_service.root.parent), KEY)
        env = {**mutual_service.env, "JDLS": value}
        shown = subprocess.run([SHOW_ITEM_LOCKS, "--server", f"127.0.0.1,{mutual_service.port}"], env=env,
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert KEY in shown.stdout, shown.stdout
        # Without the client certificate the utility is refused like any client.
        env["JDLS"] = pki.jdls(mutual_service)
        refused = subprocess.run([SHOW_ITEM_LOCKS, "--server", f"127.0.0.1,{mutual_service.port}"], env=env,
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and KEY not in refused.stdout, refused.stdout + refused.stderr


def test_a_killed_lock_server_still_loses_the_lock_over_tls(tls_service: Service, pki: Pki) -> None:
    lost = threading.Event()
    with client_of(pki.jdls(tls_service)) as client:
        held = client.lock(data_file(tls_service.root.parent), KEY, on_lost=lambda _: lost.set())
        os.kill(client.connect().welcome.server_pid, signal.SIGKILL)
        assert lost.wait(10), "the holder was not told"
        with pytest.raises(LockLost):
            held.release()
        client.lock(data_file(tls_service.root.parent), "other").release()  # and it is served again


def test_a_waiting_lock_is_granted_over_tls(tls_service: Service, pki: Pki) -> None:
    """A request that waits makes its lock server sleep in select, where bytes already decrypted are not
    seen: the waiter is granted when the holder releases, and its other requests are served meanwhile."""
    data = data_file(tls_service.root.parent)
    with client_of(pki.jdls(tls_service)) as holder, client_of(pki.jdls(tls_service)) as waiter:
        held = holder.lock(data, KEY)
        granted: list[object] = []
        waiting = threading.Event()
        thread = threading.Thread(target=lambda: granted.append(
            waiter.lock(data, KEY, timeout=20, on_wait=lambda _: waiting.set())))
        thread.start()
        assert waiting.wait(10), "the request did not wait"
        assert waiter.status(data, KEY)[0] == 2  # held by another
        for n in range(20):  # requests of the waiting client while its lock waits
            waiter.lock(data, f"other{n}").release()
        held.release()
        thread.join(20)
        assert granted, "the waiting lock was not granted"


def test_server2_is_reached_with_the_same_tls_settings(tmp_path: Path, pki: Pki) -> None:
    with running_service(tmp_path / "primary", *pki.server_options(client_ca=True)) as primary, \
            running_service(tmp_path / "secondary", *pki.server_options(client_ca=True)) as secondary:
        value = f"{pki.jdls(primary, cert=pki.client_cert, key=pki.client_key)},SERVER2=127.0.0.1,{secondary.port}"
        with client_of(value) as client:
            held = client.lock(data_file(tmp_path), KEY)
            channels = client._route.channels()
            assert sorted(c.server.port for c in channels) == sorted((primary.port, secondary.port))
            assert all(isinstance(c.sock, ssl.SSLSocket) for c in channels)
            held.release()


def test_a_silent_peer_does_not_hold_up_the_others(tmp_path: Path, pki: Pki) -> None:
    """A connection that never starts its handshake costs its own lock server the handshake timeout, and
    nobody else anything."""
    with running_service(tmp_path / "release", *pki.server_options(), "--handshake-timeout", "2") as svc:
        silent = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        svc.sockets.append(silent)
        started = time.monotonic()
        assert_serves(svc, pki)
        assert time.monotonic() - started < 2, "a good client waited for the silent one"
        assert "not done within 2 s" in svc.wait_for_log(r"TLS handshake failed", timeout=10)


# -- refused ----------------------------------------------------------------------------------------------------


def test_a_plain_client_on_the_tls_port_is_refused_and_others_are_served(tls_service: Service, pki: Pki) -> None:
    plain = socket.create_connection(("127.0.0.1", tls_service.port), timeout=10)
    tls_service.sockets.append(plain)
    plain.sendall(b"\0" * 64)  # a frame header is no TLS record
    try:
        answer = plain.recv(4096)
    except ConnectionResetError:  # the rest of what it sent was not read
        answer = b""
    assert answer[:1] in (b"", b"\x15"), answer  # at most a TLS alert, then the end: nothing of dls
    tls_service.wait_for_log(r"TLS handshake failed")
    with pytest.raises(ServiceUnavailable), client_of(f"SERVER=127.0.0.1,{tls_service.port}") as client:
        client.lock(data_file(tls_service.root.parent), KEY)
    assert_serves(tls_service, pki)


@pytest.mark.asyncio
async def test_the_asyncio_client_speaks_tls(tls_service: Service, pki: Pki) -> None:
    """dls_client.aio.AsyncClient made from the same JDLS (TLS, CA) locks over TLS, two tasks conflicting on
    the one connection; a certificate of another CA is refused as a Client refuses it."""
    from dls_client.aio import AsyncClient, AsyncHeldLock

    data = data_file(tls_service.root.parent)
    async with AsyncClient(parse(pki.jdls(tls_service))) as client:
        held = await client.lock(data, KEY)
        async def another_task() -> AsyncHeldLock:
            return await client.lock(data, KEY, timeout=10)

        second = asyncio.create_task(another_task())
        await asyncio.sleep(0.2)
        assert not second.done()
        await held.release()
        granted = await asyncio.wait_for(second, 10)
        assert granted.token > held.token
        await granted.release()
    with pytest.raises(ServiceUnavailable, match="certificate not accepted"):
        async with AsyncClient(parse(pki.jdls(tls_service, ca=pki.other_ca))) as refused:
            await refused.lock(data, KEY)


def test_a_server_certificate_of_another_ca_is_refused(tls_service: Service, pki: Pki) -> None:
    with pytest.raises(ServiceUnavailable, match="certificate is not accepted"), \
            client_of(pki.jdls(tls_service, ca=pki.other_ca)) as client:
        client.lock(data_file(tls_service.root.parent), KEY)
    tls_service.wait_for_log(r"TLS handshake failed")
    assert_serves(tls_service, pki)


def test_a_host_name_the_certificate_does_not_name_is_refused(tls_service: Service, pki: Pki) -> None:
    value = pki.jdls(tls_service).replace("SERVER=127.0.0.1", "SERVER=127.0.0.2")
    with pytest.raises(ServiceUnavailable, match=r"IP address mismatch|not accepted"), client_of(value) as client:
        client.lock(data_file(tls_service.root.parent), KEY)


@pytest.mark.parametrize("who", ["none", "stranger"])
def test_a_client_without_a_certificate_of_the_ca_is_refused(mutual_service: Service, pki: Pki, who: str) -> None:
    options = {} if who == "none" else {"cert": pki.stranger_cert, "key": pki.stranger_key}
    with pytest.raises(ServiceUnavailable), client_of(pki.jdls(mutual_service, **options)) as client:
        client.lock(data_file(mutual_service.root.parent), KEY)
    line = mutual_service.wait_for_log(r"TLS handshake failed")
    assert "certificate" in line, line
    assert_serves(mutual_service, pki, cert=pki.client_cert, key=pki.client_key)


# -- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("SERVER=h,CA=/x", "JDLS CA has no meaning without TLS"),
    ("SERVER=h,TLS,KEY=/x", "JDLS KEY has no meaning without CERT"),
    ("SERVER=h,TLS=1", "JDLS TLS takes no value"),
    ("SERVER=h,TLS,CA=", "JDLS CA: expected CA=file"),
    ("SERVER=h,TLS,CA=/nonexistent/ca.pem", "JDLS CA: cannot read /nonexistent/ca.pem"),
])
def test_bad_tls_options_are_refused_naming_the_option(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jdls.parse(value)


def test_a_certificate_with_the_wrong_key_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="JDLS CERT/KEY"):
        jdls.parse(f"SERVER=h,TLS,CA={pki.ca},CERT={pki.client_cert},KEY={pki.stranger_key}")
    with pytest.raises(ValueError, match=r"JDLS CA: .*no PEM certificate"):
        jdls.parse(f"SERVER=h,TLS,CA={pki.client_key}")


def test_dls_lock_refuses_a_bad_tls_option_with_exit_78(service: Service, tmp_path: Path) -> None:
    env = {**service.env, "JDLS": f"SERVER=127.0.0.1,{service.port},TLS,CA={tmp_path}/missing.pem"}
    done = subprocess.run([str(Path(sys.executable).parent / "dls-lock"), str(data_file(tmp_path)), KEY, "true"],
                          env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 78, done.stderr
    assert "JDLS CA: cannot read" in done.stderr


@pytest.mark.parametrize(("change", "message"), [
    ("missing cert", "--tls-cert .*cannot read it"),
    ("wrong key", "the private key does not belong to the certificate"),
    ("open key", "readable or writable by others"),
    ("not pem", "not a PEM certificate"),
])
def test_jdls_refuses_unusable_tls_files_at_start(tmp_path: Path, pki: Pki, change: str, message: str) -> None:
    cert, key = pki.server_cert, pki.server_key
    if change == "missing cert":
        cert = tmp_path / "nothing.pem"
    elif change == "wrong key":
        key = pki.client_key
    elif change == "open key":
        key.chmod(0o644)
    else:
        cert = pki._write("junk.pem", b"not a certificate\n")
    service = Service(tmp_path / "release")
    with service.checked():
        done = service.jdls("-ibs1000,10", "--port", str(service.port), "--tls-cert", str(cert), "--tls-key",
                            str(key))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert re.search(message, done.stderr), done.stderr
        assert not service.processes()


def test_tls_options_go_together() -> None:
    from dls_daemon import cli

    assert cli.main(["-ib", "--tls-key", "/k"]) == 2
    assert cli.main(["-ib", "--tls-client-ca", "/c"]) == 2


def test_welcome_over_tls_names_the_peer(tls_service: Service, pki: Pki) -> None:
    context = jdls.parse(pki.jdls(tls_service)).ssl_context()
    assert context is not None
    raw = socket.create_connection(("127.0.0.1", tls_service.port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls_service.sockets.append(sock)
    assert sock.version() in ("TLSv1.2", "TLSv1.3")
    _conn, welcome = greet(sock, 1111)
    assert isinstance(welcome, Welcome) and welcome.peer == "127.0.0.1"
    assert isinstance(sock, ssl.SSLSocket)


def test_a_peer_dribbling_its_handshake_is_cut_off_at_the_deadline_from_accept(tmp_path: Path, pki: Pki) -> None:
    """One deadline from accept covers the TLS handshake and the Hello: a ClientHello sent a byte every 0.25 s
    gets no more time than silence would."""
    with running_service(tmp_path / "release", *pki.server_options(), "--handshake-timeout", "1") as svc:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hello = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            hello.do_handshake()
        client_hello = outgoing.read()
        sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        svc.sockets.append(sock)
        cut = dribble(sock, client_hello[:40])  # 40 bytes, 10 s at this pace: never the whole of it
        assert cut is not None and cut < 4.0, cut
        svc.wait_for_log(r"TLS handshake failed", timeout=10)


def test_a_client_over_the_limit_on_a_tls_port_is_closed_without_plain_bytes(tmp_path: Path, pki: Pki) -> None:
    """Over --max-clients the listener says nothing in plain text on a TLS port (it would read as a broken
    handshake): the connection is closed, the log says why, and the client is told it was not served."""
    with running_service(tmp_path / "release", *pki.server_options(), "--max-clients", "1") as svc:
        with client_of(pki.jdls(svc)) as first:
            first.lock(data_file(tmp_path), KEY).release()
            raw = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
            svc.sockets.append(raw)
            assert raw.recv(4096) == b"", "bytes sent to a client over the limit on a TLS port"
            svc.wait_for_log(r"refused connection from 127\.0\.0\.1: ")
            with pytest.raises(ServiceUnavailable), client_of(pki.jdls(svc)) as second:
                second.lock(data_file(tmp_path), "other")
