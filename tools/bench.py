"""The lock/unlock benchmark: dls figures beside the floors they cannot beat, from one run.

The machine is shared and noisy, so every figure is compared with a floor
measured in the same run, and the ratio is what to read:

- remote cycles (lock then unlock through the real daemon over loopback TCP),
  one client, then eight client processes at once; floor: a Python TCP echo
  round trip over loopback whose reads busy-poll as dls's do (the plain
  blocking echo is shown too: on an idle machine it wakes slower than dls);
- resilient cycles (SERVER2: each lock taken on two services), against the
  one-client figure;
- TLS cycles (the same, one client, to a service with --tls-cert, a throwaway
  certificate made by trustme), against the one-client figure without TLS;
- local cycles (lock then unlock directly in the shared-memory table); floor:
  fcntl.lockf lock then unlock on a local file;
- dls-lock's start-up, a whole process timed from outside (the median of many
  runs): ``dls-lock --help``, and ``dls-lock -n FILE KEY true`` on a free lock
  of the one-client service; beside flock(1) doing the same where it is
  installed (``flock --help``, ``flock -n FILE true``). With PYTHONDONTWRITEBYTECODE
  set no .pyc is kept and every run compiles the sources again: those runs are
  tens of milliseconds slower than an installed dls-lock starts.

Usage: ./dev bench [--seconds S]   (figures, not a test: nothing is asserted)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial

from dls_client import Client, Config, FileRef, Server
from dls_proto import SpinningReader
from dls_shm import LOCAL_IP, Instance, LockTable, Owner, geometry_for

KEY = b"USD163170001"
FILE = FileRef(1483651, "ac/FBNK.ACCOUNT")


def timed(body: Callable[[int], None], seconds: float) -> float:
    """Operations per second of ``body(n)`` (which runs n operations), over about ``seconds``."""
    n = 200
    while True:  # grow the batch until it takes a measurable time
        start = time.perf_counter()
        body(n)
        elapsed = time.perf_counter() - start
        if elapsed > seconds / 10:
            break
        n *= 4
    total, spent = 0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        body(n)
        spent += time.perf_counter() - start
        total += n
    return total / spent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- floors ------------------------------------------------------------------------


def echo_floor(seconds: float, *, spinning: bool = False) -> float:
    """Round trips per second of a plain Python TCP echo over loopback (a forked echo server).

    ``spinning``: both ends read as dls's client and lock servers do (dls_proto's
    SpinningReader, a short busy poll before a blocking recv), so that the floor
    of the remote figures has the same wake-up cost as they have: on an idle
    machine a blocking read wakes slowly, and the plain echo falls below dls.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    pid = os.fork()
    if pid == 0:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        read = SpinningReader(conn).read if spinning else partial(conn.recv, 4096)
        while data := read():
            conn.sendall(data)
        os._exit(0)
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = b"x" * 60  # about the size of a Lock frame
    read = SpinningReader(sock).read if spinning else partial(sock.recv, 4096)

    def body(n: int) -> None:
        for _ in range(n):
            sock.sendall(message)
            read()

    try:
        return timed(body, seconds)
    finally:
        sock.close()
        listener.close()
        os.waitpid(pid, 0)


def lockf_floor(seconds: float, directory: str) -> float:
    """Lock+unlock cycles per second of fcntl.lockf on a local file."""
    fd = os.open(os.path.join(directory, "lockf-floor"), os.O_RDWR | os.O_CREAT, 0o600)

    def body(n: int) -> None:
        for _ in range(n):
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, 5)
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 5)

    try:
        return timed(body, seconds)
    finally:
        os.close(fd)


# -- dls ----------------------------------------------------------------------------


