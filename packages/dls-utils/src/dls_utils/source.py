"""Where a utility gets its information, and how it hands its text to the reader.

show-item-locks and list-open-files answer from the same two places: the
local instance (its lock table and proc/info documents), or a lock service
asked over the wire protocol, so that they work from an application server.
They choose alike (``--server``, else ``--local``, else SERVER of $JDLS, else
the local instance) and fail alike (``Failure``, exit 1), so both live here.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from dls_proto import Server, environment, jdls, numerals
from dls_shm import Instance

from . import command
from .remote import PEER_ADDRESS, RemoteError, fetch_snapshot


class Failure(Exception):
    """Why no display can be made; printed as ``<program>: <message>``, exit ``status`` (1)."""

    status = command.FAILED


class ConfigFailure(Failure):
    """JDLS (the client's configuration) is refused, as every client refuses it: exit 78 (EX_CONFIG), as a
    client's, rather than a display of some other place."""

    status = command.CONFIG


def local_instance() -> Instance:
    """The instance $JBCRELEASEDIR names (its table's key: DLS_IPC_KEY's when set); ConfigFailure (exit 78)
    when it cannot be one (a regular file, a name too long, a bad key): the message names which."""
    try:
        return Instance.from_environment()
    except ValueError as exc:
        raise ConfigFailure(str(exc)) from None


def port_number(text: str) -> int:
    """An argparse type: a client's port number (JBCPORTNO), 0 or more."""
    number = numerals.integer(text)
    if number is None:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a port number (0 or more)")
    return number


def server_argument(text: str) -> Server:
    """An argparse type: HOST[,PORT] of a lock service (the JDLS spelling, which keeps IPv6 addresses unambiguous)."""
    try:
        return Server.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def source_help(local: str) -> str:
    """How a tool's epilog says where its information comes from; ``local`` names the local source."""
    return (f"source: --server host[,port], else --local, else SERVER=host{{,port}} of ${jdls.VARIABLE}\n"
            f"(port {jdls.DEFAULT_PORT} when not given), else {local}.\n"
            f"A service is asked over TLS when ${jdls.VARIABLE} says TLS (with its CA, CERT, KEY).\n"
            f"A ${jdls.VARIABLE} that clients refuse is an error (exit {command.CONFIG}), not a reason to ask "
            f"elsewhere; so is a ${environment.RELEASE_DIR} that cannot be an instance's directory (a file, "
            "too long a path), when it is read.")


def add_source_options(parser: argparse.ArgumentParser, local_help: str) -> None:
    """``--server`` and ``--local``, one or the other."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--server", metavar="HOST[,PORT]", type=server_argument,
                        help=f"ask the lock service on HOST (port {jdls.DEFAULT_PORT} unless given) over TCP")
    source.add_argument("--local", action="store_true", help=local_help)


def chosen_server(args: argparse.Namespace) -> Server | None:
    """The lock service to ask, or None for the local instance."""
    server: Server | None = args.server
    if server is not None:
        return server
    if args.local:
        return None
    value = os.environ.get(jdls.VARIABLE)
    if value is None:
        return None
    try:
        return jdls.named_server(value)  # the value is checked whole, as clients check it
    except ValueError as exc:
        raise ConfigFailure(str(exc)) from None


def host_label(address: str, name: str) -> str:
    """How a heading names a lock service's host: by IP address, as jDLS did, with its name in brackets."""
    return f"{address} ({name})" if name and name != address else address


def this_host() -> str:
    """This host as a heading names it (``host_label``): its first address that is not a loopback one, from
    its name, else the one a datagram to the outside would leave from (nothing is sent), else loopback."""
    name = socket.gethostname()
    found: list[str] = []
    try:
        found = [str(info[4][0]) for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)]
    except OSError:
        pass
    address = next((a for a in found if not ipaddress.ip_address(a.split("%", 1)[0]).is_loopback), None)
    if address is None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("192.0.2.1", 9))  # TEST-NET-1: a route is looked up, no packet sent
                address = str(probe.getsockname()[0])
        except OSError:
            address = found[0] if found else "127.0.0.1"
    return host_label(address, name)


def snapshot_of(server: Server) -> tuple[dict[str, Any], str]:
    """The service's snapshot, and its host as a heading names it (``host_label``: the address the service was
    reached at, and the host name it says it has); Failure when it cannot be had. The connection is TLS as
    $JDLS asks (TLS, CA, CERT, KEY), whichever server is asked: the utility is the client there."""
    try:
        config = jdls.Config.from_environment()
    except ValueError as exc:  # JDLS refused, as clients refuse it
        raise ConfigFailure(str(exc)) from None
    try:
        snapshot = fetch_snapshot(server, tls_context=config.ssl_context() if config is not None else None)
    except RemoteError as exc:
        raise Failure(str(exc)) from None
    host = snapshot.get("host")
    return snapshot, host_label(str(snapshot.get(PEER_ADDRESS) or server.host), host if isinstance(host, str) else "")


def emit(text: str) -> None:
    """Print ``text``; a reader that stopped reading (head, less) is not an error."""
    emit_lines([text])


def emit_lines(lines: Iterable[str]) -> None:
    """Print each line as it comes (a table's rows as its groups are read, not once all are); a reader that
    stopped reading (head, less) is not an error, and ends the reading."""
    try:
        for text in lines:
            print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


#: How many items ``json_items`` encodes in one call (json's indenting encoder pays per call: a slot at a time
#: cost a third more than the whole list at once).
JSON_CHUNK = 256


def json_items(items: Iterable[Any], indent: int) -> Iterator[str]:
    """A JSON list's items as ``json.dumps(..., indent=2)`` writes them at depth ``indent`` (2 or more), in
    chunks of JSON_CHUNK items (their lines in one string) as they come, with the commas between them."""
    margin = " " * (indent - 2)
    newline = "\n" + margin
    it = iter(items)
    pending = None
    while chunk := list(itertools.islice(it, JSON_CHUNK)):
        if pending is not None:
            yield pending + ","
        text = json.dumps(chunk, indent=2)[2:-2]  # the items at depth 2, without the brackets' lines
        pending = margin + text.replace("\n", newline)  # a string's own newlines are escaped
    if pending is not None:
        yield pending


__all__ = ["ConfigFailure", "Failure", "add_source_options", "chosen_server", "emit", "emit_lines", "host_label",
           "json_items", "port_number", "server_argument", "snapshot_of", "source_help", "this_host"]
