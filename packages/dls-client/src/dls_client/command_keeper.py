"""The keeper: the child of dls-lock that runs the command and answers for every process the command starts.

dls-lock is two processes. The holder (the one the caller started) takes the
lock, keeps the connection that holds it and passes signals on; the keeper,
which the holder forks before it asks for the lock (and which closes at once
its copy of the connection the holder made before the fork), starts the command
once the lock is held and ends only when the last process the command started has ended, as
flock(1)'s lock lasts while any process holding its file lives
(``dls-lock F K sh -c 'work &'`` keeps the lock while ``work`` runs):

- it is the subreaper of the command's tree (PR_SET_CHILD_SUBREAPER): an orphan
  of the tree is reparented to it, not to init, so ``waitpid(-1)`` reaps every
  process the command started, however deep, and no child left means none runs;
- its exit status is the command's (128+N when the command died of signal N),
  whatever the processes it left behind end with;
- it passes the holder's signals on to every process of the tree (see
  ``lock_command`` for which); signals from anyone else it ignores, but for
  the terminal's (Ctrl-C), which reached the processes of its process group
  itself: those it passes on to the processes outside that group;
- when the holder asks it to stop (the lock was lost), it sends TERM (and
  CONT, so that a stopped process acts on it) to every process of the tree,
  and KILL to those still there a grace period later;
- when the holder ends before it (even by SIGKILL: its parent-death signal
  tells it), it kills (SIGKILL) every process of the tree at once: the lock
  went with the holder's connection, and nothing may go on working as if it
  still held it;
- when the holder falls silent (stopped by SIGSTOP, frozen), it stops the tree
  before the holder's lease runs out (``dls_client.lease``): a stopped holder
  cannot hear that its lock is lost, and the command must not run beside the
  next holder;
- it keeps duplicates of the lock's connections (``dls_client.kept_connections``),
  so that the service frees the lock only once the keeper has ended, after the
  tree: a killed holder's lock is not handed on while the command still runs
  (nor while the keeper is stopped).

When the holder asks it to stop and it has not ended a grace period later (it
is stopped, say), the holder KILLs it: the command dies with it (its
parent-death signal), and the holder, a subreaper too, kills what it left.

Why two processes: a process killed by SIGKILL can do nothing, and its orphans
go to init, where nobody can tell them from other processes. The keeper
outlives the holder and is still the parent (the subreaper) of all of them.
The command itself also dies with the keeper (its parent-death signal is
SIGKILL), should the keeper be killed; the processes the command left are then
reparented to the holder, which is a subreaper too and kills them
(``Keeper.wait``). Only killing both processes at once (``kill -9`` of each)
leaves the command's other processes running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection

from . import exitcodes
from .kept_connections import KeptConnections
from .lease import Lease, Watch, boottime, ran_out_message
from .process_tree import become_subreaper, descendants, die_with_parent, exec_command, set_name, signal_descendants

#: The holder's request to the keeper: the lock is lost, stop every process of the tree.
STOP = signal.SIGUSR1
#: The keeper's parent-death signal: the holder is gone (confirmed by the keeper's new parent pid).
HOLDER_GONE = signal.SIGUSR2
#: si_code of a signal the kernel sent: from a terminal (Ctrl-C, Ctrl-\, a hangup), to a whole process group.
SI_KERNEL = 0x80
#: The environment variable that tells the command its lock's fencing token (issue 14): a number that strictly
#: increases per record at each grant, for a store to refuse the writes of a holder older than the last it saw.
FENCING_VARIABLE = "DLS_FENCING_TOKEN"
#: How the holder's go carries the token to the keeper.
_TOKEN = struct.Struct("=Q")
#: The signals Python sets to "ignore" for itself, put back to the default for the command (as subprocess does).
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)
#: How long the keeper sleeps when nothing happens (a SIGCHLD or a signal wakes it at once); it then takes
#: the connections the holder handed over meanwhile (after a failover).
_IDLE = 1.0
#: How much longer than its grace period the holder lets the keeper take to end when told to stop.
_STOP_MARGIN = 0.5
#: How soon the keeper looks again when it must: while killing (the tree may still be forking), and when
#: a process left by the command may have been missed.
_AGAIN = 0.05

Say = Callable[[str], None]


class Keeper:
    """The holder's side of the keeper: start it, let it run the command, pass signals on, wait for it."""

    def __init__(self, pid: int, go: int, lease: Lease, connections: KeptConnections) -> None:
        self.pid = pid
        self._go = go
        #: The holder's lease with the keeper (see dls_client.lease): renew it before run_command.
        self.lease = lease
        #: Where the holder hands the keeper the lock's connections (``keep``) before run_command.
        self.connections = connections
        self._pidfd = os.pidfd_open(pid)
        self._lock = threading.Lock()  # signals are sent from other threads than the one that reaps
        self.killed = False

    @classmethod
    def fork(cls, argv: list[str], *, passed_on: Collection[signal.Signals], command_mask: Collection[int],
             grace: float, say: Say | None, all_processes: bool = True, holder_only: Collection[int] = ()) -> Keeper:
        """Fork the keeper of ``argv``. Call it while this process has one thread: a fork copies only the
        calling thread, and a lock another thread held would stay held in the child.

        ``passed_on``: the signals the holder passes on (blocked in the holder, which takes them with
        sigwaitinfo); ``command_mask``: the signal mask the command gets (dls-lock's own at its start);
        ``grace``: the seconds between TERM and KILL when told to ``stop``; ``say``: -v's messages;
        ``all_processes``: keep the lock until every process the command started has ended, else (-o) only
        until the command itself has (then neither process is a subreaper: what the command leaves goes to
        init, free, and is no part of the tree); ``holder_only``: descriptors the keeper closes at once (a
        connection the holder made before the fork: the keeper keeps only what it is handed, see
        ``kept_connections``)."""
        if all_processes:
            become_subreaper()  # should the keeper be killed, what it kept is reparented here (see wait)
        holder = os.getpid()
        go_read, go_write = os.pipe()
        lease = Lease(grace)  # shared with the keeper
        connections = KeptConnections()
        # Blocked before the fork: none of the keeper's signals can kill it before it listens for them.
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, STOP, HOLDER_GONE, *passed_on})
        pid = os.fork()
        if pid == 0:
            code = exitcodes.SOFTWARE
            try:
                for fd in (go_write, *holder_only):
                    os.close(fd)
                connections.watchdog_side()
                code = _Keeping(holder, argv, set(passed_on), set(command_mask), grace, say,
                                all_processes, lease, connections).run(go_read)
            except BaseException:
                import traceback  # only here: with linecache and tokenize, milliseconds of dls-lock's start-up

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        os.close(go_read)
        connections.holder_side()
        return cls(pid, go_write, lease, connections)

    def run_command(self, token: int = 0) -> None:
        """The lock is held (and leased): start the command, with the lock's fencing token ``token`` in its
        environment (FENCING_VARIABLE; 0: none, and none inherited either)."""
        with contextlib.suppress(BrokenPipeError):  # a keeper that ended already is found by wait()
            os.write(self._go, b"!" + _TOKEN.pack(token))  # one write, within PIPE_BUF: read whole
        os.close(self._go)

    def abandon(self) -> None:
        """No lock, no command: the keeper ends without running it."""
        os.close(self._go)
        self.wait()

    def stop(self) -> None:
        """The lock is lost: TERM every process of the command, KILL those left after the grace period; KILL
        the keeper itself if it has not ended shortly after (it cannot act while stopped)."""
        self.send(STOP)
        threading.Thread(target=self._enforce_stop, name="dls-lock stop", daemon=True).start()

    def _enforce_stop(self) -> None:
        with self._lock:
            if self._pidfd < 0:
                return  # reaped already
            pidfd = os.dup(self._pidfd)  # its own: wait() closes the keeper's when it reaps it
        try:
            if select.select([pidfd], [], [], self.lease.grace + _STOP_MARGIN)[0]:
                return  # it ended
        finally:
            os.close(pidfd)
        print(f"dls-lock: the keeper (pid {self.pid}) did not stop the command within {self.lease.grace:g} s (is "
              "it stopped?): killing it, and the command with it", file=sys.stderr, flush=True)
        self.send(signal.SIGKILL)

    def send(self, signum: int) -> None:
        """Send the keeper ``signum`` (nothing once it has been reaped)."""
        with self._lock:
            if self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signum)

    def wait(self) -> int:
        """Reap the keeper (and, if it was killed, what it kept); its status as a shell reports it."""
        status: int | None = None
        orphans = False
        while True:
            if orphans:
                signal_descendants(os.getpid(), signal.SIGKILL)
            try:
                pid, raw = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == self.pid:
                with self._lock:
                    os.close(self._pidfd)
                    self._pidfd = -1
                status = os.waitstatus_to_exitcode(raw)
                # Killed: the command died with it (its parent-death signal); its orphans came here.
                orphans = status < 0
        assert status is not None, "the keeper was reaped by someone else"
        #: Whether the keeper itself was killed (by a signal), rather than ending with the command's status.
        self.killed = status < 0
        return exitcodes.killed_by(-status) if status < 0 else status


