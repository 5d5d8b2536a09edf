"""The ``jdls`` (``jDLS``) command line: start, stop, remove and display a lock service.

The short options are jDLS's, so existing scripts and habits keep working,
including combined flags such as ``-ibs13000,50`` or ``-dvL``. What jDLS did
not need on a single service per machine (the port, the address to listen on,
running in the foreground for a supervisor) are long options.

The command line only parses and checks; the work is done by ``daemon``
(start), ``stop`` (stop, remove) and ``display``.
"""

from __future__ import annotations

import argparse
import os
import sys

from dls_shm import Instance, geometry_for

from .__about__ import __version__
from .daemon import start
from .display import display
from .roles import LISTENER, MONITOR, ROLES
from .settings import DEFAULT_BIND, DEFAULT_PORT, DEFAULT_STOP_TIMEOUT, DEFAULT_TIDY_MINUTES, Settings
from .stop import remove_ipc, stop_roles

PORT_VARIABLE = "JDLS_PORT"

EPILOG = f"""\
examples:
  jdls -ibs13000,50   start monitor and listener in the background, table of at least
                      13000 locks in groups of 50 (263 groups, the next prime: 13150 locks)
  jdls -ibD           start the listener only (no table: OS file locks)
  jdls -kD            stop the listener only (lock servers and their clients go on)
  jdls -k             stop everything: listener, lock servers, monitor
  jdls -K             remove the lock table's shared memory and semaphore
  jdls -dvL           show the service, the table header and every lock

The instance is $JBCRELEASEDIR (pid files in run/, log in log/jdls.log);
the port is --port, else ${PORT_VARIABLE}, else {DEFAULT_PORT}.
"""


