"""Local permissions end to end (issue 11): the table and the instance's files belong to the service's
group, a local user outside it gets a clear refusal, untrusted instance paths are refused by name, and a
pid file naming another process never gets it signalled. Real jdls, real SysV IPC, real users (``nobody``
through forked children, see dls_testkit.users)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sysv_ipc
from dls_client import LocalClient, ServiceUnavailable
from dls_shm import Geometry, LockTable, PidRecord, TableError
from dls_testkit import NOBODY, SERVICE_GID, Service, as_user, data_file, make_service, reachable_dir
from dls_utils import dump, ipcrm, list_open_files, show_item_locks


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_dir() as made:
        yield made


@pytest.fixture
def grouped(base: Path) -> Iterator[Service]:
    """A service in SERVICE_GID, started under umask 0 (what it makes must not depend on the umask)."""
    with make_service(base).checked() as svc:
        old = os.umask(0)
        try:
            svc.start("--group", str(SERVICE_GID))
        finally:
            os.umask(old)
        yield svc


def test_the_table_is_the_groups_and_a_stranger_is_refused_clearly(grouped: Service, base: Path) -> None:
    memory, semaphore = sysv_ipc.SharedMemory(grouped.key), sysv_ipc.Semaphore(grouped.key)
    memory.detach()
    for made in (memory, semaphore):
        assert (made.mode & 0o777, made.gid) == (0o660, SERVICE_GID)
    os.environ["JBCRELEASEDIR"] = str(grouped.root)  # the children's instance (the fixture restores it)

    def stranger() -> int:
        for attach in (lambda: sysv_ipc.SharedMemory(grouped.key), lambda: sysv_ipc.Semaphore(grouped.key)):
            try:
                attach()
                return 1
            except sysv_ipc.PermissionsError:
                pass
        try:
            LockTable.attach(grouped.key)
            return 1
        except TableError as exc:
            print(exc, flush=True)
        try:
            LocalClient()
            return 1
        except ServiceUnavailable as exc:
            print(exc, flush=True)
        return show_item_locks.main(["--local"])

    code, output = as_user(stranger)
    assert code != 0 and code != 99, output
    assert "Traceback" not in output
    for tool in (dump.main, list_open_files.main, ipcrm.main):
        code, said = as_user(tool)
        assert code not in (0, 99) and "Traceback" not in said, said
    assert f"lock table 0x{grouped.key:08x}: permission denied" in output
    assert "show-item-locks" in output and "permission denied" in output.splitlines()[-1]

    data = data_file(base, "member")
    os.chown(data, NOBODY, NOBODY)

    def member() -> int:  # locks through the table, and what it publishes in proc/info is the group's, 0640
        with LocalClient() as client:
            held = client.lock(data, b"K1")  # its first lock in the file publishes
            st = (grouped.instance.info_dir / f"{client.port}@0.0.0.0").stat()
            held.release()
        return 0 if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, SERVICE_GID, 0o640) else 1

    code, output = as_user(member, groups=[SERVICE_GID])
    assert code == 0, output


def test_instance_files_have_fixed_modes_whatever_the_umask(grouped: Service) -> None:
    instance = grouped.instance
    expected = {
        instance.root: 0o750, instance.run_dir: 0o750, instance.servers_dir: 0o750, instance.log_dir: 0o750,
        instance.info_dir: 0o3770, instance.error_trace.parent: 0o3770,
        instance.log_file: 0o640, instance.error_trace: 0o660, instance.pid_file("monitor"): 0o640,
        instance.pid_file("listener"): 0o640,
    }
    found = {path: stat.S_IMODE(path.stat().st_mode) for path in expected}
    assert found == expected
    assert instance.root.stat().st_gid == SERVICE_GID


@pytest.mark.parametrize("problem", ["nobody's instance", "symlinked log", "world-writable log directory",
                                     "group-writable pid file", "hard-linked error trace"])
def test_an_untrusted_instance_path_is_refused_by_name(base: Path, problem: str) -> None:
    svc = make_service(base)
    instance = svc.instance
    victim = base / "victim"
    victim.write_text("precious\n")
    if problem == "nobody's instance":
        instance.root.mkdir(mode=0o750)
        os.chown(instance.root, NOBODY, NOBODY)
        path, why = instance.root, "owned by another user nobody (uid 65534)"
    else:
        instance.make_dirs()
        if problem == "symlinked log":
            instance.log_file.symlink_to(victim)
            path, why = instance.log_file, "is a symbolic link"
        elif problem == "world-writable log directory":
            instance.log_dir.chmod(0o777)
            path, why = instance.log_dir, "writable by others (mode 0777)"
        elif problem == "hard-linked error trace":
            os.link(victim, instance.error_trace)
            path, why = instance.error_trace, "has 2 hard links"
        else:
            pid_file = instance.pid_file("monitor")
            pid_file.write_text("1\n0\ninit\n")
            pid_file.chmod(0o660)
            path, why = pid_file, "writable by group (mode 0660)"
    result = svc.jdls("-ibs1000,10", "--port", str(svc.port))
    if problem == "nobody's instance":  # put right, so that the teardown's jdls -k and -K may look
        os.chown(instance.root, 0, 0)
    elif problem in ("group-writable pid file", "hard-linked error trace"):
        path.unlink()
    else:
        path.unlink() if path.is_symlink() else path.chmod(0o750)
    svc.stop_and_check()
    assert result.returncode != 0
    assert f"jdls: {path}: {why}: refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert victim.read_text() == "precious\n"


def test_a_pid_file_naming_another_process_gets_nothing_signalled(grouped: Service) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        planted = [
            (grouped.instance.server_pid_file(sleeper.pid), PidRecord(sleeper.pid, started, "jdls")),
            (grouped.instance.servers_dir / "1.pid", PidRecord(sleeper.pid, started - 100.0, "sleep")),
        ]
        for path, record in planted:
            path.write_text(record.text())
            path.chmod(0o640)
        result = grouped.jdls("-k")
        assert result.returncode == 0, result.stderr
        assert f"{planted[0][0]}: pid {sleeper.pid} runs 'sleep', not 'jdls': not signalled" in result.stdout
        assert f"{planted[1][0]}: pid {sleeper.pid} is now a process started at" in result.stdout
        assert sleeper.poll() is None, "the unrelated process was signalled"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_error_trace_a_member_made_is_appended_to(base: Path) -> None:
    """tmp/ is the group's: a client may make the error trace before the service runs; the service appends."""
    svc = make_service(base)
    svc.instance.make_dirs(SERVICE_GID)
    svc.instance.error_trace.write_text("a client's line\n")
    os.chown(svc.instance.error_trace, NOBODY, SERVICE_GID)
    svc.instance.error_trace.chmod(0o660)
    with svc.checked():
        svc.start()
    assert svc.instance.error_trace.read_text().startswith("a client's line\n")


