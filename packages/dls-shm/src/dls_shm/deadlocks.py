"""Deadlocks: the cycles of the lock table's wait-for graph, and the one request each of them refuses.

A waiting request waits for the owners of the locks and of the requests ahead of it that it cannot go with
(the table's rule, ``blockers``: conversions first, then the wait queue, FIFO). Owners are the table's
identities, (pid, thread) or, with jdls -P, (port, thread, address): a local process's thread and a remote
client's thread through its lock server are owners alike, so a cycle is found across them, through
conversions and across resources. A cycle never resolves by itself: nobody in it can go on until one of its
requests is refused.

The victim of a cycle is the request in it that joined the queue last (the newest ``timestamp``; the higher
ticket between two of the same moment): it closed the cycle, the others were there before it; one refusal
breaks it, and the rest of the cycle goes on. A request of a client that does not know DEADLOCK (protocol
version 2 or 3: SlotFlag.LEGACY) is chosen only when every member of the cycle is one. The owner of a
refused conversion keeps its lock in its old mode. This module only reads: ``LockTable.break_deadlocks``
finds the cycles in a copy of the table and refuses each victim after checking, with the semaphores of
every group involved held, that its cycle is still there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from . import modes
from .layout import Slot, SlotFlag, SlotState

_CONVERTING = int(SlotFlag.CONVERTING)
_LEGACY = int(SlotFlag.LEGACY)
_GRANTED, _WAITING, _KEPT = int(SlotState.GRANTED), int(SlotState.WAITING), int(SlotState.KEPT)

Item = tuple[int, Slot]
Owner = tuple[Any, ...]


def blockers(ident: Callable[[Slot], Owner], me: Owner, mode: int, ticket: int | None,
             granted: list[Item], waiting: list[Item]) -> Iterator[Item]:
    """Every lock or queued request that keeps a request of owner ``me`` for ``mode`` (queued under ``ticket``;
    None: not yet) from being granted, granted locks first: a granted (or kept) lock of another owner it cannot
    go with, and the requests ahead of it in queue order that it cannot go with. A conversion (``me`` holds
    the resource) is behind the conversions queued before it only; any other request is behind every conversion
    and the requests queued before it. ``waiting`` is in queue order (conversions first, then by ticket)."""
    for item in granted:
        slot = item[1]
        if (slot.state == _KEPT or ident(slot) != me) and not modes.compatible(mode, slot.mode):
            yield item
    converting = any(s.state == _GRANTED and ident(s) == me for _, s in granted)
    for item in waiting:
        slot = item[1]
        if slot.flags & _CONVERTING:
            if converting and ticket is not None and slot.ticket >= ticket:
                return
            if slot.ticket == ticket:
                continue
        elif converting or (ticket is not None and slot.ticket >= ticket):
            return
        if not modes.compatible(mode, slot.mode):
            yield item


class Waiter(NamedTuple):
    """A waiting request in the graph: its slot's index (``at``) and slot, its resource (group, value), its owner."""

    at: int
    slot: Slot
    group: int
    value: int
    owner: Owner


class Cycle(NamedTuple):
    """A cycle of waiting requests, each waiting for the next one's owner (the last for the first's)."""

    waiters: tuple[Waiter, ...]

    @property
    def victim(self) -> Waiter:
        """The request that joined the cycle last: queued last (timestamp, then ticket); of the requests whose
        clients know DEADLOCK when there are some (a client of an older protocol was promised "exactly as
        before": it is refused only when every member of the cycle is such a client)."""
        return max(self.waiters, key=lambda w: (not w.slot.flags & _LEGACY, w.slot.timestamp, w.slot.ticket))


def resource_of(group: int, value: int, slot: Slot) -> tuple[int, int, int, int, bytes]:
    return group, value, slot.inode, slot.device, slot.key[: slot.key_len]


def queues(entries: Iterable[tuple[int, int, int, Slot]]) -> dict[tuple[int, int, int, int, bytes],
                                                                  tuple[list[Item], list[Item]]]:
    """Each resource's granted (and kept) locks and waiting requests in queue order, from (index, group, value,
    slot) entries; refused requests (DEADLOCK) are in nobody's way and left out, as the table leaves them."""
    found: dict[tuple[int, int, int, int, bytes], tuple[list[Item], list[Item]]] = {}
    for index, group, value, slot in entries:
        if slot.state not in (_GRANTED, _WAITING, _KEPT):
            continue
        granted, waiting = found.setdefault(resource_of(group, value, slot), ([], []))
        (waiting if slot.state == _WAITING else granted).append((index, slot))
    for _granted, waiting in found.values():
        waiting.sort(key=lambda item: (not item[1].flags & _CONVERTING, item[1].ticket))
    return found


def wait_for(entries: Iterable[tuple[int, int, int, Slot]],
             ident: Callable[[Slot], Owner]) -> list[tuple[Waiter, frozenset[Owner]]]:
    """Every waiting request with the owners it waits for (edges of the graph; a kept lock's owner, nobody,
    never waits, so no cycle passes through it)."""
    edges = []
    for (group, value, *_), (granted, waiting) in queues(entries).items():
        for index, slot in waiting:
            me = ident(slot)
            owners = frozenset(ident(b) for _, b in blockers(ident, me, slot.mode, slot.ticket, granted, waiting)
                               if b.state != _KEPT) - {me}
            if owners:
                edges.append((Waiter(index, slot, group, value, me), owners))
    return edges


def cycles(edges: list[tuple[Waiter, frozenset[Owner]]]) -> list[Cycle]:
    """Cycles of the graph, one victim each: a cycle is found, its victim's request taken out of the graph,
    and the search goes on until none is left (a request in two cycles may break both)."""
    out: dict[Owner, list[tuple[Waiter, frozenset[Owner]]]] = {}
    for waiter, owners in edges:
        out.setdefault(waiter.owner, []).append((waiter, owners))
    found = []
    while (cycle := _one_cycle(out)) is not None:
        found.append(cycle)
        victim = cycle.victim
        out[victim.owner] = [(w, o) for w, o in out[victim.owner] if w.at != victim.at]
    return found


def _one_cycle(out: dict[Owner, list[tuple[Waiter, frozenset[Owner]]]]) -> Cycle | None:
    """A cycle of the graph ``out`` (owner -> its waiting requests and whom each waits for), or None: an
    iterative depth-first search that follows the path it is on."""
    done: set[Owner] = set()
    for start in list(out):
        if start in done:
            continue
        path: list[Waiter] = []
        on_path: dict[Owner, int] = {start: 0}
        stack: list[Iterator[tuple[Waiter, Owner]]] = [_steps(out, start)]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
                owner = next(o for o, at in on_path.items() if at == len(stack))
                del on_path[owner]
                done.add(owner)
                if path:
                    path.pop()
                continue
            waiter, to = step
            if to in on_path:
                return Cycle((*path[on_path[to]:], waiter))
            if to in done or to not in out:
                continue
            path.append(waiter)
            on_path[to] = len(stack)
            stack.append(_steps(out, to))
    return None


def _steps(out: dict[Owner, list[tuple[Waiter, frozenset[Owner]]]], owner: Owner) -> Iterator[tuple[Waiter, Owner]]:
    for waiter, owners in out.get(owner, ()):
        for to in owners:
            yield waiter, to
