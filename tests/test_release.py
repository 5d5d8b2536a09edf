"""./dev release (tools/release.py): a failed build or a failed check is a non-zero exit naming what failed.

The release itself, built and installed, is tested by tests/test_contract_wheels.py (which builds it with this
tool); here, packages made to fail in a temporary directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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
    commit_all(root)
    return directory


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd=root,
                   check=True, capture_output=True)


def commit_all(root: Path) -> None:
    """``root`` a git repository with everything in it committed: a release builds only what git tracks."""
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "test", "--allow-empty")


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


def test_untracked_or_changed_files_in_a_package_refuse_the_release(tmp_path: Path) -> None:
    """A clone of this repository (its committed state, with this checkout's release tool), an untracked secret
    and a changed file in dls-proto: ./dev release refuses, exit 1, naming both, and builds nothing (the
    untracked files used to end up in the sdist and the wheel)."""
    root = Path(release_tool.__file__).resolve().parent.parent
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(root), str(clone)], check=True, capture_output=True)
    shutil.copy(root / "tools" / "release.py", clone / "tools" / "release.py")
    proto = clone / "packages" / "dls-proto"
    (proto / ".env").write_text("AWS_SECRET=xyz\n")
    (proto / "src" / "dls_proto" / "local_settings.txt").write_text("password\n")
    with (proto / "README.md").open("a") as readme:
        readme.write("changed\n")
    out = tmp_path / "dist"
    result = subprocess.run([sys.executable, str(clone / "tools" / "release.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 1, result
    assert "release: refused" in result.stderr, result.stderr
    for line in ("?? packages/dls-proto/.env", "?? packages/dls-proto/src/dls_proto/local_settings.txt",
                 " M packages/dls-proto/README.md"):
        assert line in result.stderr, result.stderr
    assert not out.exists() or list(out.iterdir()) == []
