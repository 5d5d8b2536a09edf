"""dls-test: test the JDLS configuration of this host against the lock service (jDLS's ``-C teststring``).

It reads JDLS and JBCPORTNO as every client process would, connects to each
server JDLS names, sends the test string through the service and back, and
prints what it used and what the service said about itself. Only dls-client
(and dls-proto) is needed, so it runs on an application server. The test
itself is dls-proto's ``probe``, which ``jdls -C`` runs too: the two cannot
disagree.

Exit status: 0 when the string came back; 1 when a service cannot be reached
(or answered wrongly); 2 for a usage error (a test string too long for an
echo); 78 for a bad JDLS or JBCPORTNO. With SERVER2 both servers are tested,
one after the other, and the status is 1 if either fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dls_proto import probe

from . import exitcodes
from .__about__ import __version__
from .config import Config
from .trace import Tracer


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dls-test",
        description="Test the JDLS configuration: echo TESTSTRING through the lock service JDLS names (each of "
        "SERVER and SERVER2) and print what was used and what came back (as jDLS -C teststring).",
        epilog=f"Exit status: {exitcodes.OK} the string came back; {exitcodes.FAILED} a service cannot be "
        f"reached or answered wrongly; {probe.USAGE} usage error; {exitcodes.CONFIG} bad JDLS or JBCPORTNO. "
        "jdls -C runs the same test.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"dls-test {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also say the server's largest frame and how long an answer is awaited")
    parser.add_argument("teststring", metavar="TESTSTRING", nargs="?", default="teststring",
                        help=f"the string to echo, at most {probe.MAX_TEST_STRING} bytes (default: teststring)")
    return parser


def _trace(line: str) -> None:
    """A failure, to the instance's error trace (and the JDLS trace), as a client's failures go."""
    Tracer(Config.from_environment() or Config()).error(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    return probe.run(args.teststring, prog="dls-test", verbose=args.verbose, trace=_trace)


if __name__ == "__main__":
    sys.exit(main())
