"""The parts of issue 11's network guard that need no daemon: the address check, the lock share of a table,
the lock information parser's bounds, the log's rate limit, and port claims between two real processes."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from dls_daemon import client_info, port_claims
from dls_daemon.cli import get_parser, settings_from
from dls_daemon.context import (
    DEFAULT_ADMIN_ALLOW,
    MAX_INFO_DEPTH,
    Limits,
    address_in,
    in_ranges,
    interim_period_for,
    ranges,
)
from dls_daemon.log import RateLimit
from dls_shm import Instance

NETS = (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(("address", "inside"), [
    ("10.1.2.3", True), ("10.2.0.1", False), ("::ffff:10.1.9.9", True), ("2001:db8::7", True),
    ("2001:db9::7", False), ("fe80::1%eth0", False), ("not an address", False),
])
def test_address_in(address: str, inside: bool) -> None:
    assert address_in(address, NETS) is inside
    assert in_ranges(address, ranges(NETS)) is inside  # a lock server's way: no ipaddress object touched


@pytest.mark.parametrize("address", ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1", "::2", "128.0.0.1",
                                     "fe80::1%lo", "0.0.0.0", "", "1.2.3", "01.2.3.4"])
def test_in_ranges_agrees_with_address_in(address: str) -> None:
    for networks in (DEFAULT_ADMIN_ALLOW, NETS, (ipaddress.ip_network("0.0.0.0/0"),), (ipaddress.ip_network("::/0"),)):
        assert in_ranges(address, ranges(networks)) is address_in(address, networks), (address, networks)


def test_admin_default_is_this_host_only() -> None:
    assert address_in("127.0.0.5", DEFAULT_ADMIN_ALLOW) and address_in("::1", DEFAULT_ADMIN_ALLOW)
    assert not address_in("192.0.2.1", DEFAULT_ADMIN_ALLOW)


def test_options_reach_the_settings(tmp_path: Path) -> None:
    args = get_parser().parse_args(["-i", "--allow", "192.0.2.7", "--allow", "2001:db8::/32", "--admin-allow",
                                    "10.0.0.0/8", "--max-per-address", "3", "--refuse-os-locks"])
    settings = settings_from(args, Instance.from_environment(tmp_path))
    assert settings.allow == (ipaddress.ip_network("192.0.2.7/32"), ipaddress.ip_network("2001:db8::/32"))
    assert settings.admin_allow == (ipaddress.ip_network("10.0.0.0/8"),)
    assert (settings.limits.max_per_address, settings.limits.os_locks) == (3, False)
    defaults = settings_from(get_parser().parse_args(["-i"]), Instance.from_environment(tmp_path))
    assert (defaults.allow, defaults.admin_allow, defaults.limits.os_locks) == ((), DEFAULT_ADMIN_ALLOW, True)


def test_the_lock_share_of_a_table() -> None:
    assert Limits().locks_for(13150) == 3287  # the default table: a quarter
    assert Limits().locks_for(4) == 100  # a tiny (test) table: at least 100
    assert Limits().locks_for(None) == 100_000  # no table: OS file locks
    assert Limits(max_locks_per_client=7, max_locks_given=True).locks_for(13150) == 7


def test_lock_information_is_bounded_before_it_is_parsed() -> None:
    assert client_info.depth(b'{"a": "[[[{{{", "b": [[1], {"c": "\\"]"}]}') == 3
    nested = b"[" * (MAX_INFO_DEPTH + 1) + b"]" * (MAX_INFO_DEPTH + 1)
    with pytest.raises(client_info.Refused, match="nested deeper than 32 levels"):
        client_info.parse(nested)
    with pytest.raises(client_info.Refused, match="nested deeper"):
        client_info.parse(b"[" * 200_000)  # would exhaust the parser's recursion
    with pytest.raises(client_info.Refused, match="at most 1048576 taken"):
        client_info.parse(b" " * (1024 * 1024 + 1))
    with pytest.raises(client_info.Refused, match="must be a JSON object"):
        client_info.parse(b"[1]")
    with pytest.raises(client_info.Refused, match="not JSON"):
        client_info.parse(b"{")
    assert client_info.parse(b'{"locks": [[1, 2]]}') == {"locks": [[1, 2]]}


def test_repeated_warnings_are_limited_and_counted(tmp_path: Path) -> None:
    logger = logging.getLogger("test_guard_parts.rate")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    limit = RateLimit(burst=3, window=0.2)
    handlers = [Keep(), Keep()]  # one filter for every handler: each record decided once
    for handler in handlers:
        handler.addFilter(limit)
        logger.addHandler(handler)
    try:
        for n in range(10):
            logger.warning("refused connection from %s: not in --allow", f"192.0.2.{n}")
            logger.info("an info line %d", n)  # never limited
        assert lines.count("an info line 9") == 2
        refused = [line for line in lines if line.startswith("refused")]
        assert len(refused) == 6  # 3 records, each through 2 handlers
        time.sleep(0.25)
        logger.warning("refused connection from %s: not in --allow", "192.0.2.99")
        assert lines[-1].startswith("refused connection from 192.0.2.99: not in --allow (and 7 more like it in the "
                                    "last ")
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


class _Holder:
    """A forked process that claims a port for an address and keeps it until ``end()``."""

    def __init__(self, instance: Instance, port: int, address: str) -> None:
        ready_r, ready_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                port_claims.claim(instance, port, address)
                os.write(ready_w, b"x")
                status = 0
                os.read(self._stop_r, 1)
            finally:
                os._exit(status)
        os.close(ready_w)
        self.claimed = os.read(ready_r, 1) == b"x"
        os.close(ready_r)
        self.ended = False

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        os.write(self._stop_w, b"x")
        os.waitpid(self.pid, 0)
        os.close(self._stop_r)
        os.close(self._stop_w)


def test_a_port_is_claimed_by_one_live_process(tmp_path: Path) -> None:
    instance = Instance.from_environment(tmp_path / "release")
    instance.run_dir.mkdir(parents=True)
    holder = _Holder(instance, 4242, "10.0.0.1")
    try:
        assert holder.claimed
        for address in ("10.0.0.2", "10.0.0.1"):  # another host, and the holder's own: one port, one connection
            with pytest.raises(port_claims.PortTaken, match=f"port 4242 is held by lock server pid {holder.pid}"):
                port_claims.claim(instance, 4242, address, wait=0.1)
        os.close(port_claims.claim(instance, 4243, "10.0.0.2", wait=0.1))  # another port is free
    finally:
        holder.end()
    mine = port_claims.claim(instance, 4242, "10.0.0.2", wait=0.1)  # free once the holder has gone
    thief = _Holder(instance, 4242, "10.0.0.1")
    try:
        assert not thief.claimed
    finally:
        thief.end()
        os.close(mine)


def test_a_claim_waits_a_moment_for_an_ending_holder(tmp_path: Path) -> None:
    """A client reconnecting while its old lock server is still ending gets its port once that one ends."""
    instance = Instance.from_environment(tmp_path / "release")
    instance.run_dir.mkdir(parents=True)
    holder = _Holder(instance, 4242, "10.0.0.1")
    ender = threading.Timer(0.3, holder.end)
    ender.start()
    try:
        os.close(port_claims.claim(instance, 4242, "10.0.0.1", wait=5))
    finally:
        ender.join()


@pytest.mark.parametrize(("ack_timeout_ms", "period"), [
    (30_000, 5.0),  # the default TIMEOUT: the interim period of a client that tells nothing
    (2_000, 2 / 3),  # TIMEOUT=2: three interim messages within it
    (500, 0.5 / 3),  # the shortest TIMEOUT a client accepts
    (0, 0.1),  # a peer's nonsense: never more often than MIN_INTERIM_PERIOD
    (0xFFFFFFFF, 5.0),  # nor less often than the lock server's own period
])
def test_interim_period_follows_the_clients_timeout(ack_timeout_ms: int, period: float) -> None:
    assert interim_period_for(ack_timeout_ms) == pytest.approx(period)
