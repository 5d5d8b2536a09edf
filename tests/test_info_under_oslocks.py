"""The operator's displays of a service without a lock table (``jdls -ibD``), with real processes (issue 12).

The listener alone serves the instance, so record locks are OS file locks in
its lock directory. A remote client (``dls-lock``, through the listener, which
publishes nothing by itself: the library publishes a file's name on its first
lock there) and a local process (a LocalClient, locking directly) hold a
record each of one file, and a third client waits. show-item-locks and
list-open-files, on the service's host and over the protocol, and
``jdls -dvL``, must show them: who holds what, in which file, who waits. The
lock server's figures are appended to its client's document. Then one port
number used from two hosts (a network namespace): both documents kept, both
shown, and each removed by its own writer only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from dls_shm import resource_value
from dls_testkit import Service, make_service, running, wait_for

BIN = Path(sys.executable).parent
HEADING = ["IPADDR", "PORT", "PID", "FILENAME", "RECORD KEY", "LOCK#", "PORT/-PID"]

#: A local process (JDLS unset): locks the key directly, says its class and pid, holds until stdin closes.
LOCAL = textwrap.dedent("""
    import os, sys
    from dls_client import get_client
    client = get_client()
    held = client.lock(sys.argv[1], sys.argv[2])
    print(type(client).__name__, client.mechanism, os.getpid(), flush=True)
    sys.stdin.readline()
    held.release()
