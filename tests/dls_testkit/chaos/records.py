"""The records of a chaos run: one small file per record, both what is locked and the counter it guards.

A counter is a fixed-width decimal number, read with one ``pread`` and written with one ``pwrite`` at
offset 0, so a worker killed at any moment leaves either the old value or the new one, never half of it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Width of a counter's text (digits, then a newline).
WIDTH = 21


def key(record: int) -> str:
    """The record key locked for record number ``record``."""
    return f"R{record}"


def create(directory: Path, count: int) -> list[Path]:
    """``count`` record files in ``directory``, each counter at 0."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / key(i) for i in range(count)]
    for path in paths:
        path.write_bytes(_text(0))
    return paths


def load(fd: int) -> int:
    """The counter in the open record file ``fd``."""
    return int(os.pread(fd, WIDTH, 0))


def store(fd: int, value: int) -> None:
    """Write ``value`` as the counter of the open record file ``fd``."""
    os.pwrite(fd, _text(value), 0)


def value_of(path: Path) -> int:
    """The counter in the record file at ``path``."""
    return int(path.read_bytes())


def _text(value: int) -> bytes:
    return f"{value:0{WIDTH - 1}d}\n".encode()
