"""One process of the demo's cache step: a cache kept coherent between processes by a lock value block.

A rate (the FBNK.CURRENCY record USD) is read by many processes and changed by few. A reader keeps the rate
in its own memory and, each time it needs it, converts its lock on the record up to PR: the conversion
returns the record's value block, which holds the version the last writer wrote. The same version, and a
valid block: its copy is current, no read of the file needed. Another version, or a block NOT VALID (a
writer ended while it held EX, so its update may be half done): it reads the record again. A writer converts
up to EX, writes the record, and converts back down to NL writing the new version into the value block.

Each process keeps an NL lock on the record from start to end and converts it up and down: a value block
lives only while some lock on its record exists, so the NL locks keep it (and its version) alive.

Usage: demo_cache.py FILE reader STOPFILE  (reads until STOPFILE exists; prints
       "done READS REFRESHES NOTVALID STALE")
       demo_cache.py FILE writer UPDATES [--die]  (--die: after UPDATES updates, take EX once more and be
       killed holding it, as a crashed writer would)
(the service is named by JDLS, the port number by JBCPORTNO).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from dls_client import Client, FileRef, HeldLock, Mode

KEY = "USD"
RECORD = 16
VERSION_BYTES = 8


def rate_of(version: int) -> bytes:
    """The record a writer writes for ``version``: a made-up rate that changes with it, fixed width."""
    return f"{1.0 + version / 1000:<{RECORD - 1}.4f}\n".encode()


def version_in(held: HeldLock) -> int:
    block = held.value_block or b""
    return int.from_bytes(block[:VERSION_BYTES], "big")


def reader(path: str, stop: Path) -> str:
    file = FileRef.of(path)
    fd = os.open(path, os.O_RDONLY)
    reads = refreshes = not_valid = stale = 0
    cached: tuple[int, bytes] | None = None
    with Client() as client:
        held = client.lock(file, KEY, mode=Mode.NL, value_block=True)
        print("ready", flush=True)
        while not stop.exists():
            held.convert(Mode.PR)  # the rate cannot change while PR is held, and the block comes with it
            version, valid = version_in(held), held.value_block_valid
            reads += 1
            if not valid:
                not_valid += 1
            if cached is None or not valid or cached[0] != version:
                cached = (version, os.pread(fd, RECORD, 0))
                refreshes += 1
            if cached[1] != os.pread(fd, RECORD, 0):  # the check a cache exists to avoid: never true here
                stale += 1
            held.convert(Mode.NL)
            time.sleep(0.002)
        held.release()
    os.close(fd)
    return f"done {reads} {refreshes} {not_valid} {stale}"


def writer(path: str, updates: int, die: bool) -> str:
    file = FileRef.of(path)
    fd = os.open(path, os.O_WRONLY)
    with Client() as client:
        held = client.lock(file, KEY, mode=Mode.NL, value_block=True)
        for _ in range(updates):
            held.convert(Mode.EX)
            version = version_in(held) + 1
            os.pwrite(fd, rate_of(version), 0)
            held.convert(Mode.NL, value_block=version.to_bytes(VERSION_BYTES, "big"))
            time.sleep(0.01)
        if die:
            held.convert(Mode.EX)
            os.kill(os.getpid(), signal.SIGKILL)  # killed holding EX, before it wrote anything
        held.release()
    os.close(fd)
    return f"done {updates}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    sub = parser.add_subparsers(dest="role", required=True)
    r = sub.add_parser("reader")
    r.add_argument("stop", type=Path)
    w = sub.add_parser("writer")
    w.add_argument("updates", type=int)
    w.add_argument("--die", action="store_true")
    args = parser.parse_args()
    if args.role == "reader":
        print(reader(args.file, args.stop), flush=True)
    else:
        print(writer(args.file, args.updates, args.die), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
