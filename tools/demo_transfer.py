"""One application process of the demo: random transfers between accounts of FBNK.ACCOUNT.

The demo starts several of these at once, as several application servers would
run against one database. Each transfer reads two balances, waits a moment (as
real business logic would) and writes both back. With record locks (the
default) the read-modify-write of a transfer is whole; with ``--no-locks`` two
processes can read the same balance and the later write loses the earlier one.

Records are fixed width (``RECORD`` bytes, see ``format_record``), so a record
is read and rewritten in place at ``index * RECORD``. Locks are always taken
in sorted key order: two transfers that need the same two accounts can then
never wait for each other in a cycle.

Usage: demo_transfer.py FILE --accounts N --transfers T --seed S [--no-locks]
(the service is named by JDLS, the port number by JBCPORTNO).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time

from dls_client import Client, DlsError, FileRef

ID_WIDTH = 12
BALANCE_WIDTH = 12
#: Bytes per record: the account id, the balance, a newline.
RECORD = ID_WIDTH + BALANCE_WIDTH + 1


def account_id(index: int) -> str:
    """The record key of account ``index``: a T24-like account number."""
    return f"{10000001 + index}"


def format_record(index: int, balance: int) -> bytes:
    return f"{account_id(index):<{ID_WIDTH}}{balance:>{BALANCE_WIDTH}}\n".encode()


def read_balance(fd: int, index: int) -> int:
    data = os.pread(fd, RECORD, index * RECORD)
    if len(data) != RECORD or data[:ID_WIDTH].decode().strip() != account_id(index):
        raise RuntimeError(f"record {index} is damaged: {data!r}")
    return int(data[ID_WIDTH : ID_WIDTH + BALANCE_WIDTH])


def write_balance(fd: int, index: int, balance: int) -> None:
    os.pwrite(fd, format_record(index, balance), index * RECORD)


def run(path: str, accounts: int, transfers: int, seed: int, locks: bool) -> int:
    """Do ``transfers`` transfers; the number of times a lock had to wait for another process."""
    rng = random.Random(seed)
    file = FileRef.of(path)
    client = Client() if locks else None
    waits = 0

    def waited(_holder: object) -> None:
        nonlocal waits
        waits += 1

    fd = os.open(path, os.O_RDWR)
    try:
        if client is not None:
            client.echo(b"hello")  # connect now, so the demo's snapshot finds every client in the service
        print("ready", flush=True)
        for _ in range(transfers):
            source, target = rng.sample(range(accounts), 2)
            amount = rng.randint(1, 100)
            with contextlib.ExitStack() as held:
                if client is not None:
                    for index in sorted((source, target), key=account_id):
                        held.enter_context(client.lock(file, account_id(index), on_wait=waited))
                from_balance = read_balance(fd, source)
                to_balance = read_balance(fd, target)
                time.sleep(rng.uniform(0, 0.002))  # the business logic: makes unprotected races likely
                write_balance(fd, source, from_balance - amount)
                write_balance(fd, target, to_balance + amount)
    finally:
        os.close(fd)
        if client is not None:
            client.close()
    return waits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo_transfer", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("file", help="the FBNK.ACCOUNT file")
    parser.add_argument("--accounts", type=int, required=True, help="number of records in the file")
    parser.add_argument("--transfers", type=int, required=True, help="transfers to make")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random transfers")
    parser.add_argument("--no-locks", action="store_true", help="take no locks at all (to show lost updates)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        waits = run(args.file, args.accounts, args.transfers, args.seed, not args.no_locks)
    except DlsError as exc:
        print(f"demo_transfer: lock service failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"done {args.transfers} {time.monotonic() - start:.2f} {waits}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
