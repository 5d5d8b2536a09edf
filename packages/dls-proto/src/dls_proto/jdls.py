"""The JDLS variable: where a client finds the lock service, and how it uses it.

Every program that needs the service's address reads it here: the client
library, ``jdls -C``, dls-test and the utilities. The syntax is jDLS's:
comma-separated options, ``SERVER=host{,port}``, ``SERVER2=host{,port}``,
``WAIT``, ``TIMEOUT=seconds``, ``BINARY``, ``OSLOCKS``, ``LOCK=EXTERNAL|INTERNAL|ALL``,
``VERBOSE``, ``TRACE=file``, ``EXIT`` (dls's own: see Config), and TLS: ``TLS``, ``CA=file``, ``CERT=file``,
``KEY=file`` (see dls_proto.tls); set but empty means localhost, port 50002.
A server may also be written ``host:port`` or ``[v6address]:port``, as most
programs write an address. Anything else is refused with a message naming the
option: a service that guessed would let two processes disagree on where their
locks are.

``OPTIONS`` says what each option takes and does: the parser refuses a name
that is not there, and the dls-jdls(7) page is written from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar, dataclass_transform, overload

from . import numerals
from .errors import ConfigurationError

if TYPE_CHECKING:
    import ipaddress
    import socket
    import ssl

VARIABLE = "JDLS"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 50002
#: Seconds of silence a client allows the service before giving it up.
DEFAULT_TIMEOUT = 30.0
#: Seconds a client gives a server to accept its TCP connection (and TLS handshake); TIMEOUT then bounds
#: every answer, the first (the greeting) included.
CONNECT_TIMEOUT = 5.0
#: The longest host name DNS can carry (RFC 1035, written without its final dot), and its longest label.
MAX_HOST_NAME = 253
MAX_LABEL = 63
LOCK_CHOICES = ("EXTERNAL", "INTERNAL", "ALL")
#: The TIMEOUT values a client accepts (seconds): below, a network's hiccup would cost every lock; above, a
#: dead service would go unnoticed for more than a day (and the wire's milliseconds would not hold it).
TIMEOUT_RANGE = (0.5, 86400.0)
#: A lock service of protocol version 2 sends a waiting request's interim messages this often (seconds), and
#: cannot be told the client's TIMEOUT ...
VERSION2_INTERIM_PERIOD = 5.0
#: ... so a client of a shorter TIMEOUT waits this long for its answers instead (an interim period and a half),
#: rather than give up a lock that merely waits, and every lock with the connection.
VERSION2_ACK_TIMEOUT = 1.5 * VERSION2_INTERIM_PERIOD


@dataclass_transform(frozen_default=True)
class Record:
    """A frozen record, as ``@dataclass(frozen=True)`` makes one, without importing dataclasses: that module
    (and inspect, ast, tokenize and dis with it) and the code it generates for each class cost a client's
    start-up several milliseconds, dls-lock's included, for three classes.

    A subclass's annotated names (no ClassVar) are its fields, in order (its bases' first), and a value set in
    the class is a field's default. Instances are made by position or keyword, compare equal when of the same
    class with the same fields, hash by their fields, repr as a dataclass does, refuse assignment
    (AttributeError), and give a changed copy with ``replace``."""

    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063 - inspect is what this does without
        cls._fields = cls._fields + tuple(name for name in own if name not in cls._fields)
        cls._defaults = {**cls._defaults, **{name: cls.__dict__[name] for name in own if name in cls.__dict__}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        if len(args) > len(self._fields):
            raise TypeError(f"{name}() takes at most {len(self._fields)} arguments ({len(args)} given)")
        values = dict(zip(self._fields, args, strict=False))
        for field, value in kwargs.items():
            if field not in self._fields:
                raise TypeError(f"{name}() got an unexpected keyword argument {field!r}")
            if field in values:
                raise TypeError(f"{name}() got multiple values for argument {field!r}")
            values[field] = value
        for field in self._fields:
            if field in values:
                object.__setattr__(self, field, values[field])
            elif field in self._defaults:
                object.__setattr__(self, field, self._defaults[field])
            else:
                raise TypeError(f"{name}() missing required argument {field!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, field) for field in self._fields)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` made (as ``dataclasses.replace``)."""
        return type(self)(**{**dict(zip(self._fields, self._values(), strict=True)), **changes})

    def __repr__(self) -> str:
        fields = ", ".join(f"{field}={value!r}" for field, value in zip(self._fields, self._values(), strict=True))
        return f"{type(self).__qualname__}({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a {type(self).__name__} is frozen")


