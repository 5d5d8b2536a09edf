"""Fencing tokens checked on a recorded history (issue 14): contender processes take a lock, record each grant's
and conversion's token with the time, and one is SIGKILLed holding it; the tokens, in the order they were
recorded, must strictly increase, the killed holder's followed by greater ones."""

from __future__ import annotations

import itertools
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from .waiting import wait_for


def contended_run_with_a_kill(start: Callable[[Path, int], subprocess.Popen[bytes]], outs: list[Path],
                              rounds: int, hang: int) -> None:
    """Start a contender per file of ``outs`` (``start(out, hang_at)``: it writes "token time" lines, two a
    round, and hangs holding the lock at round ``hang_at``); the first hangs at ``hang`` and is SIGKILLed
    there, the others run ``rounds`` rounds; then check the history they recorded."""
    procs = [start(out, hang if n == 0 else rounds) for n, out in enumerate(outs)]
    try:
        wait_for(lambda: outs[0].exists() and len(outs[0].read_text().splitlines()) == 2 * hang + 1, 30,
                 "the first contender to hold the lock at its hanging round")
        procs[0].send_signal(signal.SIGKILL)
        for proc in procs[1:]:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
    history = sorted((int(stamp), int(token), n) for n, out in enumerate(outs)
                     for token, stamp in (line.split() for line in out.read_text().splitlines()))
    assert len(history) == 2 * hang + 1 + (len(outs) - 1) * 2 * rounds
    tokens = [token for _, token, _ in history]
    assert all(a < b for a, b in itertools.pairwise(tokens)), history
    # the killed holder's last token is followed by greater ones from the others
    assert max(i for i, (_, _, n) in enumerate(history) if n == 0) < len(history) - 1
