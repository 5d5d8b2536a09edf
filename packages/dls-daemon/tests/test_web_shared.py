"""The HTTP server's shared answers (``web._Shared``): one computation at a time per route and query, given
again while fresh, so that a crowd of clients costs the monitor one computation, not one each."""

from __future__ import annotations

import threading
import time

from dls_daemon import web


def test_a_crowd_gets_one_computation_and_a_later_request_a_new_one() -> None:
    calls: list[float] = []

    def slow(query: web.Query) -> web.Reply:
        calls.append(time.monotonic())
        time.sleep(0.2)
        return web.text(200, f"answer {len(calls)}")

    shared = web._Shared(slow)
    answers: list[web.Reply] = []
    crowd = [threading.Thread(target=lambda: answers.append(shared({}))) for _ in range(20)]
    for t in crowd:
        t.start()
    for t in crowd:
        t.join(10)
    assert len(calls) == 1 and {a.body for a in answers} == {b"answer 1\n"} and len(answers) == 20
    assert shared({"filter": ["X"]}).body == b"answer 2\n"  # another query: its own answer
    time.sleep(web.FRESH + 0.5)  # fresh for FRESH, or twice what it took if longer
    assert shared({}).body == b"answer 3\n"