class Option(Record):
    """One JDLS option: its name, the value it takes after ``=`` ("" for a flag, which takes none), what
    applies when it is not given, and what it does, as dls-jdls(7) says it."""

    name: str
    value: str
    default: str
    does: str


#: Every option JDLS knows, in the order dls-jdls(7) lists them; the parser refuses any other name.
OPTIONS = (
    Option("SERVER", "host{,port}", f"localhost,{DEFAULT_PORT}",
           f"The lock service: its host name or IP address, and its TCP port ({DEFAULT_PORT} when not given). "
           "host:port and [address]:port are accepted too; an IPv6 address without a port is written as it is. "
           "A port that is not a number from 1 to 65535 (ASCII digits) is refused by name (so is a word after the "
           f"host that is no JDLS option), as is a port given twice; so is a host name DNS cannot carry (an empty "
           f"label, a label over {MAX_LABEL} characters, over {MAX_HOST_NAME} in all)."),
    Option("SERVER2", "host{,port}", "none",
           "The secondary lock service, for resilience: every lock is taken on both servers, and a client goes "
           "on with one when the other is lost. It has no meaning without SERVER, and is refused without it; so "
           "is the same host and port as SERVER (the same name, any case, or the same IP address however "
           "written), where each lock would wait behind itself. Names are not looked up: do not give one service "
           "under two names (localhost and 127.0.0.1); a client that finds its own lock on SERVER holding a "
           "request up on SERVER2 refuses the lock with a configuration error saying so (in the error trace "
           "too)."),
    Option("WAIT", "", "not set",
           "A lock request waits for its answer without a time limit: TIMEOUT does not apply to it (jdls -C and "
           "dls-test still give up after TIMEOUT: a test must end). The greeting of a new connection is not a "
           "lock request: a service that does not greet within TIMEOUT is given up, WAIT or not."),
    Option("TIMEOUT", "seconds", f"{DEFAULT_TIMEOUT:g}",
           "How long the service may stay silent on a request (the greeting included) before the client gives it "
           f"up; fractions allowed, from {TIMEOUT_RANGE[0]:g} to {TIMEOUT_RANGE[1]:g} (a day); another value is "
           "refused. The client tells its lock server this timeout (protocol version 3), and a waiting request's "
           "interim messages come a third of it apart (at most 5 s), so a short TIMEOUT does not end a contended "
           f"wait; against a service of protocol version 2 a TIMEOUT below {VERSION2_ACK_TIMEOUT:g} s is taken as "
           f"{VERSION2_ACK_TIMEOUT:g} s. A new "
           f"connection has {CONNECT_TIMEOUT:g} s to be accepted, whatever TIMEOUT says."),
    Option("BINARY", "", "not set",
           "Binary locks (file and execution locks, not record locks) go to the service too; without it they are "
           "taken on this host only."),
    Option("OSLOCKS", "", "not set",
           "Record locks are asked for as OS file locks on the lock server. A service without a lock table (jdls "
           "-ibD) takes every record lock so anyway; one with a table serves them in the table like every record "
           "lock, so that a record has one holder whichever clients set OSLOCKS."),
    Option("LOCK", "|".join(LOCK_CHOICES), "ALL",
           "Which lock handlers' locks go to the service: EXTERNAL, INTERNAL or ALL (any case); another value "
           "is refused."),
    Option("VERBOSE", "", "not set",
           "Trace information on standard error, one line per event: each request sent and each reply received "
           "(kind, request id, file, inode, key, mode, outcome, time since the request), each connection made, "
           "lost and made again, and each failover between SERVER and SERVER2; control characters escaped."),
    Option("TRACE", "file", "none", "The trace information of VERBOSE appended to this file instead of standard "
           "error (overrides VERBOSE), one whole line per write. The file is not opened through a symbolic link, "
           "must be a regular file of the process's own user with one link that others cannot write (another "
           "user's file is refused: the trace names files, keys and pids), and is made mode 0640 whatever the "
           "umask; when it cannot be opened, the client says so once on standard error, naming the file and why, "
           "and traces to standard error instead."),
    Option("EXIT", "", "not set",
           "dls's own (the guide has no such option): a process that can reach no lock service any more writes "
           "why to the error trace and sends itself SIGTERM, so its handler wraps up or it ends, as the guide's "
           "client does. No service any more means: each service it uses lost, and tried again every second "
           "for as long as its locks could still be reclaimed (the service's lock-delay less the 5 s a lost "
           "lock server may take to be noticed, counted from the loss), or a lock of the process lost meanwhile. "
           "So a restart of the service within that time (jdls -k, then jdls -ib) is survived: the process "
           "reconnects and takes its locks back; with a lock-delay of 5 s or less it ends at the first failed "
           "attempt. Meanwhile requests raise ServiceUnavailable. Without it "
           "requests raise ServiceUnavailable until a service answers again. dls-lock ignores it: there a lost "
           "service is a lost lock, told and exit 75 (see dls-lock(1))."),
    Option("TLS", "", "not set",
           "Connect over TLS (1.2 or later), to SERVER and SERVER2 alike; the server's certificate must chain to "
           "CA and name the host the client connects to."),
    Option("CA", "file", "the system's certificate authorities",
           "The PEM certificate(s) a server's certificate must chain to. Needs TLS; a file that cannot be read, "
           "or has no certificate, is refused."),
    Option("CERT", "file", "none",
           "The client's certificate (PEM), shown to a server that asks for one; its key too unless KEY names "
           "it. Needs TLS."),
    Option("KEY", "file", "in CERT",
           "The private key of CERT (PEM). Needs CERT; a key that does not belong to the certificate is refused."),
)
_BY_NAME = {option.name: option for option in OPTIONS}
_FLAGS = tuple(option.name for option in OPTIONS if not option.value)
#: The TLS options naming a file: JDLS name -> Config field.
_TLS_FILES = {"CA": "ca", "CERT": "cert", "KEY": "key"}
_SERVERS = ("SERVER", "SERVER2")


