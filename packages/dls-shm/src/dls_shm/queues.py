"""A resource's requests as an operator sees them: granted, converting, waiting and refused, in queue order.

One definition for every tool that shows a table's queues (show-item-locks --queues, locally and from a
service's snapshot, and dls-dump): they all read lock entries in ``info.entry_json``'s form, so a snapshot
sent by another version of the service is read by the same code (an entry without the fields of layout 4,
``converting``, ``block_valid`` and ``token``, reads as a plain request on a valid block).

The table keeps a conversion as a second slot of its owner on the resource, WAITING with the flag
CONVERTING and the mode wanted, beside the owner's granted slot with the mode held; the convert queue is
served before the wait queue. So a resource's requests are shown in that order: the granted (and kept)
locks, the conversions, the other waiters, then the requests refused to break a deadlock (about to be
freed by their waiters), each part in queue order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: The states of a request, in the order a resource's requests are shown: a granted lock; a kept one (its
#: lock server ended, kept for its client to reclaim); a conversion of a granted lock waiting in the
#: convert queue; a request waiting in the wait queue; one refused to break a deadlock (slot state DEADLOCK).
STATES = ("granted", "kept", "converting", "waiting", "refused")
#: The states of a lock held (it conflicts; it has a fencing token).
HELD = ("granted", "kept")
_RANK = {state: rank for rank, state in enumerate(STATES)}
#: The owner of a slot: a conversion's slot is made with every one of these of its owner's granted slot.
_OWNER = ("pid", "thread", "port", "client_pid", "ip")

Entry = Mapping[str, Any]


def request_state(entry: Entry) -> str:
    """The state of a lock entry's request (one of STATES; an unknown slot state as it is)."""
    state = str(entry["state"])
    if state == "deadlock":
        return "refused"
    if state == "waiting" and entry.get("converting"):
        return "converting"
    return state


def resource(entry: Entry) -> tuple[int, int, int, str]:
    """What makes two entries the same resource: value, file and key (values can collide)."""
    return entry["value"], entry["inode"], entry["device"], entry["key"]


def in_queue_order(entries: Iterable[Entry]) -> list[Entry]:
    """One resource's entries as they are shown: by state (STATES' order), then as they queued."""
    return sorted(entries, key=lambda e: (_RANK.get(request_state(e), len(STATES)), e["timestamp"], e["index"]))


def held_mode(entry: Entry, entries: Iterable[Entry]) -> str | None:
    """The mode a conversion's owner holds (a conversion waiting, or refused to break a deadlock): that of its
    granted (or kept) lock among ``entries``, the resource's; None for a request that converts nothing (or
    whose lock has just gone)."""
    if not entry.get("converting") or request_state(entry) not in ("converting", "refused"):
        return None
    owner = [entry.get(field) for field in _OWNER]
    for other in entries:
        if other["state"] in HELD and [other.get(field) for field in _OWNER] == owner:
            return str(other["mode"])
    return None


def block_valid(entries: Iterable[Entry]) -> bool:
    """Whether the resource's value block is valid: every slot of the resource keeps its validity, so one
    marked not valid (a slot caught between two writes of the flag, or a snapshot of an older entry) is
    enough to say not valid."""
    return all(e.get("block_valid", True) for e in entries)


def token(entry: Entry) -> int | None:
    """A held lock's fencing token; None for a request not granted (or an entry of a table without tokens)."""
    value = entry.get("token")
    return int(value) if request_state(entry) in HELD and isinstance(value, int) and value else None


def mode_change(mode: str, held: str | None) -> str:
    """How the text views show a request's mode: a conversion's as the mode held and the mode wanted."""
    return f"{held}->{mode}" if held else mode


def block_word(valid: bool) -> str:
    """How the text views say whether a resource's value block is valid."""
    return "valid" if valid else "not valid"
