"""The guide's show-item-locks example, reproduced with real processes: three ports, three kinds of client.

- port 2, a local process locking directly in the table (JDLS unset): 0.0.0.0, its own pid;
- port 1000, a remote client on another host (a network namespace joined by a veth pair), JDLS naming
  the lock server's address: the client's own address, the pid of its lock server;
- port 4, a local process with JDLS set to the local service: 127.0.0.1, the pid of its lock server.

Each holds one record of ``ac/FBNK.ACCOUNT`` (keys 32549, 33537 and USD163170001, as in the guide)
and has published its lock information. show-item-locks must print the three rows with the right
addresses, ports, pids, file names and LOCK# values (the resource value of the key and ``W``), both
on the lock server (table and proc/info) and from the other host, where it has no table and must ask
the service over the protocol.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import netns
from dls_shm import resource_value
from dls_testkit import Service, running, wait_for
from dls_utils.source import this_host

SHOW_ITEM_LOCKS = str(Path(sys.executable).parent / "show-item-locks")
HEADING = ["IPADDR", "PORT", "PID", "FILENAME", "RECORD KEY", "LOCK#", "PORT/-PID"]

#: A client process: takes its lock (JDLS decides how), publishes what it knows, says so, waits for stdin.
CLIENT = textwrap.dedent("""
    import os, sys
    from dls_client import get_client
    client = get_client()
    held = client.lock(sys.argv[1], sys.argv[2])
    client.publish_info()
    print(type(client).__name__, client.connect().welcome.server_pid if hasattr(client, "connect") else os.getpid(),
          flush=True)
    sys.stdin.readline()
    held.release()
""")


def start(env: dict[str, str], cwd: Path, key: str, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    """A client in ``cwd`` locking ``key`` of ac/FBNK.ACCOUNT (a relative name, as in the guide)."""
    return subprocess.Popen([*(prefix or []), sys.executable, "-c", CLIENT, "ac/FBNK.ACCOUNT", key], env=env,
                            cwd=cwd, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def ready(proc: subprocess.Popen[str]) -> tuple[str, int]:
    """(the client's class, the pid that holds its lock in the table) once it holds its lock."""
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        raise AssertionError(f"client failed: {line} {proc.communicate()[1]}")
    return line[0], int(line[1])


def rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split("\t") == HEADING)
    return [line.split("\t") for line in lines[at + 1:] if line.strip()]


def test_the_guides_three_port_example(service: Service, tmp_path: Path) -> None:
    data = tmp_path / "ac" / "FBNK.ACCOUNT"
    data.parent.mkdir()
    data.touch()
    base = {k: v for k, v in service.env.items() if k != "JDLS"}
    with netns.link() as link:
        # The other host reads the snapshot below: the listener must name it an operator's (--admin-allow).
        assert service.jdls("-kD").returncode == 0
        restarted = service.jdls("-ibD", "--port", str(service.port), "--admin-allow", "127.0.0.1",
                                 "--admin-allow", link.ns_ip)
        assert restarted.returncode == 0, restarted.stderr
        local = start({**base, "JBCPORTNO": "2"}, tmp_path, "32549")
        through = start({**base, "JBCPORTNO": "4", "JDLS": f"SERVER=127.0.0.1,{service.port}"}, tmp_path,
                        "USD163170001")
        remote = start({**base, "JBCPORTNO": "1000", "JDLS": f"SERVER={link.host_ip},{service.port}"}, tmp_path,
                       "33537", link.command())
        with running(local, through, remote):
            kinds = [ready(p) for p in (local, remote, through)]
            assert [k for k, _ in kinds] == ["LocalClient", "Client", "Client"], kinds
            (_, local_pid), (_, remote_server), (_, through_server) = kinds
            assert local_pid == local.pid and remote_server in service.server_pids()
            expected = [
                ["0.0.0.0", "2", str(local.pid), "ac/FBNK.ACCOUNT", "32549",
                 f"0x{resource_value(data.stat().st_ino, -1, b'32549'):08x},W", "---"],
                [link.ns_ip, "1000", str(remote_server), "ac/FBNK.ACCOUNT", "33537",
                 f"0x{resource_value(data.stat().st_ino, -1, b'33537'):08x},W", "---"],
                ["127.0.0.1", "4", str(through_server), "ac/FBNK.ACCOUNT", "USD163170001",
                 f"0x{resource_value(data.stat().st_ino, -1, b'USD163170001'):08x},W", "---"],
            ]
            # The lock servers write the remote clients' documents in their own time.
            info = service.root / "proc" / "info"
            # Named by port and client address (two application servers may use one port number).
            names = ("2@0.0.0.0", "4@127.0.0.1", f"1000@{link.ns_ip}")
            wait_for(lambda: all((info / name).exists() for name in names), 5, "the three documents")

            on_server = subprocess.run([SHOW_ITEM_LOCKS], env=base, capture_output=True, text=True, timeout=30)
            assert on_server.returncode == 0, on_server.stderr
            assert "proc/info" in on_server.stdout.splitlines()[0], on_server.stdout
            assert on_server.stdout.splitlines()[0].endswith(f"on host {this_host()}"), on_server.stdout
            assert rows(on_server.stdout) == expected, on_server.stdout

            # From the other host: no table there (an empty instance), JDLS names the service.
            elsewhere = {**base, "JBCRELEASEDIR": str(tmp_path / "client-host"),
                         "JDLS": f"SERVER={link.host_ip},{service.port}"}
            remote_view = subprocess.run(link.command(SHOW_ITEM_LOCKS), env=elsewhere, capture_output=True,
                                         text=True, timeout=30)
            assert remote_view.returncode == 0, remote_view.stderr
            # The lock server's host by the address the service was reached at, its name in brackets (as jDLS).
            assert f"on host {link.host_ip} (" in remote_view.stdout.splitlines()[0], remote_view.stdout
            assert rows(remote_view.stdout) == expected, remote_view.stdout
            for proc in (local, through, remote):
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
            for proc in (local, through, remote):
                assert proc.wait(10) == 0, proc.communicate()[1]
