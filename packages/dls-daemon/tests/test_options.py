"""Every option of jdls beyond the basics: usage errors, -C, -K -o, -P, -T, -kA/-ibA, the limits, the
lock-file directories, syslog and the systemd unit.

Real processes throughout; every test that starts a service gets its own instance and port from the
``service`` fixture (conftest.py), whose teardown runs -k and -K and fails if anything is left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from dls_client import Client, Config, RequestFailed, Server
from dls_daemon.cli import main, unit_file
from dls_proto import (
    PROTOCOL_VERSIONS,
    Acquired,
    Connection,
    ConnectionClosed,
    Echo,
    Error,
    ErrorCode,
    Lock,
    Refused,
    RefuseReason,
    Welcome,
)
from dls_shm import TableFlag
from dls_testkit import free_port, gone, greet, receive, running_service, wait_for

EX = 5
#: What a Hello may be answered with.
HELLO_ANSWERS = Welcome | Error


def start(service, *args: str) -> None:
    result = service.jdls(*args)
    assert result.returncode == 0, result.stderr


def lock(sock: socket.socket, conn: Connection, rid: int, key: bytes, thread: int = 1) -> Acquired | Refused | Error:
    sock.sendall(conn.send(Lock(rid, EX, 0, 0, thread, 11, -1, key, "/data/FILE")))
    return receive(sock, conn, Acquired | Refused | Error)


def connect(service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=5)


# -- usage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-Cx", "-i"], "not allowed with"),
        (["-Cx", "-b"], "-b applies only to -i, not to -C"),
        (["-Cx", "-L"], "-L applies only to -d, not to -C"),
        (["-Cx", "-A"], "-A applies only to -i and -k, not to -C"),
        (["-C"], "expected one argument"),
        (["-K", "-v"], "-v applies only to -i and -d and -C, not to -K"),
        (["-k", "-o"], "-o applies only to -K, not to -k"),
        (["-io"], "-o applies only to -K"),
        (["-dvo"], "-o applies only to -K"),
        (["-d", "--port", "5000"], "--port applies only to -i and -C"),
        (["-k", "--host", "h"], "--host applies only to -C"),
        (["-i", "--host", "h"], "--host applies only to -C"),
        (["-ibD", "-s", "100,10"], "-s concerns the lock table and its monitor, which -D does not start"),
        (["-ibDT"], "-T concerns the lock table"),
        (["-ibD", "-t5"], "-t concerns the lock table"),
        (["-ibD", "--tidy-seconds", "1"], "--tidy-seconds concerns the lock table"),
        (["-ibA", "--port", "5000"], "--port concerns the lock listener, which -A does not start"),
        (["-ibA", "--max-clients", "3"], "--max-clients concerns the lock listener"),
        (["-ibA", "--binary-lock-dir", "/tmp/x"], "--binary-lock-dir concerns the lock listener"),
        (["-i", "--max-frame", "10"], "invalid frame size (bytes) '10': expected 1024 to 67108864"),
        (["-i", "--max-clients", "0"], "invalid count '0'"),
        (["-i", "--max-locks", "many"], "invalid count 'many'"),
        (["-i", "--dead-client", "0.5"], "invalid dead-client bound (seconds) '0.5'"),
        (["-i", "--handshake-timeout", "-1"], "invalid timeout (seconds) '-1'"),
        (["-i", "--handshake-timeout", "nan"], "invalid timeout (seconds) 'nan'"),
        (["-i", "--handshake-timeout", "inf"], "invalid timeout (seconds) 'inf': expected 0.001 to 86400"),
        (["-k", "--stop-timeout", "inf"], "invalid timeout (seconds) 'inf'"),
        (["-i", "--dead-client", "inf"], "invalid dead-client bound (seconds) 'inf'"),
        (["-ibt", "inf"], "invalid tidy period (minutes) 'inf'"),
        (["-ib", "--tidy-seconds", "86401"], "invalid tidy period (seconds) '86401': expected 1 to 86400"),
        (["-C", "x", "--host", ""], "--host: expected a host name or address"),
        (["-i", "--lock-dir", ""], "invalid directory ''"),
        (["-k", "--lock-dir", "/tmp/x"], "--lock-dir applies only to -i, not to -k"),
        (["-k", "--syslog"], "--syslog applies only to -i"),
        (["-k", "--group", "0"], "--group applies only to -i, not to -k"),
        (["-i", "--group", "no-such-group-of-dls"], "no group named 'no-such-group-of-dls'"),
        (["-d", "--stop-timeout", "1"], "--stop-timeout applies only to -i and -k"),
        (["--unit", "-v"], "-v applies only to -i and -d and -C, not to --unit"),
        (["--unit", "-K"], "not allowed with"),
        (["-kAD"], "-A and -D exclude each other"),
        (["-i", "--allow", "10.0.0.300"], "invalid network '10.0.0.300': expected an address or address/prefix"),
        (["-i", "--admin-allow", "host.example"], "invalid network 'host.example'"),
        (["-k", "--allow", "10.0.0.0/8"], "--allow applies only to -i, not to -k"),
        (["-ibA", "--admin-allow", "::1"], "--admin-allow concerns the lock listener"),
        (["-ibA", "--refuse-os-locks"], "--refuse-os-locks concerns the lock listener"),
        (["-i", "--max-per-address", "0"], "invalid count '0'"),
        (["-b"], "one of the arguments"),
        (["-i", "--value-block-size", "65"], "invalid value block size (bytes) '65': expected 1 to 64"),
        (["-i", "--value-block-size", "0"], "invalid value block size (bytes) '0'"),
        (["-k", "--value-block-size", "16"], "--value-block-size applies only to -i"),
        (["-ibD", "--value-block-size", "16"], "--value-block-size"),
    ],
)
def test_combinations_that_make_no_sense_exit_2(argv: list[str], says: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: jdls" in err
    assert says in err


def test_help_names_every_option_and_what_o_means(capsys) -> None:
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    for option in ("-i", "-k", "-K", "-d", "-C teststring", "-b", "-s r,g", "-t nn", "-P", "-T", "-A", "-D", "-o",
                   "-L", "-v", "--port", "--bind", "--foreground", "--lock-dir", "--binary-lock-dir", "--max-frame",
                   "--handshake-timeout", "--max-clients", "--max-locks", "--dead-client", "--syslog",
                   "--log-format", "--host"):
        assert f"  {option}" in out, option
    assert "-o (override, with -K only)" in out


def test_the_systemd_unit_is_shipped(capsys) -> None:
    text = unit_file()
    assert "ExecStart=jdls -i --foreground\n" in text
    assert "ExecStop=jdls -k\n" in text
    assert "Environment=JBCRELEASEDIR=/var/lib/dls\n" in text
    # not the command line's default, and the unit says why and what local processes need
    assert "not the command line's default /var/tmp/dls" in text
    assert "must run with JBCRELEASEDIR=/var/lib/dls too" in text
    assert "[Install]" in text
    assert main(["--unit"]) == 0
    assert capsys.readouterr().out == text
    import dls_daemon

    assert (Path(dls_daemon.__file__).parent / "data" / "dls-daemon.service").is_file()


# -- -C: the connection test ------------------------------------------------------------------------


def test_connection_test_echoes_through_a_lock_server(service) -> None:
    start(service, "-ib")
    result = service.jdls("-Chello world")  # JDLS unset: localhost on $JDLS_PORT
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Client: Using host 'localhost', service '{service.port}'"
    assert lines[1].startswith("Client: connected to lock server pid ")
    assert f"(protocol version {PROTOCOL_VERSIONS[1]}, shared memory lock table)" in lines[1]
    assert lines[2] == "Client: the lock server sees this client as 127.0.0.1"
    assert lines[3].startswith("Client: received 'hello world' in ") and lines[3].endswith(" ms (round trip)")
    # The JDLS variable, as a client would use it, names the server when --host/--port do not.
    service.env["JDLS"] = f"SERVER=127.0.0.1:{service.port},TIMEOUT=7"
    service.env["JDLS_PORT"] = "1"
    via_jdls = service.jdls("-Cping", "-v")
    assert via_jdls.returncode == 0, via_jdls.stderr
    assert f"Client: Using host '127.0.0.1', service '{service.port}'" in via_jdls.stdout
    assert "its largest frame is 65536 bytes; answers awaited 7 s (JDLS TIMEOUT)" in via_jdls.stdout
    explicit = service.jdls("-C", "x", "--host", "127.0.0.1", "--port", str(service.port))
    assert explicit.returncode == 0 and "received 'x'" in explicit.stdout
    # The guide's own line, under the guide's name of the command.
    guide = subprocess.run([str(Path(sys.executable).parent / "JDLS"), "-Cteststring"], env=service.env,
                           capture_output=True, text=True, timeout=60)
    assert guide.returncode == 0, guide.stderr
    assert guide.stdout.startswith(f"Client: Using host '127.0.0.1', service '{service.port}'\n")
    assert "Client: received 'teststring' in " in guide.stdout


def test_connection_test_when_nothing_listens(service) -> None:
    result = service.jdls("-Cteststring")  # nothing started on this port
    assert result.returncode == 1
    assert result.stdout == f"Client: Using host 'localhost', service '{service.port}'\n"
    assert result.stderr.splitlines() == [
        "Client: Unable to allocate socket",
        f"Client: connection failed for host 'localhost', service '{service.port}', error Connection refused",
    ]
    service.env["JDLS"] = ""  # set but empty: localhost, port 50002 (the port given here overrides it)
    named = service.jdls("-Cx", "--port", str(service.port))
    assert named.returncode == 1
    assert f"Client: Using host 'localhost', service '{service.port}'" in named.stdout


@pytest.mark.parametrize(("jdls", "says"), [
    ("SERVER=127.0.0.1,TIMEOUT=abc", "JDLS TIMEOUT: 'abc' is not a number of seconds from 0.5 to 86400"),
    ("SERVER=127.0.0.1,WAIT,FOO", "JDLS: unknown option 'FOO'; expected SERVER, SERVER2,"),
    ("SERVER=h,notaport", "JDLS SERVER: 'notaport' after the host is neither a port"),
    ("SERVER2=h", "JDLS SERVER2 has no meaning without SERVER"),
    ("SERVER=", "JDLS SERVER: expected SERVER=host{,port}"),
    ("WAIT,WAIT", "JDLS WAIT is given twice"),
    ("SERVER=h,,WAIT", "JDLS: empty option in 'SERVER=h,,WAIT'"),
])
def test_connection_test_refuses_what_clients_refuse_with_78(service, jdls: str, says: str) -> None:
    """jdls -C reads JDLS with the client's parser: the client's message and status (EX_CONFIG), nothing tried."""
    service.env["JDLS"] = jdls
    for name in ("jdls", "JDLS"):
        result = subprocess.run([str(Path(sys.executable).parent / name), f"-C{name}"], env=service.env,
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout) == (78, ""), result.stderr
        assert result.stderr.startswith(f"{name}: {says}") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
    service.env["JDLS"] = "SERVER=127.0.0.1"
    service.env["JBCPORTNO"] = "abc"
    result = service.jdls("-Cx")
    assert (result.returncode, result.stderr) == (78, "jdls: JBCPORTNO='abc' is not a port number (0 to 4294967295)\n")


def test_connection_test_tests_server2_too(service) -> None:
    start(service, "-ib")
    closed = free_port()
    service.env["JDLS"] = f"SERVER=127.0.0.1,{service.port},SERVER2=[::1]:{closed}"
    result = service.jdls("-Cboth")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "Client: testing the primary lock service (JDLS SERVER)"
    assert lines[1] == f"Client: Using host '127.0.0.1', service '{service.port}'"
    assert "received 'both'" in lines[4]
    assert lines[5:] == ["Client: testing the secondary lock service (JDLS SERVER2)",
                         f"Client: Using host '::1', service '{closed}'"]
    assert result.stderr.splitlines()[0] == "Client: Unable to allocate socket"
    service.env["JDLS"] = f"SERVER=127.0.0.1,{service.port},SERVER2=localhost,{service.port}"
    both = service.jdls("-Cboth")
    assert both.returncode == 0, both.stderr
    assert both.stdout.count("received 'both'") == 2


def test_connection_test_waits_for_answers_as_long_as_timeout_says(service) -> None:
    """A server that accepts and never answers: given up after JDLS's TIMEOUT, not a fixed time."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        service.env["JDLS"] = f"SERVER=127.0.0.1,{port},TIMEOUT=0.5"
        started = time.monotonic()
        result = service.jdls("-Cx")
        took = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr == f"Client: no answer from host '127.0.0.1', service '{port}' within 0.5 s (JDLS TIMEOUT)\n"
    assert took < 5


