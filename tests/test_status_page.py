"""The live status page in a real browser (issue 15, item 2): ``jdls -i --http`` serves it, headless Chromium
loads it while real processes hold and wait for locks, and the test reads from the DOM what the page shows.

The locks: a client (dls-lock, through its lock server) holds ACCOUNT*B and another waits for it (A waits for
B); a local process holds ACCOUNT*L on the table itself and a client waits for it. The page must list the held
and waiting requests with their owners, draw an edge from each waiter to the owner in its way, list both
records as the hottest, and plot the monitor's samples. The screenshot is the run's artefact:
``$DLS_ARTEFACT_DIR/status-page.png``, else ``<repo>/.artefacts/status-page.png``.

Chromium must really run: without it the test fails, saying how to install it (``./dev setup`` does).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from dls_client.locks import REMOTE_DEVICE
from dls_daemon import meter
from dls_proto import Mode
from dls_shm import LOCAL_IP, Grant, LockTable, Owner, SlotState
from dls_testkit import Service, browser, free_port, make_service, wait_for
from dls_testkit.clients import data_file, lock_holder
from dls_testkit.processes import running

REPO = Path(__file__).resolve().parents[1]
HELD_BY_CLIENT, HELD_LOCALLY = "ACCOUNT*B", "ACCOUNT*L"


class Element:
    """An element of the DOM as Chromium dumped it: its tag, attributes and text (its own and its children's)."""

    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.text = tag, attrs, ""


class Dom(HTMLParser):
    """Every element of a page, in document order, with the ids of the elements it is in (``within``)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[Element, tuple[str, ...]]] = []
        self._open: list[Element] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append((element, tuple(e.attrs["id"] for e in self._open if "id" in e.attrs)))
        if tag not in ("input", "meta", "br", "img", "link"):
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def find(self, tag: str, within: str | None = None, **attrs: str) -> list[Element]:
        """The elements ``tag`` inside the element of id ``within``, with these attributes (data_x: data-x)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e, ids in self.elements if e.tag == tag and (within is None or within in ids)
                and all(e.attrs.get(k) == v for k, v in wanted.items())]


def artefact_dir() -> Path:
    """Where the run's artefacts go: $DLS_ARTEFACT_DIR, else <repo>/.artefacts (made 0755: a screenshot of
    test data, for whoever looks at the run)."""
    path = Path(os.environ.get("DLS_ARTEFACT_DIR") or REPO / ".artefacts")
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    return path


def start_with_http(service: Service, *options: str) -> int:
    """Start ``service`` with ``--http 127.0.0.1:PORT`` and ``options``; PORT, another if the one chosen was
    taken meanwhile (by another test's listener)."""
    for _ in range(5):
        port = free_port()
        try:
            service.start("--http", f"127.0.0.1:{port}", *options)
        except AssertionError as exc:
            if "cannot serve HTTP" not in str(exc):
                raise
            continue
        return port
    raise AssertionError("no free port could be served")


def get(url: str, source: str | None = None) -> tuple[int, bytes]:
    """GET ``url`` (from the address ``source``, if given): the status and the body."""
    host, _, port = url.split("/")[2].partition(":")
    path = "/" + url.split("/", 3)[3]
    with socket.create_connection((host, int(port)), timeout=10,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


@pytest.fixture
def http_service(tmp_path: Path) -> Iterator[tuple[Service, str]]:
    """A service of the test's own with ``--http 127.0.0.1:PORT``, and the page's URL."""
    with make_service(tmp_path).checked() as svc:
        port = start_with_http(svc)
        yield svc, f"http://127.0.0.1:{port}/"


def local_holder(key: int, inode: int, pipes: tuple[Any, Any]) -> int:
    """Child body: a local process of the service's host, holding HELD_LOCALLY on the table itself until told."""
    ready, go = pipes
    table = LockTable.attach(key)
    me = Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP)
    held = table.lock(me, inode, REMOTE_DEVICE, HELD_LOCALLY.encode(), Mode.EX)
    assert isinstance(held, Grant)
    ready.send()
    go.recv(timeout=120)
    table.unlock(held.handle)
    return 0


def owners_by_key(service: Service) -> dict[tuple[str, str], str]:
    """(key, "granted"/"waiting") -> the owner's name as the page names it (pid/thread: the table's owner
    identity without jdls -P), read from the table itself."""
    table = service.table()
    try:
        names = {(e.slot.key[: e.slot.key_len].decode(), SlotState(e.slot.state).name.lower()):
                 f"{e.slot.pid}/{e.slot.thread}" for e in table.scan()}
    finally:
        table.close()
    return names


