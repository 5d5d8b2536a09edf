"""A guided tour of dls: money moved between accounts by four processes, with and without locks.

What it shows, in about fifteen seconds and with nothing left behind:

1. a lock service (monitor and listener) started in a throw-away instance;
2. a small FBNK.ACCOUNT file, 10 accounts of 1000;
3. four application processes (as on four application servers) making random
   transfers through the service; the locks held at one instant are shown;
   the total is unchanged because every transfer locked both its records;
4. the same processes without locks: updates are lost and the total is wrong;
5. a cache kept coherent between processes by a lock value block: readers keep a
   rate in memory and read the file again only when the version in the record's
   value block changed, or when the block is NOT VALID because a writer was killed
   while it held the record;
6. the service stopped and its shared memory removed, and a check that no
   process and no IPC resource of the instance remains.

Usage: ./dev demo   (or .venv/bin/python tools/demo.py); exit status 0 only if
the locked run kept the total and the clean-up was complete.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psutil
import sysv_ipc
from dls_shm import Instance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_transfer import RECORD, account_id, format_record  # tools/ is no package: found through sys.path

TOOLS = Path(__file__).resolve().parent
TRANSFER = TOOLS / "demo_transfer.py"
CACHE = TOOLS / "demo_cache.py"
#: Processes of the cache step that read the rate, and how many updates each writer makes.
READERS = 3
UPDATES = 20
JDLS = [sys.executable, "-m", "dls_daemon"]
#: dls-utils' tool, installed beside this Python; without it the demo asks jdls -dL.
SHOW_ITEM_LOCKS = Path(sys.executable).parent / "show-item-locks"
ACCOUNTS = 10
OPENING = 1000
CLIENTS = 4
#: Seconds any one step may take before the demo gives up on it (a client that hangs must fail the demo).
STEP_TIMEOUT = 60.0
#: How long after every client is connected the locks are shown: mid-run, so some are held.
SNAPSHOT_DELAY = 0.2


class DemoFailed(Exception):
    """A step of the demo went wrong; the message says which and why."""


def say(text: str = "") -> None:
    print(text, flush=True)


def show(output: str, indent: str = "    ") -> None:
    """Another program's output, indented under the narration."""
    text = output.rstrip("\n")
    if text:
        say(textwrap.indent(text, indent, lambda _line: True))


