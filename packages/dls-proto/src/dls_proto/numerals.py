"""Numbers typed by a user, read as ASCII decimals only: one reading for every dls program.

Python's int() and float() also take other scripts' digits ('٣' is 3), underscores
("1_0") and surrounding white space, and str.isdigit() passes superscripts that int()
then refuses with a traceback. A port, a timeout or a table size that one program read
as a number and a shell script or another program would not is a value to refuse, so
every parser of a number from the environment or a command line goes through here.
"""

from __future__ import annotations

_DIGITS = frozenset("0123456789")
#: What a decimal fraction may be written with: digits, a point, an exponent and its sign.
_REAL = _DIGITS | frozenset(".eE+-")


def integer(text: str) -> int | None:
    """``text`` as a non-negative integer if it is ASCII digits only (at least one), else None."""
    return int(text) if text and _DIGITS.issuperset(text) else None


def real(text: str) -> float | None:
    """``text`` as a number if it is a decimal written in ASCII (digits, a point, an exponent: "0.5",
    "3", "1e3"; no "inf", "nan", underscores or spaces), else None."""
    if not text or not _REAL.issuperset(text) or not _DIGITS.intersection(text):
        return None
    try:
        return float(text)
    except ValueError:
        return None
