"""dls-lock: run a command while holding a record lock, as flock(1) does with a file lock.

The lock lives as long as dls-lock's connection to the service. If dls-lock is
killed, the service releases the lock at once; so that the command never goes
on unprotected, it is started with a parent-death signal (SIGKILL) and dies
with dls-lock. Signals that ask dls-lock to stop (TERM, INT, HUP, QUIT) are
passed on to the command, and the lock is released when the command ends.

Exit status: the command's; 1 (or -E CODE) when the lock was held and -n or
-w gave up; 2 for a usage error; 66 when FILE does not exist; 69 when the
service cannot be reached or is lost; 78 for a bad JDLS; 126/127 when the
command cannot be run; 128+N when the command died of signal N.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
from collections.abc import Sequence

from dls_proto import Mode

from . import exitcodes
from .__about__ import __version__
from .client import Client
from .config import Config, port_number
from .errors import ConfigurationError, DlsError, Holder, LockRefused
from .locks import FileRef

_PR_SET_PDEATHSIG = 1


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dls-lock",
        description="Run COMMAND while holding the dls record lock on (FILE, KEY), like flock(1) for records. "
        "The lock service is the one JDLS names (default localhost, port 50002).",
        epilog=f"Exit status: the command's; {exitcodes.FAILED} (or -E CODE) when the lock is held and -n or -w "
        f"gives up; {exitcodes.NOINPUT} FILE missing; {exitcodes.UNAVAILABLE} service unreachable; "
        f"{exitcodes.CONFIG} bad JDLS; {exitcodes.CANNOT_RUN}/{exitcodes.NOT_FOUND} command not runnable.",
    )
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


def _die_with_parent() -> None:
    """In the child before exec: be killed if dls-lock dies, so the lock and the work end together."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    say = (lambda text: print(f"dls-lock: {text}", file=sys.stderr, flush=True)) if args.verbose else None
    try:
        config = Config.from_environment() or Config()
        port_number()  # JBCPORTNO, which the client reads: refused here like a malformed JDLS
    except ConfigurationError as exc:
        print(f"dls-lock: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        ref = FileRef.of(args.file)
    except DlsError as exc:
        print(f"dls-lock: {exc}", file=sys.stderr)
        return exitcodes.NOINPUT

    def waiting(holder: Holder) -> None:
        print(f"dls-lock: waiting for {args.file} {args.key}, held by {holder.describe()}", file=sys.stderr,
              flush=True)

    client = Client(config)
    try:
        if say:
            say(f"using lock service {config.server}")
        held = client.lock(ref, args.key, args.mode, wait=not args.nonblock, timeout=args.timeout,
                           on_wait=waiting)
    except LockRefused as exc:  # and LockTimeout: -n or -w gave up
        if say:
            say(str(exc))
        return int(args.conflict_exit_code)
    except DlsError as exc:  # the service cannot be reached or was lost, or refused the request
        print(f"dls-lock: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    if say:
        say(f"locked {args.file} {args.key} ({Mode(held.mode).name}, 0x{held.value:08x})")
    try:
        return _run(args.command, args.args)
    finally:
        client.close()  # closing the connection releases the lock
        if say:
            say("released")


def _run(command: str, arguments: list[str]) -> int:
    try:
        child = subprocess.Popen([command, *arguments], preexec_fn=_die_with_parent)
    except FileNotFoundError:
        print(f"dls-lock: {command}: command not found", file=sys.stderr)
        return exitcodes.NOT_FOUND
    except PermissionError:
        print(f"dls-lock: {command}: permission denied", file=sys.stderr)
        return exitcodes.CANNOT_RUN

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    status = child.wait()
    return exitcodes.killed_by(-status) if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