def _table_size(text: str) -> tuple[int, int]:
    """``-s r,g``: r record locks in groups of g locks (two positive integers)."""
    parts = text.split(",")
    try:
        records, per_group = (int(p) for p in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        records, per_group = 0, 0
    if records < 1 or per_group < 1:
        raise argparse.ArgumentTypeError(
            f"invalid table size {text!r}: expected r,g (r record locks in groups of g locks, "
            "two positive integers, e.g. 13000,50)"
        )
    try:
        geometry_for(records, per_group)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid table size {text!r}: {exc}") from None
    return records, per_group


def _minutes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid tidy period {text!r}: expected a number of minutes (1 or more)")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid tidy period {text!r}: expected a number of seconds (1 or more)")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected a positive number of seconds")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 0..65535 (0: any free port)")
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdls",
        description="The dls lock service: the lock monitor (owner of the shared memory lock table) and the "
        "lock listener (one lock server process per remote client).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("-i", dest="action", action="store_const", const="start",
                        help="initialise: create the lock table and start the service")
    action.add_argument("-k", dest="action", action="store_const", const="stop",
                        help="stop the monitor and the listener (and, without -A/-D, every lock server)")
    action.add_argument("-K", dest="action", action="store_const", const="remove",
                        help="remove the lock table's IPC resources (shared memory and semaphore)")
    action.add_argument("-d", dest="action", action="store_const", const="display",
                        help="display the service and its lock table (-v: header details, -L: the locks)")
    parser.add_argument("-A", dest="monitor_only", action="store_true",
                        help="the lock monitor (arbiter) only: do not start/stop the listener")
    parser.add_argument("-D", dest="listener_only", action="store_true",
                        help="the distributed lock listener only: do not start/stop the monitor")
    parser.add_argument("-b", dest="background", action="store_true",
                        help="with -i: run in the background (the normal way)")
    parser.add_argument("-s", dest="size", metavar="r,g", type=_table_size,
                        help="with -i: a table of r record locks in groups of g locks "
                        "(the group count is rounded up to a prime)")
    parser.add_argument("-t", dest="tidy_minutes", metavar="nn", type=_minutes,
                        help=f"with -i: tidy orphaned locks every nn minutes (default {DEFAULT_TIDY_MINUTES})")
    parser.add_argument("-P", dest="port_owners", action="store_true",
                        help="with -i: locks are owned by port numbers rather than process ids")
    parser.add_argument("-T", dest="timestamps", action="store_true",
                        help="with -i: time-stamp every lock (shown by -dL)")
    parser.add_argument("-L", dest="locks", action="store_true", help="with -d: list every lock")
    parser.add_argument("-v", dest="verbose", action="count", default=0,
                        help="with -d: show the whole table header; with -i: log more (debug)")
    parser.add_argument("--port", type=_port, default=None,
                        help=f"with -i: TCP port to listen on (default ${PORT_VARIABLE}, else {DEFAULT_PORT})")
    parser.add_argument("--bind", metavar="ADDR", default=None,
                        help=f"with -i: address to listen on (default {DEFAULT_BIND})")
    parser.add_argument("--foreground", action="store_true",
                        help="with -i: stay in the foreground (for a supervisor), even with -b")
    parser.add_argument("--tidy-seconds", type=_seconds, default=None, metavar="N",
                        help="with -i: tidy period in seconds, overriding -t (for tests and tuning)")
    parser.add_argument("--stop-timeout", type=_timeout, default=DEFAULT_STOP_TIMEOUT, metavar="S",
                        help="seconds to wait for a process to stop before killing it "
                        f"(default {DEFAULT_STOP_TIMEOUT:g})")
    parser.add_argument("--version", action="version", version=f"%(prog)s (dls-daemon) {__version__}")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; parser.error (exit 2) on the first wrong one."""
    start_only = {
        "-b": args.background, "-s": args.size is not None, "-t": args.tidy_minutes is not None,
        "-P": args.port_owners, "-T": args.timestamps, "--foreground": args.foreground,
        "--tidy-seconds": args.tidy_seconds is not None, "--port": args.port is not None,
        "--bind": args.bind is not None,
    }
    if args.action != "start":
        for option, given in start_only.items():
            if given:
                parser.error(f"{option} applies only to -i")
    if args.action != "display" and args.locks:
        parser.error("-L applies only to -d")
    if args.monitor_only and args.listener_only:
        parser.error("-A and -D exclude each other (neither means both)")
    if args.action in ("remove", "display") and (args.monitor_only or args.listener_only):
        parser.error("-A and -D apply only to -i and -k")
    if args.action == "remove" and args.verbose:
        parser.error("-v applies only to -i and -d")
    if args.port is None and args.action == "start":
        env = os.environ.get(PORT_VARIABLE)
        if env:
            try:
                args.port = _port(env)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{PORT_VARIABLE}: {exc}")
        else:
            args.port = DEFAULT_PORT


def _roles(args: argparse.Namespace) -> tuple[str, ...]:
    if args.monitor_only:
        return (MONITOR,)
    if args.listener_only:
        return (LISTENER,)
    return ROLES


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
        _check(parser, args)
    except SystemExit as exc:  # usage errors (2), -h and --version (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        instance = Instance.from_environment()
    except ValueError as exc:
        print(f"jdls: {exc}", file=sys.stderr)
        return 2
    if args.action == "start":
        tidy = args.tidy_seconds or (args.tidy_minutes or DEFAULT_TIDY_MINUTES) * 60
        settings = Settings(
            instance, size=args.size, tidy_seconds=tidy, port_owners=args.port_owners, timestamps=args.timestamps,
            bind=args.bind or DEFAULT_BIND, port=args.port, verbosity=args.verbose, stop_timeout=args.stop_timeout,
        )
        return start(settings, _roles(args), background=args.background and not args.foreground)
    if args.action == "stop":
        roles = _roles(args)
        return stop_roles(instance, roles, servers=roles == ROLES, timeout=args.stop_timeout)
    if args.action == "remove":
        return remove_ipc(instance)
    return display(instance, verbose=args.verbose > 0, locks=args.locks)
