"""show-item-locks against a real lock table of a private instance, with real proc/info documents."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dls_shm import LOCAL_IP, Doorbell, Grant, Owner, Queued, info, modes, pack_ip, resource_value
from dls_utils.show_item_locks import main
from dls_utils.source import this_host

INODE = 1483651
DEVICE = -1
ME = os.getpid()  # the table's owner pid must live, or a blocked request would reclaim the lock

# The guide's three ports: a direct local process, a remote client through its lock server,
# a local process through the listener.
DIRECT = Owner(ME, 1, 2, 15071, LOCAL_IP)
REMOTE = Owner(ME, 2, 1000, 15031, pack_ip("10.44.1.55"))
LISTENER = Owner(ME, 3, 4, 15112, pack_ip("127.0.0.1"))
PATH = "ac/FBNK.ACCOUNT"


def take(local: Any, owner: Owner, key: str, mode: int = modes.EX, inode: int = INODE) -> Grant:
    result = local.table.lock(owner, inode, DEVICE, key.encode(), mode)
    assert isinstance(result, Grant), result
    return result


def lock_no(key: str, letter: str = "W", inode: int = INODE) -> str:
    return f"0x{resource_value(inode, DEVICE, key.encode()):08x},{letter}"


#: The address of each port's client, as its document gives it.
ADDRESSES = {2: "0.0.0.0", 1000: "10.44.1.55", 4: "127.0.0.1"}


def describe(local: Any, *ports: int) -> None:
    """Each port's information document, as a client (or its lock server) writes it."""
    for port in ports:
        info.write(local.instance, port, {"pid": port * 10, "files": [{"path": PATH, "inode": INODE}], "locks": []},
                   ip=ADDRESSES[port])


@pytest.fixture
def guide(local: Any) -> Any:
    take(local, DIRECT, "32549")
    take(local, REMOTE, "33537")
    take(local, LISTENER, "USD163170001")
    describe(local, 2, 1000, 4)
    return local


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_the_guides_three_ports(guide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys)
    assert code == 0, err
    assert lines[0] == (f"show-item-locks information retrieved from the lock table and proc/info of "
                        f"JBCRELEASEDIR={guide.instance.root} on host {this_host()}")
    assert lines[1:] == [
        "",
        "IPADDR\tPORT\tPID\tFILENAME\tRECORD KEY\tLOCK#\tPORT/-PID",
        f"0.0.0.0\t2\t{ME}\t{PATH}\t32549\t{lock_no('32549')}\t---",
        f"10.44.1.55\t1000\t{ME}\t{PATH}\t33537\t{lock_no('33537')}\t---",
        f"127.0.0.1\t4\t{ME}\t{PATH}\tUSD163170001\t{lock_no('USD163170001')}\t---",
    ]


def test_json(guide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys, "--json")
    assert code == 0, err
    rows = json.loads("\n".join(lines))
    assert [(r["ipaddr"], r["port"], r["pid"], r["filename"], r["key"], r["lock"], r["waiters"]) for r in rows] == [
        ("0.0.0.0", 2, ME, PATH, "32549", lock_no("32549"), []),
        ("10.44.1.55", 1000, ME, PATH, "33537", lock_no("33537"), []),
        ("127.0.0.1", 4, ME, PATH, "USD163170001", lock_no("USD163170001"), []),
    ]
    assert [r["client_pid"] for r in rows] == [15071, 15031, 15112]
    assert {(r["mode"], r["state"], r["inode"], r["device"]) for r in rows} == {("EX", "granted", INODE, DEVICE)}


