"""What end-to-end tests do with clients of a service: a data file, a client, who holds a lock, the table.

The record key most tests lock is ``KEY``, the guide's.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_client import Client, LockRefused
from dls_shm import LockTable

from .service import Service
from .waiting import wait_for

KEY = "USD163170001"


def lock_holder(service: Service, data: Path, marker: Path, key: str = KEY,
                seconds: int = 60) -> subprocess.Popen[bytes]:
    """``dls-lock DATA KEY`` running ``sleep SECONDS`` (exec'd by a shell that first touches ``marker``),
    returned once it holds the lock; the caller ends it (``running``). SIGTERM to it ends the sleep and so
    releases the lock."""
    command = f"touch {shlex.quote(str(marker))} && exec sleep {seconds}"
    proc = service.dls_lock_popen(str(data), key, "sh", "-c", command)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 10, "the holder to get its lock")
        assert proc.poll() is None, f"the holder ended with status {proc.returncode}"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def client_for(service: Service, timeout: float = 10.0) -> Client:
    """A Client of ``service`` that gives up after ``timeout`` seconds of silence."""
    return service.client(timeout=timeout)


def data_file(tmp_path: Path, name: str = "FBNK.ACCOUNT") -> Path:
    path = tmp_path / name
    path.touch()
    return path


@contextlib.contextmanager
def attached(service: Service) -> Iterator[LockTable]:
    """The instance's lock table, let go of at the end (jdls -K refuses while anyone is attached)."""
    table = service.table()
    try:
        yield table
    finally:
        table.close()


def slots_of(service: Service, pid: int) -> list[tuple[str, int]]:
    """(key, state) of every slot the process ``pid`` has in the table (read only: nothing is reclaimed)."""
    with attached(service) as table:
        return [(e.slot.key[: e.slot.key_len].decode(), e.slot.state) for e in table.scan() if e.slot.pid == pid]


def header_line(text: str, label: str) -> str:
    """The value of ``label:`` in ``jdls -dv`` output."""
    for line in text.splitlines():
        if line.startswith(label + ":"):
            return line[len(label) + 1:].strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


def holder_of(client: Client, data: Path, key: str) -> Any:
    """Who holds ``key`` (a try_lock that must be refused)."""
    with pytest.raises(LockRefused) as refused:
        client.try_lock(data, key).release()
    return refused.value.holder


def wait_free(client: Client, data: Path, key: str, limit: float, poll: float = 0.25) -> float:
    """Poll try_lock until it is granted (then release it); seconds it took, or more than ``limit``."""
    start = time.monotonic()
    while True:
        try:
            client.try_lock(data, key).release()
            return time.monotonic() - start
        except LockRefused:
            pass
        if time.monotonic() - start > limit:
            return time.monotonic() - start
        time.sleep(poll)


def read_counter(client: Client, counter: Path) -> int:
    """The counter's value, read under its lock (a client already connected, so also a witness)."""
    with client.lock(counter, "counter", timeout=10):
        return int(counter.read_text())

