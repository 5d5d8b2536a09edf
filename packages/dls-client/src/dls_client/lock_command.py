"""dls-lock: run a command while holding a record lock, as flock(1) does with a file lock.

The lock lives as long as dls-lock's connection to the service, and dls-lock
keeps it until the command and every process the command started have ended
(``command_keeper`` runs them and answers for them, even when dls-lock itself
is killed). What the user sees is in DESCRIPTION; the exit statuses are in
``exitcodes`` and EPILOG.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from . import exitcodes
from .__about__ import __version__

# Only what parsing the command line needs is imported at start: --help, a usage error, a missing FILE
# answer in a few milliseconds. The client (dls_proto's codecs, construct, ssl) comes in main, when a
# lock is to be taken; dls-shm and psutil never (dls-lock locks through the service).
if TYPE_CHECKING:
    import socket

    from dls_proto import Server

    from .client import Client
    from .command_keeper import Keeper
    from .errors import Holder
    from .locks import HeldLock

#: The signals dls-lock passes on to the processes of its command rather than die of them.
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: Seconds between TERM and KILL when the lock is lost (-k): time for the command to stop cleanly, during
#: which it runs without the lock (another holder may have it already), so short.
DEFAULT_KILL_AFTER = 2.0

USAGE = "%(prog)s [options] FILE KEY {COMMAND [ARG ...] | -c COMMAND}  or  %(prog)s [options] {--hold | -u} FILE KEY"

DESCRIPTION = f"""\
Run COMMAND while holding the dls record lock on (FILE, KEY), like flock(1) for
records. The lock service is the one JDLS names (default localhost, port 50002).

The lock is held until COMMAND and every process it started have ended, as
flock(1)'s lock is held while any process that has the file open runs: a
process the command leaves running in the background (sh -c 'work &'), in a
session of its own or forked twice keeps the lock too. dls-lock is their
subreaper (they are reparented to it, not to init); -v says which ones it waits
for once the command has ended. The exit status is still the command's.

The command runs with DLS_FENCING_TOKEN set to the lock's fencing token, a
number that strictly increases per record at each grant: whatever the command
writes to can refuse the writes of a holder older than the last it saw (one
that lost its lock while it was stopped, say). It is unset where the service
gives none (OS file locks, a service of protocol version 2 or 3). --hold
cannot set it in the calling shell.

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
exits with {exitcodes.LOST} too when it finds the loss only as it releases the lock. JDLS EXIT
does not apply to dls-lock (nor to --hold): a service it can no longer reach
is a lost lock, told and handled as above (or, before the lock is held, exit
{exitcodes.UNAVAILABLE}), not a silent SIGTERM to itself.

If dls-lock is killed, even by SIGKILL, every process the command started is
killed (SIGKILL) at once, and then the service releases the lock: dls-lock runs
as two processes, the one started, which holds the lock, and its keeper (ps
shows it as "dls-lock keeper"), which runs the command, kills what is left when
the first is gone, and keeps a duplicate of the lock's connection until it has
(so the lock is never handed on while the command still runs; a keeper that is
stopped keeps the lock until it is resumed). When the lock is lost and the
keeper has not stopped the command -k seconds (and half a second) later,
dls-lock kills the keeper, and the command with it. Only killing both at once
leaves processes running; or killing the keeper while dls-lock is stopped:
what the command left is then unguarded until dls-lock is resumed (and kills
it).

What no process of dls-lock can guard against, written down: when dls-lock and
its keeper are both stopped (or the keeper killed while dls-lock is stopped)
and the lock is lost meanwhile (its lock server dies and the lock-delay
passes), nothing is left to stop the command, which runs beside the next
holder until dls-lock is resumed; and a job stopped whole (Ctrl-Z) whose lock
was lost and handed on meanwhile runs for a moment when resumed, until
dls-lock sees the loss (milliseconds). Do not stop dls-lock's processes for
longer than the service's lock-delay.

