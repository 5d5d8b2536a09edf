"""The six DLM lock modes and which of them may be held together.

Kept as plain integers (NL=0 ... EX=5, the Linux DLM numbering, the same as on
the wire) with the compatibility matrix as bit masks, so the lock path checks a
pair with one shift and one ``and``.
"""

from __future__ import annotations

NL, CR, CW, PR, PW, EX = range(6)
NAMES = ("NL", "CR", "CW", "PR", "PW", "EX")
#: How jDLS displays a lock's type: its READ lock is PR, its WRITE lock EX.
DISPLAY = ("NULL", "CONCURRENT-READ", "CONCURRENT-WRITE", "READ", "PROTECTED-WRITE", "WRITE")
#: Single-letter form for LOCK# columns (0x58ba67d8,W).
LETTERS = ("N", "r", "w", "R", "P", "W")

# _COMPAT[requested] has bit g set when mode g may already be held.
_COMPAT = (
    0b111111,  # NL: with anything
    0b011111,  # CR: with all but EX
    0b000111,  # CW: with NL, CR, CW
    0b001011,  # PR: with NL, CR, PR
    0b000011,  # PW: with NL, CR
    0b000001,  # EX: with NL only
)


def compatible(requested: int, held: int) -> bool:
    """True when ``requested`` may be granted while another owner holds ``held``."""
    return bool(_COMPAT[requested] >> held & 1)


def parse(text: str) -> int:
    """A mode from its name (NL..EX), case-insensitive; ValueError names the choices."""
    try:
        return NAMES.index(text.upper())
    except ValueError:
        raise ValueError(f"unknown lock mode {text!r}: expected one of {', '.join(NAMES)}") from None


def covers(weaker: int, stronger: int) -> bool:
    """True when ``weaker`` may be held beside everything ``stronger`` may: converting a lock from
    ``stronger`` to ``weaker`` is a conversion down, granted at once (EX to PR, PR to NL; not CW to PR,
    which is sideways and waits as a conversion up does)."""
    return _COMPAT[weaker] & _COMPAT[stronger] == _COMPAT[stronger]
