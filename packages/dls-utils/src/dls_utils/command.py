"""What every dls-utils command shares: the shape of its parser, and how argparse's exits become statuses.

Each tool keeps ``get_parser()`` (the man page and the tests read it) and
``main(argv=None) -> int`` (the tests call it and read the status), so usage
errors and ``-h`` must come back as a status rather than leave the process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

#: The exit statuses every tool shares (dls-ipcrm adds its refusals).
OK = 0
#: Failed, with the reason on standard error.
FAILED = 1
#: argparse's status for a usage error.
USAGE = 2
#: JDLS refused (EX_CONFIG), the status every client gives it.
CONFIG = 78


def parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A tool's parser: the epilog printed as written (its columns and exit-status tables)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
        body: Callable[[argparse.Namespace], int]) -> int:
    """Parse ``argv`` and run ``body`` on the arguments; argparse's own exits (-h 0, usage 2) as statuses."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else USAGE
    return body(args)


def fail(prog: str, message: object, status: int) -> int:
    """Say why on standard error, as ``prog: message``; the status."""
    print(f"{prog}: {message}", file=sys.stderr)
    return status
