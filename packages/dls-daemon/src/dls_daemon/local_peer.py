"""Who is at the other end of a loopback connection: the local user an operator's address may hide.

An address in --admin-allow is an operator's; loopback is one by default, but on a shared host every
local user connects from loopback. The kernel knows the user of each TCP socket (/proc/net/tcp and
tcp6, the ``uid`` column), so for a loopback peer the lock server looks up the socket at the other end
of its own connection and lets it see the lock snapshot only if its user is root, the service's user or
a member of the service's group: the users who may read the lock table on this host anyway.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
from pathlib import Path

from .context import peer_ip

TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (the kernel's words of host byte order, then the port) as (address, port)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, int(port, 16)
    return ip, int(port, 16)


def peer_uid(ours: tuple[str, int], peer: tuple[str, int]) -> int | None:
    """The uid owning the socket at ``peer`` connected to ``ours`` (both on this host), or None if not found."""
    want_local, want_remote = (peer_ip(peer[0]), peer[1]), (peer_ip(ours[0]), ours[1])
    for table in TABLES:
        try:
            lines = table.read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            try:
                if _address(fields[1]) == want_local and _address(fields[2]) == want_remote:
                    return int(fields[7])
            except ValueError:
                continue
    return None


def may_read_the_table(uid: int, gid: int | None) -> bool:
    """Whether user ``uid`` is root, this service's user, or a member of the service's group ``gid``."""
    if uid in (0, os.geteuid()):
        return True
    if gid is None:
        return False
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def is_operator(ours: tuple[str, int], peer: tuple[str, int], gid: int | None) -> bool:
    """A loopback peer is an operator when its user may read the lock table anyway (see the docstring)."""
    uid = peer_uid(ours, peer)
    return uid is not None and may_read_the_table(uid, gid)
