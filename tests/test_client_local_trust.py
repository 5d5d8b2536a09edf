"""What a client makes or writes on its own host, where another local user may have been first (audit i12b F3,
F4): the binary lock directory of its execution locks, and its JDLS TRACE file.

Real processes: the client is a real Python process (or dls-lock against a real service), the other user a
forked child that drops to ``nobody`` (dls_testkit.users); every directory is under a fresh /tmp directory
removed at the end.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_client import binary
from dls_proto import Mode, trusted  # noqa: F401 - loaded before a child drops to nobody (dls_testkit.users)
from dls_testkit import DLS_LOCK, KEY, NOBODY, SERVICE_GID, Service, as_user, data_file, reachable_dir

#: Takes execution lock 1 (EX, no wait) in $JDLS_BINARY_LOCK_DIR, says so, and keeps it for argv[1] seconds.
EXECUTION_LOCK = textwrap.dedent("""
    import sys, time
    from dls_client import binary, DlsError
    from dls_proto import Mode
    try:
        lock = binary.execution_lock(1, Mode.EX, wait=False, timeout=None)
    except DlsError as exc:
        print("REFUSED", exc, flush=True)
        sys.exit(3)
    print("GOT", lock.path, flush=True)
    time.sleep(float(sys.argv[1]))
""")


def _execution_lock(directory: Path, seconds: float = 0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JDLS_BINARY_LOCK_DIR=str(directory))
    return subprocess.run([sys.executable, "-c", EXECUTION_LOCK, str(seconds)], env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may write (1777, as /tmp is), under a fresh /tmp directory removed at the end."""
    with reachable_dir() as base:
        shared = base / "tmp"
        shared.mkdir()
        shared.chmod(0o1777)
        yield shared


def test_a_binary_lock_directory_another_user_made_first_is_refused(open_dir: Path) -> None:
    """A local user who makes the binary lock directory before the service's users could rename its lock files
    and give an execution lock two holders (shown in the audit): the client refuses it, naming the directory,
    its owner and its mode, and locks nothing."""
    squatted = open_dir / "jbase_lock"
    code, said = as_user(lambda: os.mkdir(squatted, 0o755))
    assert code == 0, said
    done = _execution_lock(squatted)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.strip() == (
        f"REFUSED cannot use the binary lock directory {squatted}: owned by another user nobody (uid {NOBODY}) "
        f"(owner user nobody (uid {NOBODY}), mode 0755): it must be a directory of root or of this process's user "
        "(user root (uid 0)) that others cannot write"), done.stdout
    assert list(squatted.iterdir()) == []


@pytest.mark.parametrize("problem", ["group-writable without the sticky bit", "a symbolic link"])
def test_a_binary_lock_directory_others_could_change_is_refused(open_dir: Path, problem: str) -> None:
    directory = open_dir / "jbase_lock"
    if problem == "a symbolic link":
        (open_dir / "elsewhere").mkdir(mode=0o700)
        directory.symlink_to(open_dir / "elsewhere")
        expected = "is a symbolic link"
    else:
        directory.mkdir()
        directory.chmod(0o770)
        expected = "writable by group without the sticky bit (mode 0770)"
    done = _execution_lock(directory)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"cannot use the binary lock directory {directory}: {expected}" in done.stdout, done.stdout
    assert not (open_dir / "elsewhere" / "execution_lock_001").exists()


def test_a_binary_lock_directory_made_here_is_the_groups_and_shared_with_its_members(open_dir: Path) -> None:
    """The directory a client makes is 03770 whatever the umask, its lock files 0660; one root made for the
    service's group (the documented shared set-up) serves every member: another user's execution lock there
    excludes root's."""
    made = open_dir / "made" / "jbase_lock"
    done = subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", sys.executable, "-c", EXECUTION_LOCK, "0"],
                          env=dict(os.environ, JDLS_BINARY_LOCK_DIR=str(made)), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stat.S_IMODE(made.stat().st_mode) == 0o3770
    assert stat.S_IMODE((made / "execution_lock_001").stat().st_mode) == 0o660

    shared = open_dir / "jbase_lock"
    shared.mkdir()
    os.chown(shared, 0, SERVICE_GID)
    shared.chmod(0o3770)

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def member() -> int:
        os.environ["JDLS_BINARY_LOCK_DIR"] = str(shared)
        lock = binary.execution_lock(1, Mode.EX, wait=False, timeout=None)
        os.write(ready_w, b"held\n")
        os.read(go_r, 1)  # keep it until root has tried
        lock.release()
        return 0

    results: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: results.append(as_user(member, groups=[SERVICE_GID])))
    thread.start()
    try:
        assert select.select([ready_r], [], [], 20)[0], "the member never took the lock"
        assert os.read(ready_r, 100) == b"held\n"
        refused = _execution_lock(shared)
    finally:
        os.write(go_w, b"x")
        thread.join(30)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    assert results == [(0, "")]
    assert refused.returncode == 3, refused
    assert "held by another process on this host" in refused.stdout, refused.stdout
    assert (shared / "execution_lock_001").stat().st_uid == NOBODY


def test_a_trace_file_another_user_owns_is_not_appended_to(service: Service) -> None:
    """JDLS TRACE=file where another user made the file (mode 0600, theirs to read): the client does not write
    its trace (file names, keys, pids, handles) there for them to read; it says so once, naming the file and
    its owner, and traces to standard error instead."""
    with reachable_dir() as base:
        theirs = base / "theirs"
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        trace = theirs / "trace.log"

        def make() -> None:
            fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)

        code, said = as_user(make)
        assert code == 0, said
        data = data_file(base)
        env = dict(service.env, JDLS=service.jdls_value(f"TRACE={trace}"))
        done = subprocess.run([DLS_LOCK, str(data), KEY, "true"], env=env, capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert trace.stat().st_size == 0, trace.read_text()
        told = [line for line in done.stderr.splitlines() if "JDLS TRACE" in line]
        assert told == [f"Client: JDLS TRACE: cannot append to {trace} (owned by another user nobody (uid "
                        f"{NOBODY})): tracing to standard error instead"], done.stderr
        assert "Client: to " in done.stderr
