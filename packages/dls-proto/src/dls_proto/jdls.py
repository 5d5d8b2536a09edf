"""The JDLS variable: where a client finds the lock service, and how it uses it.

Every program that needs the service's address reads it here: the client
library, ``jdls -C`` and the utilities. The syntax is jDLS's: comma-separated
options, ``SERVER=host{,port}``, ``SERVER2=host{,port}``, ``WAIT``,
``TIMEOUT=seconds``, ``BINARY``, ``OSLOCKS``, ``LOCK=EXTERNAL|INTERNAL|ALL``,
``VERBOSE``, ``TRACE=file``, ``EXIT`` (dls's own: see Config), and TLS: ``TLS``, ``CA=file``, ``CERT=file``,
``KEY=file`` (see dls_proto.tls); set but empty means localhost, port 50002.
Anything else is refused with a message naming the option: a service that
guessed would let two processes disagree on where their locks are.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from . import tls as _tls
from .errors import ConfigurationError

VARIABLE = "JDLS"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 50002
#: Seconds of silence a client allows the service before giving it up.
DEFAULT_TIMEOUT = 30.0
#: The TIMEOUT values a client accepts (seconds): below, a network's hiccup would cost every lock; above, a
#: dead service would go unnoticed for more than a day (and the wire's milliseconds would not hold it).
TIMEOUT_RANGE = (0.5, 86400.0)
LOCK_CHOICES = ("EXTERNAL", "INTERNAL", "ALL")
_FLAGS = ("WAIT", "BINARY", "OSLOCKS", "VERBOSE", "TLS", "EXIT")
#: The TLS options naming a file: JDLS name -> Config field.
_TLS_FILES = {"CA": "ca", "CERT": "cert", "KEY": "key"}
_SERVERS = ("SERVER", "SERVER2")


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(f"{what}: port {text!r} is not a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True)
class Server:
    """A lock service's address; ``str()`` gives it in the JDLS spelling, ``host,port``."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host},{self.port}"

    @classmethod
    def parse(cls, text: str) -> Server:
        """``host`` or ``host,port`` (the JDLS spelling, which keeps IPv6 addresses unambiguous)."""
        host, comma, port = text.strip().partition(",")
        host = host.strip()
        if not host:
            raise ConfigurationError(f"server {text!r}: expected host or host,port")
        return cls(host, _port(port.strip(), f"server {text!r}")) if comma else cls(host)


@dataclass(frozen=True)
class Config:
    """Where a client finds the lock service and how it uses it, as JDLS gives it: the server (and
    SERVER2's secondary), whether a lock request waits silently (WAIT) and how long the service may stay
    silent (TIMEOUT), whether binary locks (BINARY) and record locks as OS file locks (OSLOCKS) go to the
    service, which lock kinds it takes (LOCK), the trace, and whether a process that can reach no lock service
    any more ends itself (EXIT; dls's own option, the guide has none: the guide's client always wraps up and
    exits once it lost its last server, where dls's raises ServiceUnavailable, tells each lock it could not
    take back as lost, and connects again when it can); and whether the connection is TLS (TLS), which
    CA its server's certificate must chain to (CA; None: the system's) and the client's own certificate and
    key (CERT, KEY), for SERVER and SERVER2 alike. ``Config()`` is JDLS set but empty.
    """

    server: Server = Server(DEFAULT_HOST)
    server2: Server | None = None
    wait: bool = False
    timeout: float = DEFAULT_TIMEOUT
    binary: bool = False
    oslocks: bool = False
    lock: str = "ALL"
    verbose: bool = False
    trace: str | None = None
    exit: bool = False
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with (None without TLS); ConfigurationError names the option whose file
        is wrong."""
        return _tls.client_context(self.ca, self.cert, self.key) if self.tls else None

    @classmethod
    def from_environment(cls: type[C], environ: Mapping[str, str] | None = None) -> C | None:
        """The configuration in JDLS, or None when JDLS is not set (no service in use)."""
        text = (os.environ if environ is None else environ).get(VARIABLE)
        return None if text is None else parse(text, cls)


C = TypeVar("C", bound=Config)


@overload
def parse(text: str) -> Config: ...
@overload
def parse(text: str, config: type[C]) -> C: ...
def parse(text: str, config: type[Config] = Config) -> Config:
    """Parse a JDLS value into ``config`` (Config or a subclass); ConfigurationError names the first
    thing wrong with it."""
    made = config(**_options(text))
    made.ssl_context()  # a certificate that cannot be used is refused with the rest of the value
    return made


def named_server(text: str) -> Server | None:
    """The SERVER a JDLS value names, or None when it names none (the value is checked whole)."""
    server = _options(text).get("server")
    return server if isinstance(server, Server) else None


def _options(text: str) -> dict[str, Any]:
    """The options a JDLS value gives, as Config's fields; ConfigurationError on the first wrong one."""
    tokens = [t.strip() for t in text.split(",")]
    if tokens == [""]:
        return {}
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, value = token.partition("=")
        name = name.strip().upper()
        value = value.strip()
        i += 1
        if name in _SERVERS:
            if not eq or not value:
                raise ConfigurationError(f"JDLS {name}: expected {name}=host or {name}=host,port")
            port = DEFAULT_PORT
            if i < len(tokens) and "=" not in tokens[i] and tokens[i][:1].isdigit():
                port = _port(tokens[i], f"JDLS {name}")
                i += 1
            values[name.lower()] = Server(value, port)
        elif name in _FLAGS:
            if eq:
                raise ConfigurationError(f"JDLS {name} takes no value (got {token!r})")
            values[name.lower()] = True
        elif name == "TIMEOUT":
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not TIMEOUT_RANGE[0] <= seconds <= TIMEOUT_RANGE[1]:  # NaN too
                raise ConfigurationError(f"JDLS TIMEOUT: {value!r} is not a number of seconds from "
                                         f"{TIMEOUT_RANGE[0]:g} to {TIMEOUT_RANGE[1]:g}")
            values["timeout"] = seconds
        elif name == "LOCK":
            if value.upper() not in LOCK_CHOICES:
                raise ConfigurationError(f"JDLS LOCK: {value!r} is not one of {', '.join(LOCK_CHOICES)}")
            values["lock"] = value.upper()
        elif name == "TRACE":
            if not value:
                raise ConfigurationError("JDLS TRACE: expected TRACE=file")
            values["trace"] = value
        elif name in _TLS_FILES:
            if not eq or not value:
                raise ConfigurationError(f"JDLS {name}: expected {name}=file")
            values[_TLS_FILES[name]] = value
        elif not token:
            raise ConfigurationError(f"JDLS: empty option in {text!r}")
        else:
            raise ConfigurationError(
                f"JDLS: unknown option {token!r}; expected SERVER, SERVER2, WAIT, TIMEOUT, BINARY, OSLOCKS, "
                "LOCK, VERBOSE, TRACE, EXIT, TLS, CA, CERT or KEY"
            )
    if "server2" in values and "server" not in values:
        raise ConfigurationError("JDLS SERVER2 has no meaning without SERVER")
    for name, field in _TLS_FILES.items():
        if field in values and "tls" not in values:
            raise ConfigurationError(f"JDLS {name} has no meaning without TLS")
    if "key" in values and "cert" not in values:
        raise ConfigurationError("JDLS KEY has no meaning without CERT (the certificate it belongs to)")
    return values
