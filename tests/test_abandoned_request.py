"""A request its client gave up on (no answer within JDLS TIMEOUT) must never become a second holder.

Found by the chaos run: a client whose wait outlasted TIMEOUT (interim messages come every 5 s, TIMEOUT
was 2) asked again on the same connection while its first request still waited at its lock server; when
the lock was freed both were granted, the second as a re-entrant grant under the first one's handle, and
the client's release of the grant nobody awaited freed the lock it went on to hold: two holders, nobody
told. Now a request that gets no answer within TIMEOUT gives its connection up (its lock server then
frees the request with everything else it held, whose holders are told first), and asks again through a
new one. Real processes: a holder, and two waiters with TIMEOUT=2 whose lock server is stopped for a while.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dls_testkit import running_service
from dls_testkit.chaos.injector import live_pids, server_of

HOLDER = textwrap.dedent("""
    import sys, time
    from dls_client import Client, DlsError
    client = Client()
    while True:
        try:
            held = client.lock(sys.argv[1], "K")
            break
        except DlsError as exc:
            print("error", type(exc).__name__, flush=True)
    print("granted", time.monotonic(), flush=True)
    time.sleep(float(sys.argv[2]))
    held.ensure_held()
    print("leaving", time.monotonic(), flush=True)
    held.release()
""")


def test_a_request_given_up_on_is_never_granted_beside_the_next(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("x")
    with running_service(tmp_path / "release") as svc:
        env = {**svc.env, "JDLS": svc.jdls_value("TIMEOUT=2")}

        def start(hold: float) -> subprocess.Popen[str]:
            return subprocess.Popen([sys.executable, "-c", HOLDER, str(data), str(hold)], env=env,
                                    stdout=subprocess.PIPE, text=True)

        def lock_server_of(proc: subprocess.Popen[str]) -> int:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                found = server_of(proc.pid, svc.port, live_pids(sorted(svc.instance.servers_dir.glob("*.pid"))))
                if found:
                    return found
                time.sleep(0.05)
            raise AssertionError(f"no lock server found for pid {proc.pid}")

        procs = [start(6)]
        try:
            assert procs[0].stdout is not None
            first = procs[0].stdout.readline()
            assert first.startswith("granted"), first
            procs.append(start(4))
            time.sleep(0.5)
            stopped = lock_server_of(procs[1])
            os.kill(stopped, signal.SIGSTOP)  # the waiter hears nothing for longer than TIMEOUT
            time.sleep(3)
            os.kill(stopped, signal.SIGCONT)
            time.sleep(0.3)
            procs.append(start(1))
            sections = []
            for index, proc in enumerate(procs):
                out, _ = proc.communicate(timeout=40)
                assert proc.returncode == 0, out
                out = (first if index == 0 else "") + out
                times = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
                         if line.startswith(("granted", "leaving"))}
                sections.append((times["granted"], times["leaving"]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        sections.sort()
        for (_, first_left), (second_in, _) in itertools.pairwise(sections):
            assert second_in >= first_left, f"two holders: sections {sections}"
        # the acknowledgement timeout is in the error trace, as every communication error (issue 12, item 6)
        trace = (svc.root / "tmp" / "jbase_error_trace").read_text()
        assert any(f"pid {procs[1].pid}:" in line and "did not answer within 2 seconds" in line
                   for line in trace.splitlines()), trace