def test_the_page_shows_the_locks_the_waits_the_hottest_records_and_the_plots_in_chromium(
    http_service: tuple[Service, str], tmp_path: Path, children: Any, pipes: Any,
) -> None:
    browser.command()  # a clear failure, not a skip, when there is no Chromium
    service, url = http_service
    data = data_file(tmp_path)
    # A wait that ends, for the metrics' wait-time histogram.
    first = lock_holder(service, data, tmp_path / "first", key="ACCOUNT*W")
    with running(first):
        waited = service.dls_lock_popen(str(data), "ACCOUNT*W", "true")
        with running(waited):
            wait_for(lambda: ("ACCOUNT*W", "waiting") in owners_by_key(service), 15, "a request waiting")
            first.terminate()  # its sleep ends: the lock goes to the waiter
            assert waited.wait(timeout=15) == 0
    ready, go = pipes(), pipes()
    local = children.fork(lambda: local_holder(service.key, data.stat().st_ino, (ready, go)))
    ready.recv(timeout=10)
    holder = lock_holder(service, data, tmp_path / "held", key=HELD_BY_CLIENT, seconds=120)
    waiters = [service.dls_lock_popen(str(data), key, "true") for key in (HELD_BY_CLIENT, HELD_LOCALLY)]
    try:
        with running(holder, *waiters):
            def both_waiting() -> bool:
                owners = owners_by_key(service)
                return all((key, "waiting") in owners for key in (HELD_BY_CLIENT, HELD_LOCALLY))

            wait_for(both_waiting, 15, "both clients waiting")
            owners = owners_by_key(service)
            # The monitor samples every few seconds: the plots need two samples with the waits in them.
            def sampled() -> bool:
                history = get_json(url + "api/history")
                return (sum(s["waiting"] == 2 for s in history["samples"]) >= 2
                        and sum(history["wait_histogram"]["counts"]) >= 1)

            wait_for(sampled, 30, "two samples of the history with both waits, and the ended wait counted")

            dom = Dom(browser.dump_dom(url))
            shot = browser.screenshot(url, artefact_dir() / "status-page.png")
            filtered = Dom(browser.dump_dom(url + "?filter=" + HELD_LOCALLY.replace("*", "%2A")))
    finally:
        go.send()
        assert children.wait(local) == 0

    # The locks now: each record's holder and waiter, with their owners.
    rows = dom.find("tr", "locks")
    seen = {(r.attrs.get("data-key"), r.attrs.get("data-state"), r.attrs.get("data-owner")) for r in rows}
    for key in (HELD_BY_CLIENT, HELD_LOCALLY):
        for state in ("granted", "waiting"):
            assert (key, state, owners[key, state]) in seen, (key, state, seen)
    assert owners[HELD_LOCALLY, "granted"] == f"{local}/1"
    [local_row] = dom.find("tr", "locks", data_key=HELD_LOCALLY, data_state="granted")
    assert f"local pid {local}" in local_row.text
    [client_row] = dom.find("tr", "locks", data_key=HELD_BY_CLIENT, data_state="granted")
    assert "127.0.0.1 port" in client_row.text and str(data) in client_row.text

    # Who waits for whom: an arrow from each waiter to the owner in its way, and no cycle.
    edges = {(e.attrs["data-from"], e.attrs["data-to"]) for e in dom.find("path", "graph", **{"class": "edge"})}
    assert edges == {(owners[k, "waiting"], owners[k, "granted"]) for k in (HELD_BY_CLIENT, HELD_LOCALLY)}
    nodes = {n.attrs["data-node"] for n in dom.find("g", "graph")}
    assert nodes == {owner for owner in owners.values()}
    assert all(n.attrs["data-cycle"] == "no" for n in dom.find("g", "graph"))

    # The hottest records: both, two requests each, now; and both waited on over the hour.
    assert {li.attrs.get("data-key") for li in dom.find("li", "hot-now")} == {HELD_BY_CLIENT, HELD_LOCALLY}
    assert all("2 requests" in li.text and str(data) in li.text for li in dom.find("li", "hot-now"))
    assert {li.attrs.get("data-key") for li in dom.find("li", "hot-hour")} == {HELD_BY_CLIENT, HELD_LOCALLY}

    # The plots, with their points.
    for plot, series in (("plot-rate", "rate"), ("plot-wait", "wait_max"), ("plot-wait", "wait_mean")):
        [line] = dom.find("polyline", plot, data_series=series)
        least = 1 if series == "rate" else 2  # a rate needs two samples
        assert int(line.attrs["data-points"]) >= least, (plot, series, line.attrs)
        assert len(dom.find("circle", plot, data_series=series)) == int(line.attrs["data-points"])

    # The metrics' wait-time histogram: a bar for each bucket, the wait that ended in one.
    bars = dom.find("rect", "wait-histogram")
    counts = [float(b.attrs["data-count"]) for b in bars]
    assert len(counts) == len(meter.BUCKETS) + 1 and sum(counts) >= 1, counts

    # The filter box (given in the link) keeps only the matching rows.
    assert {r.attrs["data-key"] for r in filtered.find("tr", "locks") if "data-key" in r.attrs} == {HELD_LOCALLY}

    width, height = browser.png_size(shot)
    assert (width, height) == browser.WINDOW and shot.stat().st_size > 20_000, (width, height, shot.stat())


def test_an_address_outside_admin_allow_gets_no_lock_information(tmp_path: Path) -> None:
    """--admin-allow 127.0.0.1/32: the page and its data are refused to 127.0.0.2 (another address of this
    host) and given to 127.0.0.1, while a lock is held."""
    with make_service(tmp_path).checked() as service:
        port = start_with_http(service, "--admin-allow", "127.0.0.1/32")
        data = data_file(tmp_path)
        holder = lock_holder(service, data, tmp_path / "held", key=HELD_BY_CLIENT)
        with running(holder):
            for path in ("/", "/api/locks", "/api/history"):
                status, body = get(f"http://127.0.0.1:{port}{path}", source="127.0.0.2")
                assert status in (403, 404), (path, status, body[:200])
                assert HELD_BY_CLIENT.encode() not in body and b"requests" not in body and b"samples" not in body
            status, body = get(f"http://127.0.0.1:{port}/api/locks", source="127.0.0.1")
            assert status == 200 and HELD_BY_CLIENT in {r["key"] for r in json.loads(body)["requests"]}
            status, body = get(f"http://127.0.0.1:{port}/", source="127.0.0.1")
            assert status == 200 and b"api/locks" in body