@contextlib.contextmanager
def service(root: str, *options: str) -> Iterator[int]:
    """A real daemon (monitor, listener) in its own instance, started with ``options`` too, stopped and removed
    afterwards."""
    port = free_port()
    env = {**os.environ, "JBCRELEASEDIR": root}
    jdls = [sys.executable, "-m", "dls_daemon"]
    subprocess.run([*jdls, "-ibs13000,50", "--port", str(port), *options], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield port
    finally:
        subprocess.run([*jdls, "-k"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run([*jdls, "-K"], env=env, stdout=subprocess.DEVNULL)


def tls_files(directory: str) -> tuple[str, str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed, as PEM files: (ca, cert, key)."""
    import trustme  # a dev dependency (requirements-dev.txt): only the benchmark needs it

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = tuple(os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key"))
    ca.cert_pem.write_to_path(paths[0])
    issued.cert_chain_pems[0].write_to_path(paths[1])
    issued.private_key_pem.write_to_path(paths[2])
    os.chmod(paths[2], 0o600)
    return paths[0], paths[1], paths[2]


def remote_cycles(client: Client, key: bytes) -> Callable[[int], None]:
    def body(n: int) -> None:
        lock = client.lock
        for _ in range(n):
            lock(FILE, key).release()

    return body


def remote_worker(port: int, index: int, seconds: float, results: multiprocessing.Queue[float]) -> None:
    os.environ["JDLS"] = f"SERVER=127.0.0.1,{port}"
    client = Client()
    client.lock(FILE, b"warm-up").release()
    results.put(timed(remote_cycles(client, KEY + b"%d" % index), seconds))
    client.close()


def remote_parallel(port: int, processes: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[float] = ctx.Queue()
    workers = [ctx.Process(target=remote_worker, args=(port, i, seconds, results)) for i in range(processes)]
    for w in workers:
        w.start()
    total = sum(results.get(timeout=seconds * 20 + 30) for _ in workers)
    for w in workers:
        w.join()
    return total


def local_cycles(root: str, seconds: float) -> float:
    table = LockTable.attach(Instance.from_environment(root).key)
    owner = Owner(os.getpid(), 1, os.getpid(), os.getpid(), LOCAL_IP)

    def body(n: int) -> None:
        lock, unlock = table.lock, table.unlock
        for _ in range(n):
            unlock(lock(owner, FILE.inode, -1, KEY, 5).handle)  # type: ignore[union-attr]

    try:
        return timed(body, seconds)
    finally:
        table.close()


# -- start-up ----------------------------------------------------------------------


def startup(argv: list[str], seconds: float) -> float:
    """The median wall time, in seconds, of running ``argv`` to its end, over about ``seconds`` (at least 5
    runs, after one not counted); output thrown away."""
    times: list[float] = []
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    spent = 0.0
    while spent < seconds or len(times) < 5:
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def startup_rows(root: str, seconds: float) -> list[tuple[str, float, float | None]]:
    """dls-lock's start-up figures (JDLS names the service), each with flock(1)'s when it is installed."""
    dls_lock = os.path.join(os.path.dirname(sys.executable), "dls-lock")
    data = os.path.join(root, "FBNK.ACCOUNT")
    open(data, "a").close()
    flock = shutil.which("flock")
    pairs = [("dls-lock --help", [dls_lock, "--help"], ["--help"]),
             ("dls-lock -n FILE KEY true (free lock)", [dls_lock, "-n", data, KEY.decode(), "true"],
              ["-n", data, "true"])]
    return [(name, startup(ours, seconds), startup([flock, *theirs], seconds) if flock else None)
            for name, ours, theirs in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per figure (default 2)")
    args = parser.parse_args(argv)
    s = args.seconds
    with tempfile.TemporaryDirectory(prefix="dls-bench-") as root:
        print(f"dls benchmark: {os.cpu_count()} cores, {s:g} s per figure; ratio = figure / floor of this run")
        echo = echo_floor(s)
        spin = echo_floor(s, spinning=True)
        lockf = lockf_floor(s, root)
        with service(root) as port:
            os.environ["JDLS"] = f"SERVER=127.0.0.1,{port}"
            client = Client()
            client.lock(FILE, b"warm-up").release()
            one = timed(remote_cycles(client, KEY), s)
            client.close()
            eight = remote_parallel(port, 8, s)
            started = startup_rows(root, s)
            local = local_cycles(root, s)
            os.makedirs(os.path.join(root, "secondary"))
            with service(os.path.join(root, "secondary")) as port2:
                client = Client(Config(server=Server("127.0.0.1", port), server2=Server("127.0.0.1", port2)))
                client.lock(FILE, b"warm-up").release()
                both = timed(remote_cycles(client, KEY), s)
                client.close()
        os.makedirs(os.path.join(root, "tls"))
        ca, cert, key = tls_files(os.path.join(root, "tls"))
        with service(os.path.join(root, "tls"), "--tls-cert", cert, "--tls-key", key) as port:
            client = Client(Config(server=Server("127.0.0.1", port), tls=True, ca=ca))
            client.lock(FILE, b"warm-up").release()
            tls = timed(remote_cycles(client, KEY), s)
            client.close()
        _ = geometry_for  # the table is sized by the daemon (-s13000,50)
    rows = [
        ("TCP echo round trips, blocking reads", echo, None),
        ("TCP echo, busy-poll reads as dls (floor)", spin, None),
        ("remote lock+unlock, 1 client", one, spin),
        ("remote lock+unlock, 8 client processes", eight, spin),
        ("resilient (SERVER2) lock+unlock, 1 client", both, one),
        ("remote lock+unlock, 1 client, TLS", tls, one),
        ("fcntl.lockf lock+unlock (floor)", lockf, None),
        ("local table lock+unlock", local, lockf),
    ]
    for name, value, floor in rows:
        of = "floor" if floor is not one else "without TLS" if value is tls else "1 client"
        ratio = f"{value / floor:5.2f} of {of}" if floor else ""
        print(f"  {name:<42} {value:>11,.0f} /s  {ratio}")
    for name, ours, flock in started:
        beside = f"  flock(1) the same: {flock * 1000:.1f} ms" if flock is not None else "  (no flock(1) here)"
        print(f"  start-up, {name:<37} {ours * 1000:>9.1f} ms {beside}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
