"""The table's layout: sizing, primes, addresses, the structs every process agrees on."""

from __future__ import annotations

import pytest
from dls_shm import (
    DEFAULT_PER_GROUP,
    DEFAULT_RECORDS,
    KEY_MAX,
    LOCAL_IP,
    Geometry,
    geometry_for,
    modes,
    next_prime,
    pack_ip,
    unpack_ip,
)
from dls_shm.layout import (
    BLOCK_MAX,
    HEADER_SIZE,
    HEADER_STRUCT,
    INDEX_BITS,
    SLOT_HEAD,
    SLOT_MODE_OFFSET,
    SLOT_QUEUED_OFFSET,
    SLOT_SIZE,
    SLOT_STRUCT,
)


def test_default_geometry_is_jdls() -> None:
    g = geometry_for(13000, 50)
    assert g == Geometry(263, 50)
    assert g.ngroups == 263
    assert g.per_group == 50
    assert g.locks == 13150
    assert geometry_for(DEFAULT_RECORDS, DEFAULT_PER_GROUP) == g


@pytest.mark.parametrize(
    ("records", "per_group", "ngroups"),
    [(1, 1, 2), (4, 2, 2), (10, 10, 2), (100, 10, 11), (101, 10, 11), (1000, 10, 101), (50, 50, 2), (51, 50, 2),
     (150, 50, 3), (13000, 13000, 2)],
)
def test_group_count_is_a_prime_at_least_the_need(records: int, per_group: int, ngroups: int) -> None:
    g = geometry_for(records, per_group)
    assert g == Geometry(ngroups, per_group)
    assert g.locks >= records


@pytest.mark.parametrize(
    ("n", "prime"),
    [(-5, 2), (0, 2), (1, 2), (2, 2), (3, 3), (4, 5), (8, 11), (9, 11), (24, 29), (25, 29), (97, 97), (260, 263),
     (263, 263), (264, 269), (7919, 7919), (7920, 7927)],
)
def test_next_prime(n: int, prime: int) -> None:
    assert next_prime(n) == prime


def test_next_prime_is_prime_and_next() -> None:
    def is_prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, k))

    for n in range(2, 600):
        p = next_prime(n)
        assert is_prime(p)
        assert all(not is_prime(k) for k in range(n, p))


@pytest.mark.parametrize(("records", "per_group"), [(0, 50), (13000, 0), (-1, 5), (5, -3)])
def test_bad_sizes_are_named(records: int, per_group: int) -> None:
    with pytest.raises(ValueError, match=f"table size {records},{per_group}: both must be at least 1"):
        geometry_for(records, per_group)


def test_too_many_locks_for_a_handle() -> None:
    limit = (1 << INDEX_BITS) - 1
    with pytest.raises(ValueError, match=f"table size {1 << 24},1: at most {limit} locks"):
        geometry_for(1 << 24, 1)
    assert geometry_for(8_000_000, 1).locks < 1 << INDEX_BITS


def test_geometry_offsets() -> None:
    g = geometry_for(100, 10)
    assert g.values_size == 40
    assert g.group_size == 8 + 40 + 10 * SLOT_SIZE  # the group's ticket counter, its values, its slots
    assert g.total_size == HEADER_SIZE + g.ngroups * g.group_size
    assert g.group_offset(0) == HEADER_SIZE
    assert g.value_offset(0) == HEADER_SIZE + 8
    assert g.slot_offset(0) == HEADER_SIZE + 8 + 40
    assert g.value_offset(13) == g.group_offset(1) + 8 + 4 * 3
    assert g.slot_offset(13) == g.group_offset(1) + 8 + 40 + 3 * SLOT_SIZE
    last = g.locks - 1
    assert g.slot_offset(last) + SLOT_SIZE == g.total_size
    assert g.value_offset(last) + 4 == g.group_offset(g.ngroups - 1) + 8 + g.values_size


def test_struct_sizes() -> None:
    assert HEADER_STRUCT.size <= HEADER_SIZE
    assert SLOT_STRUCT.size == SLOT_SIZE
    # ticket 8, state, mode, flags, pad, key length 2, queued 2, then the owner
    assert SLOT_HEAD.size == 16
    assert SLOT_MODE_OFFSET == 9
    assert SLOT_QUEUED_OFFSET == 14
    # ... the key, then the fencing token, the notice doorbell and the value block
    assert SLOT_SIZE == SLOT_HEAD.size + 4 + 4 + 4 + 16 + 8 + 8 + 8 + 8 + 8 + KEY_MAX + 8 + 8 + BLOCK_MAX


@pytest.mark.parametrize(
    ("text", "packed"),
    [
        ("10.0.0.9", bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 9])),
        ("0.0.0.0", bytes(10) + b"\xff\xff" + bytes(4)),
        ("255.255.255.255", bytes(10) + b"\xff" * 6),
        ("192.168.1.20", bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 20])),
        ("::1", bytes(15) + b"\x01"),
        ("::", bytes(16)),
        ("2001:db8::8:1", bytes.fromhex("20010db8000000000000000000080001")),
        ("fe80::1ff:fe23:4567:890a", bytes.fromhex("fe8000000000000001fffe234567890a")),
    ],
)
def test_pack_and_unpack_ip(text: str, packed: bytes) -> None:
    assert pack_ip(text) == packed
    assert len(pack_ip(text)) == 16
    assert unpack_ip(packed) == text


def test_local_ip() -> None:
    assert unpack_ip(LOCAL_IP) == "0.0.0.0"


def test_mapped_v6_text_comes_back_dotted() -> None:
    assert unpack_ip(pack_ip("::ffff:10.1.2.3")) == "10.1.2.3"


def test_an_ipv6_zone_is_dropped() -> None:
    assert pack_ip("fe80::1%eth0") == pack_ip("fe80::1")  # as accept gives a link-local peer


@pytest.mark.parametrize("text", ["", "localhost", "10.0.0", "10.0.0.256", "1::2::3", "010.0.0.1", " 10.0.0.1",
                                  "%eth0", "10.0.0.1%eth0", "fe80::1%", "fe80::1%a%b"])
def test_bad_ip(text: str) -> None:
    with pytest.raises(ValueError):
        pack_ip(text)


def test_mode_names() -> None:
    assert [modes.parse(n) for n in ("nl", "CR", "cw", "Pr", "PW", "ex")] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="unknown lock mode 'XX': expected one of NL, CR, CW, PR, PW, EX"):
        modes.parse("XX")
