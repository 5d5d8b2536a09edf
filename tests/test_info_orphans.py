"""The proc/info documents of a killed lock server go with it (second audit of issue 12).

A lock server removes its remote client's document when it ends; killed
(SIGKILL) it cannot, and show-item-locks and list-open-files went on showing a
client that was gone. The monitor's tidy removes the documents whose writer,
the lock server they name (``server_pid``, and its start time against a reused
pid), is dead: never a live lock server's, never another user's, never through
a symlink. Against a real ``jdls -ib`` with a one-second tidy period and raw
protocol clients (which do not connect again, so nothing writes the document
anew).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_proto import Connection, Echo, EchoReply, InfoPut
from dls_shm import LISTENER, info, pidfiles
from dls_testkit import Service, greet, make_service, receive, wait_for

pytestmark = pytest.mark.slow

#: The tidy period the service is started with, and how long the test gives the monitor beyond it.
TIDY, MARGIN = 1, 4


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with make_service(tmp_path).checked() as service:
        service.start("--tidy-seconds", str(TIDY))
        yield service


def published(svc: Service, port: int) -> tuple[socket.socket, int]:
    """A raw client ``port`` from 127.0.0.1 that sent its lock information; its socket and lock server's pid."""
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
    svc.sockets.append(sock)
    conn: Connection
    conn, welcome = greet(sock, port)
    sock.sendall(conn.send(InfoPut(2, b'{"files": [{"path": "/data/FBNK.ACCOUNT", "inode": 4711}]}')))
    sock.sendall(conn.send(Echo(3, b"")))  # InfoPut is not answered: the Echo's reply says it was taken
    receive(sock, conn, EchoReply)
    return sock, int(welcome.server_pid)


def documents_of(svc: Service) -> tuple[int, Path, int, Path]:
    """Two raw clients that published their documents: the lock server and document of each."""
    _, first = published(svc, 1000)
    _, second = published(svc, 1001)
    paths = svc.instance.info_dir / "1000@127.0.0.1", svc.instance.info_dir / "1001@127.0.0.1"
    assert [json.loads(p.read_text())["server_pid"] for p in paths] == [first, second]
    return first, paths[0], second, paths[1]


def test_a_killed_lock_servers_document_goes_and_no_other(svc: Service, tmp_path: Path) -> None:
    killed, gone, _, kept = documents_of(svc)
    # A document of a live process with the pid its writer had (a reused pid: another start time) goes too;
    # one that names a live pid without a start time (an earlier version's) cannot be judged and stays.
    reused = info.write(svc.instance, 1002, {"server_pid": os.getpid(), "server_started": 1.0}, ip="127.0.0.3")
    unjudged = info.write(svc.instance, 1003, {"server_pid": os.getpid()}, ip="127.0.0.3")
    # A symlink planted in proc/info is not followed: neither it nor what it points at is touched.
    outside = tmp_path / "outside"
    outside.write_text(json.dumps({"server_pid": killed, "server_started": 1.0}))
    planted = svc.instance.info_dir / "1004@127.0.0.4"
    planted.symlink_to(outside)

    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: not gone.exists() and not reused.path.exists(), TIDY + MARGIN,
             "the killed lock server's document to be removed")
    assert kept.exists(), "a live lock server's document was removed"
    assert unjudged.path.exists(), "a document that could not be judged was removed"
    assert planted.is_symlink() and outside.exists()
    # The document goes first and the line that says so follows: wait for the line, not only the file.
    svc.wait_for_log(r"removed \d proc/info document\(s\) of dead lock servers: .*1000@127\.0\.0\.1", MARGIN)
    planted.unlink()


def test_the_monitor_removes_the_document_of_a_lock_server_no_listener_reaps(svc: Service) -> None:
    """The listener removes a killed child's document at once; a lock server whose listener is gone (killed
    with it, or of an earlier listener) is no one's child: the monitor's tidy removes its document."""
    killed, gone, living, kept = documents_of(svc)
    listener = pidfiles.read(svc.instance.pid_file(LISTENER))
    assert listener is not None
    os.kill(listener.pid, signal.SIGKILL)
    wait_for(lambda: not listener.alive(), 5, "the listener to die")
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: not gone.exists(), TIDY + MARGIN, "the monitor to remove the killed lock server's document")
    assert kept.exists(), "a live lock server's document was removed"
    svc.wait_for_log(r"removed 1 proc/info document\(s\) of dead lock servers: 1000@127\.0\.0\.1$", MARGIN)
    os.kill(living, signal.SIGKILL)  # no listener to stop it
    wait_for(lambda: not psutil.pid_exists(living), 5, "the other lock server to die")


def test_without_a_table_the_listener_removes_a_killed_lock_servers_document(tmp_path: Path) -> None:
    """``jdls -ibD`` runs no monitor: the listener that reaps the killed lock server removes its document."""
    with make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        svc.start("--lock-dir", str(svc.lock_dir), "--binary-lock-dir", str(svc.binary_lock_dir))
        killed, gone, _, kept = documents_of(svc)
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not gone.exists(), MARGIN, "the listener to remove the killed lock server's document")
        assert kept.exists(), "a live lock server's document was removed"
