"""The client's configuration, from JDLS and JBCPORTNO as dls-proto reads them for every dls program.

Only the errors are the client's own: dls-proto raises its ConfigurationError,
and a client raises its ConfigurationError (a DlsError) instead, so that one
``except DlsError`` covers every failure of the library.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import dls_proto
from dls_proto import Server, environment, jdls

from .errors import ConfigurationError

if TYPE_CHECKING:
    import ssl  # loaded only with TLS (dls_proto.tls): a plain client's start-up does without it

DEFAULT_HOST = jdls.DEFAULT_HOST
DEFAULT_PORT = jdls.DEFAULT_PORT
DEFAULT_TIMEOUT = jdls.DEFAULT_TIMEOUT

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_TIMEOUT", "Config", "Server", "parse", "port_number"]


@contextmanager
def _client_errors() -> Iterator[None]:
    try:
        yield
    except ConfigurationError:
        raise
    except dls_proto.ConfigurationError as exc:
        raise ConfigurationError(str(exc)) from None


class Config(jdls.Config):
    """What a Client is told to do: dls-proto's reading of JDLS (see ``dls_proto.jdls.Config``), whose errors
    are this package's ConfigurationError. ``Client()`` reads it from JDLS; give one to use another service."""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Config | None:
        """The configuration in JDLS, or None when JDLS is not set (no service in use)."""
        with _client_errors():
            return super().from_environment(environ)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with (None without TLS); ConfigurationError names the option whose file
        is wrong."""
        with _client_errors():
            return super().ssl_context()


def parse(text: str) -> Config:
    """Parse a JDLS value; ConfigurationError names the first thing wrong with it."""
    with _client_errors():
        return jdls.parse(text, Config)


def port_number() -> int:
    """This process's port number: JBCPORTNO, else its pid (ConfigurationError when JBCPORTNO is bad)."""
    with _client_errors():
        return environment.port_number()