@pytest.mark.parametrize("disguised", [False, True], ids=["plain", "owner-set-to-root"])
def test_a_table_a_stranger_made_first_is_refused(base: Path, disguised: bool) -> None:
    """The table's key is known in advance: a stranger who makes it first (and, as its creator, could open it
    to himself again at any time) must not have it adopted, even after giving it to root (IPC_SET)."""
    with make_service(base).checked() as svc:
        key = svc.key

        def squat() -> int:
            table, created = LockTable.create(key, Geometry(11, 5), mode=0o666)
            assert created
            if disguised:
                for made in (sysv_ipc.SharedMemory(key), sysv_ipc.Semaphore(key)):
                    made.uid = 0
                    made.gid = 0
                    made.mode = 0o660
            table.close()
            return 0

        code, said = as_user(squat)
        assert code == 0, said
        result = svc.jdls("-ibA")
        assert result.returncode != 0, "the monitor adopted a stranger's table"
        assert f"was made by uid {NOBODY}" in result.stderr and "refused" in result.stderr, result.stderr
        result = svc.jdls("-ibD", "--port", str(svc.port))  # a listener must not use it either
        assert result.returncode != 0, "the listener used a stranger's table"
        assert f"was made by uid {NOBODY}" in result.stderr, result.stderr
        os.environ["JBCRELEASEDIR"] = str(svc.root)
        with pytest.raises(ServiceUnavailable, match=f"was made by uid {NOBODY}"):
            LocalClient(key)


def test_a_role_pid_file_rewritten_in_place_stops_the_process_that_holds_it(grouped: Service) -> None:
    """The monitor holds its pid file locked: when the file's content names another process (rewritten in
    place), the lock has the last word: jdls -kA stops the monitor, and the process named is left alone."""
    monitor = grouped.pid("monitor")
    assert monitor is not None
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lie = PidRecord(sleeper.pid, psutil.Process(sleeper.pid).create_time(), "sleep").text()
        path = grouped.instance.pid_file("monitor")
        with open(path, "r+", encoding="ascii") as f:  # the same file (inode), so the monitor's lock stays
            f.write(lie)
            f.truncate()
        result = grouped.jdls("-kA")
        assert result.returncode == 0, result.stderr
        assert f"stopped lock monitor (pid {monitor})" in result.stdout, result.stdout
        assert sleeper.poll() is None, "the process the file named was signalled"
        assert not psutil.pid_exists(monitor) or psutil.Process(monitor).status() == psutil.STATUS_ZOMBIE
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_local_stranger_on_loopback_is_not_shown_the_lock_snapshot(grouped: Service) -> None:
    """Loopback is an operator's address by default, but every local user connects from it: the lock server
    looks up the user of the socket at the other end, and a user who may not read the table is refused."""
    server = f"127.0.0.1,{grouped.port}"
    "localhost".encode("idna")  # the codec getaddrinfo needs, loaded now: nobody may not read the interpreter's

    def stranger() -> int:
        return show_item_locks.main(["--server", server])

    code, output = as_user(stranger)
    assert code != 0 and code != 99, output
    # The rule that refused it, not the address (audit i12b F7d: "not permitted from this address").
    assert ("not permitted: a local user must be an operator: the service's user, root, or a member of the "
            "service's group") in output, output
    grouped.wait_for_log(r"asked for the lock snapshot, refused: a local user must be an operator")
    assert show_item_locks.main(["--server", server]) == 0  # root (the service's user here) is shown it


@pytest.mark.parametrize("action", ["-k", "-K"])
def test_a_user_who_cannot_enter_the_instance_is_told_in_one_line(grouped: Service, action: str) -> None:
    """``jdls -k`` / ``-K`` by a user outside the service's group: one line naming the directory and the
    permission problem, exit 1 (audit i12b F5: a PermissionError traceback); the service runs on."""
    from dls_daemon import cli

    os.environ["JBCRELEASEDIR"] = str(grouped.root)  # the child's instance (the fixture restores it)
    code, output = as_user(lambda: cli.main([action]))
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith(f"jdls: {grouped.root}/") and ": permission denied: this user may not use the " \
        f"instance directory {grouped.root} (run jdls as the service's user, or as a member of its group)" \
        in lines[0], lines[0]
    assert grouped.pid("listener") is not None
