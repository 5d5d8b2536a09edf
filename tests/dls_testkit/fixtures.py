"""Pytest fixtures more than one package's tests use: forked children (always reaped) and pipes (always
closed). A conftest makes them its own by importing them (``from dls_testkit.fixtures import children``)."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .processes import Children, Pipe


@pytest.fixture
def children() -> Iterator[Children]:
    """Forked children of the test; any still running at the end is killed, reaped, and fails the test."""
    kids = Children()
    try:
        yield kids
    finally:
        kids.check_reaped()


@pytest.fixture
def pipes() -> Iterator[Callable[[], Pipe]]:
    """``pipes()`` makes a Pipe, closed at the end of the test."""
    made: list[Pipe] = []

    def make() -> Pipe:
        made.append(Pipe())
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture(name="env")
def tool_env(tmp_path: Path) -> dict[str, str]:
    """``env``: the environment for running a client tool with nothing of the caller's dls settings: its own
    JBCRELEASEDIR and lock directories under ``tmp_path``, and DATA naming an empty file there."""
    base = {k: v for k, v in os.environ.items() if k not in ("JDLS", "JBCPORTNO", "DLS_IPC_KEY", "JDLS_PORT")}
    data = tmp_path / "data"
    data.write_text("")
    return {**base, "JBCRELEASEDIR": str(tmp_path / "release"), "JDLS_LOCK_DIR": str(tmp_path / "jbase"),
            "JDLS_BINARY_LOCK_DIR": str(tmp_path / "jbase_lock"), "DATA": str(data)}


#: What a test's programs inherit from the test process: a disposition of SIG_IGN and the signal mask
#: survive exec, so a test that left them changed would change every later program of its worker.
_INHERITED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)


def kernel_signals(pid: int | str = "self") -> tuple[set[int], set[int]]:
    """The signals the kernel has ignored and blocked for ``pid`` (its main thread): what a program started
    from it inherits, whatever Python's own record (``signal.getsignal``) says, which C code can bypass."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith(("SigIgn:", "SigBlk:")))

    def members(mask: str) -> set[int]:
        bits = int(mask, 16)
        return {n for n in range(1, 65) if bits >> (n - 1) & 1}

    return members(fields["SigIgn"]), members(fields["SigBlk"])


@pytest.fixture(autouse=True)
def signals_left_alone() -> Iterator[None]:
    """A test that leaves a signal ignored or blocked in the test process is warned of, and its change undone:
    a dls-lock started later by the same worker would otherwise ignore Ctrl-C, as a background job does."""
    ignored, _ = kernel_signals()
    if signal.SIGINT in ignored or signal.SIGQUIT in ignored:
        # The tests' programs start as a terminal's foreground job's would, whatever the runner was started as:
        # a shell starts a background job (``./dev test &``) with INT and QUIT ignored, and so every program
        # of ours it starts (a dls-lock would rightly leave Ctrl-C alone, as a background job does).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        ignored, _ = kernel_signals()
    dispositions = {signum: signal.getsignal(signum) for signum in _INHERITED}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    changed = [signal.Signals(signum).name for signum, was in dispositions.items() if signal.getsignal(signum) != was]
    now_ignored, _ = kernel_signals()
    changed += [f"{signal.Signals(signum).name} ignored in the kernel" for signum in _INHERITED
                if signum in now_ignored - ignored]
    if changed:
        for signum, was in dispositions.items():
            signal.signal(signum, was)
    now = signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if now != mask:
        changed.append(f"mask {sorted(signal.Signals(s).name for s in now)}")
    if changed:
        warnings.warn(f"the test changed the test process's signals ({', '.join(changed)}); undone", stacklevel=1)
