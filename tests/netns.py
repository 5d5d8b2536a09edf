"""A client host a test can cut off: a network namespace joined to this one by a veth pair.

``link()`` makes a namespace named ``dls-t-<pid>-<n>`` and a veth pair whose
host side (in the root namespace) is ``10.231.X.1/30`` and whose namespace side
is ``10.231.X.2/30``, X chosen so that the /30 overlaps no address or route
the machine already has: traffic between the two ends stays on this one wire.
A program started with ``command(...)`` runs inside the namespace and reaches
a daemon of the root namespace at ``host_ip``. ``cut()`` takes the host side
of the link down: from then on nothing passes either way, and nobody is told
(no FIN, no RST, no ICMP reaches the other end), as when a cable is pulled or
a host loses power.

Leaving the ``with`` block deletes the namespace, which destroys the veth pair
with it. Processes started in it must have been ended first.

This is a helper module, not a test module; the tests load it from its file
(the root pytest imports test files with ``--import-mode=importlib``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

#: Every address this helper hands out is in here.
SUPERNET = ipaddress.IPv4Network("10.231.0.0/16")
#: The /30 networks handed out: 10.231.X.0/30, X from 0 to 255.
SUBNETS = 256
PREFIX = "dls-t"
_serial = itertools.count(1)


class NetnsError(RuntimeError):
    """The namespace or its link could not be made (no root, no CAP_NET_ADMIN, no iproute2...)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; NetnsError with its message when ``check`` and it fails."""
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise NetnsError("the ip command (iproute2) is not installed") from None
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> set[str]:
    """Names of the network namespaces ``ip netns list`` shows."""
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def interfaces() -> set[str]:
    """Names of the network interfaces of the root namespace."""
    names = set()
    for line in ip("-o", "link", "show").stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.add(parts[1].strip().split("@")[0])
    return names


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network of an address or a route of the root namespace (the default route aside)."""
    found = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            found.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        if not words:
            continue
        dest = words[1] if words[0] in ("local", "broadcast", "unicast", "multicast", "anycast", "blackhole",
                                        "unreachable", "prohibit", "throw", "nat") and len(words) > 1 else words[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(dest, strict=False))
    return found


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    used = _networks_in_use()
    base = int(SUPERNET.network_address)
    for i in range(SUBNETS):
        index = (seed + i) % SUBNETS
        candidate = ipaddress.IPv4Network((base + 256 * index, 30))
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError(f"no free /30 left in {SUPERNET}")


@dataclass
class Link:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Take the host side down: the namespace is unreachable, and nothing tells its programs."""
        ip("link", "set", "dev", self.host_if, "down")

    def exists(self) -> bool:
        """Whether anything of it is left: the namespace or the host side of the veth pair."""
        return self.name in namespaces() or self.host_if in interfaces()

    def remove(self) -> None:
        """Delete the namespace (its veth end, hence the pair, goes with it); never fails on what is gone."""
        if self.name in namespaces():
            ip("netns", "del", self.name, check=False)
        if self.host_if in interfaces():
            ip("link", "del", "dev", self.host_if, check=False)


def create() -> Link:
    """A new namespace and its link, up and addressed; NetnsError (after cleaning up) if it cannot be had."""
    pid = os.getpid()
    existing = namespaces()
    while True:
        n = next(_serial)
        name = f"{PREFIX}-{pid}-{n}"
        if name not in existing:
            break
    tag = f"{pid % 100000}x{n}"
    subnet = _free_subnet(pid * 7919 + n * 104729)
    host_ip, ns_ip = (str(a) for a in subnet.hosts())
    link = Link(name, f"dlsh{tag}"[:15], f"dlsn{tag}"[:15], host_ip, ns_ip)
    try:
        ip("netns", "add", name)
        ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", link.host_if)
        ip("link", "set", "dev", link.host_if, "up")
        ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", link.ns_if)
        ip("-n", name, "link", "set", "dev", link.ns_if, "up")
        ip("-n", name, "link", "set", "dev", "lo", "up")
    except NetnsError as exc:
        link.remove()
        raise NetnsError(f"cannot make network namespace {name} with a veth link ({host_ip} <-> {ns_ip}); "
                         f"this needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2: {exc}") from None
    return link


@contextlib.contextmanager
def link() -> Iterator[Link]:
    """A namespace and its link for the ``with`` block, deleted when it is left however it is left."""
    made = create()
    try:
        yield made
    finally:
        made.remove()
