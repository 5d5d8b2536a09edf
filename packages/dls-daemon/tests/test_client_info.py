"""A remote client's proc/info document as its lock server keeps it: named by the address the client came from
and its port, never by anything the client says; the lock server's figures appended; removed only while it is
still the lock server's own."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from dls_daemon import client_info
from dls_proto import Hello
from dls_shm import Instance, PidRecord


def hello(port: int, host: str) -> Hello:
    return Hello(1, 1, 1, 0, port, 4242, 7, host, "test")


def test_the_file_is_named_by_address_and_port_whatever_host_the_client_claims(tmp_path: Path) -> None:
    instance = Instance.from_environment(tmp_path / "release")
    hostile = hello(1000, "../../../etc/passwd\n@x")
    written = client_info.write(instance, hostile, "::ffff:10.44.1.55", PidRecord(777, 5.5),
                                b'{"files": [], "ip": "6.6.6.6"}', {"locks_granted": 3})
    assert written.path == instance.info_dir / "1000@10.44.1.55"
    assert [p.name for p in instance.info_dir.iterdir()] == ["1000@10.44.1.55"]
    assert stat.S_IMODE(written.path.stat().st_mode) == 0o640
    document = json.loads(written.path.read_text())
    # the address is the lock server's word, not the client's; the host name is only shown
    assert (document["ip"], document["port"], document["host"]) == ("10.44.1.55", 1000, "../../../etc/passwd\n@x")
    assert (document["server_pid"], document["server_started"]) == (777, 5.5)  # the writer, as the monitor judges it
    assert document["stats"] == {"locks_granted": 3}


def test_each_lock_server_removes_only_its_own_document(tmp_path: Path) -> None:
    instance = Instance.from_environment(tmp_path / "release")
    first = client_info.write(instance, hello(1000, "app1"), "10.44.1.55", PidRecord(100, 1.0), b"{}")
    other_host = client_info.write(instance, hello(1000, "app2"), "10.44.1.57", PidRecord(200, 1.0), b"{}")
    # the client, reconnected:
    again = client_info.write(instance, hello(1000, "app1"), "10.44.1.55", PidRecord(300, 1.0), b"{}")
    client_info.remove(first)  # the old lock server ends after the new one wrote: the new document stays
    assert again.path.exists() and other_host.path.exists()
    client_info.remove(again)
    assert not again.path.exists() and other_host.path.exists()
