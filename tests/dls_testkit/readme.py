"""The client README's examples, run by the tests as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

#: The README whose examples the tests run.
CLIENT_README = Path(__file__).resolve().parents[2] / "packages" / "dls-client" / "README.md"


def examples(start: str, end: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ```python blocks of the client README's section from the heading ``start`` to ``end``, and the
    test's directory made the one they expect: the current directory, with data/FBNK.ACCOUNT in it."""
    text = CLIENT_README.read_text()
    section = text[text.index(start):text.index(end)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "FBNK.ACCOUNT").touch()
    monkeypatch.chdir(tmp_path)
    return blocks
