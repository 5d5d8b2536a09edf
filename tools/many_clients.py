"""Many clients at once: how long N clients take to connect and lock, and what each lock server costs.

A real ``jdls -ib`` in a temporary instance (its table sized for the clients, ``--max-clients`` and
``--max-per-address`` raised to let every one of them in from 127.0.0.1), then N clients, each with a
connection of its own (hence a lock server of its own), spread over a few worker processes: each client
connects and locks a record of its own, and holds it until every client has. A client says what
``dls_client.Client`` says on the way: Hello, its lock information (InfoPut), the Lock, its lock information
again. By default the workers speak the protocol themselves (dls_proto on plain sockets), so that thousands
of clients cost this machine little beside the service; ``--library`` makes each a ``dls_client.Client``
instead, whose watcher thread per client makes a worker of hundreds of them slow (a real application server
has one Client per process).

The figures: the wall time from the first connection to the last grant, and the slowest client's
connect+lock; the private memory (USS: Private_Clean + Private_Dirty of smaps_rollup) of a sample of lock
servers and of the listener; the machine's memory taken (MemAvailable before and while every client holds
its lock, the clients' own included); the CPU a client cost, each on the same 2 cores when the tool runs on
the service's host: the listener's (/proc/PID/schedstat, over the run), a lock server's (the sample's
median, from its fork to its client's last message) and the client side's (the worker processes', from
getrusage), which a real client host would spend elsewhere.

Every process of this tool raises its own RLIMIT_NOFILE soft limit to the hard one (a worker holds a
socket per client). Figures, not a test: nothing is asserted (tests/test_many_clients.py is the test).

Usage: python tools/many_clients.py [--clients N ...] [--processes P] [--port PORT] [--sample K] [--library]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection as Connection_

import psutil
from dls_client import Client, Config, FileRef, Server
from dls_proto import Acquired, Connection, Granted, InfoPut, Lock, Mode, Role, Welcome, identity, receive
from dls_shm import LISTENER, Instance

FILE = FileRef(1483651, "ac/FBNK.ACCOUNT")


def raise_nofile() -> int:
    """This process's RLIMIT_NOFILE soft limit raised to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cpu_seconds(pid: int) -> float:
    """The CPU time ``pid`` has had so far (the first field of /proc/PID/schedstat, in nanoseconds)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0]) / 1e9


def children_cpu() -> float:
    """The CPU time of this process's ended and collected children (the workers), user and system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def uss(pid: int) -> int:
    """The private memory of ``pid`` in bytes (Private_Clean + Private_Dirty of smaps_rollup)."""
    return int(psutil.Process(pid).memory_full_info().uss)


