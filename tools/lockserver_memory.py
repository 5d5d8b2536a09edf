"""What a lock server's private memory goes to, point by point from its fork to its client served.

A forked lock server shares the listener's pages until either process writes to one; a page written (if only
for a reference count) is then the lock server's alone. This tool starts a real ``jdls -ib`` (as
``many_clients.py`` does) with a probe (``tools/lockserver_probe/sitecustomize.py``) that marks the points
of each lock server's start, connects N clients one after the other (each Hello, InfoPut, Lock, InfoPut, as
``dls_client.Client`` says it) and prints the median private memory (USS, MiB) at each point and what each
step added. ``--pause S`` makes the listener sleep S seconds after each fork, so that the first points show
the child's own work (the listener's writes after the fork copy pages into the child too); ``--calls`` adds,
for one lock server, the functions it called from its ``first`` point to served and how many distinct pages
they are on, by module.

The probe is a ``sitecustomize`` put first on the service's PYTHONPATH: it shadows any other for that
service. Figures, not a test: see docs/benchmarks.md, "Issue 13, third round: a lock server's memory".

Usage: python tools/lockserver_memory.py [--clients N] [--port PORT] [--pause S] [--calls]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import many_clients

PROBE = Path(__file__).resolve().parent / "lockserver_probe"


def marks(directory: Path) -> dict[str, list[int]]:
    """Each point's USS (kB) over the lock servers that reported, in the order of the points."""
    points: dict[str, list[int]] = {}
    for path in sorted(directory.glob("marks-*.txt")):
        for word in path.read_text(encoding="ascii").split():
            name, kb = word.split("=")
            points.setdefault(name, []).append(int(kb))
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=30, help="clients, one after the other (default 30)")
    parser.add_argument("--port", type=int, default=None, help="the service's port (default: a free one)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds the listener sleeps after each fork")
    parser.add_argument("--calls", action="store_true", help="also list one lock server's calls, by module")
    args = parser.parse_args(argv)
    many_clients.raise_nofile()
    port = args.port or many_clients.free_port()
    with tempfile.TemporaryDirectory(prefix="dls-probe-") as probe_dir:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE), os.environ.get("PYTHONPATH")]))
        os.environ["DLS_PROBE_DIR"] = probe_dir
        if args.pause:
            os.environ["DLS_PROBE_PAUSE"] = str(args.pause)
        if args.calls:
            os.environ["DLS_PROBE_CALLS"] = "1"
        reports = Path(probe_dir)
        with tempfile.TemporaryDirectory(prefix="dls-memory-") as root, many_clients.service(root, port, args.clients):
            clients = [many_clients.protocol_client(port, b"PROBE%07d" % i) for i in range(args.clients)]
            deadline = time.monotonic() + 60
            while len(list(reports.glob("marks-*.txt"))) < args.clients and time.monotonic() < deadline:
                time.sleep(0.1)
            for client in clients:
                client.close()
        points = marks(reports)
        if not points:
            print("no lock server reported (is the probe on PYTHONPATH?)", file=sys.stderr)
            return 1
        print(f"{len(next(iter(points.values())))} lock servers; USS median (MiB) at each point, and each step's:")
        before = 0.0
        for name, kbs in points.items():
            median = statistics.median(kbs) / 1024
            print(f"  {name:12} {median:5.2f}  {median - before:+5.2f}")
            before = median
        if args.calls:
            calls = sorted(reports.glob("calls-*.txt"))
            if calls:
                print(calls[0].read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
