"""Text that came from a peer, made fit for a line of a report, a trace or a log; and how a message says
an amount of something (``amount``), in one place.

A key or file name is whatever a client sent: a newline, tab or escape sequence in
it would forge lines or rows, or drive the operator's terminal; bidirectional and
zero-width marks would make it read as something else. Every program that shows one
escapes it here.
"""

from __future__ import annotations

import functools
import re


@functools.cache
def _controls() -> re.Pattern[str]:
    """The characters ``printable`` escapes, compiled on first use, not at import: about a millisecond of
    every client's start-up (dls-lock's before it connects), for text that most runs never show."""
    return re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def printable(text: str) -> str:
    """``text`` with each control character (and bidirectional or zero-width mark) written as ``\\xNN`` or
    ``\\uNNNN``."""
    return _controls().sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def amount(value: float, unit: str) -> str:
    """``value`` ``unit`` as a message says it: "1 second", "0.5 seconds", "30 seconds" (the figure with :g,
    the unit singular only for exactly one), so that no message says "1 seconds"."""
    return f"{value:g} {unit}" if value == 1 else f"{value:g} {unit}s"
