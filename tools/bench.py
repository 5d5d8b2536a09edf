"""The lock/unlock benchmark: what users run, beside the floors and references measured in the same run.

A cycle is a lock then its unlock. Every case runs in real forked processes: they
all start and set up (connect, attach, warm up), meet at a barrier, then each
counts its cycles for --seconds, so that start-up is not counted. Keys are drawn
at random from 10,000 (the draws prebuilt, so that drawing costs nothing);
processes "on their own keys" draw from disjoint shares of them; "one key" is
all processes on the same key, contended.

- dls, through the public API: ``Client`` (remote, through a real jdls started in
  a temporary JBCRELEASEDIR) and ``LocalClient`` (in that service's table); one
  process, N processes on their own keys, N on one key. For several processes the
  total rate and each process's (min, max, and the spread: the largest distance of
  one from their mean, the fairness figure); for one key also the wait (from
  asking for the lock to getting it) at p50 and p99, and p99 in hand-offs (p99
  divided by the mean hand-off time, one over the total rate).
- Floors: a forking Python TCP echo server (one forked child per connection, as
  the lock servers are; blocking reads) with 1 and N client processes, one round
  trip a cycle; fcntl.lockf on a file, 1 and N processes on their own byte ranges
  and N on one byte.
- References for the client library's cost: the raw table (dls_shm's LockTable
  lock and unlock) against LocalClient; the bare protocol round trip (Lock frames
  prebuilt with dls-proto's codec sent on one greeted connection to the same
  service, each Acquired read with dls's own busy-poll reader and its handle put
  into a prebuilt Unlock frame) against Client. Both also with N processes (the
  bare trip beside the echo's N, the raw table on own keys beside its 1): what the
  service and the table alone allow N clients, the client library costing nothing.
- The asyncio client (``dls_client.aio.AsyncClient``, one connection, no thread): one task, and N tasks of
  one loop on their own keys, beside Client's one process, N threads of one process sharing its Client (on
  their own keys too) and N processes.
- Scraped: Client's cases again on a service started with ``--http``, each measured without and then with
  its /metrics loaded every 100 ms (SCRAPE_PERIOD) by a process of its own (issue 15: scraping never
  slows the lock path measurably).
- Resilient cycles (SERVER2: each lock taken on two services) and TLS cycles (a
  service with --tls-cert, a throwaway trustme certificate), one process, against
  Client's one-process rate.
- dls-lock's start-up, a whole process timed from outside (median of the runs):
  ``dls-lock --help`` and ``dls-lock -n FILE KEY true`` on a free lock, beside
  flock(1) doing the same where it is installed; the time until it asks for the
  lock (from its start to the service's grant, as the service wrote it in the
  lock table), with issue 13's goal; and the whole run again with dls's sources
  compiled at each run (a copy without .pyc), as an install that kept none.
  ``./dev setup`` writes the .pyc of the sources (an editable install has none,
  and PYTHONDONTWRITEBYTECODE stops Python writing any): without them every
  figure of dls-lock includes compiling what it imports (tens of milliseconds).

The table gives each figure, what it is compared with, the ratio, and issue 13's
goal for it with PASS or MISS; beside each, the previous run's value (from the
history file) and the ratio to it. Each run appends one JSON line to the history
(date, git commit, load averages, figures). The machine may be shared and noisy:
read the ratios within one run; compare runs only at the same load.

Usage: ./dev bench [--seconds S] [--processes N] [--history FILE] [--port P] [--quick]
(--port P: P to P+5 are used)
(figures, not a test: nothing is asserted; exit 0 whatever the goals say)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import itertools
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, NamedTuple

from dls_client import REMOTE_DEVICE, Client, Config, FileRef, HeldLock, LocalClient, Server
from dls_proto import (
    CLIENT_MAX_FRAME,
    WAIT_FOREVER,
    Acquired,
    Connection,
    Lock,
    Mode,
    Role,
    SpinningReader,
    Unlock,
    Welcome,
    encode,
    exchange,
    identity,
)
from dls_shm import LOCAL_IP, Instance, LockTable, Owner

FILE = FileRef(1483651, "ac/FBNK.ACCOUNT")
#: The keys a cycle draws from: record ids, as an application's.
KEYS = [b"USD16317%05d" % i for i in range(10_000)]
#: Random draws prebuilt per process (taken in turn, again and again).
DRAWS = 4096
#: Cycles run before the barrier (connections made, code paths warm).
WARM_UP = 200
#: Seconds a worker may take to set up, and beyond --seconds to report.
SETUP_TIMEOUT = 120.0
#: The repository (tools/..); the history is kept under it by default.
REPO = Path(__file__).resolve().parent.parent
HISTORY = REPO / ".bench" / "history.jsonl"
#: The size of the echo's message: about a Lock frame's.
ECHO_MESSAGE = b"x" * 62


class BenchError(Exception):
    """The benchmark cannot go on (a service that does not start, a worker that failed): said in one line."""


# -- the harness: forked workers, a barrier, a deadline ---------------------------------------------------


class Cycle(NamedTuple):
    """What one worker runs: ``unlock(lock(draw))`` is a cycle, for each of ``draws`` in turn; ``close``
    lets go of what the worker set up. ``timed``, when given, measures instead of ``measure`` (a worker whose
    cycles run in several threads or tasks of its own): given the seconds, (cycles, seconds they took)."""

    lock: Callable[[Any], Any]
    unlock: Callable[[Any], object]
    draws: Sequence[Any]
    close: Callable[[], object]
    timed: Callable[[float], tuple[int, float]] | None = None


#: Sets up a worker's Cycle in the worker itself (after the fork): given its index, how many workers
#: there are, and whether they all use one key.
Prepare = Callable[[int, int, bool], Cycle]


class Outcome(NamedTuple):
    """One case: each process's rate (cycles per second), and the waits for the lock (seconds, sorted;
    measured only when the processes share one key)."""

    rates: list[float]
    waits: list[float]


def draws_of(pool: Sequence[Any], index: int, processes: int, contended: bool) -> list[Any]:
    """A worker's prebuilt draws: the first of ``pool`` when contended, else random picks from its own share
    (every ``processes``-th element from ``index``), the same for the same worker in every run."""
    if contended:
        return [pool[0]]
    return random.Random(index).choices(pool[index::processes], k=DRAWS)


def measure(cycle: Cycle, seconds: float, waits: array[float] | None) -> tuple[int, float]:
    """Run cycles for ``seconds``: how many, and the time they took. With ``waits``, each cycle's time from
    asking for the lock to getting it is appended there (and the clock read at every cycle)."""
    lock, unlock, clock = cycle.lock, cycle.unlock, time.perf_counter
    count = 0
    start = clock()
    end = start + seconds
    if waits is None:  # the clock read once per 16 cycles: nothing between two cycles but the loop
        chunks = [cycle.draws[i:i + 16] for i in range(0, len(cycle.draws), 16)]
        while True:
            for chunk in chunks:
                for draw in chunk:
                    unlock(lock(draw))
                count += len(chunk)
                if clock() >= end:
                    return count, clock() - start
    record = waits.append
    for draw in itertools.cycle(cycle.draws):
        asked = clock()
        held = lock(draw)
        got = clock()
        unlock(held)
        record(got - asked)
        count += 1
        if got >= end:
            break
    return count, clock() - start


def _worker(prepare: Prepare, index: int, processes: int, contended: bool, seconds: float,
            barrier: Any, results: multiprocessing.Queue[tuple[int, int, float, bytes, str | None]]) -> None:
    """One process of a case: set up, warm up, wait for the others, measure, report (or report why not)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers and cleans up
    try:
        cycle = prepare(index, processes, contended)
        try:
            for draw in itertools.islice(itertools.cycle(cycle.draws), WARM_UP if not contended else 1):
                cycle.unlock(cycle.lock(draw))
            barrier.wait(SETUP_TIMEOUT)
            waits = array("d") if contended else None
            count, elapsed = measure(cycle, seconds, waits) if cycle.timed is None else cycle.timed(seconds)
        finally:
            cycle.close()
        results.put((index, count, elapsed, waits.tobytes() if waits is not None else b"", None))
    except BaseException as exc:  # whatever it is, the parent says it
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, 0, 0.0, b"", f"{type(exc).__name__}: {exc}"))


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C ignored meanwhile: cleaning up is not cut short (programs started now ignore it too)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(prepare: Prepare, processes: int, seconds: float, *, contended: bool = False) -> Outcome:
    """Run a case in ``processes`` forked workers that start measuring together; BenchError if one fails."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes + 1)
    results: multiprocessing.Queue[tuple[int, int, float, bytes, str | None]] = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(prepare, i, processes, contended, seconds, barrier, results),
                           daemon=True) for i in range(processes)]
    reported = False
    try:
        for w in workers:
            w.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(SETUP_TIMEOUT)  # all set up: they measure from now
        got = [results.get(timeout=seconds + SETUP_TIMEOUT) for _ in workers]
        reported = True
    except queue.Empty:
        raise BenchError(f"a worker did not report within {seconds + SETUP_TIMEOUT:g} s") from None
    finally:
        with uninterrupted():  # interrupted or failed: the workers killed at once (the table's semaphore is
            for w in workers:  # taken with SEM_UNDO: a worker killed holding it gives it back)
                if not reported and w.is_alive():
                    w.kill()
                w.join()
    errors = sorted((error for *_, error in got if error), key=lambda e: e.startswith("BrokenBarrierError"))
    if errors:
        raise BenchError(errors[0])
    rates = [count / elapsed for _, count, elapsed, _, _ in got]
    waits: array[float] = array("d")
    for *_, data, _ in got:
        waits.frombytes(data)
    return Outcome(rates, sorted(waits))


def percentile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q / 100))]


def figures_of(name: str, outcome: Outcome) -> dict[str, float]:
    """The figures of a case named ``name``: its total rate; with several processes .min, .max and .spread
    (the largest distance of one process's rate from their mean, over the mean); with waits .p50_ms,
    .p99_ms and .p99_handoffs (p99 over the mean hand-off time, one over the total rate)."""
    total = sum(outcome.rates)
    figures = {name: total}
    if len(outcome.rates) > 1:
        mean = statistics.fmean(outcome.rates)
        figures.update({f"{name}.min": min(outcome.rates), f"{name}.max": max(outcome.rates),
                        f"{name}.spread": max(abs(r - mean) for r in outcome.rates) / mean})
    if outcome.waits:
        p99 = percentile(outcome.waits, 99)
        figures.update({f"{name}.p50_ms": percentile(outcome.waits, 50) * 1000, f"{name}.p99_ms": p99 * 1000,
                        f"{name}.p99_handoffs": p99 * total})
    return figures


def _nothing(_: object) -> None:
    """The unlock of a cycle that has none (an echo round trip)."""


# -- floors ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def echo_server(port: int) -> Iterator[tuple[str, int]]:
    """A forking TCP echo server on 127.0.0.1 (``port``, 0 for any): one forked child per connection, which
    echoes with blocking reads. Killed with its children (its own process group) at the end."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
            while True:
                conn, _ = listener.accept()
                if os.fork() == 0:
                    listener.close()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    while data := conn.recv(4096):
                        conn.sendall(data)
                    os._exit(0)
                conn.close()
        finally:
            os._exit(0)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # done here too: killpg must find the group even if the child has not run yet
    address = listener.getsockname()
    listener.close()
    try:
        yield address
    finally:
        with uninterrupted():
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def echo_prepare(address: tuple[str, int], index: int, processes: int, contended: bool) -> Cycle:
    """One round trip of a message of a Lock frame's size a cycle."""
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send, recv, size = sock.sendall, sock.recv, len(ECHO_MESSAGE)

    def trip(_: object) -> None:
        send(ECHO_MESSAGE)
        data = recv(4096)
        while len(data) < size:
            data += recv(4096)

    return Cycle(trip, _nothing, [None] * 16, sock.close)


def lockf_prepare(path: str, index: int, processes: int, contended: bool) -> Cycle:
    """fcntl.lockf of one byte of ``path``, at an offset drawn as a key is (byte 0 when contended)."""
    fd = os.open(path, os.O_RDWR)
    lockf, ex, un = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN

    def lock(offset: int) -> int:
        lockf(fd, ex, 1, offset)
        return offset

    def unlock(offset: int) -> None:
        lockf(fd, un, 1, offset)

    return Cycle(lock, unlock, draws_of(range(len(KEYS)), index, processes, contended), partial(os.close, fd))


# -- references --------------------------------------------------------------------------------------------


class UnlockFrame(NamedTuple):
    """Where a grant's frame (Acquired: the service speaks protocol 4 with the bench) carries its handle, and an
    Unlock frame around a handle, from dls-proto's codec: the bare round trip copies the handle from one to the
    other without decoding or encoding."""

    granted_size: int
    handle_at: int
    prefix: bytes
    suffix: bytes

    @classmethod
    def from_codec(cls) -> UnlockFrame:
        marker = 0x0123456789ABCDEF
        granted = encode(Acquired(1, marker, Mode.EX, 0, 1, 0, b""))
        unlock = encode(Unlock(2, marker))
        for raw in (marker.to_bytes(8, "big"), marker.to_bytes(8, "little")):
            at, u_at = granted.find(raw), unlock.find(raw)
            if at >= 0 and u_at >= 0:
                return cls(len(granted), at, unlock[:u_at], unlock[u_at + 8:])
        raise BenchError("dls-proto's Acquired and Unlock frames do not carry the handle as 8 bytes")


def bare_prepare(port: int, index: int, processes: int, contended: bool) -> Cycle:
    """The bare protocol round trip: a greeted connection to the service; per cycle a prebuilt Lock frame
    sent, its Acquired read (dls's busy-poll reader, as the client's), an Unlock frame sent (unanswered)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
    welcome = exchange(sock, conn, identity.hello(program="bench"))
    if not isinstance(welcome, Welcome):
        raise BenchError(f"the service answered Hello with {welcome!r}")
    thread = identity.thread_id()
    frames = {key: encode(Lock(1, Mode.EX, 0, WAIT_FOREVER, thread, FILE.inode, REMOTE_DEVICE, key, FILE.path))
              for key in (KEYS[:1] if contended else KEYS[index::processes])}
    size, at, prefix, suffix = UnlockFrame.from_codec()
    read, send = SpinningReader(sock).read, sock.sendall

    def lock(frame: bytes) -> bytes:
        send(frame)
        reply = read()
        while len(reply) < size:
            reply += read()
        return reply

    def unlock(reply: bytes) -> None:
        send(prefix + reply[at:at + 8] + suffix)

    draws = [frames[k] for k in draws_of(KEYS, index, processes, contended)]
    first = lock(draws[0])
    conn.receive_data(first)
    if not isinstance(granted := conn.next_event(), Acquired):
        raise BenchError(f"the service answered a bare Lock with {granted!r}")
    unlock(first)
    return Cycle(lock, unlock, draws, sock.close)


def raw_prepare(key: int, index: int, processes: int, contended: bool) -> Cycle:
    """dls-shm's LockTable.lock and unlock, straight on the service's table."""
    table = LockTable.attach(key)
    pid = os.getpid()
    owner = Owner(pid, 1, pid, pid, LOCAL_IP)
    take = partial(table.lock, owner, FILE.inode, REMOTE_DEVICE)

    def lock(key: bytes) -> int:
        return take(key, Mode.EX).handle  # type: ignore[union-attr]

    return Cycle(lock, table.unlock, draws_of(KEYS, index, processes, contended), table.close)


# -- dls ---------------------------------------------------------------------------------------------------


def client_prepare(config: Config, index: int, processes: int, contended: bool) -> Cycle:
    """``Client(config).lock(FILE, key)`` then the HeldLock's ``release()``."""
    client = Client(config)
    return Cycle(partial(client.lock, FILE), HeldLock.release, draws_of(KEYS, index, processes, contended),
                 client.close)


def own_draws(index: int, processes: int, owners: int) -> list[list[bytes]]:
    """The draws of each of a worker's ``owners`` (threads or tasks), each on keys of its own."""
    return [draws_of(KEYS, index * owners + i, processes * owners, False) for i in range(owners)]


def threads_prepare(config: Config, threads: int, index: int, processes: int, contended: bool) -> Cycle:
    """``threads`` threads of one process sharing one ``Client(config)`` (its one connection), each its own
    keys: Client's figure beside the asyncio client's tasks."""
    client = Client(config)
    shares = own_draws(index, processes, threads)

    def timed(seconds: float) -> tuple[int, float]:
        results: list[tuple[int, float]] = []

        def run(draws: list[bytes]) -> None:
            results.append(measure(Cycle(partial(client.lock, FILE), HeldLock.release, draws, client.close), seconds,
                                   None))
        workers = [threading.Thread(target=run, args=(draws,)) for draws in shares]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if len(results) < threads:
            raise BenchError("a thread of the Client's threads case failed")
        return sum(count for count, _ in results), max(took for _, took in results)

    return Cycle(partial(client.lock, FILE), HeldLock.release, shares[0], client.close, timed)


def aio_prepare(config: Config, tasks: int, index: int, processes: int, contended: bool) -> Cycle:
    """``tasks`` asyncio tasks of one loop sharing one ``AsyncClient(config)``, each its own keys: per cycle
    ``await client.lock(FILE, key)`` then ``await held.release()``."""
    import asyncio

    from dls_client.aio import AsyncClient, AsyncHeldLock

    loop = asyncio.new_event_loop()
    client = AsyncClient(config)
    shares = own_draws(index, processes, tasks)
    clock = time.perf_counter

    async def take(key: bytes) -> AsyncHeldLock:
        return await client.lock(FILE, key)

    async def cycles(draws: list[bytes], end: float) -> int:
        lock, count = client.lock, 0
        chunks = [draws[i:i + 16] for i in range(0, len(draws), 16)]
        while True:
            for chunk in chunks:
                for key in chunk:
                    await (await lock(FILE, key)).release()
                count += len(chunk)
                if clock() >= end:
                    return count

    async def together(seconds: float) -> tuple[int, float]:
        start = clock()
        counts = await asyncio.gather(*(cycles(draws, start + seconds) for draws in shares))
        return sum(counts), clock() - start

    def close() -> None:
        loop.run_until_complete(client.close())
        loop.close()

    return Cycle(lambda key: loop.run_until_complete(take(key)),
                 lambda held: loop.run_until_complete(held.release()), shares[0], close,
                 lambda seconds: loop.run_until_complete(together(seconds)))


def local_prepare(index: int, processes: int, contended: bool) -> Cycle:
    """``LocalClient().lock(FILE, key)`` (the table of JBCRELEASEDIR's instance) then ``release()``."""
    client = LocalClient()
    if client.table is None:
        raise BenchError("LocalClient found no table: it would lock with OS file locks")
    return Cycle(partial(client.lock, FILE), HeldLock.release, draws_of(KEYS, index, processes, contended),
                 client.close)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def service(root: str, port: int, *options: str) -> Iterator[int]:
    """A real daemon (monitor, listener) in its own instance at ``root`` on ``port`` (0: a free one), started
    with ``options`` too, stopped and its table removed afterwards."""
    port = port or free_port()
    env = {**os.environ, "JBCRELEASEDIR": root}
    jdls = [sys.executable, "-m", "dls_daemon"]
    started = subprocess.run([*jdls, "-ibs13000,50", "--port", str(port), *options], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    try:
        if started.returncode != 0:
            raise BenchError(f"jdls -ib --port {port} failed ({started.returncode}): {started.stderr.strip()}")
        yield port
    finally:
        with uninterrupted():
            subprocess.run([*jdls, "-k"], env=env, stdout=subprocess.DEVNULL, check=False)
            subprocess.run([*jdls, "-K"], env=env, stdout=subprocess.DEVNULL, check=False)


#: How often the scraped cases load /metrics (seconds).
SCRAPE_PERIOD = 0.1
#: The scraper: loads its URL every period until SIGTERM, then prints how many loads succeeded and failed. It
#: says "ready" once its first load is done (and its SIGTERM handler in place), and the measure begins then.
SCRAPER = """
import signal, sys, time, urllib.request
url, period = sys.argv[1], float(sys.argv[2])
done = failed = 0
def stop(*_):
    print(done, failed, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
try:
    urllib.request.urlopen(url, timeout=5).read()
    done += 1
except OSError:
    failed += 1
print("ready", flush=True)
while True:
    began = time.monotonic()
    try:
        urllib.request.urlopen(url, timeout=5).read()
        done += 1
    except OSError:
        failed += 1
    time.sleep(max(0.0, period - (time.monotonic() - began)))
"""


@contextlib.contextmanager
def scraping(url: str, period: float) -> Iterator[None]:
    """A process that loads ``url`` every ``period`` seconds while the block runs; BenchError when no load
    succeeded."""
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url, str(period)], stdout=subprocess.PIPE, text=True)
    try:
        assert scraper.stdout is not None
        scraper.stdout.readline()  # "ready": its first load done (or "" if it died: said below)
        yield
    finally:
        scraper.terminate()
        out, _ = scraper.communicate(timeout=30)
    done, failed = (int(x) for x in (out.split() or ["0", "0"]))
    if not done or failed:
        raise BenchError(f"scraping {url}: {done} loads succeeded, {failed} failed")


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


