"""Contract: what is released is what installs and runs. Every package installs alone, from its wheel, with
only what it declares; the five together make a working service; the archives hold what they must.

The wheels are those of the release: built once per test session by ``tools/release.py``'s ``release`` (what
``./dev release`` runs: ``python -m build``, an sdist and a wheel from it for each package, ``twine check
--strict``), into one directory shared by the xdist workers (built under a file lock by whichever worker comes
first); or, when $DLS_RELEASE_DIR names a directory, exactly the files of the release there (made by
``./dev release --out DIR``), which are then the ones these tests pass or fail. Then, for each package, a fresh
venv in tmp_path gets that one wheel (``pip install <wheel> --find-links <release dir>``: siblings from the
release, third-party dependencies from the usual index and cache), and:

- ``pip check`` finds nothing wrong, and the installed distributions are the package,
  the siblings it declares (transitively) and third-party packages, nothing else;
- the package imports, and its version is the one its ``__about__`` says;
- every tool in its ``[project.scripts]`` runs once with ``--help``: exit 0, and the
  output starts with ``usage:``.

And dls-client, which is all an application server installs, must not bring dls-shm,
sysv_ipc or psutil with it. All five wheels in one venv run the whole: its jdls starts a service, its
dls-lock locks a record, its show-item-locks shows it, and the service stops leaving nothing. Each sdist holds
every file git keeps of its package (what a build needs: sources, py.typed, data, man pages, README,
CHANGELOG), and each wheel its modules, data and man pages.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import psutil
import pytest
from dls_testkit import Service, load_tool, make_service, wait_for

#: The first test that asks for the release waits for its build (about 40 s alone, longer on a busy machine) as
#: well as doing its own work.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
#: What an application server must not get with dls-client (normalised names).
NOT_WITH_THE_CLIENT = {"dls-shm", "sysv-ipc", "psutil", "dls-daemon", "dls-utils"}
#: Names a directory holding a release (./dev release --out DIR) for these tests to install instead of building one.
RELEASE_DIR_VARIABLE = "DLS_RELEASE_DIR"


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


#: tools/release.py, the one way a release is built.
release_tool = load_tool("release")


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release the tests install: $DLS_RELEASE_DIR's, else one built once for all the xdist workers of
    this session (a failed build is told to every worker, not tried again by each)."""
    given = os.environ.get(RELEASE_DIR_VARIABLE)
    if given:
        if not Path(given).is_dir():
            pytest.fail(f"${RELEASE_DIR_VARIABLE}={given}: not a directory (make one with ./dev release --out DIR)")
        return Path(given)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory, failed = shared / "dls-release", shared / "dls-release.failed"
    with open(shared / "dls-release.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = directory / ".built"
        if failed.exists():
            pytest.fail(failed.read_text())
        if not done.exists():
            made = release_tool.release(directory)
            if not made.ok:
                failed.write_text("the release build failed:\n" + "\n".join(made.problems))
                pytest.fail(failed.read_text())
            done.touch()
    return directory


def wheel_of(directory: Path, package: str) -> Path:
    wheels = sorted(directory.glob(f"{package.replace('-', '_')}-*.whl"))
    assert len(wheels) == 1, f"wheels of {package} in {directory}: {wheels}"
    return wheels[0]


def sdist_of(directory: Path, package: str) -> Path:
    sdists = sorted(directory.glob(f"{package.replace('-', '_')}-*.tar.gz"))
    assert len(sdists) == 1, f"sdists of {package} in {directory}: {sdists}"
    return sdists[0]


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


def tracked(package: str) -> list[str]:
    """The files git keeps of ``package``, relative to its directory."""
    result = subprocess.run(["git", "ls-files", "-z", "."], cwd=ROOT / "packages" / package, capture_output=True,
                            check=True)
    return sorted(name for name in result.stdout.decode().split("\0") if name)


def compiled(members: list[str]) -> list[str]:
    return [m for m in members if "__pycache__" in m or m.endswith(".pyc")]


@pytest.mark.parametrize("package", PACKAGES)
def test_sdist_holds_every_file_of_its_package(package: str, wheel_dir: Path) -> None:
    """What a build needs (the sources with py.typed and data, the man pages the wheel maps, README, CHANGELOG,
    pyproject.toml) and its tests: everything git keeps of the package, under ``<name>-<version>/``; no bytecode.
    (The release's wheels are built from these sdists, so a file a build needs and the sdist lacks fails there.)"""
    with tarfile.open(sdist_of(wheel_dir, package)) as sdist:
        members = [m.name for m in sdist.getmembers() if m.isfile()]
    top = f"{package.replace('-', '_')}-{version_of(package)}/"
    assert all(m.startswith(top) for m in members), [m for m in members if not m.startswith(top)]
    inside = {m[len(top):] for m in members}
    missing = [name for name in tracked(package) if name not in inside]
    assert not missing, f"the sdist of {package} lacks {missing}"
    assert {"PKG-INFO", "README.md", "CHANGELOG.md", "pyproject.toml"} <= inside
    assert not compiled(members), compiled(members)


@pytest.mark.parametrize("package", PACKAGES)
def test_wheel_carries_its_modules_data_and_man_pages(package: str, wheel_dir: Path) -> None:
    """Every file of the package's source tree (modules, py.typed, data such as dls-daemon's unit file) and
    every man page its pyproject maps into share/man, and nothing compiled."""
    with zipfile.ZipFile(wheel_of(wheel_dir, package)) as wheel:
        members = wheel.namelist()
    module = package.replace("-", "_")
    source = f"src/{module}/"
    wanted = [name[len("src/"):] for name in tracked(package) if name.startswith(source)]
    data = f"{module}-{version_of(package)}.data/data/"
    with open(ROOT / "packages" / package / "pyproject.toml", "rb") as f:
        shared = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"].get("shared-data", {})
    wanted += [data + destination for destination in shared.values()]
    assert f"{module}/py.typed" in wanted
    missing = [name for name in wanted if name not in members]
    assert not missing, f"the wheel of {package} lacks {missing}"
    assert not compiled(members), compiled(members)
    if package == "dls-daemon":
        assert "dls_daemon/data/dls-daemon.service" in members
    if package in ("dls-daemon", "dls-client", "dls-utils"):
        assert any(m.startswith(data + "share/man/man1/") for m in members), members


def test_all_five_wheels_in_one_venv_run_the_service_and_its_tools(wheel_dir: Path, tmp_path: Path) -> None:
    """The whole, as released: the five wheels in one fresh venv; its jdls starts a service (its own instance
    and port), its dls-lock holds a record there while its show-item-locks shows the lock (from the service,
    as from another host, and from the table, as on the lock server), the lock ends with the command, and the
    service stops (jdls -k, -K from the venv) leaving no process and no IPC object."""
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    result = run(python, "-m", "pip", "install", "-q", *(wheel_of(wheel_dir, p) for p in PACKAGES))
    assert result.returncode == 0, f"pip install of the five wheels failed:\n{result.stdout}{result.stderr}"
    result = run(python, "-m", "pip", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = run(python, "-m", "pip", "list", "--format=freeze").stdout
    versions = dict(line.split("==") for line in listed.splitlines() if "==" in line)
    assert {normalise(name): version for name, version in versions.items() if normalise(name).startswith("dls-")} \
        == {p: version_of(p) for p in PACKAGES}, listed

    service = Service(tmp_path / "server" / "release", env=clean_env(HOME=str(tmp_path)),
                      program=[str(bin_dir / "jdls")])
    with service.checked():
        service.start()
        for role in ("monitor", "listener"):
            pid = service.pid(role)
            assert pid, f"no {role} pid file"
            command = psutil.Process(pid).cmdline()
            assert command[0].startswith(str(venv)), f"the {role} runs {command}, not the venv's jdls"

        data = tmp_path / "FBNK.ACCOUNT"
        data.touch()
        done = tmp_path / "done"
        wait = f"until [ -e {done} ]; do sleep 0.05; done"
        holder = subprocess.Popen([str(bin_dir / "dls-lock"), str(data), "USD163170001", "sh", "-c", wait],
                                  env=service.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def shown(*how: str) -> list[dict[str, Any]]:
                out = run(bin_dir / "show-item-locks", "--json", *how, env=service.env, timeout=30)
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)  # type: ignore[no-any-return]

            wait_for(lambda: bool(shown()), 15, "show-item-locks (from the service) to list the held lock", poll=0.1)
            for how in ((), ("--local",)):
                rows = shown(*how)
                assert [(r["filename"], r["key"], r["client_pid"], r["mode"]) for r in rows] \
                    == [(str(data), "USD163170001", holder.pid, "EX")], (how, rows)
            done.touch()
            _, err = holder.communicate(timeout=30)
            assert holder.returncode == 0, f"dls-lock exited {holder.returncode}: {err}"
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
        wait_for(lambda: not shown(), 10, "show-item-locks to list no lock after dls-lock ended", poll=0.1)
