"""The release: every package's sdist and wheel, built and checked (./dev release).

    python tools/release.py [--out DIR] [--jobs N]

For each package under packages/ (each directory with a pyproject.toml), ``python -m build`` makes its sdist and
then its wheel from that sdist, in build's own isolated environment (the build backend fresh from the index, as
on a clean machine): a wheel built from the sdist proves that the sdist holds everything a build needs (a man page
or a data file the sdist lacked would fail that build, where a wheel built from the checkout would not notice).
All of them go into one directory, DIR (default: dist/ at the top of the repository, which git ignores); the files
an earlier release left there for these packages are removed first, so the directory holds exactly one release.
Then ``twine check --strict`` checks every file (the metadata and the README as PyPI would render it).

A release holds what git tracks, nothing else: before building, it refuses (exit 1, naming them) when a package's
directory holds files git does not track (a stray ``.env`` or key would end up in the sdist, even the wheel) or
tracked files changed since the last commit (the release would not be the commit it claims to be). Files git
ignores (``__pycache__``, build output) are left out of the builds by the packages' own settings.

It prints what it made, a line per file with its size, and exits 0; 1 when a package's directory is not clean, a
build or the check failed (saying which, with the tool's own output); 2 for a usage error. The contract tests
(tests/test_contract_wheels.py) call ``release`` itself, so the wheels they install are built exactly as a
release's are (from the checkout as it is: the clean-tree check is the command's, not the function's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "dist"
#: Lines of a failed tool's output shown: its end, where pip and build say what went wrong.
TAIL = 40
#: Packages built at once: each build mostly waits (its isolated environment being installed), so two at a time
#: take about half as long as one after another, on two cores.
JOBS = 2


def packages(root: Path = ROOT) -> list[Path]:
    """The package directories: every directory under packages/ with a pyproject.toml (as ./dev's PACKAGES)."""
    return sorted(p for p in (root / "packages").iterdir() if (p / "pyproject.toml").is_file())


def distribution_prefix(package: Path) -> str:
    """How the files of ``package`` begin: its name with "-" as "_" (dls-proto: dls_proto-0.6.0.tar.gz)."""
    return package.name.replace("-", "_") + "-"


def files_of(directory: Path, package: Path) -> list[Path]:
    """The sdists and wheels of ``package`` in ``directory``."""
    prefix = distribution_prefix(package)
    return sorted(p for p in directory.iterdir()
                  if p.name.startswith(prefix) and p.name.endswith((".whl", ".tar.gz")))


@dataclass
class Release:
    """What ``release`` made, and what failed (each a message with the failing tool's output)."""

    directory: Path
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.files)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout + result.stderr).rstrip().splitlines()
    return "\n".join("    " + line.rstrip() for line in lines[-TAIL:])


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a tool to its end, its output kept for a failure's message: without colours (they would be escape
    codes in it), and without this process's search path (build makes its own isolated environment, as on a
    clean machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "FORCE_COLOR")}
    env["NO_COLOR"] = "1"
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                          check=False)


def build(package: Path, out: Path, python: str = sys.executable) -> str | None:
    """``python -m build`` of ``package`` into ``out``: its sdist, then its wheel from that sdist. None when it
    made one of each, else what went wrong."""
    result = _run(python, "-m", "build", "--outdir", out, package)
    if result.returncode != 0:
        return f"building {package.name} failed (python -m build, exit {result.returncode}):\n{_tail(result)}"
    built = files_of(out, package)
    if sorted(p.name.endswith(".whl") for p in built) != [False, True]:
        return f"building {package.name} made {[p.name for p in built]}, not one sdist and one wheel"
    return None


def unclean(package_dirs: Sequence[Path]) -> list[str]:
    """What in ``package_dirs`` git does not have as committed: a line per untracked or changed file
    (``git status --porcelain``: ``?? path`` untracked, `` M path`` modified, ...; ignored files are not listed),
    or why git could not tell (a package outside a git work tree cannot be checked, so is not released)."""
    lines: list[str] = []
    for package in package_dirs:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "."],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=package, check=False)
        if result.returncode != 0:
            lines.append(f"{package}: git status failed (exit {result.returncode}): {result.stderr.strip()}")
        lines += result.stdout.splitlines()
    return lines


def release(out: Path, package_dirs: Sequence[Path] | None = None, python: str = sys.executable, jobs: int = JOBS,
            progress: Callable[[str], None] = lambda _: None) -> Release:
    """Build each package's sdist and wheel into ``out`` (made if missing; these packages' earlier files there
    removed first), ``jobs`` packages at a time, then ``twine check --strict`` them all. A failed build does not
    stop the others: every failure is told at once."""
    package_dirs = packages() if package_dirs is None else package_dirs
    out.mkdir(parents=True, exist_ok=True)
    for package in package_dirs:
        for old in files_of(out, package):
            old.unlink()
    made = Release(out)

    def one(package: Path) -> str | None:
        progress(f"building {package.name}")
        return build(package, out, python)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        made.problems += [problem for problem in pool.map(one, package_dirs) if problem]
    made.files = [path for package in package_dirs for path in files_of(out, package)]
    if made.files:
        progress("checking them (twine check --strict)")
        result = _run(python, "-m", "twine", "--no-color", "check", "--strict", *made.files)
        if result.returncode != 0:
            made.problems.append(f"twine check --strict failed (exit {result.returncode}):\n{_tail(result)}")
    return made


def size(path: Path) -> str:
    return f"{path.stat().st_size / 1000:.1f} kB"


def summary(made: Release) -> str:
    """The files made, a line each with its size; and whether all is well."""
    width = max((len(p.name) for p in made.files), default=0)
    lines = [f"release in {made.directory}:", *(f"  {p.name:<{width}}  {size(p):>9}" for p in made.files)]
    if made.ok:
        lines.append(f"release: {len(made.files)} files built and checked (twine check --strict)")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="./dev release", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 built and checked; 1 a package directory holds untracked "
                                            "or uncommitted files (listed), or a build or the check failed; "
                                            "2 usage error (--out not a directory that can be made, --jobs below 1).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="the directory for the sdists and wheels (default: dist/ at the top of the repository)")
    parser.add_argument("--jobs", type=int, default=JOBS, metavar="N", help=f"packages built at once (default {JOBS})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out}: not a directory")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be 1 or more")
    dirty = unclean(packages())
    if dirty:
        print("release: refused: the package directories hold files that are untracked or changed since the last "
              "commit (commit or remove them: a release is what git tracks):", file=sys.stderr)
        for line in dirty:
            print(f"    {line}", file=sys.stderr)
        return 1
    try:
        made = release(out, jobs=args.jobs, progress=lambda text: print(f"release: {text}", file=sys.stderr,
                                                                          flush=True))
    except OSError as exc:
        parser.error(f"--out {args.out}: {exc.strerror or exc}")
    print(summary(made), flush=True)
    for problem in made.problems:
        print(f"release: {problem}", file=sys.stderr)
    return 0 if made.ok else 1


if __name__ == "__main__":
    sys.exit(main())