# -- start-up ----------------------------------------------------------------------------------------------


#: Issue 13's goal for dls-lock's start-up until the service grants a free lock (milliseconds, .pyc kept):
#: about what the interpreter (15 ms), the imports taking a lock needs (socket, threading, argparse, the
#: protocol's messages and codec, the client) and the service's start of a new connection's lock server (a fork
#: and its start: 5 ms or more, which dls-lock spends on the rest of its own start, having connected first)
#: cost on a quiet machine of 2 cores (docs/benchmarks.md).
GRANTED_GOAL_MS = 50.0


def timed(run: Callable[[], float], seconds: float, runs: int) -> float:
    """The median, in milliseconds, of what ``run`` measures (seconds), over about ``seconds`` (at least ``runs``
    runs, after one not counted)."""
    run()
    times: list[float] = []
    while sum(times) < seconds or len(times) < runs:
        times.append(run())
    return statistics.median(times) * 1000


def whole_run(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], float]:
    """A run of ``argv`` timed from its start to its end (output thrown away)."""
    def run() -> float:
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=env)
        return time.perf_counter() - start
    return run


def until_granted(lock: list[str], table: LockTable) -> Callable[[], float]:
    """A run of ``lock`` (dls-lock and its options, FILE and KEY: a free lock), timed from its start to the
    moment the service granted its lock, as the service wrote it in the lock's slot of ``table`` (its
    timestamp, time.time(); this machine's clock, as the start's): the time dls-lock takes to ask, and
    a loopback hop and the lock server's grant. Read from the table, not through a relay in the connection:
    nothing stands between dls-lock and the service to slow it. The command tells when the lock is held
    (a line on its standard output) and waits for its standard input to close."""
    argv = [*lock, "sh", "-c", "echo held; exec cat >/dev/null"]

    def run() -> float:
        start = time.time()
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            held = proc.stdout.readline()
            granted = [e.slot.timestamp for e in table.scan() if e.slot.client_pid == proc.pid]
            proc.stdin.close()
        if not held or not granted:
            raise BenchError(f"dls-lock {' '.join(lock[1:])} did not hold its lock (exit {proc.returncode})")
        return granted[0] - start
    return run


