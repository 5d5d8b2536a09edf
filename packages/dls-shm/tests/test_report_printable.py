"""Keys and file names come from clients: shown, they must not drive the terminal or read as other text."""

from dls_shm.report import printable


def test_controls_and_invisible_reordering_marks_are_shown_escaped() -> None:
    assert printable("KEY\n127.0.0.1\tFAKE\x1b[2J\x7f\x9b") == "KEY\\x0a127.0.0.1\\x09FAKE\\x1b[2J\\x7f\\x9b"
    assert printable("ACCT\u202e1001\u2066x\u200b") == "ACCT\\u202e1001\\u2066x\\u200b"
    assert printable("USD163170001 é ü 日本") == "USD163170001 é ü 日本"  # letters of any script stay
