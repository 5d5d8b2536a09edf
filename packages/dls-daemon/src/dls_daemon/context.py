"""What a lock server inherits from the listener that forked it.

The listener builds one ServerContext and hands it to every lock server it
forks; a lock server needs nothing else from its parent, which is why stopping
or restarting the listener does not disturb it.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from dls_proto import DEFAULT_MAX_FRAME, environment
from dls_shm import Instance, LockTable, pack_ip

#: Defaults of the limits below; each has a jdls long option (a frame's: dls-proto's DEFAULT_MAX_FRAME).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Without a table (OS file locks) nothing bounds a client's locks but this.
DEFAULT_MAX_LOCKS_PER_CLIENT = 100_000
#: With a table, one client may hold at most this share of its lock slots unless --max-locks says otherwise,
#: so that one client (or one stranger) cannot fill the table for everyone.
TABLE_SHARE = 4
#: ... but never fewer than this many (a table so small is a test's, where one client may fill it).
MIN_TABLE_SHARE = 100
#: Seconds between interim Waiting messages to a client whose request waits (at most: see interim_period_for).
DEFAULT_INTERIM_PERIOD = 5.0
#: A client that tells its acknowledgement timeout (protocol version 3's Settings) gets an interim message at
#: least this many times within it: a lost or late one still leaves it more than one more.
INTERIMS_PER_ACK_TIMEOUT = 3
#: The shortest period between interim messages, however short the client's acknowledgement timeout: what a
#: client may make its lock server send is bounded.
MIN_INTERIM_PERIOD = 0.1
#: A waiting request's first interim message comes this long after it was queued (or one interim period, if
#: that is shorter), not at once: a wait shorter than that (most waits for a lock handed on from process to
#: process) costs no message, and its client no publication of its lock information (a client publishes
#: when a wait starts and when it ends, the first Waiting being how it knows); a wait an operator could
#: see in show-item-locks is announced all the same.
FIRST_INTERIM_DELAY = 0.05
#: Clients served at once by one listener.
DEFAULT_MAX_CLIENTS = 1000
#: Longest a client host may vanish without a word before its lock server gives it up (seconds); its locks are
#: then kept for the table's lock-delay, for the client to reclaim should it come back.
DEFAULT_DEAD_CLIENT_BOUND = 15.0
#: Connections one client address may have open at once (--max-per-address).
DEFAULT_MAX_PER_ADDRESS = 64
#: Largest lock information document (InfoPut) a client may send (the frame limit, 64 KiB by default, comes
#: first), and how deep its JSON may nest.
MAX_INFO_BYTES = 1024 * 1024
MAX_INFO_DEPTH = 32

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Who may read the lock snapshot (InfoGet) unless --admin-allow says otherwise: this host only.
DEFAULT_ADMIN_ALLOW: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def interim_period_for(ack_timeout_ms: int, longest: float = DEFAULT_INTERIM_PERIOD) -> float:
    """Seconds between interim Waiting messages to a client whose acknowledgement timeout (JDLS TIMEOUT, told in
    Settings) is ``ack_timeout_ms``: a third of it, at least MIN_INTERIM_PERIOD and at most ``longest``
    (Limits.interim_period, which a client that says nothing, of protocol version 2 say, gets)."""
    return min(longest, max(MIN_INTERIM_PERIOD, ack_timeout_ms / 1000 / INTERIMS_PER_ACK_TIMEOUT))


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer address as accept gives it (an IPv4-mapped IPv6 one as IPv4, a zone dropped); None if not one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_in(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether a peer address (as accept gives it, an IPv4-mapped IPv6 one too) lies in one of ``networks``."""
    ip = peer_ip(address)
    return ip is not None and any(ip in net for net in networks)


#: A network as ``in_ranges`` matches it: (IP version, its first address, its netmask), integers.
Range = tuple[int, int, int]
#: What ``pack_ip`` puts before an IPv4 address (mapped into IPv6).
_V4_MAPPED = pack_ip("0.0.0.0")[:12]  # noqa: S104 - an address to compare with, not to bind


def ranges(networks: tuple[Network, ...]) -> tuple[Range, ...]:
    """``networks`` as ``in_ranges`` takes them (made once, in the listener)."""
    return tuple((net.version, int(net.network_address), int(net.netmask)) for net in networks)


def in_ranges(address: str, networks: tuple[Range, ...]) -> bool:
    """``address_in`` for a lock server: the address read by ``inet_pton`` (``pack_ip``) and matched against
    integers the listener prepared (``ranges``), so that no ipaddress object is touched: each one would cost
    every lock server the page it is on (copy-on-write after the fork, if only for its reference count)."""
    try:
        packed = pack_ip(address)
    except ValueError:
        return False
    version, bits = (4, int.from_bytes(packed[12:], "big")) if packed[:12] == _V4_MAPPED else (
        6, int.from_bytes(packed, "big"))
    return any(version == v and bits & mask == first for v, first, mask in networks)


@dataclass
class Limits:
    """What one client may ask of its lock server, and how many clients the listener serves."""

    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_locks_per_client: int = DEFAULT_MAX_LOCKS_PER_CLIENT
    interim_period: float = DEFAULT_INTERIM_PERIOD
    max_clients: int = DEFAULT_MAX_CLIENTS
    dead_client_bound: float = DEFAULT_DEAD_CLIENT_BOUND
    #: Connections one client address may have open at once; the next is refused at accept.
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS
    #: Whether Lock requests with the BINARY flag are served (else refused with FORBIDDEN).
    os_locks: bool = True
    #: Whether --max-locks was given; when not, a table lowers max_locks_per_client to its share.
    max_locks_given: bool = False

    def locks_for(self, table_locks: int | None) -> int:
        """The locks one client may hold: --max-locks, else a share of the table's slots (``table_locks``)."""
        if self.max_locks_given or table_locks is None:
            return self.max_locks_per_client
        return max(MIN_TABLE_SHARE, table_locks // TABLE_SHARE)


@dataclass
class ServerContext:
    """Everything a lock server needs from the listener that forked it: the instance, the table (None:
    OS file locks), where OS locks live, the limits, where to log, and the TLS context when the port
    speaks TLS (the lock server does the handshake)."""

    instance: Instance
    table: LockTable | None
    log: logging.Logger
    limits: Limits = field(default_factory=Limits)
    lock_dir: Path = Path(environment.DEFAULT_LOCK_DIR)
    binary_lock_dir: Path = Path(environment.DEFAULT_BINARY_LOCK_DIR)
    #: Peers that may read the lock snapshot (InfoGet): --admin-allow.
    admin_allow: tuple[Network, ...] = DEFAULT_ADMIN_ALLOW
    #: ``admin_allow`` as ``in_ranges`` takes it, made here in the listener (``__post_init__``).
    admin_ranges: tuple[Range, ...] = field(init=False, default=())
    #: The service's group (jdls --group): a lock directory made on first use belongs to it.
    gid: int | None = None
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self.admin_ranges = ranges(self.admin_allow)