def startup_figures(root: str, port: int, seconds: float, runs: int) -> dict[str, float]:
    """dls-lock's start-up (through the service on ``port``, whose instance is at ``root``): --help, a free
    lock taken whole, until the service grants it, and whole again with no .pyc (dls's sources compiled at
    each run); flock(1)'s doing the same when installed."""
    dls_lock = os.path.join(os.path.dirname(sys.executable), "dls-lock")
    data = os.path.join(root, "FBNK.ACCOUNT")
    open(data, "a").close()
    os.environ["JDLS"] = f"SERVER=127.0.0.1,{port}"
    lock = [dls_lock, "-n", data, KEYS[0].decode()]
    # dls's sources copied without their bytecode, first on the path, none written: dls-lock compiles every
    # module of dls it imports at each run, as from an install that kept no .pyc (the standard library's kept).
    sources = os.path.join(root, "no-pyc")
    for package in sorted((REPO / "packages").iterdir()):
        shutil.copytree(package / "src", sources, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    compiling = {**os.environ, "PYTHONPATH": sources, "PYTHONDONTWRITEBYTECODE": "1"}
    table = LockTable.attach(Instance.from_environment(root).key)
    try:
        figures = {"startup.help": timed(whole_run([dls_lock, "--help"]), seconds, runs),
                   "startup.lock": timed(whole_run([*lock, "true"]), seconds, runs),
                   "startup.granted": timed(until_granted(lock, table), seconds, runs),
                   "startup.lock_compiling": timed(whole_run([*lock, "true"], compiling), seconds, runs)}
    finally:
        table.close()
    flock = shutil.which("flock")
    if flock:
        figures["flock.help"] = timed(whole_run([flock, "--help"]), seconds, runs)
        figures["flock.lock"] = timed(whole_run([flock, "-n", data, "true"]), seconds, runs)
    return figures


# -- the run -----------------------------------------------------------------------------------------------


def measure_all(args: argparse.Namespace, root: str, progress: Callable[[str], None]) -> dict[str, float]:
    """Every figure of the run, by name (see FIGURES)."""
    seconds, n = args.seconds, args.processes
    ports = iter(range(args.port, args.port + 6)) if args.port else itertools.repeat(0)
    figures: dict[str, float] = {}

    def case(name: str, prepare: Prepare, processes: int, contended: bool = False) -> None:
        progress(name)
        figures.update(figures_of(name, run(prepare, processes, seconds, contended=contended)))

    with echo_server(next(ports)) as address:
        case("echo.single", partial(echo_prepare, address), 1)
        case("echo.parallel", partial(echo_prepare, address), n)
    path = os.path.join(root, "lockf")
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    case("lockf.single", partial(lockf_prepare, path), 1)
    case("lockf.parallel", partial(lockf_prepare, path), n)
    case("lockf.contended", partial(lockf_prepare, path), n, True)

    os.environ["JBCRELEASEDIR"] = root  # LocalClient's instance, and dls-lock's
    with service(root, next(ports)) as port:
        config = Config(server=Server("127.0.0.1", port))
        case("bare.single", partial(bare_prepare, port), 1)
        case("bare.parallel", partial(bare_prepare, port), n)
        case("remote.single", partial(client_prepare, config), 1)
        case("remote.parallel", partial(client_prepare, config), n)
        case("remote.contended", partial(client_prepare, config), n, True)
        case("remote.threads", partial(threads_prepare, config, n), 1)
        case("aio.single", partial(aio_prepare, config, 1), 1)
        case("aio.tasks", partial(aio_prepare, config, n), 1)
        case("raw.single", partial(raw_prepare, Instance.from_environment(root).key), 1)
        case("raw.parallel", partial(raw_prepare, Instance.from_environment(root).key), n)
        case("local.single", local_prepare, 1)
        case("local.parallel", local_prepare, n)
        case("local.contended", local_prepare, n, True)
        progress("start-up")
        figures.update(startup_figures(root, port, seconds, 2 if args.quick else 5))
        secondary = os.path.join(root, "secondary")
        os.makedirs(secondary)
        with service(secondary, next(ports)) as port2:
            pair = Config(server=Server("127.0.0.1", port), server2=Server("127.0.0.1", port2))
            case("server2.single", partial(client_prepare, pair), 1)
    scraped_root = os.path.join(root, "scraped")
    os.makedirs(scraped_root)
    lock_port, http_port = next(ports), next(ports) or free_port()
    with service(scraped_root, lock_port, "--http", f"127.0.0.1:{http_port}") as port:
        config = Config(server=Server("127.0.0.1", port))
        for name, processes, contended in (("single", 1, False), ("parallel", n, False), ("contended", n, True)):
            # Each case without, then with, the scraper, side by side: the machine's load changes less between.
            case(f"http.{name}", partial(client_prepare, config), processes, contended)
            with scraping(f"http://127.0.0.1:{http_port}/metrics", SCRAPE_PERIOD):
                case(f"scraped.{name}", partial(client_prepare, config), processes, contended)
    tls_root = os.path.join(root, "tls")
    os.makedirs(tls_root)
    ca, cert, key = tls_files(tls_root)
    with service(tls_root, next(ports), "--tls-cert", cert, "--tls-key", key) as port:
        case("tls.single", partial(client_prepare, Config(server=Server("127.0.0.1", port), tls=True, ca=ca)), 1)
    return figures


class Goal(NamedTuple):
    """Issue 13's goal for a ratio (or a figure without a reference): ``op`` is ">=", "<=" or "<"."""

    op: str
    value: float

    def met(self, x: float) -> bool:
        return x >= self.value if self.op == ">=" else x <= self.value if self.op == "<=" else x < self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:.2g}"


