"""Contract: every package installs alone, from its wheel, with only what it declares.

The five wheels are built once per test session (``pip wheel --no-deps``), into one
directory shared by the xdist workers (built under a file lock by whichever worker
comes first). Then, for each package, a fresh venv in tmp_path gets that one wheel
(``pip install <wheel> --find-links <wheel dir>``: siblings from the wheel dir,
third-party dependencies from the usual index and cache), and:

- ``pip check`` finds nothing wrong, and the installed distributions are the package,
  the siblings it declares (transitively) and third-party packages, nothing else;
- the package imports, and its version is the one its ``__about__`` says;
- every tool in its ``[project.scripts]`` runs once with ``--help``: exit 0, and the
  output starts with ``usage:``.

And dls-client, which is all an application server installs, must not bring dls-shm,
sysv_ipc or psutil with it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
#: What an application server must not get with dls-client (normalised names).
NOT_WITH_THE_CLIENT = {"dls-shm", "sysv-ipc", "psutil", "dls-daemon", "dls-utils"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project(package: str) -> dict[str, Any]:
    with open(ROOT / "packages" / package / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def requirement_names(package: str) -> set[str]:
    return {normalise(re.match(r"[A-Za-z0-9_.-]+", req).group(0))  # type: ignore[union-attr]
            for req in project(package).get("dependencies", [])}


def sibling_closure(package: str) -> set[str]:
    """The package and the dls packages it needs, directly or not."""
    found, todo = set(), [package]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        todo.extend(req for req in requirement_names(name) if req in PACKAGES)
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DLS_IPC_KEY", "JDLS", "JDLS_PORT", "JBCPORTNO")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                            env=env or clean_env(), stdin=subprocess.DEVNULL, cwd="/")
    return result


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five wheels, built once for all the xdist workers of this session."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = shared / "dls-wheels"
    directory.mkdir(exist_ok=True)
    with open(shared / "dls-wheels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = directory / ".built"
        if not done.exists():
            for package in PACKAGES:
                result = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ROOT / "packages" / package,
                             "-w", directory)
                assert result.returncode == 0, f"building the wheel of {package} failed:\n{result.stderr}"
            done.touch()
    return directory


def wheel_of(directory: Path, package: str) -> Path:
    wheels = sorted(directory.glob(f"{package.replace('-', '_')}-*.whl"))
    assert len(wheels) == 1, f"wheels of {package} in {directory}: {wheels}"
    return wheels[0]


def version_of(package: str) -> str:
    about = (ROOT / "packages" / package / "src" / package.replace("-", "_") / "__about__.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', about)
    assert match, f"no __version__ in {package}'s __about__.py"
    return match.group(1)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_installs_alone_and_its_tools_run(package: str, wheel_dir: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = run(sys.executable, "-m", "venv", venv)
    assert result.returncode == 0, result.stderr
    python, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip"]
    result = run(*pip, "install", "-q", wheel_of(wheel_dir, package), "--find-links", wheel_dir)
    assert result.returncode == 0, f"pip install {package} failed:\n{result.stdout}{result.stderr}"
    result = run(*pip, "check")
    assert result.returncode == 0, f"pip check after installing {package}:\n{result.stdout}{result.stderr}"

    listed = run(*pip, "list", "--format=freeze", "--exclude-editable")
    installed = {normalise(line.split("==")[0]) for line in listed.stdout.splitlines() if "==" in line}
    siblings = {name for name in installed if name.startswith("dls-")}
    assert siblings == sibling_closure(package), (
        f"installing {package} brought dls packages {sorted(siblings)}; it declares {sorted(sibling_closure(package))}")
    if package == "dls-client":
        unwanted = installed & NOT_WITH_THE_CLIENT
        assert not unwanted, f"dls-client alone installed {sorted(unwanted)}: an application server needs none of them"

    module = package.replace("-", "_")
    result = run(python, "-c", f"import {module}.__about__ as a, {module}; print(a.__version__, {module}.__file__)")
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr}"
    version, location = result.stdout.split()
    assert version == version_of(package)
    assert location.startswith(str(venv)), f"{module} imported from {location}, not from the venv"

    env = clean_env(JBCRELEASEDIR=str(tmp_path / "release"), HOME=str(tmp_path))
    failures = []
    for script in project(package).get("scripts", {}):
        tool = venv / "bin" / script
        if not tool.exists():
            failures.append(f"{script}: not installed")
            continue
        result = run(tool, "--help", env=env, timeout=30)
        if result.returncode != 0 or not result.stdout.startswith("usage:"):
            failures.append(f"{script} --help: exit {result.returncode}, stdout {result.stdout[:200]!r}, "
                            f"stderr {result.stderr[-500:]!r}")
    assert not failures, f"tools of {package}:\n" + "\n".join(failures)


def test_show_item_locks_on_a_client_host_with_only_dls_client_and_dls_utils(wheel_dir: Path, tmp_path: Path) -> None:
    """An application server with dls-client and dls-utils installed (from their wheels, nothing else of dls
    but what they declare) asks a running lock service for its locks, as an operator would from there;
    the man pages came with the wheels and man finds them from the venv's bin on PATH."""
    from dls_testkit import make_service, wait_for

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip = [venv / "bin" / "python", "-m", "pip"]
    result = run(*pip, "install", "-q", wheel_of(wheel_dir, "dls-client"), wheel_of(wheel_dir, "dls-utils"),
                 "--find-links", wheel_dir)
    assert result.returncode == 0, result.stderr
    listed = run(*pip, "list", "--format=freeze").stdout
    assert "dls-daemon" not in listed.replace("_", "-"), listed

    service = make_service(tmp_path / "server")
    service.start()
    try:
        data = tmp_path / "FBNK.ACCOUNT"
        data.touch()
        host = clean_env(JBCRELEASEDIR=str(tmp_path / "client-host"), HOME=str(tmp_path),
                         JDLS=f"SERVER=127.0.0.1,{service.port}", JBCPORTNO="1000")
        holder = subprocess.Popen([str(venv / "bin" / "dls-lock"), str(data), "USD163170001", "sleep", "60"],
                                  env=host, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def shown() -> list[dict[str, Any]]:
                out = run(venv / "bin" / "show-item-locks", "--json", env=host, timeout=30)
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)  # type: ignore[no-any-return]

            rows: list[dict[str, Any]] = []

            def listed() -> bool:
                rows[:] = shown()
                return bool(rows)

            wait_for(listed, 10, "show-item-locks to list the held lock", poll=0.1)
            assert [(r["ipaddr"], r["port"], r["key"]) for r in rows] == [("127.0.0.1", 1000, "USD163170001")], rows
            text = run(venv / "bin" / "show-item-locks", "--server", f"127.0.0.1,{service.port}", env=host)
            assert text.returncode == 0 and "USD163170001" in text.stdout, text
            assert f"lock service at 127.0.0.1,{service.port}" in text.stdout.splitlines()[0], text.stdout
        finally:
            holder.kill()
            holder.wait(10)
    finally:
        service.stop_and_check()
    man_env = clean_env(PATH=f"{venv / 'bin'}:/usr/bin:/bin", MANPATH="")
    man_env.pop("MANPATH")
    for page in ("show-item-locks", "dls-lock", "list-open-files"):
        where = run("man", "-w", page, env=man_env)
        assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), (page, where)
