"""``jdls -i --log-format json``: the log as one JSON object a line, with the client's address in a lock
server's lines, and nothing a client sends able to break a line or forge a field."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_daemon import log as daemon_log
from dls_daemon.cli import main
from dls_shm import Instance

FIELDS = {"time", "level", "role", "pid", "client", "message"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def entries(path: Path) -> list[dict[str, object]]:
    """Every line of ``path`` as a JSON object with the fields (fails the test on any other line)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict) and FIELDS <= entry.keys(), line
        assert TIME.fullmatch(str(entry["time"])), line
        out.append(entry)
    return out


def test_a_json_log_has_a_line_per_event_and_a_lock_servers_lines_name_its_client(service, tmp_path) -> None:
    service.start("--log-format", "json")
    data = tmp_path / "data"
    data.write_bytes(b"")
    with service.client() as client, client.lock(data, "record"):
        service.wait_for_log("connected")
    service.wait_for_log("closed")
    stop = service.jdls("-k")
    assert stop.returncode == 0, stop.stderr
    logged = entries(service.log_path)
    roles = {str(e["role"]) for e in logged}
    assert {"monitor", "listener", "server"} <= roles, roles
    served = [e for e in logged if e["role"] == "server"]
    assert served
    for entry in served:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", str(entry["client"])), entry
        assert str(entry["client"]) in str(entry["message"]), entry
    assert all(e["client"] is None for e in logged if e["role"] != "server")
    assert {e["pid"] for e in logged if e["role"] == "monitor"} == {int(stop.stdout.split("lock monitor (pid ")[1]
                                                                        .split(")")[0])}


@pytest.fixture
def json_logger(tmp_path: Path) -> Iterator[tuple[logging.Logger, Instance]]:
    """This process's ``jdls`` logger writing JSON to an instance in tmp_path (as a lock server's); undone."""
    instance = Instance.from_environment(tmp_path / "release")
    logger = daemon_log.setup(instance, "server", log_format="json")
    daemon_log.set_role("server", client="192.0.2.7:4242")
    try:
        yield logger, instance
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        daemon_log.set_role("jdls")


def test_what_a_client_sends_cannot_break_a_line_or_forge_a_field(json_logger) -> None:
    logger, instance = json_logger
    hostile = 'evil\n{"level": "ERROR", "client": null}\r\x00\x1b[31m\u2028"\\ end'
    logger.warning("client sent %s", hostile)
    try:
        raise ValueError(hostile)
    except ValueError:
        logger.exception("request failed")
    logged = entries(instance.log_file)
    assert len(logged) == 2 == len(instance.log_file.read_bytes().splitlines())
    first, second = logged
    assert first["message"] == f"client sent {hostile}"
    assert (first["level"], first["role"], first["client"]) == ("WARNING", "server", "192.0.2.7:4242")
    assert second["level"] == "ERROR" and "ValueError" in str(second["exception"])
    assert "exception" not in first
    # The error trace keeps jBASE's text lines.
    trace = instance.error_trace.read_text(encoding="utf-8")
    assert " server ERROR request failed" in trace and not trace.startswith("{")


def test_a_bad_log_format_is_a_usage_error(capsys) -> None:
    assert main(["-i", "--log-format", "xml"]) == 2
    err = capsys.readouterr().err
    assert "--log-format" in err and "'xml'" in err
    assert main(["-k", "--log-format", "json"]) == 2


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_message_with_bytes_that_are_not_text_is_logged_all_the_same(tmp_path: Path, log_format: str) -> None:
    """A client's bytes decoded with surrogateescape (a key that is not UTF-8) are written escaped, in the log
    file and the error trace alike, rather than the line being lost to an encoding error."""
    instance = Instance.from_environment(tmp_path / "release")
    logger = daemon_log.setup(instance, "server", log_format=log_format)
    try:
        logger.error("bad key %s from a client", b"K\xff\xfe".decode("utf-8", "surrogateescape"))
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        daemon_log.set_role("jdls")
    for path in (instance.log_file, instance.error_trace):
        lines = path.read_bytes().splitlines()
        assert len(lines) == 1 and b"bad key K" in lines[0] and b"udcff" in lines[0], (path.name, lines)