def test_a_waiter_shows_in_the_holders_row(guide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    bells = [Doorbell(), Doorbell()]
    try:
        for thread, port, bell in ((7, 7, bells[0]), (8, 8, bells[1])):
            waiter = Owner(ME, thread, port, 7000 + port, pack_ip("10.44.1.60"))
            queued = guide.table.lock(waiter, INODE, DEVICE, b"33537", modes.EX, wait_token=bell.token)
            assert isinstance(queued, Queued), queued
        code, lines, err = run(capsys, "--key", "33537")
        assert code == 0, err
        assert lines[3:] == [f"10.44.1.55\t1000\t{ME}\t{PATH}\t33537\t{lock_no('33537')}\t7,8"]
        # A waiting port finds the lock it waits for.
        code, lines, err = run(capsys, "--port", "8")
        assert lines[3:] == [f"10.44.1.55\t1000\t{ME}\t{PATH}\t33537\t{lock_no('33537')}\t7,8"]
    finally:
        for bell in bells:
            bell.close()


def test_read_locks_and_filters(guide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    take(guide, Owner(ME, 9, 9, 909, LOCAL_IP), "CUST1", modes.PR, inode=77)
    info.write(guide.instance, 9, {"files": [{"path": "cu/FBNK.CUSTOMER", "inode": 77}], "locks": []})
    code, lines, _ = run(capsys, "--file", "CUSTOMER")
    assert code == 0
    assert lines[3:] == [f"0.0.0.0\t9\t{ME}\tcu/FBNK.CUSTOMER\tCUST1\t{lock_no('CUST1', 'R', 77)}\t---"]
    _, lines, _ = run(capsys, "--file", "ACCOUNT")
    assert [line.split("\t")[1] for line in lines[3:]] == ["2", "1000", "4"]
    _, lines, _ = run(capsys, "--port", "1000")
    assert [line.split("\t")[4] for line in lines[3:]] == ["33537"]
    _, lines, _ = run(capsys, "--key", "3354")
    assert lines[2:] == ["(no record locks)"]


def test_without_information_the_inode_is_shown(guide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    os.unlink(info.info_path(guide.instance, 1000, "10.44.1.55"))
    _, lines, _ = run(capsys, "--port", "1000")
    assert lines[3].split("\t")[3] == "inode 01483651"


def test_one_port_on_two_hosts_keeps_both_documents(guide: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Port 1000 on a second application server: its document is kept beside the first's, each lock is named
    from its own client's, and each writer removes only its own."""
    other = Owner(ME, 5, 1000, 16000, pack_ip("10.44.1.57"))
    take(guide, other, "OTHER", inode=78)
    second = info.write(guide.instance, 1000, {"pid": 16000, "files": [{"path": "cu/FBNK.CUSTOMER", "inode": 78}],
                                               "locks": []}, ip="10.44.1.57")
    assert sorted(p.name for p in guide.instance.info_dir.iterdir()) == [
        "1000@10.44.1.55", "1000@10.44.1.57", "2@0.0.0.0", "4@127.0.0.1"]
    _, lines, _ = run(capsys, "--port", "1000")
    assert [(line.split("\t")[0], line.split("\t")[3]) for line in lines[3:]] == [
        ("10.44.1.55", PATH), ("10.44.1.57", "cu/FBNK.CUSTOMER")]
    # A third writer replaces the second host's document; the second's removal leaves the third's in place.
    third = info.write(guide.instance, 1000, {"pid": 17000, "files": [], "locks": []}, ip="10.44.1.57")
    info.remove(second)
    assert third.path.exists()
    info.remove(third)
    assert not third.path.exists() and info.info_path(guide.instance, 1000, "10.44.1.55").exists()


def test_a_document_of_the_earlier_naming_is_still_read(local: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """proc/info/<port>, as dls before 0.7.0 named a document, still names a lock's file."""
    take(local, REMOTE, "33537")
    local.instance.info_dir.mkdir(parents=True, exist_ok=True)
    (local.instance.info_dir / "1000").write_text(json.dumps(
        {"format": 1, "port": 1000, "pid": 15031, "ip": "10.44.1.55", "files": [{"path": PATH, "inode": INODE}]}))
    _, lines, _ = run(capsys)
    assert lines[3].split("\t")[:4] == ["10.44.1.55", "1000", str(ME), PATH]


def test_no_locks(local: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys)
    assert code == 0
    assert lines[0].startswith("show-item-locks information retrieved from the lock table")
    assert lines[1:] == ["", "(no record locks)"]
    code, lines, _ = run(capsys, "--json")
    assert (code, json.loads("\n".join(lines))) == (0, [])


def test_no_table(clean_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys)
    assert code == 1
    assert lines == []
    assert err == (f"show-item-locks: no lock table and no proc/info for JBCRELEASEDIR={clean_env.root} "
                   "(is jdls running?)\n")


def test_jdls_server_is_used_and_a_failed_connection_named(
    local: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port with certainly nobody listening: bound, never listened on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("JDLS", f"WAIT,SERVER=127.0.0.1,{port}")
        code, lines, err = run(capsys)
        assert code == 1 and lines == []
        assert err.startswith(f"show-item-locks: cannot connect to the lock service at 127.0.0.1, port {port}: ")
        code, lines, err = run(capsys, "--server", f"127.0.0.1,{port}")
        assert code == 1 and f"127.0.0.1, port {port}" in err
    # --local reads the table whatever JDLS says.
    code, lines, err = run(capsys, "--local")
    assert code == 0, err
    assert lines[-1] == "(no record locks)"


def test_bad_jdls_and_usage(clean_env: Any, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JDLS", "SERVER=")
    code, _, err = run(capsys)
    assert code == 78 and "JDLS SERVER: expected SERVER=host" in err  # the message and status every client gives
    code, _, err = run(capsys, "--server", "h,x")
    assert code == 2 and "port 'x'" in err
    code, _, err = run(capsys, "--server", "h", "--local")
    assert code == 2
    code, _, err = run(capsys, "--port", "-3")
    assert code == 2


@pytest.mark.parametrize("jdls", ["SERVER=h,notaport", "TIMEOUT=abc", "SERVER2=h", "SERVER=h,,WAIT", "NOSUCH",
                                  "SERVER=127.0.0.1,TIMEOUT=abc"])
@pytest.mark.parametrize("program", ["show-item-locks", "list-open-files"])
def test_a_refused_jdls_is_78_not_another_source(clean_env: Any, jdls: str, program: str) -> None:
    """As real programs: the JDLS error, exit 78 as every client; never the local table, nor port 50002."""
    env = {**os.environ, "JDLS": jdls}
    done = subprocess.run([str(Path(sys.executable).parent / program)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (78, ""), done.stderr
    assert done.stderr.startswith(f"{program}: JDLS") and done.stderr.count("\n") == 1, done.stderr
    with_server = subprocess.run([str(Path(sys.executable).parent / program), "--server", "127.0.0.1,1"], env=env,
                                 capture_output=True, text=True, timeout=60)
    assert with_server.returncode == 78 and with_server.stderr.startswith(f"{program}: JDLS"), with_server.stderr