class Row(NamedTuple):
    """A line of the table: ``figure``'s value; with ``against``, the ratio figure / against (``per_cycle``:
    the ratio of times per cycle, against / figure); ``goal`` applies to the ratio, or to the value without
    ``against``."""

    figure: str
    label: str
    against: str | None = None
    goal: Goal | None = None
    per_cycle: bool = False


def rows(n: int) -> list[Row]:
    """The table, in order; ``n`` is the number of processes of the parallel cases."""
    fair, p99 = Goal("<=", 0.20), Goal("<", 8)
    return [
        Row("echo.single", "floor: TCP echo (forking), 1 process"),
        Row("echo.parallel", f"floor: TCP echo (forking), {n} processes"),
        Row("lockf.single", "floor: fcntl.lockf, 1 process"),
        Row("lockf.parallel", f"floor: fcntl.lockf, {n} processes, own bytes"),
        Row("lockf.contended", f"floor: fcntl.lockf, {n} processes, one byte"),
        Row("lockf.contended.spread", "  its fairness (spread)"),
        Row("lockf.contended.p50_ms", "  its wait p50"),
        Row("lockf.contended.p99_ms", "  its wait p99"),
        Row("lockf.contended.p99_handoffs", "  its wait p99 in hand-offs"),
        Row("bare.single", "reference: bare protocol round trip"),
        Row("bare.parallel", f"reference: bare protocol round trip, {n} processes", "echo.parallel"),
        Row("raw.single", "reference: raw table (dls_shm)"),
        Row("raw.parallel", f"reference: raw table, {n} processes, own keys", "raw.single"),
        Row("remote.single", "Client, 1 process", "echo.single"),
        Row("remote.single", "Client, 1 process, time per cycle", "bare.single", Goal("<=", 1.2), per_cycle=True),
        Row("remote.parallel", f"Client, {n} processes, own keys", "echo.parallel", Goal(">=", 0.5)),
        Row("remote.parallel", f"Client, {n} processes, own keys", "bare.parallel"),
        Row("remote.parallel.spread", "  its fairness (spread)"),
        Row("remote.contended", f"Client, {n} processes, one key", "remote.single", Goal(">=", 0.5)),
        Row("remote.contended.spread", "  its fairness (spread)", goal=fair),
        Row("remote.contended.p50_ms", "  its wait p50"),
        Row("remote.contended.p99_ms", "  its wait p99"),
        Row("remote.contended.p99_handoffs", "  its wait p99 in hand-offs", goal=p99),
        Row("remote.threads", f"Client, {n} threads of 1 process, own keys", "remote.single"),
        Row("aio.single", "AsyncClient (asyncio), 1 task", "remote.single"),
        Row("aio.tasks", f"AsyncClient, {n} tasks of 1 loop, own keys", "aio.single"),
        Row("aio.tasks", f"AsyncClient, {n} tasks of 1 loop, own keys", "remote.threads"),
        Row("aio.tasks", f"AsyncClient, {n} tasks of 1 loop, own keys", "remote.parallel"),
        Row("local.single", "LocalClient, 1 process", "lockf.single"),
        Row("local.single", "LocalClient, 1 process", "raw.single", Goal(">=", 1 / 1.5)),
        Row("local.parallel", f"LocalClient, {n} processes, own keys", "local.single", Goal(">=", 1.0)),
        Row("local.parallel", f"LocalClient, {n} processes, own keys", "lockf.parallel"),
        Row("local.parallel.spread", "  its fairness (spread)"),
        Row("local.contended", f"LocalClient, {n} processes, one key", "local.single", Goal(">=", 0.2)),
        Row("local.contended", f"LocalClient, {n} processes, one key", "lockf.contended"),
        Row("local.contended.spread", "  its fairness (spread)", goal=fair),
        Row("local.contended.p50_ms", "  its wait p50"),
        Row("local.contended.p99_ms", "  its wait p99"),
        Row("local.contended.p99_handoffs", "  its wait p99 in hand-offs", goal=p99),
        Row("http.single", "Client, 1 process, service with --http", "remote.single"),
        Row("scraped.single", "  /metrics scraped every 100 ms", "http.single"),
        Row("http.parallel", f"Client, {n} processes, own keys, --http", "remote.parallel"),
        Row("scraped.parallel", "  /metrics scraped every 100 ms", "http.parallel"),
        Row("http.contended", f"Client, {n} processes, one key, --http", "remote.contended"),
        Row("scraped.contended", "  /metrics scraped every 100 ms", "http.contended"),
        Row("http.contended.p99_ms", "  its wait p99"),
        Row("scraped.contended.p99_ms", "  its wait p99, scraped", "http.contended.p99_ms"),
        Row("server2.single", "Client, SERVER2 (resilient), 1 process", "remote.single"),
        Row("tls.single", "Client, TLS, 1 process", "remote.single"),
        Row("startup.help", "start-up: dls-lock --help", "flock.help"),
        Row("startup.lock", "start-up: dls-lock -n FILE KEY true", "flock.lock"),
        Row("startup.granted", "  until it asks (the service's grant)", goal=Goal("<", GRANTED_GOAL_MS)),
        Row("startup.lock_compiling", "  whole, no .pyc (sources compiled)", "flock.lock"),
    ]


