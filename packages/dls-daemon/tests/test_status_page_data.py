"""The status page's figures from plain data (issue 15): the history's lock rate and contended records, the
hottest records now, and the page itself in the package."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from dls_daemon import status_page, web
from dls_daemon.status_page import History, Sample
from dls_proto import Mode
from dls_shm import LOCAL_IP, Entry, Grant, Instance, Owner, Slot, SlotState, geometry_for
from dls_testkit import free_key, own_table


def test_the_history_gives_the_rate_between_samples_and_counts_the_samples_a_record_waited_in() -> None:
    history = History(period=5.0, span=15.0)
    waited = (1, 2, "K1")
    for n, (grants, contended) in enumerate([(10, ()), (60, (waited,)), (60, (waited,)), (160, ()), (170, ())]):
        history.samples.append(Sample(1000.0 + 5 * n, grants, 1, len(contended), 2.0, 1.0, contended))
    document = history.document()
    assert len(document["samples"]) == 4  # the ring keeps the last span: 15 s at 5 s, and the one before
    assert [p["rate"] for p in document["samples"]] == [None, 0.0, 20.0, 2.0]
    assert document["contended"] == [{"inode": 1, "device": 2, "key": "K1", "samples": 2}]


def test_the_wait_histogram_counts_the_waits_that_ended_within_the_samples() -> None:
    history = History()
    for n, waits in enumerate([(1.0, 0.0, 5.0), (3.0, 1.0, 9.0)]):
        history.samples.append(Sample(1000.0 + n, 0, 0, 0, 0.0, 0.0, (), waits))
    assert status_page.wait_histogram(tuple(history.samples))["counts"] == [2.0, 1.0, 4.0]
    assert status_page.wait_histogram(())["counts"] == []


def test_a_sample_is_due_once_a_period() -> None:
    history = History(period=5.0)
    assert history.due(100.0) and not history.due(104.0) and history.due(105.0)


def test_the_hottest_now_counts_requests_not_refused_most_first() -> None:
    def entry(key: bytes, state: SlotState, inode: int = 7) -> Entry:
        return Entry(0, 0, 1, Slot(1, state, 5, 0, len(key), 0, 1, 0, 1, LOCAL_IP, 1, inode, 3, 0.0, 0, key, 0, 0, b""))

    entries = [entry(b"A", SlotState.GRANTED), entry(b"B", SlotState.GRANTED), entry(b"B", SlotState.WAITING),
               entry(b"B", SlotState.WAITING), entry(b"A", SlotState.DEADLOCK), entry(b"C", SlotState.GRANTED, 8)]
    hottest = status_page.Hottest()
    for e in entries:
        hottest.add(e)
    assert hottest.top([{"inode": 7, "device": 3, "filename": "inode 00000007"},
                        {"inode": 7, "device": 3, "filename": "f"}]) == [
        {"filename": "f", "key": "B", "requests": 3, "waiting": 2},
        {"filename": "f", "key": "A", "requests": 1, "waiting": 0},
        {"filename": "inode 00000008", "key": "C", "requests": 1, "waiting": 0},
    ]


def test_the_page_is_in_the_package_and_fetches_nothing_from_elsewhere() -> None:
    page = web.status_page({}).body.decode()
    assert page.startswith("<!DOCTYPE html>") and "api/locks" in page and "api/history" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_the_locks_document_lists_at_most_max_requests_in_whole_groups_and_counts_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table of more requests than MAX_REQUESTS: the page gets the first groups' (never half a group: a
    resource's queue is in one group), ``total`` all of them, and the hottest records count them all."""
    monkeypatch.setattr(status_page, "MAX_REQUESTS", 3)
    with own_table(free_key(tmp_path), geometry_for(1000, 10)) as table:
        me = Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP)
        for n in range(40):
            assert isinstance(table.lock(me, 5, 6, f"K{n}".encode(), Mode.EX), Grant)
        group_of = {e.value: e.group for e in table.scan()}
        document = status_page.locks_document(table, Instance.from_environment(tmp_path / "release"))
    per_group = Counter(group_of.values())
    listed = Counter(group_of[r["value"]] for r in document["requests"])
    assert document["total"] == 40 and 0 < len(document["requests"]) <= 3
    assert all(per_group[g] == n for g, n in listed.items())  # whole groups
    assert len(document["hottest"]) == status_page.HOTTEST  # counted beyond the requests listed


def test_the_graph_draws_a_cycle_of_waiters_in_red(tmp_path: Path) -> None:
    """Two owners (threads 1 and 2 of this process), each holding what the other asks for: the graph has both
    edges and both nodes marked as a cycle (which the monitor, not running here, would break at once)."""
    with own_table(free_key(tmp_path), geometry_for(1000, 10)) as table:
        a, b = (Owner(os.getpid(), thread, 0, os.getpid(), LOCAL_IP) for thread in (1, 2))
        bell = table.doorbell()
        try:
            held = [table.lock(a, 5, 6, b"ONE", Mode.EX), table.lock(b, 5, 6, b"TWO", Mode.EX)]
            asked = [table.lock(a, 5, 6, b"TWO", Mode.EX, wait_token=bell.token),
                     table.lock(b, 5, 6, b"ONE", Mode.EX, wait_token=bell.token)]
            assert all(isinstance(h, Grant) for h in held) and not any(isinstance(q, Grant) for q in asked)
            graph = status_page.wait_graph(table, table.waiting_entries())
        finally:
            bell.close()
    one, two = f"{os.getpid()}/1", f"{os.getpid()}/2"
    assert {(e["from"], e["to"], e["cycle"]) for e in graph["edges"]} == {(one, two, True), (two, one, True)}
    assert {(n["id"], n["cycle"]) for n in graph["nodes"]} == {(one, True), (two, True)}
