"""The ``jdls`` (``jDLS``) command line: start, stop, remove, display and test a lock service.

The short options are jDLS's, so existing scripts and habits keep working,
including combined flags such as ``-ibs13000,50``, ``-dvL`` or ``-Cteststring``.
What jDLS did not need on a single service per machine (the port, the address
to listen on, running in the foreground for a supervisor, the lock-file
directories, the limits) are long options.

Every option is checked against the action it comes with, and against ``-A``
and ``-D`` (an option of the listener makes no sense with ``-A``, one of the
table with ``-D``): a combination that would be silently ignored is a usage
error (exit 2) instead, because an operator who typed it meant something.

The command line only parses and checks; the work is done by ``start``
(start), ``stop`` (stop, remove) and ``display`` (display, connection test).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NoReturn, TypeVar

from dls_proto import DEFAULT_MAX_FRAME, ConfigurationError, environment, jdls, numerals, probe
from dls_shm import BLOCK_MAX, DEFAULT_BLOCK_SIZE, LISTENER, MONITOR, ROLES, Instance, geometry_for, trusted

from . import log as daemon_log
from . import status_page, web
from .__about__ import __version__
from .context import (
    DEFAULT_ADMIN_ALLOW,
    DEFAULT_DEAD_CLIENT_BOUND,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_LOCKS_PER_CLIENT,
    DEFAULT_MAX_PER_ADDRESS,
    MIN_TABLE_SHARE,
    TABLE_SHARE,
    Limits,
    Network,
)
from .display import DISPLAY_HELP, display
from .exitcodes import ExitCode
from .settings import DEFAULT_BIND, DEFAULT_LOCK_DELAY, DEFAULT_STOP_TIMEOUT, DEFAULT_TIDY_MINUTES, Settings
from .start import os_problem, start
from .stop import remove_ipc, stop_roles
from .tls import TlsSetupError

PORT_VARIABLE = "JDLS_PORT"
DEFAULT_PORT = jdls.DEFAULT_PORT
#: Smallest frame limit that still lets every message of the protocol through (a Hello with long names).
MIN_FRAME = 1024
MAX_FRAME = 64 * 1024 * 1024
#: The longest lock-delay: a day (clients are told it in milliseconds, in 32 bits).
MAX_LOCK_DELAY = 86400.0
UNIT_FILE = "dls-daemon.service"
#: The names of the command ([project.scripts]): jdls, jDLS as the guide writes the service, JDLS as it runs
#: the test (``JDLS -Cteststring``).
NAMES = ("jdls", "jDLS", "JDLS")

DESCRIPTION = """\
The dls lock service: the lock monitor (owner of the shared memory lock table,
tidies orphaned locks) and the lock listener (one lock server process per
remote client).

  jdls -i {-bPTAD} {-s r,g} {-t nn}   start
  jdls -k {-AD}                       stop
  jdls -K {-o}                        remove the lock table (IPC resources)
  jdls -d {-v} {-L}                   display the service and its table
  jdls -C teststring                  test a client connection