""")


@pytest.fixture
def os_service(tmp_path: Path) -> Iterator[Service]:
    """``jdls -ibD`` with its lock directories under tmp_path."""
    with make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        svc.start("--lock-dir", str(svc.lock_dir), "--binary-lock-dir", str(svc.binary_lock_dir))
        yield svc


def tool(svc: Service, name: str, *args: str, env: dict[str, str] | None = None,
         prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), str(BIN / name), *args], env=env or svc.env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def rows(output: str, heading: list[str] = HEADING) -> list[list[str]]:
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split("\t") == heading)
    found = []
    for line in lines[at + 1:]:
        if not line.strip():
            break  # the summary follows (jdls -d)
        found.append(line.split("\t"))
    return found


def dls_lock(svc: Service, port: str, *args: str) -> subprocess.Popen[bytes]:
    """``dls-lock ARGS`` as a client of the service with JBCPORTNO ``port``."""
    return subprocess.Popen([str(BIN / "dls-lock"), *args], env={**svc.env, "JBCPORTNO": port},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def lock_no(data: Path, key: str) -> str:
    return f"0x{resource_value(data.stat().st_ino, -1, key.encode()):08x},W"


def test_show_item_locks_list_open_files_and_dvL_see_os_locks(os_service: Service, tmp_path: Path) -> None:
    svc = os_service
    data = tmp_path / "FBNK.ACCOUNT"
    data.touch()
    local_env = {k: v for k, v in svc.env.items() if k != "JDLS"}
    holder = dls_lock(svc, "1000", str(data), "33537", "sleep", "60")
    local = subprocess.Popen([sys.executable, "-c", LOCAL, str(data), "32549"], env={**local_env, "JBCPORTNO": "2"},
                             text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info = svc.root / "proc" / "info"
    with running(holder, local):
        assert local.stdout is not None
        kind, mechanism, local_pid = local.stdout.readline().split()
        assert (kind, mechanism) == ("LocalClient", "oslocks"), local.communicate()[1]
        # dls-lock's document, with the file it locked in, is there without its calling publish_info()
        wait_for(lambda: (info / "1000@127.0.0.1").exists() and json.loads((info / "1000@127.0.0.1").read_text())
                 ["files"], 10, "the holder's document")
        waiter = dls_lock(svc, "1001", str(data), "33537", "true")
        _with_waiter(svc, data, info, holder, local, waiter, local_pid)
    wait_for(lambda: not any(info.iterdir()), 10, "the documents to be removed")
    nothing = tool(svc, "show-item-locks", env=local_env)
    assert nothing.returncode == 0 and "(no record locks)" in nothing.stdout, nothing.stdout + nothing.stderr


def _with_waiter(svc: Service, data: Path, info: Path, holder: subprocess.Popen[bytes], local: subprocess.Popen[str],
                 waiter: subprocess.Popen[bytes], local_pid: str) -> None:
    local_env = {k: v for k, v in svc.env.items() if k != "JDLS"}
    with running(waiter):
        waiter_file = info / "1001@127.0.0.1"
        wait_for(lambda: waiter_file.exists() and any(lk["state"] == "waiting" for lk in json.loads(
            waiter_file.read_text())["locks"]), 10, "the waiter's document")
        holder_doc = json.loads((info / "1000@127.0.0.1").read_text())
        server = holder_doc["server_pid"]
        assert server in svc.server_pids()
        # The lock server's own figures, appended to its client's document.
        stats = holder_doc["stats"]
        assert stats["locks_granted"] == 1 and stats["locks_held"] == 1 and stats["locks_refused"] == 0
        assert set(stats) >= {"connected", "lock_waits", "lock_retries", "lock_timeouts", "locks_released"}

        expected = [
            ["0.0.0.0", "2", local_pid, str(data), "32549", lock_no(data, "32549"), "---"],
            ["127.0.0.1", "1000", str(server), str(data), "33537", lock_no(data, "33537"), "1001"],
        ]
        on_host = tool(svc, "show-item-locks", env=local_env)
        assert on_host.returncode == 0, on_host.stderr
        assert "no lock table: the record locks are the OS file locks held in " + str(svc.lock_dir) in on_host.stdout
        assert rows(on_host.stdout) == expected, on_host.stdout
        over_wire = tool(svc, "show-item-locks", "--server", f"127.0.0.1,{svc.port}", env=local_env)
        assert over_wire.returncode == 0, over_wire.stderr
        assert rows(over_wire.stdout) == expected, over_wire.stdout
        assert over_wire.stdout.splitlines()[0].split(" on host ")[1].startswith("127.0.0.1 (")

        waiter_pid = json.loads((info / "1001@127.0.0.1").read_text())["pid"]
        # list-open-files' PID is the client's own (dls-lock's), not its lock server's
        files = [["0.0.0.0", "2", local_pid, str(data)], ["127.0.0.1", "1000", str(holder_doc["pid"]), str(data)],
                 ["127.0.0.1", "1001", str(waiter_pid), str(data)]]
        assert holder_doc["pid"] == holder.pid
        for args in ((), ("--server", f"127.0.0.1,{svc.port}")):
            listed = tool(svc, "list-open-files", *args, env=local_env)
            assert listed.returncode == 0, listed.stderr
            assert rows(listed.stdout, ["IPADDR", "PORT", "PID", "FILENAME"]) == files, listed.stdout

        # The lock server's figures, as list-open-files --stats shows them (none for the local process).
        stats_view = tool(svc, "list-open-files", "--stats", env=local_env)
        assert stats_view.returncode == 0, stats_view.stderr
        by_port = {r[1]: r for r in rows(stats_view.stdout, ["IPADDR", "PORT", "PID", "SERVER-PID", "GRANTED",
                                                              "WAITS", "RETRIES", "REFUSED", "TIMEOUTS", "RELEASED",
                                                              "HELD", "WAITING"])}
        assert by_port["1000"][3:5] == [str(server), "1"] and by_port["1000"][10] == "1", stats_view.stdout
        assert by_port["1001"][5] == "1" and by_port["1001"][11] == "1", stats_view.stdout  # waits, waiting now
        assert by_port["2"][3:] == ["-"] * 9, stats_view.stdout

        shown = svc.jdls("-dvL")
        assert shown.returncode == 0, shown.stderr
        assert "Lock listener at pid:" in shown.stdout and " - Active" in shown.stdout
        assert f"Lock directory:         {svc.lock_dir}" in shown.stdout
        locks = rows(shown.stdout, ["value", "pid", "type", "port", "i-node", "dev", "ipaddr", "key"])
        assert sorted(locks) == sorted([
            [lock_no(data, "32549")[:-2], local_pid, "WRITE", "2", f"{data.stat().st_ino:08d}", "-1", "0.0.0.0",
             "32549"],
            [lock_no(data, "33537")[:-2], str(server), "WRITE", "1000", f"{data.stat().st_ino:08d}", "-1",
             "127.0.0.1", "33537"],
        ]), shown.stdout
        assert "2 locks currently held" in shown.stdout and "1 requests waiting" in shown.stdout
        assert local.stdin is not None
        local.stdin.write("\n")
        local.stdin.flush()
        assert local.wait(10) == 0
        holder.kill()
        assert waiter.wait(20) == 0


def test_dvL_without_table_or_listener_still_says_so(tmp_path: Path) -> None:
    with make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        shown = svc.jdls("-dvL")
        assert shown.returncode == 1
        assert "no lock listener serves it" in shown.stderr and "jdls -ibD" in shown.stderr


HOLD = textwrap.dedent("""
    import sys
    from dls_client import get_client
    client = get_client()
    held = client.lock(sys.argv[1], sys.argv[2])
    print("held", flush=True)
    sys.stdin.readline()
