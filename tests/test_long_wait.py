"""A lock wait longer than the client's acknowledgement TIMEOUT: granted, not timed out, and idle meanwhile.

Issue 4's check is "a lock held for two minutes by one process while another
waits with the default TIMEOUT (30 s): the waiter neither times out nor
busy-loops (its lock server's CPU stays near zero)". This is its scaled-down
form: the lock is held for ``HOLD`` = 40 s rather than 120 s, to keep the
suite short. 40 s is enough to prove the mechanism, because it is longer than
the default TIMEOUT (30 s) with a margin of two interim periods (5 s each): a
waiter that did not restart its acknowledgement timeout on every interim
"Waiting" message would give up (AcknowledgementTimeout) about 30 s into the
wait, so one that is still waiting after 40 s, and is then granted, does
restart it, and nothing in the mechanism depends on the length of the wait
beyond that (120 s is only more interim periods of the same kind).

That the acknowledgement timeout is live while a request waits is shown
elsewhere: tests/test_abandoned_request.py (waiters of TIMEOUT=2 whose lock
server stops answering give up). Here the default waiter must have been told
it waits about every 5 s, so surviving 40 s is the interim messages' doing.
(A control of ``TIMEOUT=2`` no longer gives up: since issue 12 a client tells
its lock server its timeout and gets its interim messages within it, see
tests/test_interim_timeout.py.)

Alongside, a second waiter with ``JDLS=...,WAIT`` (no interim messages, no
acknowledgement timeout at all) waits for the same lock over the same 40 s:
it must be granted too, after the first, and be just as idle.

Measured on the development VM (psutil user+system CPU seconds over the 40 s
of the wait, ~37 s of it: from both waiters being connected to just before the release):
default waiter's dls-lock 0.00-0.01 s, its lock server 0.00-0.01 s; WAIT
waiter's dls-lock 0.00 s, its lock server 0.00 s. The bound, ``CPU_BOUND`` =
0.1 s, is about ten times the largest of these; a loop that polled even every
10 ms would spend well over that in 40 s.

By hand, the full two-minute check (a lock service on port P; ``ps`` samples
during the wait, 110 s in; the waiter's lines name its lock server pid)::

    export JDLS=SERVER=localhost,P; touch F; dls-lock F K sleep 120 & sleep 1; dls-lock F K date & sleep 110; \
      ps -o pid,time,args -p "$!,$(pgrep -d, -f 'jdls|dls_daemon')"; wait

the waiter prints "waiting for F K, held by ... (lock server pid N)" once (with
JDLS VERBOSE, a "Waiting #... still waiting" trace line every 5 s) and then the
date after about 120 s (no "did not answer"), and ``ps`` shows TIME 00:00:00
for the waiter (``dls-lock F K date``) and its lock server N.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from dls_testkit import DLS_LOCK, KEY, Service, lock_holder, running, wait_for

#: How long the waiters wait (from the default waiter's first interim message to the release).
HOLD = 40.0
#: The client's default acknowledgement TIMEOUT, which HOLD must exceed.
DEFAULT_TIMEOUT = 30.0
#: The lock server's period between interim "Waiting" messages (dls_daemon.context).
INTERIM_PERIOD = 5.0
#: The most CPU time (user + system, seconds) a waiting process may use over HOLD seconds.
CPU_BOUND = 0.1




def cpu(pid: int) -> float:
    """User + system CPU seconds used so far by the process (not its children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def lock_server_of(service: Service, client_pid: int) -> int | None:
    """The pid of the lock server serving the client ``client_pid`` (from its proc/info file)."""
    try:
        info = json.loads((service.root / "proc" / "info" / f"{client_pid}@127.0.0.1").read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = info.get("server_pid")
    return pid if isinstance(pid, int) and pid in service.server_pids() else None


def granted_at(path: Path) -> float:
    """The time the waiter's command wrote (``date +%s.%N``), i.e. when it had the lock."""
    return float(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(HOLD + 60)
def test_wait_longer_than_timeout_is_granted_and_idle(service: Service, tmp_path: Path) -> None:
    assert HOLD >= DEFAULT_TIMEOUT + 2 * INTERIM_PERIOD
    assert "TIMEOUT" not in service.env["JDLS"] and "WAIT" not in service.env["JDLS"], service.env["JDLS"]
    data = tmp_path / "FBNK.ACCOUNT"
    data.touch()
    held, got_default, got_wait = tmp_path / "held", tmp_path / "got.default", tmp_path / "got.wait"
    err_default, err_wait = tmp_path / "default.err", tmp_path / "wait.err"

    holder = lock_holder(service, data, held, seconds=300)
    with running(holder):

        # the default waiter: JDLS as the service's, no TIMEOUT option, so TIMEOUT=30 s; VERBOSE traces each
        # interim message (dls-lock says "waiting for" once)
        with err_default.open("wb") as err:
            default = subprocess.Popen(
                [DLS_LOCK, str(data), KEY, "sh", "-c", f"date +%s.%N > {shlex.quote(str(got_default))}"],
                env=dict(service.env, JDLS=service.env["JDLS"] + ",VERBOSE"), stdin=subprocess.DEVNULL, stderr=err)
        with running(default):
            wait_for(lambda: "waiting for" in err_default.read_text() or default.poll() is not None, 10,
                     "the default waiter to say it waits")
            assert default.poll() is None, f"the default waiter ended ({default.returncode}): {err_default.read_text()}"
            requested = time.time()
            started = time.monotonic()

            # the WAIT waiter: no interim messages, no acknowledgement timeout
            wait_env = dict(service.env, JDLS=service.env["JDLS"] + ",WAIT")
            with err_wait.open("wb") as err:
                waiter = subprocess.Popen(
                    [DLS_LOCK, str(data), KEY, "sh", "-c",
                     f"date +%s.%N > {shlex.quote(str(got_wait))}"],
                    env=wait_env, stdin=subprocess.DEVNULL, stderr=err)
            with running(waiter):
                servers: dict[str, int] = {}

                def both_served() -> bool:
                    for name, proc in (("default", default), ("wait", waiter)):
                        pid = lock_server_of(service, proc.pid)
                        if pid is not None:
                            servers[name] = pid
                    return len(servers) == 2 or waiter.poll() is not None

                wait_for(both_served, 10, "a lock server for each waiter")
                assert waiter.poll() is None, f"the WAIT waiter ended ({waiter.returncode}): {err_wait.read_text()}"
                time.sleep(1.0)  # let the WAIT waiter's request reach its lock server before measuring
                pids = {"default waiter": default.pid, "default waiter's lock server": servers["default"],
                        "WAIT waiter": waiter.pid, "WAIT waiter's lock server": servers["wait"]}
                before = {name: cpu(pid) for name, pid in pids.items()}
                measured_from = time.monotonic()

                time.sleep(max(0.0, started + HOLD - time.monotonic()))

                assert default.poll() is None, (f"the default waiter ended ({default.returncode}) after "
                                                f"{time.monotonic() - started:.1f} s: {err_default.read_text()}")
                assert waiter.poll() is None, f"the WAIT waiter ended ({waiter.returncode}): {err_wait.read_text()}"
                assert not got_default.exists() and not got_wait.exists(), "a waiter got the lock while it was held"
                used = {name: cpu(pid) - before[name] for name, pid in pids.items()}
                span = time.monotonic() - measured_from
                report = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in used.items())
                print(f"\nCPU over {span:.1f} s of waiting: {report}")

                released = time.time()
                holder.send_signal(signal.SIGTERM)
                assert holder.wait(timeout=10) == 128 + signal.SIGTERM, f"the holder ended with {holder.returncode}"
                assert default.wait(timeout=10) == 0, err_default.read_text()
                assert waiter.wait(timeout=10) == 0, err_wait.read_text()

    # it waited: longer than TIMEOUT, the whole time the lock was held, and was served once it was released
    for name, path in (("default", got_default), ("WAIT", got_wait)):
        when = granted_at(path)
        assert when >= released, f"the {name} waiter got the lock {released - when:.3f} s before the release"
        assert when - requested > HOLD - 1.0 > DEFAULT_TIMEOUT, (
            f"the {name} waiter got the lock only {when - requested:.1f} s after asking")
        assert when - released < 2.0, f"the {name} waiter got the lock {when - released:.2f} s after the release"
    # the default waiter was kept alive by interim messages (one at once, then one every INTERIM_PERIOD)
    interims = len(re.findall(r"Waiting #\d+ still waiting", err_default.read_text()))
    assert interims >= HOLD // INTERIM_PERIOD, f"only {interims} interim messages in {HOLD} s"
    assert err_default.read_text().count("dls-lock: waiting for") == 1, "dls-lock says it waits once"
    assert "waiting for" not in err_wait.read_text(), "the WAIT waiter was sent interim messages"
    assert "timed out" not in err_default.read_text() and "did not answer" not in err_default.read_text()
    # and idled meanwhile
    busy = {name: seconds for name, seconds in used.items() if seconds >= CPU_BOUND}
    assert not busy, f"CPU over {span:.1f} s of waiting above {CPU_BOUND} s: {report}"
