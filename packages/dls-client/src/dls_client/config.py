"""The JDLS environment variable: how a client process finds and uses the lock service.

Syntax (as jDLS): comma-separated options, ``SERVER=host{,port}``,
``SERVER2=host{,port}``, ``WAIT``, ``TIMEOUT=seconds``, ``BINARY``,
``OSLOCKS``, ``LOCK=EXTERNAL|INTERNAL|ALL``, ``VERBOSE``, ``TRACE=file``.
Set but empty means localhost, port 50002. Anything else is refused with a
message naming the option: a lock service that guessed would let two
processes disagree on where their locks are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigurationError

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 50002
DEFAULT_TIMEOUT = 30.0
LOCK_CHOICES = ("EXTERNAL", "INTERNAL", "ALL")


@dataclass(frozen=True)
class Server:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host},{self.port}"


@dataclass(frozen=True)
class Config:
    server: Server = Server(DEFAULT_HOST)
    server2: Server | None = None
    wait: bool = False
    timeout: float = DEFAULT_TIMEOUT
    binary: bool = False
    oslocks: bool = False
    lock: str = "ALL"
    verbose: bool = False
    trace: str | None = None

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Config | None:
        """The configuration in JDLS, or None when JDLS is not set (no service in use)."""
        env = os.environ if environ is None else environ
        text = env.get("JDLS")
        return None if text is None else parse(text)


def _port(text: str, option: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigurationError(f"JDLS {option}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse(text: str) -> Config:
    """Parse a JDLS value; ConfigurationError names the first thing wrong with it."""
    tokens = [t.strip() for t in text.split(",")]
    if tokens == [""]:
        return Config()
    values: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, value = token.partition("=")
        name = name.strip().upper()
        value = value.strip()
        i += 1
        if name in ("SERVER", "SERVER2"):
            if not eq or not value:
                raise ConfigurationError(f"JDLS {name}: expected {name}=host or {name}=host,port")
            port = DEFAULT_PORT
            if i < len(tokens) and "=" not in tokens[i] and tokens[i][:1].isdigit():
                port = _port(tokens[i], name)
                i += 1
            values[name.lower()] = Server(value, port)
        elif name in ("WAIT", "BINARY", "OSLOCKS", "VERBOSE"):
            if eq:
                raise ConfigurationError(f"JDLS {name} takes no value (got {token!r})")
            values[name.lower()] = True
        elif name == "TIMEOUT":
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if seconds <= 0 or seconds != seconds:
                raise ConfigurationError(f"JDLS TIMEOUT: {value!r} is not a positive number of seconds")
            values["timeout"] = seconds
        elif name == "LOCK":
            if value.upper() not in LOCK_CHOICES:
                raise ConfigurationError(f"JDLS LOCK: {value!r} is not one of {', '.join(LOCK_CHOICES)}")
            values["lock"] = value.upper()
        elif name == "TRACE":
            if not value:
                raise ConfigurationError("JDLS TRACE: expected TRACE=file")
            values["trace"] = value
        elif not token:
            raise ConfigurationError(f"JDLS: empty option in {text!r}")
        else:
            raise ConfigurationError(
                f"JDLS: unknown option {token!r}; expected SERVER, SERVER2, WAIT, TIMEOUT, BINARY, OSLOCKS, "
                "LOCK, VERBOSE or TRACE"
            )
    if "server2" in values and "server" not in values:
        raise ConfigurationError("JDLS SERVER2 has no meaning without SERVER")
    return Config(**values)  # type: ignore[arg-type]