@contextmanager
def service(root: str, port: int, clients: int) -> Iterator[Instance]:
    """``jdls -ib`` in ``root``, a table of two lock slots a client, every client let in; stopped and removed
    afterwards."""
    env = {**os.environ, "JBCRELEASEDIR": root}
    jdls = [sys.executable, "-m", "dls_daemon"]
    records = max(13000, 2 * clients)
    limit = str(clients + 16)
    subprocess.run([*jdls, f"-ibs{records},50", "--port", str(port), "--max-clients", limit,
                    "--max-per-address", limit], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        yield Instance.from_environment(root)
    finally:
        subprocess.run([*jdls, "-k"], env=env, stdout=subprocess.DEVNULL, timeout=120)
        subprocess.run([*jdls, "-K"], env=env, stdout=subprocess.DEVNULL, timeout=60)


def _document(key: bytes | None) -> bytes:
    """The lock information a Client publishes: none held yet, then the lock it took (dls_client.lockinfo)."""
    files = [{"path": FILE.path, "inode": FILE.inode}] if key else []
    locks = [{"path": FILE.path, "inode": FILE.inode, "key": key.decode(), "mode": "EX", "state": "held",
              "thread": 1}] if key else []
    return json.dumps({"files": files, "locks": locks}).encode()


def protocol_client(port: int, key: bytes) -> socket.socket:
    """A connection that has said Hello, its lock information, and holds ``key`` (RuntimeError otherwise)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(Role.CLIENT)

    def answer() -> object:
        return receive(conn, lambda: sock.recv(65536))

    sock.sendall(conn.send(identity.hello("many_clients", port=port)))
    if not isinstance(welcome := answer(), Welcome):
        raise RuntimeError(f"answered {welcome!r}")
    sock.sendall(conn.send(InfoPut(1, _document(None))) + conn.send(
        Lock(2, Mode.EX, 0, 0, 1, FILE.inode, 0, key, FILE.path)))
    if not isinstance(granted := answer(), (Granted, Acquired)):  # Acquired from a service of protocol 4
        raise RuntimeError(f"answered {granted!r}")
    sock.sendall(conn.send(InfoPut(3, _document(key))))
    return sock


def worker(port: int, first: int, count: int, library: bool, go: Connection_, out: Connection_) -> None:
    """``count`` clients, each connected and locking its own record (keys from ``first``), when told to go;
    reports (seconds each took, error or None), then holds the locks until told to stop."""
    raise_nofile()
    config = Config(server=Server("127.0.0.1", port))
    go.recv()
    held: list[Client | socket.socket] = []
    times: list[float] = []
    error = None
    try:
        for i in range(first, first + count):
            key = b"CLIENT%07d" % i
            started = time.monotonic()
            if library:
                client = Client(config)
                held.append(client)
                client.lock(FILE, key)
            else:
                held.append(protocol_client(port, key))
            times.append(time.monotonic() - started)
    except Exception as exc:  # reported to the parent, which prints it
        error = f"{type(exc).__name__}: {exc}"
    out.send((times, error))
    go.recv()  # stop
    for one in held:
        one.close()


@dataclass
class Result:
    clients: int
    locked: int
    wall: float
    slowest: float
    p50: float
    servers_uss: list[int]
    listener_uss: int
    memory_taken: int
    errors: list[str]
    #: CPU seconds: the listener's over the run, each sampled lock server's so far, the workers' in all.
    listener_cpu: float
    servers_cpu: list[float]
    clients_cpu: float


def run(clients: int, processes: int, port: int, sample: int, library: bool) -> Result:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="dls-many-") as root, service(root, port, clients) as instance:
        listener_pid = int(instance.pid_file(LISTENER).read_text().split()[0])
        before = mem_available()
        listener_cpu = cpu_seconds(listener_pid)
        clients_cpu = children_cpu()
        share, extra = divmod(clients, processes)
        pipes, workers = [], []
        first = 0
        for p in range(processes):
            count = share + (p < extra)
            go_r, go_w = ctx.Pipe(duplex=False)
            out_r, out_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker, args=(port, first, count, library, go_r, out_w))
            proc.start()
            pipes.append((go_w, out_r))
            workers.append(proc)
            first += count
        try:
            started = time.monotonic()
            for go_w, _ in pipes:
                go_w.send("go")
            times: list[float] = []
            errors: list[str] = []
            for _, out_r in pipes:
                t, error = out_r.recv()
                times.extend(t)
                if error:
                    errors.append(error)
            wall = time.monotonic() - started
            taken = before - mem_available()
            listener_cpu = cpu_seconds(listener_pid) - listener_cpu
            servers = [int(p.stem) for p in instance.servers_dir.glob("*.pid") if p.stem.isdigit()]
            sampled = random.sample(servers, min(sample, len(servers)))
            servers_uss = sorted(uss(pid) for pid in sampled)
            servers_cpu = sorted(cpu_seconds(pid) for pid in sampled)
            listener_uss = uss(listener_pid)
        finally:
            for go_w, _ in pipes:
                go_w.send("stop")
            for proc in workers:
                proc.join(120)
        clients_cpu = children_cpu() - clients_cpu
        return Result(clients, len(times), wall, max(times, default=0.0), statistics.median(times) if times else 0.0,
                      servers_uss, listener_uss, taken, errors, listener_cpu, servers_cpu, clients_cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--processes", type=int, default=8, help="client processes (default 8)")
    parser.add_argument("--port", type=int, default=None, help="the service's port (default: a free one)")
    parser.add_argument("--sample", type=int, default=20, help="lock servers whose USS is read (default 20)")
    parser.add_argument("--library", action="store_true", help="each client a dls_client.Client (default: the "
                        "protocol spoken on a plain socket)")
    args = parser.parse_args(argv)
    limit = raise_nofile()
    print(f"RLIMIT_NOFILE {limit}; {os.cpu_count()} cores; MemAvailable {mem_available() / 2**30:.1f} GiB")
    mb = 1024 * 1024
    for n in args.clients:
        r = run(n, args.processes, args.port or free_port(), args.sample, args.library)
        kind = "Client objects" if args.library else "protocol clients"
        print(f"{r.clients} {kind} ({args.processes} processes): {r.locked} locked in {r.wall:.1f} s "
              f"(connect+lock per client: median {r.p50 * 1000:.0f} ms, slowest {r.slowest:.2f} s)")
        if r.servers_uss:
            print(f"  lock server USS over {len(r.servers_uss)}: min {r.servers_uss[0] / mb:.2f} MB, median "
                  f"{statistics.median(r.servers_uss) / mb:.2f} MB, max {r.servers_uss[-1] / mb:.2f} MB; "
                  f"listener USS {r.listener_uss / mb:.2f} MB")
        print(f"  memory taken (MemAvailable, clients included): {r.memory_taken / 2**30:.2f} GiB, "
              f"{r.memory_taken / max(1, r.locked) / mb:.2f} MB a client")
        if r.servers_cpu:
            per = 1000 / max(1, r.locked)
            print(f"  CPU a client: listener {r.listener_cpu * per:.2f} ms, lock server (median of "
                  f"{len(r.servers_cpu)}) {statistics.median(r.servers_cpu) * 1000:.2f} ms, client side "
                  f"{r.clients_cpu * per:.2f} ms")
        for error in r.errors:
            print(f"  error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
