"""Protocol errors, split by whose fault they are.

A lock server must tell "my peer sent garbage" (close that one connection, log
it, carry on) from "my own code tried something illegal" (a bug to fix), so the
two are distinct classes, as in h11.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error this package raises about the conversation."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (our bug)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol; the connection cannot go on."""


class ConfigurationError(ValueError):
    """A setting from the environment (JDLS, JBCPORTNO) is not valid; the message names it.

    Every dls program reads these the same way (see ``environment`` and ``jdls``), so a
    value one program refuses is refused by all: two programs that guessed differently
    would lock in different places without seeing each other.
    """