"""

EPILOG = f"""\
examples:
  jdls -ibs13000,50   start monitor and listener in the background, table of at least
                      13000 locks in groups of 50 (263 groups, the next prime: 13150 locks)
  jdls -ibD           start the listener only: its lock servers lock in the table if one
                      exists (the monitor's), else as OS file locks in --lock-dir
  jdls -kD            stop the listener only (lock servers and their clients go on)
  jdls -kA; jdls -ibA stop and start the monitor only (listener and lock servers go on)
  jdls -k             stop everything: listener, lock servers, monitor
  jdls -K             remove the lock table's shared memory and semaphore
  jdls -K -o          remove it even though lock servers or other processes still have it
                      attached (never while the monitor or the listener runs)
  jdls -dvL           show the service, the table header and every lock
  jdls -Chello        connect as a client would and have 'hello' echoed

-o (override, with -K only): the jDLS guide lists it without saying what it does.
  Here it removes the lock table even while lock servers (left by jdls -kD, or serving
  after a crash) or other processes have it attached. They are named first; they keep
  their mapping but get errors on their next lock, and new processes no longer see the
  table. A lock they hold stays held in the removed table, and its holder, which makes no
  further request, is not told: it learns that its lock is lost only when its lock server
  stops (jdls -k). Until then jdls -ib and jdls -ibD refuse (they name those lock servers),
  so that no new mechanism grants those records again. It never removes the table while the
  monitor or the listener runs, -o or not: stop them first (jdls -k, or -kA and -kD). Meant
  for an operator clearing up after a crash.

--lock-delay S: a lock that a remote client holds is not freed when its lock server ends
  while the client may still live (the lock server killed, jdls -k, the client's host gone
  silent): it is kept for S seconds, and no conflicting lock is granted meanwhile, so that a
  client which has not yet noticed cannot overlap the next holder. The client takes it back
  through a new connection, proving it with what its grant gave it, also after jdls -k and
  jdls -ib on the same table; what is not taken back in time is freed, and a client that comes
  back later is told it lost the lock. A client whose process ended (the kernel closed its
  connection) frees its locks at once; a local process's are freed, not kept, as soon as a
  request they block finds it gone, else by the next tidy. The default, {DEFAULT_LOCK_DELAY:g} s
  (Consul's), is longer than a client takes to find its lock server gone (5 s) plus a restart of
  the service, so a live client reclaims in time; the price is that a request behind a crashed
  lock server's lock waits that long. 0 keeps nothing. The monitor writes it into the table,
  an existing one too; without a table (jdls -ibD: OS file locks) nothing can be kept, nor
  can the binary locks (JDLS BINARY: OS file locks in --binary-lock-dir) beside one. A record
  lock of a client with JDLS OSLOCKS is a table lock beside a table, kept like the others.

Deadlocks: every 0.25 s the monitor looks for cycles of waiting requests (each waits for
  the owner of a lock or of a request ahead of it: a process and thread, or with -P a port,
  thread and address), across local processes and remote clients, files and conversions.
  One request of each cycle is refused, the one that joined it last (it closed the cycle),
  of a client that knows DEADLOCK (protocol 4) if there is one: its client gets DEADLOCK
  (dls-lock exits 35) and keeps what it held, a conversion's lock in its old mode; the rest
  of the cycle goes on. Each refusal is logged. Without a lock
  table (jdls -ibD) there is no detection. --value-block-size sets the size of the value
  block every resource of a new table has (see dls-client's README).

One mechanism per instance: a monitor (-ibA, -ib) makes no lock table while OS file locks serve
  the instance: while the listener runs without a table, while lock servers run without one
  (left by -kD), or while an OS lock is held in --lock-dir (by a local process, say). It names
  them and what to do (jdls -k, then jdls -ib; or have the holders release) and exits 1, having
  started nothing. A listener that finds no table (-ibD) refuses the same way while lock
  servers still lock in a table removed under them (jdls -K -o). Local processes that hold no
  OS lock follow a table made later. Binary locks are outside this rule (a namespace of their
  own, OS file locks for every client). A record has one holder: a client with JDLS OSLOCKS has
  its record locks taken as OS file locks only where there is no table; beside one the table
  serves them like every other record lock, so that it and the clients without OSLOCKS exclude
  each other (the lock server's log says so once per connection).

Who may connect (the listener): with --allow only those networks connect; a connection from
  elsewhere is closed at accept, unanswered, and logged. Without --allow anyone who can reach the
  port may connect, as with jDLS, and the log says so at start: give --allow on any network you do
  not trust (loopback is not implied: add 127.0.0.1 when local tools connect). The lock snapshot
  (every lock and client, as remote show-item-locks and list-open-files read it) and the server's
  host name go to --admin-allow only (default this host); from loopback, which every local user
  connects from, only to an operator: the service's user, root, or a member of the service's group
  (others are told so). On a -P table a client port belongs to the one connection that claimed it
  while that connection lives. Each address may have --max-per-address connections; each client
  --max-locks locks (default a quarter of the table). A peer is told a code and a short reason when
  refused; the log has the rest.

-C teststring: tests the client configuration of this host as dls-test does (the same code):
  ${jdls.VARIABLE} and JBCPORTNO are read as every client reads them, and a value a client refuses
  is refused here with the client's message and exit status 78. Each server ${jdls.VARIABLE} names
  (SERVER, then SERVER2) is connected to as a client connects ({jdls.CONNECT_TIMEOUT:g} s to accept the
  connection; TLS with its CA, CERT and KEY when ${jdls.VARIABLE} says TLS), greeted, and has the string
  echoed, each answer within ${jdls.VARIABLE}'s TIMEOUT (default {jdls.DEFAULT_TIMEOUT:g} s). --host and
  --port replace SERVER and SERVER2 (the rest of ${jdls.VARIABLE} still applies); with ${jdls.VARIABLE}
  unset, localhost on ${PORT_VARIABLE} or {DEFAULT_PORT} is tested. Exit status 1 when the string does not
  come back from every server; the test string is at most {probe.MAX_TEST_STRING} bytes.

TLS: --tls-cert FILE --tls-key FILE make the port speak TLS only (1.2 or later; 1.3 when the
  client speaks it); clients set TLS in ${jdls.VARIABLE}, and CA=file to verify the certificate,
  which must name the host they connect to (SERVER=). --tls-client-ca FILE also requires a client
  certificate signed by that CA (CERT=file, KEY=file in ${jdls.VARIABLE}). The files are PEM; they are
  read once, at start (a new certificate takes jdls -kD; jdls -ibD). A key file readable or
  writable by others, or writable by its group, is refused; so is a key that does not belong to
  the certificate. The handshake is done by each connection's lock server, within
  --handshake-timeout; a failed one (a plain client, a certificate not accepted or missing) is
  closed and logged with the reason.

Logs: log/jdls.log has a line per event of the monitor, the listener and each lock server, also
  on standard error with --foreground. --log-format json makes each line one JSON object: time
  (ISO 8601 UTC, milliseconds), level, role (monitor, listener, server), pid, client (a lock
  server's client address:port, else null), message, and exception (a traceback) when there is
  one; everything in it escaped, so a client's bytes quoted in a message keep to their line and
  field. Errors also go to {environment.ERROR_TRACE} in jBASE's text, and with --syslog every line
  to syslog as text (syslog stamps time and host itself), whatever --log-format says.

systemd (jdls --unit prints the unit): under a Type=notify unit (NOTIFY_SOCKET set) the process
  started with --foreground tells systemd STATUS=starting, then READY=1 once the listener accepts
  (with -A once the table is made; with -D once the port is bound), every 10 s a STATUS= line of the
  locks held and waiting and the lock servers, and STOPPING=1 when it stops. With WatchdogSec= set
  (WATCHDOG_USEC), its loop (the monitor's: the one that tidies and breaks deadlocks) sends
  WATCHDOG=1 every half period (never more often than every 50 ms; a WATCHDOG_USEC or
  WATCHDOG_PID that is not a number is logged and means no watchdog): a loop that hangs gets the
  service killed and restarted. Only
  that process sends (NotifyAccess=main); a notification that cannot be sent is logged once and
  never stops the service. In the background (-b) nothing is sent.

HTTP (--http ADDR:PORT): the lock monitor serves /metrics, in the Prometheus text format, and a
  status page at /, on ADDR:PORT (an IP address: 127.0.0.1:9102, [::1]:9102, 0.0.0.0:9102 for every
  interface). Only the --admin-allow networks may load anything (default this host); others get 403
  and the log names them. GET only (others 405). Each connection has {web.REQUEST_TIMEOUT:g} s for its request and
  at most {web.MAX_CONNECTIONS} are served at once (one more is closed unanswered): a slow or hostile client never
  delays the monitor's tidying or deadlock detection. A port in use fails the start, as the lock port
  does. The server runs in the monitor: with -D there is none (a usage error); with -A, --admin-allow
  applies to it.
  /metrics: the table's locks held and waiting by mode, its size and fullest group; grants by mode,
  refusals by reason, cancels and errors by code, wait and hand-off time histograms (from the lock
  servers, which send their counts to the monitor's run/metrics.sock at most once a second and as
  they end); tidy-ups, the locks they freed, deadlocks broken, lock servers running. Each has its HELP.

The status page (/ of --http) is for the operator in a hurry, in any browser, with nothing to install
  and nothing fetched from elsewhere: the locks now as show-item-locks --queues shows them (held,
  converting, waiting and refused requests, owners, fencing tokens, value blocks), with a filter box
  (file, key or owner; /?filter=TEXT in a link); who waits for whom drawn as a graph (an arrow from
  each waiter to every owner in its way, a cycle in red: the monitor breaks it within a moment); the
  hottest records (the most requests now, the most often waited on in the last hour); plots of the
  last hour's lock rate (grants per second) and wait times (the longest and mean age of the waiting
  requests, and the waits that ended by how long they took, from the metrics' histogram), which the
  monitor samples every {status_page.SAMPLE_PERIOD:g} s. It refreshes every 2 s from /api/locks and /api/history,
  JSON that scripts may read too (at most {status_page.MAX_REQUESTS} requests are listed; "total" says how many
  there are).

{DISPLAY_HELP}
The instance is $JBCRELEASEDIR (pid files in run/, log in log/jdls.log, errors also in
{environment.ERROR_TRACE}); the port is --port, else ${PORT_VARIABLE}, else {DEFAULT_PORT}.
Exit status: 0 done, 1 failed (the reason is printed), 2 usage error, 78 a $JBCRELEASEDIR that
cannot be an instance's directory (a regular file, too long a path) or a bad $DLS_IPC_KEY, and
for -C a JDLS or JBCPORTNO that clients refuse.
"""

N = TypeVar("N", int, float)


def _table_size(text: str) -> tuple[int, int]:
    """``-s r,g``: r record locks in groups of g locks (two positive integers)."""
    parts = text.split(",")
    records, per_group = (numerals.integer(p.strip()) or 0 for p in parts) if len(parts) == 2 else (0, 0)
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


def _shown(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _number(kind: Callable[[str], N | None], what: str, low: N, high: N | None = None,
            bounds: str | None = None) -> Callable[[str], N]:
    """An argparse type: a number of ``kind`` from ``low`` (to ``high``), the error naming ``what`` and
    the range (``bounds`` says it when the figures alone would not read well)."""

    if bounds is None:
        bounds = f"{_shown(low)} to {_shown(high)}" if high is not None else f"{_shown(low)} or more"

    def parse(text: str) -> N:
        value = kind(text)  # numerals': ASCII decimals only, as every dls program reads a number
        if value is None or not value >= low or (high is not None and value > high):  # also refuses nan
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: expected {bounds}")
        return value

    return parse


#: The longest a time option may be: a day (longer is no limit, which these options must keep).
MAX_SECONDS = 86400.0
#: Minutes as jDLS takes them, fractions allowed (-t 0.05 tidies every 3 s), at least one second.
_minutes = _number(numerals.real, "tidy period (minutes)", 1 / 60, MAX_SECONDS / 60,
                   bounds="minutes, fractions allowed, from one second's worth to a day's (-t 0.05 is 3 s, -t 1440 "
                   "a day)")
_seconds = _number(numerals.integer, "tidy period (seconds)", 1, int(MAX_SECONDS))
_timeout = _number(numerals.real, "timeout (seconds)", 0.001, MAX_SECONDS)
#: Port 0 is refused, also for a listener: the system would choose one that jdls -d never shows and that
#: no client's JDLS or JDLS_PORT could name, and -C cannot connect to it.
_port = _number(numerals.integer, "port", 1, 65535,
                bounds="1 to 65535 (0, a port of the system's choosing, is refused: clients must know it)")
_frame = _number(numerals.integer, "frame size (bytes)", MIN_FRAME, MAX_FRAME)
_count = _number(numerals.integer, "count", 1)
_bound = _number(numerals.real, "dead-client bound (seconds)", 1.0, MAX_SECONDS)
_delay = _number(numerals.real, "lock-delay (seconds)", 0.0, MAX_LOCK_DELAY)
_block_size = _number(numerals.integer, "value block size (bytes)", 1, BLOCK_MAX)


def _network(text: str) -> Network:
    """``--allow``/``--admin-allow``: an IPv4 or IPv6 network in CIDR notation, or one address (/32, /128)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid network {text!r}: expected an address or address/prefix (10.1.0.0/16, 192.0.2.7, "
            "2001:db8::/32)") from None


def _host_name(text: str) -> str:
    """``--host``/``--bind``: an IP address or a host name DNS can carry, checked as JDLS's SERVER is
    (dls_proto.jdls), not left to the resolver's UnicodeError."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a host name or address")
    try:
        return jdls.checked_host(text.strip(), "host")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("host: ")) from None


def _path(what: str) -> Callable[[str], Path]:
    """An argparse type: an absolute path to a ``what`` (a file, a directory); not empty."""
    def parse(text: str) -> Path:
        if not text:
            raise argparse.ArgumentTypeError(f"invalid {what} '': expected a path")
        return Path(text).absolute()
    return parse


_directory = _path("directory")
_file = _path("file")


def _group(text: str) -> int:
    try:
        return trusted.group_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def called_as(argv0: str | None = None) -> str:
    """The name the command was run by (``sys.argv[0]``'s), when it is one of NAMES; else ``jdls``
    (``python -m dls_daemon``), so that the usage, argparse's errors, --version and the refusals name what the
    operator typed. (The rest of the help says jdls under every name: one text for the three names' pages,
    which are written by a program of another name, so as jdls.)"""
    name = os.path.basename(sys.argv[0] if argv0 is None and sys.argv else argv0 or "")
    return name if name in NAMES else NAMES[0]


class _NoAction(Exception):
    """argparse found no action (-i, -k, ...): said only once the arguments it did not know are named."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that a missing action is raised (``_NoAction``) rather than reported: an
    unknown option (``jdls -x``) is then named first, since it is the likelier mistake."""

    relaxed = False

    def error(self, message: str) -> NoReturn:
        if message.startswith("one of the arguments") and not self.relaxed:
            raise _NoAction(message)
        super().error(message)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, an unknown option or argument named before a missing action."""
    try:
        return parser.parse_args(argv)
    except _NoAction as missing:
        groups = parser._mutually_exclusive_groups
        required = [g.required for g in groups]
        for group in groups:
            group.required = False
        try:
            _, extras = parser.parse_known_args(argv)
        finally:
            for group, was in zip(groups, required, strict=True):
                group.required = was
        options = [a for a in extras if a.startswith("-")]
        if options:
            parser.error(f"unknown option{'s' if len(options) > 1 else ''} {' '.join(options)} ({parser.prog} -h "
                         "lists them)")
        if extras:
            parser.error(f"unexpected argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}")
        if isinstance(parser, _Parser):
            parser.relaxed = True
        parser.error(str(missing))


def get_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=called_as(),  # the usage and argparse's errors name what the operator typed, as --version does
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("-i", dest="action", action="store_const", const="start",
                        help="initialise: create the lock table and start the service")
    action.add_argument("-k", dest="action", action="store_const", const="stop",
                        help="stop the monitor and the listener (and, without -A/-D, every lock server)")
    action.add_argument("-K", dest="action", action="store_const", const="remove",
                        help="remove the lock table's IPC resources (shared memory and semaphore); refuses "
                        "while the monitor or the listener runs, and while lock servers or other processes use "
                        "them unless -o")
    action.add_argument("-d", dest="action", action="store_const", const="display",
                        help="display the service and its lock table (-v: header details, -L: the locks)")
    action.add_argument("-C", dest="test_string", metavar="teststring",
                        help="test a client connection: connect, greet and have teststring echoed back")
    action.add_argument("--unit", dest="action", action="store_const", const="unit",
                        help=f"print the systemd unit file shipped with dls-daemon ({UNIT_FILE})")
    start_opts = parser.add_argument_group("with -i (start)")
    start_opts.add_argument("-b", dest="background", action="store_true",
                            help="run in the background (the normal way)")
    start_opts.add_argument("-s", dest="size", metavar="r,g", type=_table_size,
                            help="a table of r record locks in groups of g locks (the group count is rounded up "
                            "to a prime); an existing table is attached as it is")
    start_opts.add_argument("-t", dest="tidy_minutes", metavar="nn", type=_minutes,
                            help=f"tidy orphaned locks every nn minutes, fractions allowed "
                            f"(default {DEFAULT_TIDY_MINUTES})")
    start_opts.add_argument("--lock-delay", type=_delay, default=None, metavar="S",
                            help="keep the locks of a client whose lock server ended without it (killed, jdls "
                            "-k, its host silent) for S seconds, for the client to reclaim; 0: free them at once "
                            f"(default {DEFAULT_LOCK_DELAY:g}; see below)")
    start_opts.add_argument("--value-block-size", type=_block_size, default=None, metavar="N",
                            help=f"every resource's lock value block has N bytes, 1 to {BLOCK_MAX} (default "
                            f"{DEFAULT_BLOCK_SIZE}; set when the table is created)")
    start_opts.add_argument("-P", dest="port_owners", action="store_true",
                            help="port based locks: a lock belongs to a port number, thread and client address "
                            "(local processes: 0.0.0.0) rather than a process id and thread (set when the table is "
                            "created)")
    start_opts.add_argument("-T", dest="timestamps", action="store_true",
                            help="time-stamp every lock: -dL then shows each lock's age (set when the table is "
                            "created)")
    start_opts.add_argument("--port", type=_port, default=None,
                            help=f"TCP port to listen on, with -C to connect to, 1 to 65535 (default "
                            f"${PORT_VARIABLE}, else {DEFAULT_PORT}); 0 is refused: a port of the system's "
                            "choosing would be one no client knows")
    start_opts.add_argument("--bind", metavar="ADDR", default=None, type=_host_name,
                            help=f"address to listen on (default {DEFAULT_BIND})")
    start_opts.add_argument("--foreground", action="store_true",
                            help="stay in the foreground (for a supervisor such as systemd), even with -b")
    start_opts.add_argument("--tidy-seconds", type=_seconds, default=None, metavar="N",
                            help="tidy period in seconds, overriding -t (for tests and tuning)")
    start_opts.add_argument("--lock-dir", type=_directory, default=None, metavar="DIR",
                            help=f"where OS file locks of records are kept without a table; a monitor that "
                            f"would make a table refuses while one is held there; the listener records it in "
                            f"run/lock-dir, where local processes lock too, whatever their ${environment.LOCK_DIR} "
                            f"(default ${environment.LOCK_DIR}, else {environment.DEFAULT_LOCK_DIR})")
    start_opts.add_argument("--binary-lock-dir", type=_directory, default=None, metavar="DIR",
                            help=f"where OS file locks of binary locks are kept, made on first use "
                            f"(default ${environment.BINARY_LOCK_DIR}, else {environment.DEFAULT_BINARY_LOCK_DIR})")
    start_opts.add_argument("--group", type=_group, default=None, metavar="NAME|GID",
                            help="the service's group: the lock table's shared memory and semaphore are made "
                            "mode 0660 in it, and the instance directory and the lock directories belong to it; "
                            "application processes that lock on this host (local clients, dls-lock, the "
                            "utilities) must run as a member, and nobody else can reach the table or the lock "
                            "files. Default: the group of the instance directory ($JBCRELEASEDIR), so "
                            "'chgrp GROUP $JBCRELEASEDIR' is the whole setup; a directory made by jdls gets "
                            "the group of the user running it")
    start_opts.add_argument("--max-frame", type=_frame, default=None, metavar="BYTES",
                            help=f"largest message a client may send (default {DEFAULT_MAX_FRAME})")
    start_opts.add_argument("--handshake-timeout", type=_timeout, default=None, metavar="S",
                            help="seconds a new connection has to say Hello "
                            f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})")
    start_opts.add_argument("--max-clients", type=_count, default=None, metavar="N",
                            help=f"clients served at once; one more is told so and closed (default "
                            f"{DEFAULT_MAX_CLIENTS}). Each is served by a process of its own: the listener raises its "
                            "descriptor limit to the hard limit at start and logs how many clients the host has "
                            "room for, with a warning naming each limit below N (processes, kernel.pid_max, "
                            "memory, the table's locks) and how to raise it")
    start_opts.add_argument("--max-locks", type=_count, default=None, metavar="N",
                            help=f"locks one client may hold and wait for (default: 1/{TABLE_SHARE} of the table's "
                            f"lock slots, at least {MIN_TABLE_SHARE}, so that no client fills it; without a table "
                            f"{DEFAULT_MAX_LOCKS_PER_CLIENT})")
    start_opts.add_argument("--allow", type=_network, action="append", default=None, metavar="CIDR",
                            help="accept clients from this network only (repeatable; an address alone is one "
                            "host); a connection from elsewhere is closed at once and logged. Loopback is not "
                            "implied. Default: any address, with a warning in the log")
    start_opts.add_argument("--admin-allow", type=_network, action="append", default=None, metavar="CIDR",
                            help="the networks that may read the lock snapshot (every lock and client, as "
                            "remote show-item-locks and list-open-files read it; repeatable); others are "
                            "refused (default: this host only, 127.0.0.0/8 and ::1)")
    start_opts.add_argument("--http", type=web.parse_address, default=None, metavar="ADDR:PORT",
                            help="the monitor serves HTTP on this address: /metrics (Prometheus text format) and "
                            "a status page at /, to the --admin-allow networks only (others get 403); e.g. "
                            "127.0.0.1:9102 or [::1]:9102. Not with -D (the monitor serves it). See HTTP below")
    start_opts.add_argument("--max-per-address", type=_count, default=None, metavar="N",
                            help="connections one client address may have open at once; one more is closed at "
                            f"accept and logged (default {DEFAULT_MAX_PER_ADDRESS})")
    start_opts.add_argument("--refuse-os-locks", action="store_true",
                            help="refuse the binary lock requests of clients with JDLS BINARY (OS file locks the lock "
                            "server takes in --binary-lock-dir) rather than serve them (default: served, as jDLS "
                            "did); the record locks of clients with JDLS OSLOCKS are served by the service's "
                            "mechanism like every record lock")
    start_opts.add_argument("--dead-client", type=_bound, default=None, metavar="S",
                            help="longest a client host may vanish without a word before its lock server "
                            "gives it up, keeping its locks for the lock-delay (default "
                            f"{DEFAULT_DEAD_CLIENT_BOUND:g} s)")
    start_opts.add_argument("--tls-cert", type=_file, default=None, metavar="FILE",
                            help="speak TLS on the port with this certificate (PEM, its chain after it); "
                            "needs --tls-key (see TLS below)")
    start_opts.add_argument("--tls-key", type=_file, default=None, metavar="FILE",
                            help="the private key of --tls-cert (PEM; not readable by others)")
    start_opts.add_argument("--tls-client-ca", type=_file, default=None, metavar="FILE",
                            help="require a client certificate signed by this CA (PEM); needs --tls-cert")
    start_opts.add_argument("--syslog", action="store_true",
                            help="log to syslog (/dev/log) too, besides the instance's log file (in syslog's "
                            "text format, whatever --log-format says)")
    start_opts.add_argument("--log-format", choices=daemon_log.FORMATS, default=None,
                            help="the lines of the log file (and of standard error with --foreground): text "
                            "(default) or json, one object a line (see Logs below)")
    both = parser.add_argument_group("with -i or -k")
    both.add_argument("-A", dest="monitor_only", action="store_true",
                      help="the lock monitor (arbiter) only: do not start/stop the listener")
    both.add_argument("-D", dest="listener_only", action="store_true",
                      help="the distributed lock listener only: do not start/stop the monitor (-ibD: the lock "
                      "servers use the lock table if one exists, else OS file locks)")
    both.add_argument("--stop-timeout", type=_timeout, default=None, metavar="S",
                      help="seconds to wait for a process to stop before killing it, and for killed ones to "
                      "end (plus 2 ms for each: thousands of lock servers killed at once take the system "
                      f"seconds) (default {DEFAULT_STOP_TIMEOUT:g})")
    other = parser.add_argument_group("with -K, -d, -C")
    other.add_argument("-o", dest="override", action="store_true",
                       help="with -K: override, remove the table even while lock servers or other processes "
                       "have it attached (they are named); never while the monitor or the listener runs")
    other.add_argument("-L", dest="locks", action="store_true", help="with -d: list every lock")
    other.add_argument("-v", dest="verbose", action="count", default=0,
                       help="with -d: the whole table header (-vv: and its IPC key and id); with -C: more "
                       "detail; with -i: log debug messages")
    other.add_argument("--host", default=None, type=_host_name,
                       help=f"with -C: the host to test instead of the servers of ${jdls.VARIABLE} (default: "
                       f"those, else {jdls.DEFAULT_HOST})")
    parser.add_argument("--version", action="version", version=f"{called_as()} (dls-daemon) {__version__}")
    return parser


#: Where each option makes sense: the actions it goes with.
ALLOWED: dict[str, frozenset[str]] = {
    **{o: frozenset({"start"}) for o in (
        "-b", "-s", "-t", "--lock-delay", "--value-block-size", "-P", "-T", "--bind", "--foreground",
        "--tidy-seconds", "--lock-dir",
        "--binary-lock-dir", "--max-frame", "--handshake-timeout", "--max-clients", "--max-locks",
        "--dead-client", "--syslog", "--log-format", "--allow", "--admin-allow", "--max-per-address",
        "--refuse-os-locks",
        "--group", "--tls-cert", "--tls-key", "--tls-client-ca", "--http",
    )},
    "-A": frozenset({"start", "stop"}), "-D": frozenset({"start", "stop"}),
    "--stop-timeout": frozenset({"start", "stop"}),
    "--port": frozenset({"start", "test"}), "--host": frozenset({"test"}),
    "-o": frozenset({"remove"}), "-L": frozenset({"display"}), "-v": frozenset({"start", "display", "test"}),
}
#: Options of the table and the monitor: meaningless with -D, which starts neither.
MONITOR_OPTIONS = ("-s", "-t", "-T", "--tidy-seconds", "--lock-delay", "--value-block-size", "--http")
#: Options of the listener: meaningless with -A, which does not start it. (--lock-dir is both's: the
#: monitor looks there for OS file locks held before it makes a table.)
LISTENER_OPTIONS = (
    "--port", "--bind", "--binary-lock-dir", "--max-frame", "--handshake-timeout", "--max-clients",
    "--max-locks", "--dead-client", "--allow", "--admin-allow", "--max-per-address", "--refuse-os-locks",
    "--tls-cert", "--tls-key", "--tls-client-ca",
)
ACTION_NAMES = {"start": "-i", "stop": "-k", "remove": "-K", "display": "-d", "test": "-C", "unit": "--unit"}


def _given(args: argparse.Namespace) -> dict[str, bool]:
    return {
        "-b": args.background, "-s": args.size is not None, "-t": args.tidy_minutes is not None,
        "-P": args.port_owners, "-T": args.timestamps, "--bind": args.bind is not None,
        "--foreground": args.foreground, "--tidy-seconds": args.tidy_seconds is not None,
        "--lock-delay": args.lock_delay is not None, "--value-block-size": args.value_block_size is not None,
        "--lock-dir": args.lock_dir is not None, "--binary-lock-dir": args.binary_lock_dir is not None,
        "--max-frame": args.max_frame is not None, "--handshake-timeout": args.handshake_timeout is not None,
        "--max-clients": args.max_clients is not None, "--max-locks": args.max_locks is not None,
        "--dead-client": args.dead_client is not None, "--syslog": args.syslog,
        "--log-format": args.log_format is not None,
        "--allow": args.allow is not None, "--admin-allow": args.admin_allow is not None,
        "--max-per-address": args.max_per_address is not None, "--refuse-os-locks": args.refuse_os_locks,
        "--group": args.group is not None,
        "--tls-cert": args.tls_cert is not None, "--tls-key": args.tls_key is not None,
        "--tls-client-ca": args.tls_client_ca is not None, "--http": args.http is not None,
        "-A": args.monitor_only, "-D": args.listener_only, "--stop-timeout": args.stop_timeout is not None,
        "--port": args.port is not None, "--host": args.host is not None, "-o": args.override,
        "-L": args.locks, "-v": args.verbose > 0,
    }


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; parser.error (exit 2) on the first wrong one."""
    if args.test_string is not None:
        args.action = "test"
    given = {option for option, present in _given(args).items() if present}
    for option in sorted(given):
        allowed = ALLOWED[option]
        if args.action not in allowed:
            names = " and ".join(ACTION_NAMES[a] for a in ("start", "stop", "remove", "display", "test")
                                 if a in allowed)
            parser.error(f"{option} applies only to {names}, not to {ACTION_NAMES[args.action]}")
    if args.monitor_only and args.listener_only:
        parser.error("-A and -D exclude each other (neither means both)")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (client certificates are asked for in TLS)")
    if args.stop_timeout is None:  # given or not is known now: the default can be filled in
        args.stop_timeout = DEFAULT_STOP_TIMEOUT
    if args.action == "start" and args.listener_only:
        for option in MONITOR_OPTIONS:
            if option in given:
                parser.error(f"{option} concerns the lock table and its monitor, which -D does not start")
    if args.action == "start" and args.monitor_only:
        for option in LISTENER_OPTIONS:
            if option == "--admin-allow" and args.http is not None:
                continue  # who may load the monitor's HTTP pages too
            if option in given:
                parser.error(f"{option} concerns the lock listener, which -A does not start")
    jdls_set = os.environ.get(jdls.VARIABLE) is not None
    if args.action in ("start", "test") and args.port is None and not (args.action == "test" and jdls_set):
        env = os.environ.get(PORT_VARIABLE)
        if env:
            try:
                args.port = _port(env)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{PORT_VARIABLE}: {exc}")
        elif args.action == "start":
            args.port = DEFAULT_PORT


def _test_server(host: str | None, port: int | None) -> jdls.Server | None:
    """The server ``-C`` tests instead of those of JDLS: --host/--port (JDLS unset: $JDLS_PORT), the other
    half from JDLS's SERVER, else localhost, port 50002. None: JDLS's own servers."""
    if host is None and port is None:
        return None
    try:
        named = jdls.named_server(os.environ.get(jdls.VARIABLE) or "")
    except ConfigurationError:
        named = None  # the test refuses JDLS by name before it connects anywhere
    server = named or jdls.Server(jdls.DEFAULT_HOST)
    return jdls.Server(host or server.host, server.port if port is None else port)


def _roles(args: argparse.Namespace) -> tuple[str, ...]:
    if args.monitor_only:
        return (MONITOR,)
    if args.listener_only:
        return (LISTENER,)
    return ROLES


def settings_from(args: argparse.Namespace, instance: Instance) -> Settings:
    """The Settings of ``jdls -i``, defaults filled in."""
    limits = Limits()
    if args.max_frame is not None:
        limits.max_frame = args.max_frame
    if args.handshake_timeout is not None:
        limits.handshake_timeout = args.handshake_timeout
    if args.max_clients is not None:
        limits.max_clients = args.max_clients
    if args.max_locks is not None:
        limits.max_locks_per_client = args.max_locks
        limits.max_locks_given = True
    if args.max_per_address is not None:
        limits.max_per_address = args.max_per_address
    limits.os_locks = not args.refuse_os_locks
    if args.dead_client is not None:
        limits.dead_client_bound = args.dead_client
    tidy = args.tidy_seconds or max(1, round((args.tidy_minutes or DEFAULT_TIDY_MINUTES) * 60))
    return Settings(
        instance, size=args.size, tidy_seconds=tidy, port_owners=args.port_owners, timestamps=args.timestamps,
        lock_delay=DEFAULT_LOCK_DELAY if args.lock_delay is None else args.lock_delay,
        block_size=args.value_block_size,
        bind=args.bind or DEFAULT_BIND, port=args.port, verbosity=args.verbose,
        stop_timeout=args.stop_timeout, limits=limits,
        lock_dir=args.lock_dir or environment.lock_dir(), binary_lock_dir=args.binary_lock_dir
        or environment.binary_lock_dir(),
        syslog=args.syslog, log_format=args.log_format or "text", allow=tuple(args.allow or ()),
        admin_allow=tuple(args.admin_allow) if args.admin_allow else DEFAULT_ADMIN_ALLOW,
        group=args.group, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        http=args.http,
    )


def unit_file() -> str:
    """The systemd unit shipped in the package (dls_daemon/data/dls-daemon.service)."""
    return resources.files("dls_daemon").joinpath("data", UNIT_FILE).read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    try:
        args = _parse(parser, argv)
        _check(parser, args)
    except SystemExit as exc:  # usage errors (2), -h and --version (0)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    if args.action == "unit":
        sys.stdout.write(unit_file())
        return ExitCode.OK
    if args.action == "test":
        return probe.run(args.test_string, prog=called_as(), server=_test_server(args.host, args.port),
                         verbose=args.verbose > 0)
    try:
        instance = Instance.from_environment()
    except ValueError as exc:  # dls_proto's ConfigurationError: JBCRELEASEDIR or DLS_IPC_KEY, named
        print(f"{called_as()}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.action == "start":
        settings = settings_from(args, instance)
        try:
            settings.tls_context()  # the listener makes it again at its start; a bad file stops nothing running
        except TlsSetupError as exc:
            print(f"jdls: cannot use TLS: {exc}", file=sys.stderr)
            return ExitCode.FAILED
        return start(settings, _roles(args), background=args.background and not args.foreground)
    if args.action in ("stop", "remove"):
        try:
            instance.check_dirs()  # nothing named by a planted file is signalled, no planted table removed
            if args.action == "remove":
                return remove_ipc(instance, override=args.override)
            roles = _roles(args)
            return stop_roles(instance, roles, servers=roles == ROLES, timeout=args.stop_timeout)
        except trusted.Untrusted as exc:
            print(f"jdls: {exc}: refused", file=sys.stderr)
            return ExitCode.FAILED
        except OSError as exc:  # another user's instance (jdls -k as nobody): one line, not a traceback
            print(f"jdls: {os_problem(exc, instance.root)}", file=sys.stderr)
            return ExitCode.FAILED
    try:
        return display(instance, verbose=args.verbose, locks=args.locks)
    except trusted.Untrusted as exc:
        print(f"jdls: {exc}: refused", file=sys.stderr)
        return ExitCode.FAILED
    except BrokenPipeError:  # a reader that stopped reading (head, less) is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.OK
