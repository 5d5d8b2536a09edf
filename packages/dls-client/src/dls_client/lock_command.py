"""dls-lock: run a command while holding a record lock, as flock(1) does with a file lock.

The lock lives as long as dls-lock's connection to the service, and dls-lock
keeps it until the command and every process the command started have ended
(``command_keeper`` runs them and answers for them, even when dls-lock itself
is killed). What the user sees is in DESCRIPTION; the exit statuses are in
``exitcodes`` and EPILOG.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Sequence

from dls_proto import Mode

from . import exitcodes
from .__about__ import __version__
from .client import Client
from .command_keeper import SI_KERNEL, Keeper
from .config import Config, port_number
from .errors import ConfigurationError, DlsError, Holder, LockLost, LockRefused
from .locks import FileRef, HeldLock

#: The signals dls-lock passes on to the processes of its command rather than die of them.
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: Seconds between TERM and KILL when the lock is lost (-k): time for the command to stop cleanly, during
#: which it runs without the lock (another holder may have it already), so short.
DEFAULT_KILL_AFTER = 2.0

DESCRIPTION = f"""\
Run COMMAND while holding the dls record lock on (FILE, KEY), like flock(1) for
records. The lock service is the one JDLS names (default localhost, port 50002).

The lock is held until COMMAND and every process it started have ended, as
flock(1)'s lock is held while any process that has the file open runs: a
process the command leaves running in the background (sh -c 'work &'), in a
session of its own or forked twice keeps the lock too. dls-lock is their
subreaper (they are reparented to it, not to init); -v says which ones it waits
for once the command has ended. The exit status is still the command's.

The signals TERM, INT, HUP and QUIT sent to dls-lock are passed on to every
process the command started, once each: one the terminal sends (Ctrl-C,
Ctrl-\\) reaches the processes in dls-lock's process group by itself, so
dls-lock passes it on only to the others. Before the lock is held, such a
signal ends dls-lock (and the command never runs).

If the lock is lost while the command runs (its lock server or the whole
service ended and the lock could not be taken back, or the service could not be
reached in time), dls-lock says so on standard error, sends TERM to every
process the command started, KILL to those still running -k seconds later, and
exits with {exitcodes.LOST} (EX_TEMPFAIL: the work was cut short and may be run again). It
exits with {exitcodes.LOST} too when it finds the loss only as it releases the lock.

