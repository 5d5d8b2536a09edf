"""A big lock table: the monitor's tidy-up, and the tools that list every lock (issue 13, item 5).

Makes a table of ``--records`` locks (default 1,000,000, in groups of 50) under an IPC key of its own, fills
``--locks`` of them (default 100,000) from ``--owners`` real processes (default 8, each its own keys), and
times, each beside the longest wait for the table's semaphore that a prober process saw meanwhile (a
lock+unlock of its own every 0.2 ms: what any locker of the table would have waited, on a busy machine
its scheduling too) and the longest the work held the semaphore itself (``LockTable._acquire`` to
``_release``, timed in this process, where the tools run too: their ``main``, output to a file):

- the tidy the monitor runs (``LockTable.tidy``) with every owner alive: it frees nothing;
- ``jdls -dvL``, ``dls-dump``, ``dls-dump --json`` and ``show-item-locks --local``, their output to a file;
- half the owners then end, and the tidy frees their locks.

Nothing is left behind: the owners are ended and reaped, the table removed, the temporary instance
directory deleted. Run: ``.venv/bin/python tools/bench_bigtable.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sysv_ipc
from dls_shm import LOCAL_IP, LockTable, Owner, geometry_for, ipc_key_for, modes

PROBE_PAUSE = 0.0002


def _fill(table: LockTable, owner: int, count: int, ready: int, go: int) -> None:
    """In a child: take ``count`` locks of distinct keys, say so, then wait for the word to end."""
    rng = random.Random(owner)
    who = Owner(os.getpid(), 1, 10000 + owner, os.getpid(), LOCAL_IP)
    for n in range(count):
        table.lock(who, rng.randrange(1, 1 << 30), 0, b"K%d-%d" % (owner, n), modes.EX)
    os.write(ready, b"x")
    os.read(go, 1)


def _probe(key: int, stop: int, out: int) -> None:
    """In a child: lock and unlock a key of its own until ``stop`` is readable; write the longest cycle (µs)."""
    import select

    table = LockTable.attach(key)
    who = Owner(os.getpid(), 1, 1, os.getpid(), LOCAL_IP)
    longest = 0.0
    while not select.select([stop], [], [], PROBE_PAUSE)[0]:
        started = time.perf_counter()
        grant = table.lock(who, 1, 0, b"probe", modes.EX)
        table.unlock(grant.handle)  # type: ignore[union-attr]
        longest = max(longest, time.perf_counter() - started)
    os.write(out, f"{longest * 1e6:.0f}".encode())


class Prober:
    """A process locking beside the work measured: the longest wait for the semaphore it saw."""

    def __init__(self, key: int) -> None:
        self.stop_r, self.stop_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                _probe(key, self.stop_r, self.out_w)
            finally:
                os._exit(0)

    def longest_ms(self) -> float:
        os.write(self.stop_w, b"x")
        text = os.read(self.out_r, 64)
        os.waitpid(self.pid, 0)
        for fd in (self.stop_r, self.stop_w, self.out_r, self.out_w):
            os.close(fd)
        return int(text) / 1000


class Holds:
    """How long each hold of a table's semaphore by this process lasted."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._since = 0.0
        acquire, release = LockTable._acquire, LockTable._release

        def timed_acquire(table: LockTable) -> None:
            acquire(table)
            self._since = time.perf_counter()

        def timed_release(table: LockTable) -> None:
            self.durations.append(time.perf_counter() - self._since)
            release(table)

        setattr(LockTable, "_acquire", timed_acquire)  # noqa: B010 - a method replaced, as a test would
        setattr(LockTable, "_release", timed_release)  # noqa: B010


HOLDS = Holds()


def timed(what: str, run: Callable[[], object], key: int) -> None:
    prober = Prober(key)
    time.sleep(0.05)
    HOLDS.durations.clear()
    started = time.perf_counter()
    result = run()
    took = time.perf_counter() - started
    longest = prober.longest_ms()
    held = sorted(HOLDS.durations) or [0.0]
    print(f"{what:<26} {took:6.2f} s  {len(held):6d} holds: median {held[len(held) // 2] * 1e3:6.3f} ms, "
          f"99% {held[len(held) * 99 // 100] * 1e3:6.3f}, longest {held[-1] * 1e3:6.2f}; "
          f"a locker waited {longest:6.1f} ms at most  {result or ''}", flush=True)


def in_file(path: Path, main: Callable[[list[str]], int], argv: list[str]) -> Callable[[], str]:
    """Run a tool's ``main(argv)`` here, its standard output to ``path``: its status and line count."""
    def run() -> str:
        sys.stdout.flush()
        saved = os.dup(1)
        with open(path, "wb") as out:
            os.dup2(out.fileno(), 1)
            try:
                status = main(argv)
                sys.stdout.flush()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        lines = path.read_bytes().count(b"\n")
        return f"exit {status}, {lines} lines"
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--locks", type=int, default=100_000)
    parser.add_argument("--owners", type=int, default=8)
    parser.add_argument("--skip-tools", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dls-bigtable-") as tmp:
        root = Path(tmp)
        key = ipc_key_for(root)
        env = {**os.environ, "JBCRELEASEDIR": str(root), "DLS_IPC_KEY": f"0x{key:08x}"}
        env.pop("JDLS", None)
        table, created = LockTable.create(key, geometry_for(args.records, 50))
        assert created
        children: list[tuple[int, int]] = []
        try:
            started = time.perf_counter()
            ready_r, ready_w = os.pipe()
            for n in range(args.owners):
                go_r, go_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    try:
                        _fill(table, n, args.locks // args.owners, ready_w, go_r)
                    finally:
                        os._exit(0)
                os.close(go_r)
                children.append((pid, go_w))
            for _ in children:
                os.read(ready_r, 1)
            g = table.geometry
            print(f"table of {g.locks} locks ({g.ngroups} groups of {g.per_group}, {g.total_size >> 20} MiB), "
                  f"{sum(1 for _ in table.scan())} locks held by {args.owners} processes "
                  f"(filled in {time.perf_counter() - started:.1f} s)", flush=True)
            timed("tidy, every owner alive", table.tidy, key)
            if not args.skip_tools:
                from dls_daemon import cli
                from dls_utils import dump, show_item_locks

                os.environ.update(env)
                for name, tool, argv in (("jdls -dvL", cli.main, ["-dvL"]), ("dls-dump", dump.main, []),
                                         ("dls-dump --json", dump.main, ["--json"]),
                                         ("show-item-locks --local", show_item_locks.main, ["--local"])):
                    timed(name, in_file(root / "out", tool, argv), key)
            half = children[: len(children) // 2]
            for pid, go in half:
                os.write(go, b"x")
                os.waitpid(pid, 0)
            children = children[len(children) // 2:]
            timed(f"tidy, {len(half)} of {args.owners} owners dead", table.tidy, key)
        finally:
            for pid, go in children:
                os.write(go, b"x")
                os.waitpid(pid, 0)
            table.remove()
            for kind in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
                try:
                    kind(key).remove()
                except sysv_ipc.ExistentialError:
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