def shown(name: str, value: float, figures: dict[str, float] | None = None, *, per_cycle: bool = False) -> str:
    """A figure as the table shows it, by the kind its name says: a spread with the lowest and highest rate
    when ``figures`` has them; a rate as the time per cycle when ``per_cycle``."""
    if per_cycle:
        return f"{1e6 / value:.1f} µs/cycle"
    if name.endswith(".spread"):
        low, high = (figures or {}).get(name[:-7] + ".min"), (figures or {}).get(name[:-7] + ".max")
        beside = f" ({low:,.0f}-{high:,.0f})" if low is not None and high is not None else ""
        return f"±{value * 100:.0f}%{beside}"
    if name.endswith("_ms") or name.startswith(("startup.", "flock.")):
        return f"{value:,.{2 if value >= 1 else 3}f} ms"
    if name.endswith("_handoffs"):
        return f"{value:.1f}"
    return f"{value:,.0f} /s"


#: How the "against" column names a figure.
SHORT = {"echo.single": "echo 1", "echo.parallel": "echo N", "lockf.single": "lockf 1", "lockf.parallel": "lockf N",
         "lockf.contended": "lockf 1 byte", "bare.single": "bare trip", "raw.single": "raw table",
         "bare.parallel": "bare trip N", "remote.contended": "Client 1 key",
         "remote.single": "Client 1", "remote.threads": "Client N thr", "remote.parallel": "Client N proc",
         "http.single": "--http 1", "http.parallel": "--http N", "http.contended": "--http 1 key",
         "http.contended.p99_ms": "unscraped",
         "aio.single": "Async 1", "local.single": "Local 1", "flock.help": "flock(1)", "flock.lock": "flock(1)"}