class _Keeping:
    """The keeper's own side, in the forked child: wait for the lock, run the command, reap the tree."""

    def __init__(self, holder: int, argv: list[str], passed_on: set[int], command_mask: set[int], grace: float,
                 say: Say | None, all_processes: bool, lease: Lease, connections: KeptConnections) -> None:
        self.holder = holder
        self.argv = argv
        self.passed_on = passed_on
        self.command_mask = command_mask
        self.grace = grace
        self.say = say
        self.all_processes = all_processes
        self.me = os.getpid()
        #: The lock's fencing token, told with the go (0: none).
        self.token = 0
        #: When KILL follows the TERM of a stop (monotonic), once told to stop.
        self.kill_at: float | None = None
        self.killing = False
        self.lease = Watch(lease)
        self.connections = connections

    def run(self, go: int) -> int:
        set_name("dls-lock keeper")
        if self.all_processes:
            become_subreaper()  # not inherited from the holder's
        die_with_parent(HOLDER_GONE)
        said = os.read(go, 1 + _TOKEN.size)
        if os.getppid() != self.holder or said[:1] != b"!":
            return exitcodes.OK  # the holder ended, or gave up, before it had the lock: nothing ran
        os.close(go)
        self.token = _TOKEN.unpack(said[1:])[0] if len(said) == 1 + _TOKEN.size else 0
        self.connections.take()  # handed over before the go: held from before the command runs
        command = self._start()
        return -command if command < 0 else self._keep(command)

    def _start(self) -> int:
        """Fork and exec the command: its pid; or, when it cannot be run, minus the exit status (126, 127)."""
        report_read, report_write = os.pipe()  # close-on-exec: it stays empty when the exec succeeds
        pid = os.fork()
        if pid == 0:
            try:
                os.close(report_read)
                die_with_parent(signal.SIGKILL)  # the command never outlives its keeper
                if os.getppid() == self.me:
                    for signum in _PYTHON_IGNORES:
                        signal.signal(signum, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, self.command_mask)
                    if self.token:
                        os.environ[FENCING_VARIABLE] = str(self.token)
                    else:  # none: not an outer dls-lock's either, which would be another lock's
                        os.environ.pop(FENCING_VARIABLE, None)
                    exec_command(self.argv)
            except OSError as exc:
                os.write(report_write, str(exc.errno).encode())
            finally:
                os._exit(exitcodes.CANNOT_RUN)
        os.close(report_write)
        with os.fdopen(report_read, "rb") as report:
            failure = report.read()
        if not failure:
            return pid
        os.waitpid(pid, 0)
        error = int(failure)
        reason = {errno.ENOENT: "command not found", errno.EACCES: "permission denied"}.get(error, os.strerror(error))
        print(f"dls-lock: {self.argv[0]}: {reason}", file=sys.stderr)
        return -(exitcodes.NOT_FOUND if error == errno.ENOENT else exitcodes.CANNOT_RUN)

    def _keep(self, command: int) -> int:
        """Reap until no child is left; the command's status."""
        listen = {signal.SIGCHLD, STOP, HOLDER_GONE, *self.passed_on}
        status: int | None = None
        told = False
        while True:
            if self.kill_at is not None and not self.killing and time.monotonic() >= self.kill_at:
                self._kill_the_rest()
            if self.killing:
                signal_descendants(self.me, signal.SIGKILL)
            while True:
                try:
                    pid, raw = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    assert status is not None
                    return status
                if pid == 0:
                    break
                if pid == command:
                    code = os.waitstatus_to_exitcode(raw)
                    status = exitcodes.killed_by(-code) if code < 0 else code
            if status is not None and not told:
                told = self._tell_who_is_left(status)
            # Soon again while killing, and while a process just forked may have been missed by the last look.
            soon = self.killing or (status is not None and not told)
            timeout = _AGAIN if soon else _IDLE
            if self.kill_at is not None and not self.killing:
                timeout = min(timeout, max(0.0, self.kill_at - time.monotonic()))
            timeout = min(timeout, self._watch_lease())
            wake = boottime() + timeout
            info = signal.sigtimedwait(listen, timeout)
            self.lease.slept(wake)
            self.connections.take()
            if info is not None:
                self._on_signal(info)

    def _watch_lease(self) -> float:
        """Stop the tree if the holder's lease runs out (see dls_client.lease); the seconds until the next
        look."""
        if self.kill_at is not None:
            return _IDLE
        wait, kill_after = self.lease.due()
        if kill_after is None:
            return wait
        print(ran_out_message(self.holder, "the command", min(self.grace, kill_after)), file=sys.stderr,
              flush=True)
        self._stop(until=kill_after)
        return _AGAIN

    def _tell_who_is_left(self, status: int) -> bool:
        """Say which processes the command left running, with -v; False if none was seen (a scan of /proc
        is not one instant: a process forked during it may be missed until the next)."""
        left = _running(self.me)
        if left and self.say:
            count, pids = _described(left)
            self.say(f"the command ended ({status}); waiting for {count} the command started: {pids}")
        return bool(left) or not self.say

    def _on_signal(self, info: signal.struct_siginfo) -> None:
        signum = info.si_signo
        if signum == HOLDER_GONE:
            if os.getppid() != self.holder:  # a parent-death signal, not a stray SIGUSR2
                self.killing = True
        elif signum == STOP:
            if info.si_pid == self.holder and self.kill_at is None:
                self._stop()
        elif signum in self.passed_on:
            if info.si_pid == self.holder and info.si_code != SI_KERNEL:
                signal_descendants(self.me, signum)
            elif info.si_code == SI_KERNEL:  # the terminal's: its process group has it already
                signal_descendants(self.me, signum, skip_group=os.getpgrp())

    def _stop(self, until: float | None = None) -> None:
        """TERM (and CONT) to every process of the tree now, KILL to what is left after the grace period
        (or ``until`` seconds from now)."""
        grace = self.grace if until is None else min(self.grace, until)
        self.kill_at = time.monotonic() + grace
        if grace > 0:
            for signum in (signal.SIGTERM, signal.SIGCONT):
                signal_descendants(self.me, signum)
        else:
            self._kill_the_rest()

    def _kill_the_rest(self) -> None:
        self.killing = True
        left = _running(self.me)
        if left:
            count, pids = _described(left)
            when = f"still running {self.grace:g} s after TERM" if self.grace > 0 else "running"
            print(f"dls-lock: killing {count} {when}: {pids}", file=sys.stderr, flush=True)


def _running(root: int) -> list[int]:
    """The processes below ``root`` that have not ended."""
    return [proc.pid for proc in descendants(root) if not proc.zombie]


def _described(pids: list[int]) -> tuple[str, str]:
    """("2 processes", "pids 7, 9"): how messages count and name processes."""
    many = len(pids) > 1
    return f"{len(pids)} process{'es' if many else ''}", f"pid{'s' if many else ''} {', '.join(map(str, pids))}"