def test_connection_test_string_too_long_is_said_not_a_traceback(service) -> None:
    start(service, "-ib", "--max-frame", "1024")
    too_long = service.jdls("-C" + "x" * 70000)
    assert too_long.returncode == 2
    assert too_long.stderr == "jdls: the test string is 70000 bytes long; an echo carries at most 65535\n"
    over_frame = service.jdls("-C" + "y" * 2000)
    assert over_frame.returncode == 1
    assert "the test string is 2000 bytes long; this lock server takes at most 1022 in an echo" in over_frame.stderr
    assert "Traceback" not in over_frame.stderr + too_long.stderr


def test_every_name_says_its_own_version() -> None:
    for name in ("jdls", "jDLS", "JDLS"):
        result = subprocess.run([str(Path(sys.executable).parent / name), "--version"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0
        assert result.stdout.startswith(f"{name} (dls-daemon) ")


def test_unknown_option_is_named(capsys) -> None:
    for argv, says in ((["-x"], "unknown option -x (jdls -h lists them)"),
                       (["-x", "-q"], "unknown options -x -q"),
                       (["stray"], "unexpected argument: stray"),
                       (["-d", "-x"], "unrecognized arguments: -x")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err, err
        assert "one of the arguments" not in err
    assert main([]) == 2
    assert "one of the arguments -i -k -K -d -C --unit is required" in capsys.readouterr().err


def test_tidy_period_is_said_in_words(capsys) -> None:
    assert main(["-ibt0"]) == 2
    err = capsys.readouterr().err
    assert "invalid tidy period (minutes) '0': expected minutes, fractions allowed, from one second's worth" in err
    assert "0.0166" not in err


# -- limits ---------------------------------------------------------------------------------------------


def test_the_client_over_the_limit_is_told_and_logged(service) -> None:
    start(service, "-ib", "--max-clients", "1")
    with connect(service) as first:
        _, welcome = greet(first, expect=HELLO_ANSWERS)
        assert isinstance(welcome, Welcome)
        with connect(service) as second:
            conn, refused = greet(second, expect=HELLO_ANSWERS)
            assert refused == Error(0, ErrorCode.LIMIT, "limit of 1 clients reached")
            assert isinstance(receive(second, conn, ConnectionClosed), ConnectionClosed)
        tested = service.jdls("-Cx")
        assert tested.returncode == 1
        assert "answered with an error: limit of 1 clients reached" in tested.stderr
        assert "refused connection from 127.0.0.1:" in service.log()
        assert service.log().count(": limit of 1 clients reached") == 2
    wait_for(lambda: service.jdls("-Cx").returncode == 0, what="the freed place to be taken")


def test_lock_servers_of_an_earlier_listener_count_against_the_limit(service) -> None:
    start(service, "-ib", "--max-clients", "1")
    with connect(service) as first:
        assert isinstance(greet(first, expect=HELLO_ANSWERS)[1], Welcome)
        start(service, "-kD")
        start(service, "-ibD", "--max-clients", "1")
        assert "1 lock server(s) of an earlier listener still serving" in service.log()
        with connect(service) as second:
            assert greet(second, expect=HELLO_ANSWERS)[1] == Error(0, ErrorCode.LIMIT, "limit of 1 clients reached")


def test_the_lock_limit_per_client(service, tmp_path: Path) -> None:
    start(service, "-ib", "--max-locks", "2")
    data = tmp_path / "FILE"
    data.write_text("records")
    with Client(Config(Server("127.0.0.1", service.port))) as client:
        held = [client.lock(data, "K1"), client.lock(data, "K2")]
        with pytest.raises(RequestFailed) as refused:
            client.lock(data, "K3")
        assert refused.value.code == ErrorCode.LIMIT
        assert "limit of 2 locks per client" in str(refused.value)
        held[0].release()
        client.lock(data, "K3").release()  # room again
    wait_for(lambda: "over the limit of 2 locks" in service.log(), what="the log to name the limit")


def test_frame_limit_and_handshake_timeout(service) -> None:
    start(service, "-ib", "--max-frame", "2048", "--handshake-timeout", "0.3")
    with connect(service) as sock:
        conn, welcome = greet(sock, expect=HELLO_ANSWERS)
        assert isinstance(welcome, Welcome) and welcome.max_frame == 2048
        sock.sendall(conn.send(Echo(2, b"x" * 4000)))
        error = receive(sock, conn, Error)
        assert error.code == ErrorCode.PROTOCOL and "exceeds the limit of 2048" in error.reason
    with connect(service) as silent:
        started = time.monotonic()
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed for want of a Hello
        assert time.monotonic() - started < 3
    wait_for(lambda: "no Hello within 0.3 s" in service.log(), what="the log to say why")


def test_limits_and_directories_reach_the_listener(service, tmp_path: Path) -> None:
    locks, binary = tmp_path / "jbase", tmp_path / "jbase_lock"
    result = service.jdls("-ibD", "--lock-dir", str(locks), "--binary-lock-dir", str(binary), "--dead-client", "7",
                          "--max-clients", "9", "--max-locks", "5", "--max-frame", "4096", "--handshake-timeout", "2")
    assert result.returncode == 0, result.stderr
    assert f"OS file locks in {locks} (no lock table)" in result.stdout
    assert locks.is_dir() and locks.stat().st_mode & 0o7777 == 0o3770
    assert not binary.exists()  # made on first use only
    assert ("limits: 9 clients, 64 per address, 5 locks per client, frames of 4096 bytes, handshake 2 s, "
            "dead client 7 s"
            in service.log())


def test_an_unusable_lock_directory_fails_the_start(service, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = service.jdls("-ibD", "--lock-dir", str(blocker / "jbase"))
    assert result.returncode == 1
    assert f"cannot use the lock directory {blocker / 'jbase'}" in result.stderr
    assert service.processes() == []


# -- syslog -----------------------------------------------------------------------------------------


def test_syslog(service, tmp_path: Path) -> None:
    address = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(address)
        syslogd.settimeout(5)
        service.env["JDLS_SYSLOG_SOCKET"] = address
        start(service, "-ib", "--syslog")
        received = []
        while not any(b"listener started" in m for m in received):
            received.append(syslogd.recv(4096))
    monitor = service.pid("monitor")
    # <30> is facility daemon (3 * 8), priority info (6).
    assert any(m.startswith(f"<30>jdls[{monitor}]: monitor INFO monitor started".encode()) for m in received), received
    assert "listener started" in service.log()  # the log file as well


def test_syslog_missing_is_said_in_the_log(service, tmp_path: Path) -> None:
    service.env["JDLS_SYSLOG_SOCKET"] = str(tmp_path / "no-such-socket")
    start(service, "-ibA", "--syslog")
    assert f"syslog not available: {tmp_path / 'no-such-socket'} does not exist" in service.log()


# -- -K -o ----------------------------------------------------------------------------------------------


def test_remove_override_names_and_removes(service) -> None:
    start(service, "-ibA")
    refused = service.jdls("-K", "-o")
    assert refused.returncode == 1 and "lock monitor" in refused.stderr  # never under a running monitor
    start(service, "-kA")
    table = service.table()
    try:
        kept = service.jdls("-K")
        assert kept.returncode == 1
        assert f"1 other process(es) still attached: {os.getpid()} (" in kept.stderr
        assert "jdls -K -o removes it anyway" in kept.stderr
        removed = service.jdls("-K", "-o")
        assert removed.returncode == 0, removed.stderr
        assert "removed lock table" in removed.stdout
        assert f"warning: removing the lock table 0x{service.instance.key:08x} although 1 other process(es)" \
            in removed.stderr and f"{os.getpid()} (" in removed.stderr
        assert service.ipc_left() == []
    finally:
        table.close()


def test_remove_override_with_a_lock_server_left(service) -> None:
    start(service, "-ib")
    with connect(service) as sock:
        conn, welcome = greet(sock, expect=HELLO_ANSWERS)
        assert isinstance(welcome, Welcome)
        assert isinstance(lock(sock, conn, 2, b"REC"), Acquired)
        start(service, "-kD")
        start(service, "-kA")
        assert service.jdls("-K").returncode == 1
        removed = service.jdls("-Ko")
        assert removed.returncode == 0, removed.stderr
        assert f"lock server (pid {welcome.server_pid}) run" in removed.stderr
        assert service.ipc_left() == []
        reply = lock(sock, conn, 3, b"REC2")  # the lock server tells its client the table is gone
        assert isinstance(reply, Error) and "was removed" in reply.reason
    wait_for(lambda: gone(welcome.server_pid), what="the lock server to end with its client")


# -- -P and -T ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("port_based", [True, False])
def test_port_based_owners(service, port_based: bool) -> None:
    start(service, "-ibP" if port_based else "-ib")
    assert bool(service.header().flags & TableFlag.PORT_OWNERS) is port_based
    shown = service.jdls("-dv").stdout
    assert ("IPC semaphores based on PORT number" if port_based else "IPC semaphores based on THREAD id") in shown
    with connect(service) as a, connect(service) as b, connect(service) as c:
        conn_a, welcome_a = greet(a, 1000, expect=HELLO_ANSWERS)
        conn_b, welcome_b = greet(b, 1000, expect=HELLO_ANSWERS)  # same port and thread, another connection
        conn_c, _ = greet(c, 1001, expect=HELLO_ANSWERS)
        assert isinstance(welcome_a, Welcome)
        first = lock(a, conn_a, 2, b"33537")
        assert isinstance(first, Acquired)
        if port_based:  # a port names one client: a second connection claiming it is refused
            assert isinstance(welcome_b, Error) and welcome_b.code == ErrorCode.FORBIDDEN
        else:
            assert isinstance(welcome_b, Welcome) and welcome_a.server_pid != welcome_b.server_pid
            second = lock(b, conn_b, 2, b"33537")
            assert isinstance(second, Refused) and second.reason == RefuseReason.BUSY
        other = lock(c, conn_c, 2, b"33537")
        assert isinstance(other, Refused) and other.holder_port == 1000


def test_time_stamped_locks_show_their_age(service) -> None:
    start(service, "-ibT")
    assert service.header().flags & TableFlag.TIMESTAMPS
    with connect(service) as sock:
        conn, _ = greet(sock, expect=HELLO_ANSWERS)
        assert isinstance(lock(sock, conn, 2, b"OLD"), Acquired)
        time.sleep(1.2)
        shown = service.jdls("-dvL").stdout
    assert "Locking mechanism:      IPC semaphores based on THREAD id, locks time stamped" in shown
    lines = shown.splitlines()
    header = lines.index("Record locks outstanding") + 2
    assert lines[header].split("\t")[-1] == "age"
    row = lines[header + 1].split("\t")
    assert row[-2] == "OLD" and row[-1] in ("00:01", "00:02", "00:03")


def test_a_table_without_timestamps_has_no_age_column(service) -> None:
    start(service, "-ibA")
    shown = service.jdls("-dL").stdout
    assert "Group\tvalue\tpid\ttype\tport\ti-node\tdev\tqueued\tipaddr\tkey\n" in shown


# -- the monitor stopped and started under a working listener ------------------------------------------


def test_monitor_restarted_while_a_client_holds_a_lock(service, tmp_path: Path) -> None:
    start(service, "-ib")
    monitor, listener = service.pid("monitor"), service.pid("listener")
    assert monitor and listener
    data = tmp_path / "FILE"
    data.write_text("records")
    with Client(Config(Server("127.0.0.1", service.port))) as client:
        held = client.lock(data, "HELD")
        [server] = {e.slot.pid for e in _scan(service)}
        start(service, "-kA")
        assert gone(monitor) and not gone(listener) and not gone(server)
        assert service.header().monitor_pid == 0
        shown = service.jdls("-d").stdout
        assert f"Lock monitor at pid:    {monitor} - Inactive" not in shown  # the header says 0 now
        assert "Lock monitor at pid:    0 - Inactive" in shown
        assert f"Lock listener at pid:   {listener} - Active" in shown
        during = client.lock(data, "WHILE-NO-MONITOR")  # the lock server carries on
        restarted = service.jdls("-ibA")
        assert restarted.returncode == 0, restarted.stderr
        assert "attached lock table" in restarted.stdout
        new_monitor = service.pid("monitor")
        assert new_monitor and new_monitor != monitor
        header = service.header()
        assert (header.monitor_pid, header.listener_pid) == (new_monitor, listener)
        shown = service.jdls("-dvL").stdout
        assert f"Lock monitor at pid:    {new_monitor} - Active" in shown
        assert "2 locks currently in use" in shown
        assert "\tHELD" in shown and "\tWHILE-NO-MONITOR" in shown  # the start-up tidy kept a live owner's locks
        assert client.status(data, "HELD")[0] == 1
        held.release()
        during.release()
        client.lock(data, "AFTER").release()
        assert not gone(server) and not gone(listener)


def _scan(service) -> list:
    table = service.table()
    try:
        return list(table.scan())
    finally:
        table.close()


def test_monitor_header_keeps_time_and_cpu(service) -> None:
    start(service, "-ibA")
    first = service.header()
    assert first.monitor_pid == service.pid("monitor") and first.tidy_period == 300
    wait_for(lambda: service.header().last_ran > first.last_ran, timeout=3, what="the monitor's tick")
    header = service.header()
    assert time.time() - header.last_ran < 2.5
    proc = psutil.Process(header.monitor_pid)
    times = proc.cpu_times()
    assert 0 <= header.cpu_user <= times.user + 0.05 and 0 <= header.cpu_system <= times.system + 0.05


def test_a_short_tidy_period_in_fractions_of_a_minute(service) -> None:
    """-t takes minutes as jDLS does; fractions let an operator tidy every few seconds (0.05 = 3 s)."""
    result = service.jdls("-ibA", "-t", "0.05")
    assert result.returncode == 0, result.stderr
    assert service.header().tidy_period == 3
    display = service.jdls("-dv")
    assert "Tidy-up time:           3 seconds" in display.stdout, display.stdout
    refused = service.jdls("-ibA", "-t", "0")
    assert refused.returncode == 2 and "tidy period (minutes)" in refused.stderr


def test_the_value_block_size_is_the_tables_and_stays_with_it(tmp_path: Path) -> None:
    """--value-block-size makes the table's blocks that size; a service started again on that table with
    another size says it is ignored (the size is the table's, as -s is)."""
    with running_service(tmp_path / "release", "--value-block-size", "16") as svc:
        assert svc.header().block_size == 16
        assert svc.jdls("-k").returncode == 0
        svc.start("--value-block-size", "40")
        svc.wait_for_log(r"value blocks of 16 bytes: --value-block-size 40 is ignored")
