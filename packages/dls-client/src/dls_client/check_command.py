"""dls-test: test the JDLS configuration of this host against the lock service (jDLS's ``-C teststring``).

It reads JDLS as every client process would, connects, sends the test string
through the service and back, and prints what it used and what the service
said about itself. Only dls-client is needed, so it runs on an application
server.

Exit status: 0 when the string came back; 1 when the service cannot be
reached (or answered wrongly); 78 for a bad JDLS. With SERVER2 both servers
are tested, one after the other, and the status is 1 if either fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from dls_proto import Mechanism

from . import exitcodes
from .__about__ import __version__
from .client import Client
from .config import DEFAULT_HOST, DEFAULT_PORT, Config, port_number
from .errors import ConfigurationError, DlsError, ServiceUnavailable


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dls-test",
        description="Test the JDLS configuration: echo TESTSTRING through the lock service JDLS names and "
        "print what was used and what came back (as jDLS -C teststring).",
        epilog=f"Exit status: {exitcodes.OK} the string came back; {exitcodes.FAILED} the service cannot be reached; "
        f"{exitcodes.CONFIG} bad JDLS.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"dls-test {__version__}")
    parser.add_argument("teststring", metavar="TESTSTRING", nargs="?", default="teststring",
                        help="the string to echo (default: teststring)")
    return parser


def _mechanism(value: int) -> str:
    try:
        return Mechanism(value).name
    except ValueError:
        return f"unknown ({value})"


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        config = Config.from_environment()
        port_number()  # JBCPORTNO, which the client reads: refused here like a malformed JDLS
    except ConfigurationError as exc:
        print(f"dls-test: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if config is None:
        print(f"Client: JDLS is not set; testing the default of a set but empty JDLS, "
              f"{DEFAULT_HOST},{DEFAULT_PORT}", flush=True)
        config = Config()
    servers = [config.server] if config.server2 is None else [config.server, config.server2]
    worst = exitcodes.OK
    for n, server in enumerate(servers):
        if len(servers) > 1:
            print(f"Client: testing the {('primary', 'secondary')[n]} lock service (JDLS SERVER{n + 1 if n else ''})",
                  flush=True)
        worst = max(worst, _test(dataclasses.replace(config, server=server, server2=None), args.teststring))
    return worst


def _test(config: Config, teststring: str) -> int:
    """Echo ``teststring`` through the one server of ``config``; the exit status."""
    server = config.server
    print(f"Client: Using host '{server.host}', service '{server.port}'", flush=True)
    client = Client(config)
    try:
        data, seconds = client.echo(os.fsencode(teststring))
        welcome = client.connect().welcome
    except ServiceUnavailable as exc:
        print("Client: unable to connect to distributed lock service, locks not enabled", flush=True)
        print(f"Client: {exc}", flush=True)
        return exitcodes.FAILED
    except DlsError as exc:
        print(f"Client: echo failed: {exc}", flush=True)
        return exitcodes.FAILED
    finally:
        client.close()
    text = os.fsdecode(data)
    print(f"Client: echoed '{teststring}', received '{text}' in {seconds * 1000:.3f} ms")
    print(f"Client: lock server pid {welcome.server_pid} on {welcome.server_host or server.host}, "
          f"mechanism {_mechanism(welcome.mechanism)}, protocol version {welcome.version}")
    print(f"Client: the lock server sees this client as {welcome.peer}")
    if text != teststring:
        print("Client: the string came back changed", flush=True)
        return exitcodes.FAILED
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
