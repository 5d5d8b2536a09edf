"""./dev release (tools/release.py): a failed build or a failed check is a non-zero exit naming what failed.

The release itself, built and installed, is tested by tests/test_contract_wheels.py (which builds it with this
tool); here, packages made to fail in a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dls_testkit import load_tool

release_tool = load_tool("release")


def package(root: Path, name: str, pyproject: str, readme: bool = True) -> Path:
    """A package directory ``root/packages/name`` with that pyproject.toml and a module of one line."""
    directory = root / "packages" / name
    module = directory / "src" / name.replace("-", "_")
    module.mkdir(parents=True)
    (module / "__init__.py").write_text('"""A package of the test."""\n')
    (directory / "pyproject.toml").write_text(pyproject)
    if readme:
        (directory / "README.md").write_text(f"# {name}\n\nA package of the test.\n")
    return directory


HATCHLING = """[build-system]
requires = ["hatchling>=1.18"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A package of the test."
requires-python = ">=3.11"
{readme}license = "MIT"

[tool.hatch.build.targets.wheel]
packages = ["src/{module}"]
"""


def test_a_failed_build_is_exit_1_naming_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    broken = package(tmp_path, "dls-broken", '[project\nname = "dls-broken"\n')
    monkeypatch.setattr(release_tool, "packages", lambda: [broken])
    out = tmp_path / "dist"
    assert release_tool.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "release: building dls-broken failed (python -m build, exit 1)" in err, err
    assert "pyproject.toml" in err, err  # build's own word on what is wrong
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_a_failed_twine_check_is_exit_1_and_earlier_files_are_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A package that builds but has no README: twine check --strict refuses it (PyPI would show no
    description). The out directory held an older version's files of it: they are gone, the new ones are
    listed with their sizes."""
    bare = package(tmp_path, "dls-bare", HATCHLING.format(name="dls-bare", module="dls_bare", readme=""),
                   readme=False)
    monkeypatch.setattr(release_tool, "packages", lambda: [bare])
    out = tmp_path / "dist"
    out.mkdir()
    (out / "dls_bare-0.1.0.tar.gz").write_bytes(b"old")
    (out / "other-1.0.tar.gz").write_bytes(b"not ours")
    assert release_tool.main(["--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "release: twine check --strict failed" in captured.err, captured.err
    assert "dls_bare-1.0.0-py3-none-any.whl" in captured.out and " kB" in captured.out, captured.out
    assert "built and checked" not in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["dls_bare-1.0.0-py3-none-any.whl", "dls_bare-1.0.0.tar.gz",
                                                     "other-1.0.tar.gz"]


def test_out_not_a_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "file"
    afile.touch()
    with pytest.raises(SystemExit) as exit_:
        release_tool.main(["--out", str(afile)])
    assert exit_.value.code == 2
    assert f"--out {afile}: not a directory" in capsys.readouterr().err