If dls-lock is killed, even by SIGKILL, the service releases the lock, and
every process the command started is killed (SIGKILL) at once: dls-lock runs as
two processes, the one started, which holds the lock, and its keeper (ps shows
it as "dls-lock keeper"), which runs the command and kills what is left when
the first is gone. Only killing both at once leaves processes running.
"""

EPILOG = textwrap.fill(
    f"Exit status: the command's (128+N when it died of signal N); {exitcodes.LOST} the lock was lost while the "
    f"command ran (it was stopped); {exitcodes.FAILED} (or -E CODE) when the lock is held and -n or -w gives up; "
    f"{exitcodes.NOINPUT} FILE missing; {exitcodes.UNAVAILABLE} service unreachable (or lost before the command "
    f"ran); {exitcodes.CONFIG} bad JDLS; {exitcodes.CANNOT_RUN}/{exitcodes.NOT_FOUND} command not runnable.", 80)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dls-lock", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-s", "--shared", action="store_const", dest="mode", const=Mode.PR,
                      help="take a shared (read, PR) lock")
    mode.add_argument("-x", "--exclusive", action="store_const", dest="mode", const=Mode.EX,
                      help="take an exclusive (write, EX) lock; the default")
    parser.set_defaults(mode=Mode.EX)
    parser.add_argument("-n", "--nonblock", action="store_true", help="fail at once if the lock is held")
    parser.add_argument("-w", "--wait", "--timeout", type=_seconds, metavar="SECONDS", dest="timeout",
                        help="wait at most SECONDS for the lock")
    parser.add_argument("-E", "--conflict-exit-code", type=_exit_code, default=exitcodes.FAILED, metavar="CODE",
                        help=f"exit status when -n or -w gives up (default {exitcodes.FAILED})")
    parser.add_argument("-k", "--kill-after", type=_seconds, default=DEFAULT_KILL_AFTER, metavar="SECONDS",
                        help="when the lock is lost, KILL the processes of the command still running SECONDS after "
                        f"TERM (default {DEFAULT_KILL_AFTER:g}); the lock is told lost at the latest 5 s before the "
                        "service may hand it on, so keep SECONDS below that margin (with jdls --lock-delay under "
                        "5 s, or 0, the lock may be handed on as soon as it is lost: use -k 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what is happening on standard error")
    parser.add_argument("-V", "--version", action="version", version=f"dls-lock {__version__}")
    parser.add_argument("file", metavar="FILE", help="the file whose record is locked (it must exist)")
    parser.add_argument("key", metavar="KEY", help="the record key")
    parser.add_argument("command", metavar="COMMAND", help="the command to run with the lock held")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG", help="its arguments")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def _exit_code(text: str) -> int:
    if not text.isdigit() or int(text) > 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not an exit status (0 to 255)")
    return int(text)


def _passed_on() -> list[signal.Signals]:
    """The signals dls-lock passes on: those of PASSED_ON it was not started with ignored (a shell starts a
    background job with INT and QUIT ignored; the command then keeps them ignored, as a shell's would)."""
    return [signum for signum in PASSED_ON if signal.getsignal(signum) != signal.SIG_IGN]


class _SignalRelay:
    """Takes the holder's PASSED_ON signals, with who sent them: they are blocked in every thread of the
    holder (the mask is set before any thread starts), and this thread waits for them with sigwaitinfo.

    Before the command runs, such a signal ends dls-lock, as it would without the relay (a request that
    waits for the lock is withdrawn with the connection). While the keeper runs, it is passed on to the
    keeper, which passes it on to every process the command started; but not one the terminal sent
    (Ctrl-C, Ctrl-\\), which reached the keeper's process group itself, the keeper and the command
    included: the keeper passes that one on only to the processes outside the group. (A session leader
    may be sent a hangup alone: dls-lock passes that on too.)"""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = set(signals)
        self.keeper: Keeper | None = None
        if self.signals:
            threading.Thread(target=self._run, name="dls-lock signals", daemon=True).start()

    def _run(self) -> None:
        while True:
            info = signal.sigwaitinfo(self.signals)
            keeper = self.keeper
            if keeper is None:
                self._die_of(info.si_signo)
            elif info.si_code != SI_KERNEL or os.getsid(0) == os.getpid():
                keeper.send(info.si_signo)

    @staticmethod
    def _die_of(signum: int) -> None:
        """End the process by ``signum``'s default action (its disposition is SIG_DFL, see main)."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.pthread_kill(threading.get_ident(), signum)


class _LostWatch:
    """What dls-lock does when its lock is lost: say so, once, and stop the command if it runs.

    The client calls ``on_lost`` from its watcher thread within a second of the loss, whatever the holder's
    main thread is doing (waiting for the keeper); a loss the client finds only when the lock is released
    is ``found`` there."""

    def __init__(self, file: str, key: str, grace: float) -> None:
        self.name = f"{file} {key}"
        self.grace = grace
        self.lost = False
        #: "before", "running" or "ended": where the command is.
        self._command = "before"
        self._keeper: Keeper | None = None
        self._lock = threading.Lock()

    def running(self, keeper: Keeper) -> bool:
        """The command is about to run; False if the lock was lost already (then it must not)."""
        with self._lock:
            self._command, self._keeper = "running", keeper
            return not self.lost

    def ended(self) -> None:
        with self._lock:
            self._command = "ended"

    def on_lost(self, held: HeldLock) -> None:
        command = self._first()
        reason = held.lost_reason or "lost"
        if command == "running":
            _tell(f"lost the lock on {self.name} ({reason}): stopping the command (TERM now, KILL after "
                  f"{self.grace:g} s)")
            assert self._keeper is not None
            self._keeper.stop()
        elif command is not None:
            self._say_lost(command, reason)

    def found(self, reason: str) -> None:
        """A loss the holder's main thread found (before it ran the command, or when it released the lock)."""
        command = self._first()
        if command is not None:
            self._say_lost(command, reason)

    def _first(self) -> str | None:
        """Mark the lock lost: where the command was then; None if it was marked already."""
        with self._lock:
            if self.lost:
                return None
            self.lost = True
            return self._command

    def _say_lost(self, command: str, reason: str) -> None:
        when = "before the command started: it does not run" if command == "before" else "after the command ended"
        _tell(f"lost the lock on {self.name} ({reason}) {when}")


def _tell(text: str) -> None:
    print(f"dls-lock: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    say = _tell if args.verbose else None
    try:
        config = Config.from_environment() or Config()
        port_number()  # JBCPORTNO, which the client reads: refused here like a malformed JDLS
    except ConfigurationError as exc:
        _tell(str(exc))
        return exitcodes.CONFIG
    try:
        ref = FileRef.of(args.file)
    except DlsError as exc:
        _tell(str(exc))
        return exitcodes.NOINPUT

    # Before any thread exists (the keeper is forked, the relay's thread and the client's inherit the mask).
    passed_on = _passed_on()
    command_mask = signal.pthread_sigmask(signal.SIG_BLOCK, passed_on)
    if signal.SIGINT in passed_on:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python's KeyboardInterrupt: dls-lock dies of it instead
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # not ignored (inherited so): children must stay to be reaped
    keeper = Keeper.fork([args.command, *args.args], passed_on=passed_on, command_mask=command_mask,
                         grace=args.kill_after, say=say)
    relay = _SignalRelay(passed_on)
    watch = _LostWatch(args.file, args.key, args.kill_after)

    def waiting(holder: Holder) -> None:
        _tell(f"waiting for {args.file} {args.key}, held by {holder.describe()}")

    client = Client(config)
    try:
        if say:
            say(f"using lock service {config.server}")
        held = client.lock(ref, args.key, args.mode, wait=not args.nonblock, timeout=args.timeout,
                           on_wait=waiting, on_lost=watch.on_lost)
    except LockRefused as exc:  # and LockTimeout: -n or -w gave up
        if say:
            say(str(exc))
        keeper.abandon()
        return int(args.conflict_exit_code)
    except DlsError as exc:  # the service cannot be reached or was lost, or refused the request
        _tell(str(exc))
        keeper.abandon()
        return exitcodes.UNAVAILABLE
    if say:
        say(f"locked {args.file} {args.key} ({Mode(held.mode).name}, 0x{held.value:08x})")
    try:
        status = _run_holding(held, keeper, relay, watch)
    finally:
        client.close()  # and the connection's end releases the lock, whatever release() could not
    if say and not watch.lost:
        say("released")
    return status


def _run_holding(held: HeldLock, keeper: Keeper, relay: _SignalRelay, watch: _LostWatch) -> int:
    """Run the command while the lock is held, and release it; the command's status, or LOST."""
    if held.lost or not watch.running(keeper):
        watch.found(held.lost_reason or "lost")
        keeper.abandon()
        return exitcodes.UNAVAILABLE  # the command never ran: as if the service had been lost before the grant
    relay.keeper = keeper
    keeper.run_command()
    status = keeper.wait()
    relay.keeper = None
    watch.ended()
    try:
        held.release()
    except LockLost as exc:
        watch.found(exc.reason)
    except DlsError as exc:  # the lock goes with the connection, closed next
        _tell(f"releasing the lock on {watch.name}: {exc}")
    return exitcodes.LOST if watch.lost else status


if __name__ == "__main__":
    sys.exit(main())