def free_port() -> int:
    """A TCP port free now on this host (the OS picks it, so parallel runs do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Demo:
    """One run: its instance directory, its port, and everything it started (to stop it all)."""

    root: Path
    port: int
    transfers: int
    clients: list[subprocess.Popen[str]]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "JBCRELEASEDIR": str(self.root)}

    @property
    def data(self) -> Path:
        return self.root / "data" / "FBNK.ACCOUNT"

    def jdls(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*JDLS, *args], env=self.env, capture_output=True, text=True, timeout=STEP_TIMEOUT)

    # -- the service ---------------------------------------------------------------------

    def start_service(self) -> None:
        say(f"Starting the lock service (instance {self.root}, port {self.port}):")
        say(f"  $ jdls -ibs13000,50 --port {self.port}")
        done = self.jdls("-ibs13000,50", "--port", str(self.port))
        show(done.stdout + done.stderr)
        if done.returncode != 0:
            raise DemoFailed(f"jdls -i failed with status {done.returncode}")

    def stop_service(self) -> list[str]:
        """Stop the service and remove its table; what went wrong (nothing: an empty list)."""
        problems = []
        say("Stopping the lock service and removing its lock table:")
        for option in ("-k", "-K"):
            say(f"  $ jdls {option}")
            try:
                done = self.jdls(option)
            except subprocess.TimeoutExpired:
                problems.append(f"jdls {option} did not finish in {STEP_TIMEOUT:g} s")
                continue
            show(done.stdout + done.stderr)
            if done.returncode != 0:
                problems.append(f"jdls {option} failed with status {done.returncode}")
        return problems

    # -- the accounts --------------------------------------------------------------------

    def create_accounts(self) -> None:
        self.data.parent.mkdir()
        self.reset_accounts()
        say(f"Created {self.data.relative_to(self.root)}: {ACCOUNTS} accounts of {OPENING} "
            f"({RECORD}-byte records, rewritten in place); total {self.total()}.")

    def reset_accounts(self) -> None:
        self.data.write_bytes(b"".join(format_record(i, OPENING) for i in range(ACCOUNTS)))

    def balances(self) -> list[int]:
        data = self.data.read_bytes()
        return [int(data[i * RECORD + 12 : (i + 1) * RECORD - 1]) for i in range(ACCOUNTS)]

    def total(self) -> int:
        return sum(self.balances())

    def show_balances(self) -> int:
        balances = self.balances()
        for i in range(0, ACCOUNTS, 5):
            say("    " + "   ".join(f"{account_id(j)} {balances[j]:>5}" for j in range(i, min(i + 5, ACCOUNTS))))
        return sum(balances)

    # -- the application processes -------------------------------------------------------

    def start_clients(self, locks: bool, seed: int) -> None:
        for n in range(1, CLIENTS + 1):
            env = {**self.env, "JDLS": f"SERVER=127.0.0.1,{self.port}", "JBCPORTNO": str(n)}
            args = [sys.executable, str(TRANSFER), str(self.data), "--accounts", str(ACCOUNTS),
                    "--transfers", str(self.transfers), "--seed", str(seed * 100 + n)]
            if not locks:
                args.append("--no-locks")
            self.clients.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True))

    def wait_ready(self) -> None:
        """Wait until every client is connected and transferring (each says "ready" on its stdout)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        for n, proc in enumerate(self.clients, 1):
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            said = b""
            while not said.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.fail_clients(f"client {n} (pid {proc.pid}) did not start in {STEP_TIMEOUT:g} s")
                chunk = os.read(fd, 1)  # one byte at a time: nothing after "ready" is taken from communicate()
                if not chunk:
                    break
                said += chunk
            if said != b"ready\n":
                _, err = proc.communicate(timeout=STEP_TIMEOUT)
                show(err)
                self.fail_clients(f"client {n} (pid {proc.pid}) did not start (status {proc.returncode})")

    def wait_clients(self) -> list[tuple[float, int]]:
        """Wait for every client; (seconds, lock waits) of each. A failed or hung client fails the demo."""
        deadline = time.monotonic() + STEP_TIMEOUT
        results = []
        for n, proc in enumerate(self.clients, 1):
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail_clients(f"client {n} (pid {proc.pid}) did not finish in {STEP_TIMEOUT:g} s")
            fields = out.split()
            if proc.returncode != 0 or len(fields) != 4 or fields[0] != "done":
                show(err)
                self.fail_clients(f"client {n} (pid {proc.pid}) failed with status {proc.returncode}")
            results.append((float(fields[2]), int(fields[3])))
        self.clients.clear()
        return results

    def fail_clients(self, why: str) -> NoReturn:
        self.kill_clients()
        raise DemoFailed(why)

    def kill_clients(self) -> None:
        for proc in self.clients:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
        self.clients.clear()

    def run_clients(self, locks: bool, seed: int, snapshot: bool) -> None:
        how = "locking both records of each transfer" if locks else "WITHOUT any lock"
        say(f"Starting {CLIENTS} application processes (JBCPORTNO=1..{CLIENTS}), each making "
            f"{self.transfers} random transfers, {how}...")
        start = time.monotonic()
        self.start_clients(locks, seed)
        self.wait_ready()
        if snapshot:
            time.sleep(SNAPSHOT_DELAY)
            self.show_locks()
        results = self.wait_clients()
        elapsed = time.monotonic() - start
        waits = sum(w for _, w in results)
        extra = f"; {waits} lock requests had to wait for another process" if locks else ""
        say(f"All {CLIENTS} finished: {CLIENTS * self.transfers} transfers in {elapsed:.1f} s{extra}.")

    # -- the cache kept coherent by a value block --------------------------------------------------------

    def cache_process(self, n: int, *args: str) -> subprocess.Popen[str]:
        env = {**self.env, "JDLS": f"SERVER=127.0.0.1,{self.port}", "JBCPORTNO": str(100 + n)}
        proc = subprocess.Popen([sys.executable, str(CACHE), str(self.rates), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.clients.append(proc)
        return proc

    @property
    def rates(self) -> Path:
        return self.root / "data" / "FBNK.CURRENCY"

    def finish(self, proc: subprocess.Popen[str], what: str) -> tuple[int, list[str]]:
        """Wait for one process of the cache step: its status and the words it printed last."""
        try:
            out, err = proc.communicate(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail_clients(f"{what} (pid {proc.pid}) did not finish in {STEP_TIMEOUT:g} s")
        if proc.returncode not in (0, -signal.SIGKILL):
            show(err)
            self.fail_clients(f"{what} (pid {proc.pid}) failed with status {proc.returncode}")
        self.clients.remove(proc)
        return proc.returncode, (out.splitlines() or [""])[-1].split()

    def cache_step(self) -> bool:
        """Step 5; True if no reader ever used a stale rate, and the killed writer's block was seen NOT VALID."""
        self.rates.write_bytes(b"1.0000         \n")
        stop = self.root / "data" / "stop-readers"
        say(f"A cache kept coherent by a lock value block: {READERS} processes keep the USD rate of "
            f"{self.rates.relative_to(self.root)} in memory; a writer changes it {UPDATES} times.")
        readers = [self.cache_process(n, "reader", str(stop)) for n in range(1, READERS + 1)]
        self.wait_ready_of(readers)
        status, _ = self.finish(self.cache_process(10, "writer", str(UPDATES), "--die"), "the first writer")
        say(f"  the writer made {UPDATES} updates, then was killed (SIGKILL) holding the record in EX "
            f"(status {status})")
        time.sleep(0.3)  # the readers see the block NOT VALID meanwhile
        self.finish(self.cache_process(11, "writer", str(UPDATES)), "the second writer")
        say(f"  a second writer made {UPDATES} more updates")
        time.sleep(0.2)
        stop.touch()
        coherent = seen = True
        for n, proc in enumerate(readers, 1):
            _, words = self.finish(proc, f"reader {n}")
            if len(words) != 5 or words[0] != "done":
                self.fail_clients(f"reader {n} said {' '.join(words)!r}")
            reads, refreshes, not_valid, stale = map(int, words[1:])
            say(f"  reader {n}: {reads} uses of the rate, {reads - refreshes} from its cache, {refreshes} read "
                f"from the file ({not_valid} times the block was NOT VALID), {stale} stale")
            coherent = coherent and stale == 0
            seen = seen and not_valid > 0
        if coherent and seen:
            say("  No reader ever used a stale rate, and none read the file more than the versions required,")
            say("  except after the killed writer: its lock's value block was NOT VALID until the next write.")
        elif not coherent:
            say("  A reader used a stale rate: WRONG: the value block failed to keep the caches coherent.")
        else:
            say("  A reader never saw the killed writer's block NOT VALID: WRONG.")
        return coherent and seen

    def wait_ready_of(self, procs: list[subprocess.Popen[str]]) -> None:
        for proc in procs:
            assert proc.stdout is not None
            if not select.select([proc.stdout], [], [], STEP_TIMEOUT)[0]:
                self.fail_clients(f"a cache process (pid {proc.pid}) did not start in {STEP_TIMEOUT:g} s")
            line = proc.stdout.readline()
            if line != "ready\n":
                self.fail_clients(f"a cache process (pid {proc.pid}) did not start: {line!r}")

    def show_locks(self) -> None:
        """The locks held at this instant: show-item-locks when installed, else jdls -dL."""
        tool = SHOW_ITEM_LOCKS
        done = None
        if tool.exists():
            say("The locks held at this instant ($ show-item-locks):")
            done = subprocess.run([str(tool)], env=self.env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
            if done.returncode != 0:
                say(f"  (show-item-locks failed with status {done.returncode}: {_last_line(done.stderr)}; "
                    "asking jdls -dL instead)")
                done = None
        if done is None:
            say("The locks held at this instant ($ jdls -dL; pid is the client's lock server, port its JBCPORTNO):")
            done = self.jdls("-dL")
        show(done.stdout + done.stderr)

    # -- the clean-up check --------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Processes and IPC of this instance still there (all of them inherit JBCRELEASEDIR)."""
        found = []
        me = os.getpid()
        for proc in psutil.process_iter(["pid", "name"]):
            if proc.pid == me:
                continue
            try:
                if proc.environ().get("JBCRELEASEDIR") == str(self.root) and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"process {proc.pid} ({proc.info['name']})")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        key = Instance.from_environment(self.root).key
        for kind, ipc in (("shared memory", sysv_ipc.SharedMemory), ("semaphore", sysv_ipc.Semaphore)):
            try:
                ipc(key)
                found.append(f"{kind} with key 0x{key:08x}")
            except sysv_ipc.ExistentialError:
                pass
        return found


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


def tour(demo: Demo) -> bool:
    """Steps 1-5; True if the locked run kept the total and the value block kept the caches coherent."""
    demo.start_service()
    say()
    demo.create_accounts()
    expected = ACCOUNTS * OPENING
    say()

    demo.run_clients(locks=True, seed=1, snapshot=True)
    say("Balances after the locked run:")
    locked_total = demo.show_balances()
    kept = locked_total == expected
    if kept:
        say(f"  total {locked_total}: total unchanged: locks kept every transfer whole.")
    else:
        say(f"  total {locked_total}, expected {expected}: WRONG even with locks: the lock service failed.")
    say()

    say(f"Now the same again without locks (balances reset to {OPENING}).")
    demo.reset_accounts()
    demo.run_clients(locks=False, seed=2, snapshot=False)
    say("Balances after the run without locks:")
    unlocked_total = demo.show_balances()
    if unlocked_total != expected:
        drift = unlocked_total - expected
        how = f"{drift} appeared from nowhere" if drift > 0 else f"{-drift} vanished"
        say(f"  total {unlocked_total}, expected {expected}: WRONG, {how}. Lost updates: two processes read "
            "the same balance, and the later write wiped out the earlier one.")
    else:
        say(f"  total {unlocked_total}: this time the races happened to cancel out; run again "
            "(the total is wrong almost every time).")
    say()
    cached = demo.cache_step()
    say()
    return kept and cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--transfers", type=int, default=150, help="transfers per process (default 150)")
    parser.add_argument("--keep", action="store_true", help="keep the instance directory (its log) afterwards")
    args = parser.parse_args(argv)
    started = time.monotonic()
    demo = Demo(Path(tempfile.mkdtemp(prefix="dls-demo-")), free_port(), args.transfers, [])
    kept = False
    problems: list[str] = []
    try:
        kept = tour(demo)
    except DemoFailed as exc:
        problems.append(str(exc))
        say(f"DEMO FAILED: {exc} (the service log: {demo.root / 'log' / 'jdls.log'})")
        _print_log(demo.root)
    except KeyboardInterrupt:
        problems.append("interrupted")
        say("\nInterrupted: cleaning up.")
    finally:
        demo.kill_clients()
        problems += demo.stop_service()
        left = demo.leftovers()
        if left:
            problems.append("left behind: " + ", ".join(left))
            say("NOT cleaned up: " + ", ".join(left))
        else:
            say("cleaned up: no process, no IPC left.")
        if args.keep:
            say(f"Instance directory kept: {demo.root}")
        else:
            shutil.rmtree(demo.root, ignore_errors=True)
    ok = kept and not problems
    say(f"Demo {'done' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s.")
    if problems:
        say("Problems: " + "; ".join(problems))
    return 0 if ok else 1


def _print_log(root: Path) -> None:
    """The end of the service log: why a client failed is usually there."""
    try:
        lines = (root / "log" / "jdls.log").read_text().splitlines()
    except OSError:
        return
    if lines:
        say("  last lines of the service log:")
        show("\n".join(lines[-15:]), "    | ")


if __name__ == "__main__":
    sys.exit(main())