def _port(text: str, what: str) -> int:
    port = numerals.integer(text)
    if port is None or not 0 < port < 65536:
        raise ConfigurationError(f"{what}: port {text!r} is not a number from 1 to 65535")
    return port


def checked_host(host: str, what: str) -> str:
    """``host`` if it is an IP address or a host name DNS can carry (labels of 1 to 63 characters, 253 in
    all, as IDNA encodes them); else ConfigurationError names it. Refused here rather than at connect
    time, where the resolver's idna codec raises UnicodeError, and in every program alike. (An IPv4 address
    passes as a name would.)"""
    if ":" in host:  # no name has one: an IPv6 address (ipaddress only then: a client's start-up does without)
        if _ipv6(host) is None:
            raise ConfigurationError(f"{what}: host {host!r} is not an IPv6 address (a host name has no colon)")
        return host
    name = host.removesuffix(".")  # a fully qualified name's final dot is no empty label
    if any(ord(c) < 0x21 or c == "\x7f" for c in name):
        raise ConfigurationError(f"{what}: host {host!r} has a space or control character")
    if any(not label for label in name.split(".")):
        raise ConfigurationError(f"{what}: host {host!r} has an empty label (two dots in a row, or one at the "
                                 "start)")
    encoded: list[bytes] = []
    for label in name.split("."):
        try:
            encoded.append(label.encode("ascii" if label.isascii() else "idna"))
        except UnicodeError:  # a label IDNA cannot encode (too long once encoded, or a forbidden character)
            raise ConfigurationError(f"{what}: host {host!r} is not a valid host name: its label {label!r} is "
                                     "not an internationalised name IDNA can encode (a character it forbids, or "
                                     f"over {MAX_LABEL} characters once encoded)") from None
        if len(encoded[-1]) > MAX_LABEL:
            raise ConfigurationError(f"{what}: host {host!r} has a label longer than {MAX_LABEL} characters "
                                     f"({len(encoded[-1])})")
    if len(b".".join(encoded)) > MAX_HOST_NAME:
        raise ConfigurationError(f"{what}: host {host[:40]!r}... is {len(b'.'.join(encoded))} characters long: "
                                 f"a host name is at most {MAX_HOST_NAME}")
    return host