def table(figures: dict[str, float], previous: dict[str, float], n: int) -> list[str]:
    """The printed table: each row's value, what it is set against and the ratio, the goal and PASS or MISS,
    the previous run's value and now/previous."""
    lines = [f"{'figure':<44} {'value':>22}  {'against':<12} {'ratio':>6}  {'goal':<7} {'':4}  "
             f"{'previous':>14} {'now/prev':>8}"]
    for row in rows(n):
        value = figures.get(row.figure)
        if value is None:
            continue
        ratio_text, goal_text, verdict = "", "", ""
        measured: float | None = value
        if row.against is not None:
            base = figures.get(row.against)
            measured = None if not base else (base / value if row.per_cycle else value / base)
            ratio_text = f"{measured:6.2f}" if measured is not None else "     -"
        if row.goal is not None:
            goal_text = str(row.goal)
            verdict = "" if measured is None else "PASS" if row.goal.met(measured) else "MISS"
        before = previous.get(row.figure)
        prev_text = "" if before is None else shown(row.figure, before, per_cycle=row.per_cycle)
        change = f"{value / before:8.2f}" if before else ""
        against = SHORT.get(row.against, row.against) if row.against else ""
        text = shown(row.figure, value, figures, per_cycle=row.per_cycle)
        lines.append(f"{row.label:<44} {text:>22}  {against:<12} {ratio_text:>6}  "
                     f"{goal_text:<7} {verdict:4}  {prev_text:>14} {change:>8}".rstrip())
    return [*lines, LEGEND]