""")


def test_one_port_from_two_hosts_keeps_two_documents(tmp_path: Path) -> None:
    """Port 1000 on this host (through loopback) and on another (a network namespace): two documents, two
    named rows; the first client to go takes only its own document away."""
    data = tmp_path / "FBNK.ACCOUNT"
    data.touch()
    with netns.link() as link, make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        svc.start("--lock-dir", str(svc.lock_dir), "--binary-lock-dir", str(svc.binary_lock_dir),
                  "--admin-allow", "127.0.0.1")
        here = subprocess.Popen([sys.executable, "-c", HOLD, str(data), "K-HERE"],
                                env={**svc.env, "JBCPORTNO": "1000"}, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        there = subprocess.Popen(link.command(sys.executable, "-c", HOLD, str(data), "K-THERE"),
                                 env={**svc.env, "JBCPORTNO": "1000", "JDLS": f"SERVER={link.host_ip},{svc.port}"},
                                 text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with running(here, there):
            for proc in (here, there):
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "held", proc.communicate()[1]
            info = svc.root / "proc" / "info"
            names = {"1000@127.0.0.1", f"1000@{link.ns_ip}"}
            wait_for(lambda: {p.name for p in info.iterdir()} == names, 10, "both documents")
            shown = tool(svc, "show-item-locks")
            assert shown.returncode == 0, shown.stderr
            assert sorted((r[0], r[1], r[3], r[4]) for r in rows(shown.stdout)) == sorted([
                ("127.0.0.1", "1000", str(data), "K-HERE"), (link.ns_ip, "1000", str(data), "K-THERE")])
            listed = tool(svc, "list-open-files")
            assert sorted(r[0] for r in rows(listed.stdout, ["IPADDR", "PORT", "PID", "FILENAME"])) == sorted(
                ["127.0.0.1", link.ns_ip])
            assert there.stdin is not None
            there.stdin.close()
            assert there.wait(10) == 0
            wait_for(lambda: {p.name for p in info.iterdir()} == {"1000@127.0.0.1"}, 10,
                     "only the other host's document to go")
            assert here.stdin is not None
            here.stdin.close()
            assert here.wait(10) == 0
            wait_for(lambda: not any(info.iterdir()), 10, "the last document to go")


def test_oslocks_clients_beside_a_table_are_shown_too(service: Service, tmp_path: Path) -> None:
    """A table serves the instance; a client with JDLS OSLOCKS has its record lock in the table like the
    others (one mechanism per record): show-item-locks shows both, on the host and over the protocol."""
    data = tmp_path / "FBNK.ACCOUNT"
    data.touch()
    env = {**service.env, "JDLS": service.jdls_value("OSLOCKS"), "JBCPORTNO": "1000"}
    oslock = subprocess.Popen([str(BIN / "dls-lock"), str(data), "33537", "sleep", "60"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    table = subprocess.Popen([str(BIN / "dls-lock"), str(data), "32549", "sleep", "60"],
                             env={**service.env, "JBCPORTNO": "4"}, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with running(oslock, table):
        info = service.root / "proc" / "info"
        wait_for(lambda: all((info / n).exists() and json.loads((info / n).read_text())["files"]
                             for n in ("1000@127.0.0.1", "4@127.0.0.1")), 10, "both documents")
        servers = {n: json.loads((info / n).read_text())["server_pid"] for n in ("1000@127.0.0.1", "4@127.0.0.1")}
        expected = [
            ["127.0.0.1", "4", str(servers["4@127.0.0.1"]), str(data), "32549", lock_no(data, "32549"), "---"],
            ["127.0.0.1", "1000", str(servers["1000@127.0.0.1"]), str(data), "33537", lock_no(data, "33537"), "---"],
        ]
        local_env = {k: v for k, v in service.env.items() if k != "JDLS"}
        for args in ((), ("--server", f"127.0.0.1,{service.port}")):
            shown = tool(service, "show-item-locks", *args, env=local_env)
            assert shown.returncode == 0, shown.stderr
            assert "no lock table" not in shown.stdout
            assert rows(shown.stdout) == expected, shown.stdout
