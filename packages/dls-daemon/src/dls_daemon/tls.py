"""TLS on the listener's port: the server's context, made once at start from --tls-cert/--tls-key.

The listener makes the context when it starts (and ``jdls -i`` checks the
files before starting anything), so that a certificate that cannot be used
stops the start with a message naming the file, never a lock server later.
The lock servers it forks inherit the context and do the handshake
themselves, each on its own connection: a slow or hostile peer costs its
own lock server the handshake timeout and nobody else anything.

With --tls-client-ca a client must present a certificate that CA signed
(mutual TLS); without it any client that completes the handshake is served.
TLS 1.2 is the oldest version spoken. No session tickets are sent: a client
connects once and stays, so resumption buys nothing, and a connection that
never carries a post-handshake message keeps the client's reading and writing
threads out of each other's way.

The private key must not be readable by others: a key file with any
permission for others, or writable by its group, is refused (the group may
read it, for a service account in the key's group).
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

from dls_proto.tls import MIN_VERSION, reason

#: Permission bits a private key file may not have: any for others, writing for the group.
KEY_FORBIDDEN_MODE = 0o027


class TlsSetupError(Exception):
    """A TLS file cannot be used; the message names it and says what is wrong."""


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The listener's TLS context: ``cert`` (PEM, the chain after the certificate) with its private ``key``;
    client certificates signed by ``client_ca`` required when given. TlsSetupError names the file at fault."""
    _check_file("--tls-cert", cert)
    _check_file("--tls-key", key)
    _check_key_mode(key)
    if client_ca is not None:
        _check_file("--tls-client-ca", client_ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.num_tickets = 0
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsSetupError(f"--tls-cert {cert} / --tls-key {key}: {_load_problem(exc)}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TlsSetupError(f"--tls-client-ca {client_ca}: no PEM certificate in it ({reason(exc)})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _check_file(option: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise TlsSetupError(f"{option} {path}: not a regular file")
            f.read(1)
    except OSError as exc:
        raise TlsSetupError(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None


def _check_key_mode(key: Path) -> None:
    mode = os.stat(key).st_mode
    if mode & KEY_FORBIDDEN_MODE:
        raise TlsSetupError(f"--tls-key {key}: the private key is mode {stat.S_IMODE(mode):04o}, "
                            "readable or writable by others (or writable by its group); chmod 600 or 640 it")


def _load_problem(exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "the private key does not belong to the certificate"
    if "PEM" in str(exc.reason or exc).upper():
        return f"not a PEM certificate and private key ({reason(exc)})"
    return reason(exc)