LEGEND = """\
ratio: value / against's (a time per cycle: against's rate / value); goal: issue 13's for the ratio, or for
the value itself. Spread (fairness): the largest distance of one process's rate from their mean, over the
mean (lowest-highest rate beside). Wait: from asking for the lock to getting it; in hand-offs: p99 wait times
the total rate (one over the mean hand-off time). N: --processes."""


# -- the history -------------------------------------------------------------------------------------------


def open_history(path: Path) -> IO[str]:
    """The history file opened to append (made, and its directory, when missing); BenchError when it cannot
    be, before anything is measured."""
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), "a", encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write the history file {path}: {exc.strerror}") from None


def previous_run(path: Path) -> dict[str, Any] | None:
    """The last run recorded in the history file (None if there is none)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and isinstance(entry.get("figures"), dict):
                return entry
    return None


def git_commit() -> tuple[str | None, bool]:
    """The repository's HEAD commit and whether tracked files differ from it ((None, False) outside git)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return head, bool(status.strip())


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 and less than 3600 seconds")
    return value


def processes_count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 2 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes from 2 to 64")
    return int(text)


def port_number(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65532:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 1 to 65532")
    return int(text)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=positive, default=2.0, metavar="S",
                        help="time each figure is measured for (default 2)")
    parser.add_argument("--processes", type=processes_count, default=8, metavar="N",
                        help="processes of the parallel and contended cases (default 8)")
    parser.add_argument("--history", type=Path, default=HISTORY, metavar="FILE",
                        help="the runs' figures, one JSON line a run, appended to and compared with "
                             "(default .bench/history.jsonl in the repository)")
    parser.add_argument("--port", type=port_number, default=0, metavar="P",
                        help="the ports to use: P to P+5 (the echo, four services, an HTTP port); default: free "
                        "ones")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (the test's): start-up figures from 2 runs each")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        history = open_history(args.history)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 73  # EX_CANTCREAT
    previous = previous_run(args.history)
    commit, dirty = git_commit()
    load = os.getloadavg()
    tty = sys.stderr.isatty()

    def progress(name: str) -> None:
        if tty:
            print(f"\rbench: measuring {name:<30}", end="", file=sys.stderr, flush=True)

    with history:
        try:
            with tempfile.TemporaryDirectory(prefix="dls-bench-") as root:
                print(f"dls benchmark: {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
                      f"{args.seconds:g} s per figure, {args.processes} processes; temporary directory {root}",
                      flush=True)
                figures = measure_all(args, root, progress)
        except BenchError as exc:
            print(f"\nbench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nbench: interrupted; everything it started is stopped and removed", file=sys.stderr)
            return 130
        if tty:
            print("\r" + " " * 50 + "\r", end="", file=sys.stderr)
        end_load = os.getloadavg()
        if previous is not None:
            print(f"previous run: {previous.get('date')}, commit {str(previous.get('commit'))[:10]}, load "
                  f"{(previous.get('load') or ['?'])[0]}, {previous.get('seconds', '?')} s per figure, "
                  f"{previous.get('processes', '?')} processes{', quick' if previous.get('quick') else ''}")
        print("\n".join(table(figures, previous.get("figures", {}) if previous else {}, args.processes)))
        print(f"load at the end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}; "
              f"figures appended to {args.history}")
        entry = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "commit": commit,
                 "dirty": dirty, "load": [round(x, 2) for x in load], "load_end": [round(x, 2) for x in end_load],
                 "cores": os.cpu_count(), "seconds": args.seconds, "processes": args.processes, "quick": args.quick,
                 "figures": {k: round(v, 6) for k, v in figures.items()}}
        history.write(json.dumps(entry) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