def connect(server: Server, timeout: float) -> socket.socket:
    """``socket.create_connection`` to ``server`` within ``timeout`` seconds; OSError for every way it fails,
    a host name the resolver refuses included (its UnicodeError or ValueError, for a Server not made by
    parse), so that a caller reports it as the service it cannot reach, never as a traceback."""
    import socket

    try:
        # An ASCII name goes as bytes: given text, the resolver encodes it with the idna codec, whose import
        # (with stringprep and unicodedata) costs a client's start-up milliseconds; checked_host refuses what
        # that encoding would of an ASCII name (an empty label, one over 63 characters).
        host = checked_host(server.host, "server").encode("ascii") if server.host.isascii() else server.host
        return socket.create_connection((host, server.port), timeout=timeout)  # type: ignore[arg-type] # bytes too
    except ValueError as exc:  # UnicodeError and ConfigurationError too
        raise OSError(f"host name {server.host!r} cannot be looked up ({exc})") from None


def _host_port(text: str, what: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[address]`` or ``[address]:port``: the host and the port given (None if
    none). A bare IPv6 address (two colons or more) is a host, as the JDLS spelling ``host,port`` keeps it."""
    text = text.strip()
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or not address or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"{what}: {text!r} is not [address] or [address]:port")
        return checked_host(address, what), _port(rest[1:], what) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not host.strip():
            raise ConfigurationError(f"{what}: {text!r} has no host before the port")
        return checked_host(host.strip(), what), _port(port.strip(), what)
    return checked_host(text, what), None


class Server(Record):
    """A lock service's address; ``str()`` gives it in the JDLS spelling, ``host,port``."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host},{self.port}"

    @classmethod
    def parse(cls, text: str) -> Server:
        """``host`` or ``host,port`` (the JDLS spelling, which keeps IPv6 addresses unambiguous), or
        ``host:port``, ``[address]:port``."""
        what = f"server {text!r}"
        host, comma, port = text.strip().partition(",")
        if not host.strip():
            raise ConfigurationError(f"{what}: expected host or host,port")
        host, given = _host_port(host, what)
        if comma and given is not None:
            raise ConfigurationError(f"{what}: the port is given twice")
        return cls(host, _port(port.strip(), what) if comma else given or DEFAULT_PORT)


class Config(Record):
    """Where a client finds the lock service and how it uses it, as JDLS gives it: the server (and
    SERVER2's secondary), whether a lock request waits silently (WAIT) and how long the service may stay
    silent (TIMEOUT), whether binary locks (BINARY) go to the service and record locks are asked for as OS file
    locks (OSLOCKS), which lock kinds it takes (LOCK), the trace, and whether a process that can reach no lock service
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
        if not self.tls:
            return None
        from . import tls  # ssl, only when TLS is asked for: a plain client's start-up does without it

        return tls.client_context(self.ca, self.cert, self.key)

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


def _same(one: Server, other: Server) -> bool:
    """Whether two servers are the same service as written: the same port, and the same host name (case and
    a final dot aside) or IP address (however written: ::1 and 0::1, an IPv4-mapped ::ffff:127.0.0.1 and
    127.0.0.1). Names are not looked up: a parse must not wait on DNS."""
    def key(host: str) -> str:
        address = _ipv6(host) if ":" in host else None
        if address is None:
            return host.removesuffix(".").lower()
        return str(address.ipv4_mapped or address)
    return one.port == other.port and key(one.host) == key(other.host)


def _ipv6(host: str) -> ipaddress.IPv6Address | None:
    """``host`` as an IPv6 address (its zone, fe80::1%eth0, aside), or None when it is none."""
    import ipaddress

    try:
        return ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return None


def _names() -> str:
    """The option names, as an error message lists them."""
    names = [option.name for option in OPTIONS]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _options(text: str) -> dict[str, Any]:
    """The options a JDLS value gives, as Config's fields; ConfigurationError on the first wrong one."""
    tokens = [t.strip() for t in text.split(",")]
    if tokens == [""]:
        return {}
    values: dict[str, Any] = {}
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, value = token.partition("=")
        name = name.strip().upper()
        value = value.strip()
        i += 1
        option = _BY_NAME.get(name)
        if option is None:
            if not token:
                raise ConfigurationError(f"JDLS: empty option in {text!r} (two commas, or one at an end)")
            raise ConfigurationError(f"JDLS: unknown option {token!r}; expected {_names()}")
        if name in seen:
            raise ConfigurationError(f"JDLS {name} is given twice: give each option once")
        seen.add(name)
        if not option.value:
            if eq:
                raise ConfigurationError(f"JDLS {name} takes no value (got {token!r})")
            values[name.lower()] = True
            continue
        if not eq or not value:
            raise ConfigurationError(f"JDLS {name}: expected {name}={option.value}")
        if name in _SERVERS:
            what = f"JDLS {name}"
            host, port = _host_port(value, what)
            following = tokens[i] if i < len(tokens) else ""
            if following and "=" not in following and following.upper() not in _FLAGS:  # {,port}
                if port is not None:
                    raise ConfigurationError(f"{what}: the port is given twice ({value!r} and {following!r})")
                if numerals.integer(following) is None:
                    raise ConfigurationError(f"{what}: {following!r} after the host is neither a port (a number "
                                             "from 1 to 65535) nor a JDLS option")
                port = _port(following, what)
                i += 1
            values[name.lower()] = Server(host, port or DEFAULT_PORT)
        elif name == "TIMEOUT":
            seconds = numerals.real(value)
            if seconds is None or not TIMEOUT_RANGE[0] <= seconds <= TIMEOUT_RANGE[1]:
                raise ConfigurationError(f"JDLS TIMEOUT: {value!r} is not a number of seconds from "
                                         f"{TIMEOUT_RANGE[0]:g} to {TIMEOUT_RANGE[1]:g}")
            values["timeout"] = seconds
        elif name == "LOCK":
            if value.upper() not in LOCK_CHOICES:
                raise ConfigurationError(f"JDLS LOCK: {value!r} is not one of {', '.join(LOCK_CHOICES)}")
            values["lock"] = value.upper()
        elif name == "TRACE":
            values["trace"] = value
        elif name in _TLS_FILES:
            values[_TLS_FILES[name]] = value
        else:  # an option of the table that the parser does not read yet: a bug, not the user's fault
            raise AssertionError(f"JDLS {name}: in OPTIONS but not parsed")
    if "server2" in values and "server" not in values:
        raise ConfigurationError("JDLS SERVER2 has no meaning without SERVER")
    if "server2" in values and _same(values["server"], values["server2"]):
        raise ConfigurationError(f"JDLS SERVER2 ({values['server2']}) is the same service as SERVER "
                                 f"({values['server']}): every lock would wait behind itself; name another")
    for name, field in _TLS_FILES.items():
        if field in values and "tls" not in values:
            raise ConfigurationError(f"JDLS {name} has no meaning without TLS")
    if "key" in values and "cert" not in values:
        raise ConfigurationError("JDLS KEY has no meaning without CERT (the certificate it belongs to)")
    return values
