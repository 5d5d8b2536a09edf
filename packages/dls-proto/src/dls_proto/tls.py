"""TLS for dls connections, client side: the context JDLS asks for, and the handshake.

Every program that connects to a lock service (the client library, ``jdls
-C``, the utilities) takes its TLS settings from JDLS (``TLS``, ``CA=``,
``CERT=``, ``KEY=``) and connects through ``wrap`` here, so that they verify
a server alike: its certificate must chain to ``CA=`` (the system's
certificate authorities without it) and name the host the client asked for
(``SERVER=``/``SERVER2=``, checked as a browser checks it: a DNS name, or an
IP address in the certificate's subjectAltName). TLS 1.2 is the oldest
version spoken; 1.3 is used whenever the server speaks it.

A context is made once per process and setting (loading a CA bundle costs
milliseconds): ``client_context`` remembers the ones it made.
"""

from __future__ import annotations

import functools
import re
import socket
import ssl

from .errors import ConfigurationError

#: The oldest TLS version either side speaks.
MIN_VERSION = ssl.TLSVersion.TLSv1_2


@functools.lru_cache(maxsize=8)
def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """The client's TLS context: servers verified against ``ca`` (a PEM file; None: the system's CAs) and
    their host name checked; ``cert`` (and ``key``, when the key is not in ``cert``) presented when the
    server asks for a client certificate. ConfigurationError names the JDLS option whose file is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and checks the host name
    context.minimum_version = MIN_VERSION
    if ca is None:
        context.load_default_certs()
    else:  # that CA alone: a certificate some public CA signed for the host must not pass for the service
        _readable("CA", ca)
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigurationError(f"JDLS CA: {ca}: no PEM certificate in it ({reason(exc)})") from None
    if cert is not None:
        _readable("CERT", cert)
        if key is not None:
            _readable("KEY", key)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"JDLS CERT/KEY: {cert}{f' and {key}' if key else ''}: not a certificate with its private key "
                f"({reason(exc)})") from None
    return context


def _readable(option: str, path: str) -> None:
    """ConfigurationError naming ``option`` when ``path`` cannot be read."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigurationError(f"JDLS {option}: cannot read {path}: {exc.strerror or exc}") from None


def reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason for ``exc``, readable: ``certificate verify failed`` for CERTIFICATE_VERIFY_FAILED."""
    if exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))


def wrap(sock: socket.socket, context: ssl.SSLContext, host: str, timeout: float | None) -> ssl.SSLSocket:
    """``sock`` (connected to ``host``) after a TLS handshake within ``timeout`` seconds, the server's
    certificate verified; HandshakeFailed (an OSError) says why not, TimeoutError when it took too long.
    The socket is left blocking, as it came, whatever the handshake's timeout."""
    before = sock.gettimeout()
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        raise HandshakeFailed(f"TLS: the server's certificate is not accepted: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        tls.close()
        raise HandshakeFailed(f"TLS handshake failed: {describe(exc)}") from None
    except BaseException:
        tls.close()
        raise
    tls.settimeout(before)
    return tls


class HandshakeFailed(ConnectionError):
    """The TLS handshake failed: the message says why (a certificate not accepted, a peer not speaking TLS)."""


def failure(exc: OSError) -> str:
    """What a failed connection says of ``exc``: the system's words, or a TLS failure's short reason."""
    if isinstance(exc, ssl.SSLError):
        return describe(exc)
    return exc.strerror or str(exc) or type(exc).__name__


def describe(exc: ssl.SSLError) -> str:
    """A short reason for a failed handshake, for people: what OpenSSL says, without its file and line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "the peer closed the connection during the handshake"
    return reason(exc)