If dls-lock is stopped (SIGSTOP, a debugger, a frozen process) it can no
longer hear that its lock is lost, so it renews a lease with its keeper twice
a second: how long the lock is sure to stay its own should it do nothing more
(the service's lock-delay less the 5 s a dead server takes to be found; 10 s
with jdls's default 15 s). When the lease runs out, the keeper stops the
command as for a lost lock, TERM -k seconds before the end, KILL at it, so the
command never runs beside the next holder; resumed, dls-lock says why and
exits {exitcodes.LOST}, though the service may still have kept the lock. With a lock-delay
under 5 s plus -k plus 1 s, the keeper acts after 1 s of silence, and the
lock may be handed on sooner. When the terminal's Ctrl-Z stops dls-lock, its
keeper and the command together, the keeper gives dls-lock a second to renew
on resuming before it acts.

Where dls-lock differs from flock(1), and why:

FILE must exist (exit {exitcodes.NOINPUT}); flock creates it. A record lock names a record of a file
(the service knows the file by its inode, as jDLS does), and a file made for
the lock would be a new, empty one: a mistyped name would lock a record of no
file anyone uses, and the command would run unprotected without a word.

-o does not pass the lock to a descriptor the command might close: without it
dls-lock holds the lock while any process the command started runs (above);
with it, only while COMMAND itself runs, as flock -o does.

The descriptor form (exec 9>FILE; flock 9 ... flock -u 9) is --hold and -u:
the lock is held by a connection to the service, which no shell can keep, so
dls-lock --hold FILE KEY leaves a process that keeps it for the calling shell
(dls-lock's parent; ps shows it as "dls-lock hold", show-item-locks with its
pid) and exits 0 once the lock is held (-n, -w, -E, -s as for a command). The
lock is released by dls-lock -u FILE KEY from the same shell, or when the shell
ends, however it ends (even by SIGKILL). -u reaches the hold process through a
unix socket in a directory of the user's own, $TMPDIR/dls-lock-UID.XXXXXXXX
(/tmp without TMPDIR; mode 0700, kept for the next --hold), which no other user
can take first or enter (exit {exitcodes.CANT_CREATE} if it cannot be made). Processes the
shell leaves running after it ends do not keep it (wait for them first); run
--hold from the script itself, not from a subshell $(...) or a pipeline, whose
process ends at once.
A lost lock is told as a command's: the hold process says so on the shell's
standard error, sends TERM to the shell and every process it started, KILL to
those left -k seconds later; so a shell lock is for a script, not for an
interactive shell. If the hold process is killed, its guard (ps: "dls-lock
guard") does the same, and keeps the lock's connection until it has (as the
keeper does): only killing both at once leaves the shell untold. If the
guard is killed first, the hold process stops the shell as for a lost lock. If the hold
process is stopped, its guard stops the shell before its lease runs out, as the
keeper stops a command (above). A
whole script can also run under dls-lock, with this line near its top (add -n
to give up at once if another run holds it, as flock's manual does):

    [ "$DLS_LOCKED" = "$0" ] || exec env DLS_LOCKED="$0" dls-lock FILE KEY "$0" "$@"

An executable COMMAND without a #! line is run by /bin/sh, as the shells and
flock(1) run it. A COMMAND that is not found exits 127, one that cannot be run
126: the shell's codes, which a script already tests (flock gives 69 and 126;
69 is dls-lock's "service unavailable" and must not mean a mistyped command).
"""

EPILOG = (
    f"Exit status: the command's (128+N when it died of signal N); {exitcodes.LOST} the lock was\n"
    f"lost while the command ran (it was stopped); {exitcodes.FAILED} (or -E CODE) when the lock is\n"
    f"held and -n or -w gives up; {exitcodes.NOINPUT} FILE missing; {exitcodes.UNAVAILABLE} service unreachable "
    "(or lost\n"
    f"before the command ran); {exitcodes.CONFIG} bad JDLS; {exitcodes.CANNOT_RUN}/{exitcodes.NOT_FOUND} command "
    f"not runnable; {exitcodes.USAGE} usage\n"
    f"error (a KEY longer than a request carries too); {exitcodes.DEADLOCK} (EDEADLK) the request was refused to\n"
    "break a deadlock (the command did not run).")


def _untranslated() -> None:
    """argparse's own words (usage:, options, its errors) as they are written, in English like dls-lock's:
    argparse asks gettext for each one's translation as it builds a parser, and the first lookup imports
    locale (its tables, regular expressions): a millisecond and more of every start, for message catalogs
    Python does not ship. Done by ``main`` alone: the dls-lock process, not a program that builds the parser
    (the man pages, an application)."""
    argparse._ = str  # type: ignore[attr-defined]
    argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural  # type: ignore[attr-defined]


def get_parser() -> argparse.ArgumentParser:
    # Built with a formatter of a fixed width: argparse makes one for every argument added (to check its
    # metavar), and one of the terminal's width imports shutil (with bz2, lzma) to ask it, milliseconds of
    # dls-lock's start-up for nothing: the width matters only to the help, made with the real one (set below).
    parser = argparse.ArgumentParser(prog="dls-lock", description=DESCRIPTION, epilog=EPILOG, usage=USAGE,
                                     formatter_class=functools.partial(argparse.RawDescriptionHelpFormatter,
                                                                       width=80))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-s", "--shared", action="store_const", dest="mode", const="PR",
                      help="take a shared (read, PR) lock")
    mode.add_argument("-x", "--exclusive", action="store_const", dest="mode", const="EX",
                      help="take an exclusive (write, EX) lock; the default")
    parser.set_defaults(mode="EX")
    parser.add_argument("-n", "--nonblock", action="store_true", help="fail at once if the lock is held")
    parser.add_argument("-w", "--wait", "--timeout", type=_seconds, metavar="SECONDS", dest="timeout",
                        help="wait at most SECONDS for the lock (-w 0 is -n: no waiting, and no waiting message)")
    parser.add_argument("-E", "--conflict-exit-code", type=_exit_code, default=exitcodes.FAILED, metavar="CODE",
                        help=f"exit status when -n or -w gives up (default {exitcodes.FAILED})")
    parser.add_argument("-c", "--command", dest="shell_command", metavar="COMMAND",
                        help="run the single string COMMAND with $SHELL -c (/bin/sh if SHELL is unset), as "
                        "flock -c does; it may come after KEY (dls-lock FILE KEY -c 'a | b')")
    parser.add_argument("-o", "--close", action="store_true",
                        help="release the lock when COMMAND itself ends, not when the last process it started "
                        "ends (as flock -o: the processes it leaves running do not hold the lock, so nothing "
                        "stops them when the lock is lost or dls-lock is killed once COMMAND has ended)")
    parser.add_argument("--hold", action="store_true",
                        help="no COMMAND: take the lock for the life of the calling shell (dls-lock's parent), "
                        "as exec 9>FILE; flock 9 does, and exit 0 once it is held; it is released when the shell "
                        "ends, however it ends, or by -u (see DESCRIPTION)")
    parser.add_argument("-u", "--unlock", action="store_true",
                        help="no COMMAND: release the lock --hold took for this shell (exit 0; 75 if it was lost; "
                        "1 if this shell holds no such lock)")
    parser.add_argument("-k", "--kill-after", type=_seconds, default=DEFAULT_KILL_AFTER, metavar="SECONDS",
                        help="when the lock is lost, KILL the processes of the command still running SECONDS after "
                        f"TERM (default {DEFAULT_KILL_AFTER:g}); the lock is told lost at the latest 5 s before the "
                        "service may hand it on, so keep SECONDS below that margin (with jdls --lock-delay under "
                        "5 s, or 0, the lock may be handed on as soon as it is lost: use -k 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what is happening on standard error")
    parser.add_argument("-V", "--version", action="version", version=f"dls-lock {__version__}")
    parser.add_argument("file", nargs="?", metavar="FILE",
                        help="the file whose record is locked: it must exist (dls-lock does not create it)")
    parser.add_argument("key", nargs="?", metavar="KEY",
                        help="the record key: its bytes as the shell gives them, UTF-8 or not")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="the command to run with the lock held")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG", help="its arguments")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, its omissions said in words; the command to run in ``args.argv``.

    argparse alone cannot say it: FILE, KEY and COMMAND are optional to it (``-c`` stands for COMMAND and
    may follow KEY, where the remainder begins), so what is missing is checked here."""
    parser = get_parser()
    args = parser.parse_args(argv)
    rest: list[str] = list(args.args)
    if args.command is None and rest:  # "FILE KEY -c STRING": -c after KEY, as flock takes it after FILE
        first = rest.pop(0)
        if first in ("-c", "--command"):
            given = rest
        elif first.startswith("--command="):
            given = [first.partition("=")[2], *rest]
        elif first.startswith("-c"):
            given = [first[2:], *rest]
        else:
            parser.error(f"{first!r} after KEY: options go before FILE (only -c may follow KEY)")
        if len(given) != 1:
            parser.error("-c takes one argument, the whole command line in one (quoted) string")
        if args.shell_command is not None:
            parser.error("-c given twice")
        args.shell_command = given[0]
        rest = []
    missing = [name for name, value in (("FILE", args.file), ("KEY", args.key)) if value is None]
    alone = "--hold" if args.hold else "-u" if args.unlock else None
    if alone is not None:
        given = [option for option, value in (("--hold", args.hold), ("-u", args.unlock), ("-c", args.shell_command),
                                              ("-o", args.close)) if value and option != alone]
        if given:
            parser.error(f"{alone} and {given[0]} given: {alone} runs no command")
        if args.command is not None:
            parser.error(f"{alone} runs no command: give FILE and KEY alone (not {args.command!r})")
        if missing:
            parser.error(f"missing {_and(missing)}: give the file and the record key")
        return args
    if args.command is None and args.shell_command is None:
        missing.append("COMMAND (or -c COMMAND)")
    if missing:
        parser.error(f"missing {_and(missing)}: give the file, the record key and the command to run")
    if args.command is not None and args.shell_command is not None:
        parser.error("both -c COMMAND and a COMMAND given: give one")
    if args.shell_command is not None:
        args.argv = [os.environ.get("SHELL") or "/bin/sh", "-c", args.shell_command]
    else:
        args.argv = [args.command, *rest]
    if args.timeout == 0:  # a zero wait does not wait: -n, which says nothing while it does not
        args.nonblock, args.timeout = True, None
    return args


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _seconds(text: str) -> float:
    from dls_proto import numerals  # here, not at the top: --help and --version load no dls_proto

    value = numerals.real(text)
    if value is None or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def _exit_code(text: str) -> int:
    from dls_proto import numerals

    value = numerals.integer(text)
    if value is None or value > 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not an exit status (0 to 255)")
    return value


def _passed_on() -> list[signal.Signals]:
    """The signals dls-lock passes on: those of PASSED_ON it was not started with ignored (a shell starts a
    background job with INT and QUIT ignored; the command then keeps them ignored, as a shell's would)."""
    return [signum for signum in PASSED_ON if signal.getsignal(signum) != signal.SIG_IGN]


class _EarlyConnection:
    """The connection to the service, made as soon as dls-lock knows which service and what to lock, and
    handed to the client's first connection to that server (``connect``; any other connects as usual).

    The service answers a new connection by forking it a lock server, which starts before it reads the
    greeting: milliseconds (more on a busy machine), which dls-lock spends meanwhile on the rest of its
    start (its keeper, its threads, the client's imports) instead of waiting for them after it. The
    connection is made before the keeper is forked, so the keeper closes its copy at once (``fds``): it
    keeps only the duplicates it is handed once the lock is held (``kept_connections``). A connection
    that failed is that first connection's failure, told as it would have been."""

    def __init__(self, server: Server) -> None:
        from .channel import tcp_connect

        self.server = server
        self._connect = tcp_connect
        self._sock: socket.socket | None = None
        self._error: OSError | None = None
        try:
            self._sock = tcp_connect(server)
        except OSError as exc:
            self._error = exc

    def fds(self) -> list[int]:
        """The descriptor of the connection while it waits for the client (for the keeper to close)."""
        return [self._sock.fileno()] if self._sock is not None else []

    def connect(self, server: Server, timeout: float) -> socket.socket:
        """The client's ``connect``: the connection made early (or its failure) the first time it is asked
        for its server; a new one otherwise."""
        if server == self.server:
            sock, error = self._sock, self._error
            self._sock = self._error = None
            if error is not None:
                raise error
            if sock is not None:
                return sock
        return self._connect(server, timeout)


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
        from .command_keeper import SI_KERNEL

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

    def fell_silent(self) -> None:
        """The keeper stopped the command because this process fell silent (see command_keeper): say so,
        and count the lock lost (it may still have been held, but nobody could be sure of it)."""
        if self._first() is not None:
            _tell(f"this dls-lock (pid {os.getpid()}) was stopped or frozen too long to be sure it still held "
                  f"the lock on {self.name}: the command was stopped")

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


def wait_notice(name: str, verbose: bool) -> Callable[[Holder], None]:
    """What to call with each interim message of a wait for the lock on ``name`` (every third of TIMEOUT):
    it says "waiting for" once per wait, not at every one; with -v also each time the holder changes."""
    last: Holder | None = None

    def waiting(holder: Holder) -> None:
        nonlocal last
        if last is None:
            _tell(f"waiting for {name}, held by {holder.describe()}")
        elif verbose and holder != last:
            _tell(f"still waiting for {name}, now held by {holder.describe()}")
        last = holder

    return waiting


def main(argv: Sequence[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        # Ctrl-C ends dls-lock by its default action, as the signal relay passes it on later: not Python's
        # KeyboardInterrupt, a traceback from wherever the start-up is (its imports, its connection).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    _untranslated()
    args = _parse(argv)
    from .channel import DEAD_SERVER_BOUND

    if args.kill_after >= DEAD_SERVER_BOUND:
        _tell(f"warning: -k {args.kill_after:g} is not less than the {DEAD_SERVER_BOUND:g} s between a lost lock "
              "being told and the service handing it on: a command that ignores TERM may run beside the next "
              "holder")

    from .config import Config, port_number
    from .errors import ConfigurationError, DlsError

    say = _tell if args.verbose else None
    try:
        # Not JDLS EXIT's SIGTERM to itself, which would end dls-lock without a word (143): a service it can
        # no longer reach is a lost lock here, told and stopped as one, or a request that fails.
        config = (Config.from_environment() or Config()).replace(exit=False)
        port_number()  # JBCPORTNO, which the client reads: refused here like a malformed JDLS
    except ConfigurationError as exc:
        _tell(str(exc))
        return exitcodes.CONFIG
    from .locks import FileRef, key_bytes

    try:
        key = key_bytes(os.fsencode(args.key))  # the bytes the shell gave, UTF-8 or not, as --hold and -u take it
    except DlsError as exc:  # longer than a request carries
        _tell(f"KEY: {exc}")
        return exitcodes.USAGE
    try:
        ref = FileRef.of(args.file)
    except DlsError as exc:
        _tell(f"{exc} (dls-lock does not create FILE: the lock is on a record of a file that exists)")
        return exitcodes.NOINPUT
    from dls_proto import Mode

    if args.hold or args.unlock:
        from . import shell_hold

        if args.unlock:
            return shell_hold.unlock(os.getppid(), ref.inode, key, f"{args.file} {args.key}")
        return shell_hold.hold(shell_hold.HoldRequest(
            file=args.file, key=args.key, ref=ref, mode=Mode[args.mode], nonblock=args.nonblock,
            timeout=args.timeout, conflict=args.conflict_exit_code, grace=args.kill_after, say=say,
            on_wait=wait_notice(f"{args.file} {args.key}", args.verbose)), config)
    passed_on = _passed_on()
    if signal.SIGINT in passed_on:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python's KeyboardInterrupt: dls-lock dies of it instead
    early = _EarlyConnection(config.server)
    from .client import Client
    from .command_keeper import Keeper
    from .errors import Deadlock, LockRefused

    # Before any thread exists (the keeper is forked, the relay's thread and the client's inherit the mask).
    # Until then a signal of PASSED_ON ends dls-lock by its default action, as the relay does.
    command_mask = signal.pthread_sigmask(signal.SIG_BLOCK, passed_on)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # not ignored (inherited so): children must stay to be reaped
    keeper = Keeper.fork(args.argv, passed_on=passed_on, command_mask=command_mask,
                         grace=args.kill_after, say=say, all_processes=not args.close, holder_only=early.fds())
    relay = _SignalRelay(passed_on)
    watch = _LostWatch(args.file, args.key, args.kill_after)

    waiting = wait_notice(f"{args.file} {args.key}", args.verbose)
    client = Client(config, connect=early.connect)
    try:
        if say:
            say(f"using lock service {config.server}")
        held = client.lock(ref, key, Mode[args.mode], wait=not args.nonblock, timeout=args.timeout,
                           on_wait=waiting, on_lost=watch.on_lost)
    except LockRefused as exc:  # and LockTimeout: -n or -w gave up
        if say:
            say(str(exc))
        keeper.abandon()
        return int(args.conflict_exit_code)
    except ConfigurationError as exc:  # found only when the services answered (SERVER2 naming SERVER's)
        _tell(str(exc))
        keeper.abandon()
        return exitcodes.CONFIG
    except Deadlock as exc:  # chosen as the one request of a cycle of waiters to refuse
        _tell(str(exc))
        keeper.abandon()
        return exitcodes.DEADLOCK
    except DlsError as exc:  # the service cannot be reached or was lost, or refused the request
        _tell(str(exc))
        keeper.abandon()
        return exitcodes.UNAVAILABLE
    if say:
        say(f"locked {args.file} {args.key} ({Mode(held.mode).name}, 0x{held.value:08x})")
    try:
        status = _run_holding(client, held, keeper, relay, watch)
    finally:
        client.close()  # and the connection's end releases the lock, whatever release() could not
    if say and not watch.lost:
        say("released")
    return status


def _run_holding(client: Client, held: HeldLock, keeper: Keeper, relay: _SignalRelay, watch: _LostWatch) -> int:
    """Run the command while the lock is held, and release it; the command's status, or LOST."""
    if held.lost or not watch.running(keeper):
        watch.found(held.lost_reason or "lost")
        keeper.abandon()
        return exitcodes.UNAVAILABLE  # the command never ran: as if the service had been lost before the grant
    relay.keeper = keeper
    from .lease import Renewal

    renewal = Renewal(keeper.lease, lambda: client.held_until(held),
                      also=lambda: keeper.connections.keep(client.held_through(held)))
    keeper.run_command(held.token)
    status = keeper.wait()
    renewal.stop()
    relay.keeper = None
    watch.ended()
    if keeper.lease.ran_out:
        watch.fell_silent()
    elif keeper.killed:
        _tell(f"the keeper (pid {keeper.pid}) was killed, and the command with it")
    from .errors import DlsError, LockLost

    try:
        held.release()
    except LockLost as exc:
        watch.found(exc.reason)
    except DlsError as exc:  # the lock goes with the connection, closed next
        _tell(f"releasing the lock on {watch.name}: {exc}")
    return exitcodes.LOST if watch.lost else status


def run() -> NoReturn:
    """The dls-lock command (its entry point): main's exit status, the process ended with it at once
    (os._exit) once standard output and error are flushed. By then the lock is released, its connection
    closed and the keeper reaped (or the hold process left running); what the interpreter's own exit would
    add is taking its modules and objects apart, several milliseconds of a short dls-lock's run, which
    nothing of dls-lock needs: it registers no atexit handler, its threads are daemons (ended either way),
    its trace is written unbuffered. --help, a usage error and an exception end as any Python program."""
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing of dls-lock's was waiting in it
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
