"""The chaos run's history checker on hand-made histories: it must catch an overlap and a lost update, and
accept what is no violation (a holder killed before the next entered, a worker killed between "writing"
and "wrote"); and the logs it reads are what the processes wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dls_testkit.chaos import History, Log, Verdict, check, history, read_history
from dls_testkit.chaos.history import (
    BEGIN,
    END,
    ENTER,
    EXIT,
    KILL,
    LOCK_SERVER,
    LOST,
    READ,
    RELEASED,
    STOP,
    WORKER,
    WRITING,
    WROTE,
    Event,
    last_event,
)


def ev(t: float, kind: str, **fields: Any) -> Event:
    return {"t": t, "ev": kind, **fields}


def section(n: int, enter: float, value: int, end: float, rec: int = 0) -> list[Event]:
    """A whole section of record ``rec``: enters at ``enter``, reads ``value``, writes it plus one, exits at
    ``end``."""
    mid = (enter + end) / 2
    return [ev(enter, ENTER, n=n, rec=rec), ev(enter + 0.001, READ, n=n, rec=rec, value=value),
            ev(mid, WRITING, n=n, rec=rec, value=value + 1), ev(mid + 0.001, WROTE, n=n, rec=rec, value=value + 1),
            ev(end, EXIT, n=n, rec=rec), ev(end + 0.001, RELEASED, n=n, rec=rec)]


def opened(n: int, enter: float, value: int, rec: int = 0) -> list[Event]:
    """A section that entered and read ``value``, and nothing more (yet)."""
    return [ev(enter, ENTER, n=n, rec=rec), ev(enter + 0.001, READ, n=n, rec=rec, value=value)]


def killed(worker: str, t: float) -> Event:
    return ev(t, KILL, target=WORKER, worker=worker, pids=[1234], final=False)


def verdict_of(workers: dict[str, list[Event]], final: int, faults: list[Event] | None = None) -> Verdict:
    """The verdict on record 0's history, from 0 at the start to ``final``, in a run of 100 s."""
    return check(History(workers=workers, faults=[ev(0.0, BEGIN), *(faults or []), ev(100.0, END)], initial={0: 0},
                         final={0: final}))


def test_a_clean_history_passes_with_its_figures() -> None:
    verdict = verdict_of({"w0.0": section(1, 1.0, 0, 2.0) + section(2, 3.0, 2, 4.0),
                          "w1.0": section(1, 2.5, 1, 2.9)}, final=3,
                         faults=[ev(5.0, KILL, target=LOCK_SERVER, service=0, pids=[99]),
                                 ev(6.0, STOP, target=WORKER, worker="w1.0", pids=[98])])
    assert verdict.ok, verdict.problems()
    assert (verdict.sections, verdict.completed, verdict.seconds) == (3, 3, 100.0)
    assert verdict.faults == {"kill lock server": 1, "stop worker": 1}
    figures = verdict.figures()
    assert "sections        3 (3 wrote their counter" in figures and "overlaps        0" in figures


def test_an_overlap_is_caught_even_when_the_counter_came_out_right() -> None:
    # w1 enters while w0 still holds, but reads after w0 wrote: only the overlap shows it.
    w0 = section(1, 1.0, 0, 2.0)
    w1 = [ev(1.9, ENTER, n=1, rec=0), ev(1.95, READ, n=1, rec=0, value=1), ev(2.1, WRITING, n=1, rec=0, value=2),
          ev(2.2, WROTE, n=1, rec=0, value=2), ev(2.3, EXIT, n=1, rec=0)]
    verdict = verdict_of({"w0.0": w0, "w1.0": w1}, final=2)
    assert not verdict.ok
    assert [(o.first.worker, o.second.worker) for o in verdict.overlaps] == [("w0.0", "w1.0")]
    assert not verdict.lost_updates
    assert "R0: w1.0 #1 [1.900, 2.300] (exited) entered while w0.0 #1 [1.000, 2.000] (exited) held it" \
        in verdict.problems()


def test_a_lost_update_is_caught() -> None:
    # Two sections one after the other, both read 0: the first one's write was lost.
    verdict = verdict_of({"w0.0": section(1, 1.0, 0, 2.0), "w1.0": section(1, 3.0, 0, 4.0)}, final=1)
    assert not verdict.ok and not verdict.overlaps
    assert [(b.section.worker, b.section.read, sorted(b.expected)) for b in verdict.lost_updates] == [("w1.0", 0, [1])]


def test_two_overlapping_writers_are_an_overlap_and_a_lost_update() -> None:
    verdict = verdict_of({"w0.0": section(1, 1.0, 0, 2.0), "w1.0": section(1, 1.5, 0, 2.5)}, final=1)
    assert len(verdict.overlaps) == 1 and len(verdict.lost_updates) == 1


def test_a_final_value_other_than_the_writes_left_is_caught() -> None:
    verdict = verdict_of({"w0.0": section(1, 1.0, 0, 2.0)}, final=5)
    assert verdict.final == ["R0: the file holds 5 at the end, the writes left [1]"]
    assert not verdict.ok


def test_a_holder_killed_before_the_next_entered_is_no_overlap() -> None:
    verdict = verdict_of({"w0.0": opened(1, 1.0, 0), "w1.0": section(1, 1.6, 0, 2.0)}, final=1,
                         faults=[killed("w0.0", 1.5)])
    assert verdict.ok, verdict.problems()
    assert verdict.killed_holders == 1


def test_a_holder_killed_after_the_next_entered_is_an_overlap() -> None:
    verdict = verdict_of({"w0.0": opened(1, 1.0, 0), "w1.0": section(1, 1.4, 0, 2.0)}, final=1,
                         faults=[killed("w0.0", 1.5)])
    assert [(o.first.worker, o.first.end) for o in verdict.overlaps] == [("w0.0", 1.5)]


def test_a_worker_killed_between_writing_and_wrote_left_either_value() -> None:
    torn = [*opened(1, 1.0, 0), ev(1.2, WRITING, n=1, rec=0, value=1)]
    for read_next in (0, 1):  # the write happened, or not
        verdict = verdict_of({"w0.0": torn, "w1.0": section(1, 2.0, read_next, 3.0)}, final=read_next + 1,
                             faults=[killed("w0.0", 1.3)])
        assert verdict.ok, verdict.problems()
    for final in (0, 1):  # the torn write was the last one
        assert verdict_of({"w0.0": torn}, final=final, faults=[killed("w0.0", 1.3)]).ok
    assert not verdict_of({"w0.0": torn}, final=2, faults=[killed("w0.0", 1.3)]).ok
    # Not killed: a write that never finished makes no sense.
    assert not verdict_of({"w0.0": torn}, final=1).ok


def test_a_lost_lock_ends_the_section_when_told_or_at_the_last_write() -> None:
    # Told at 1.3 by the callback, no write: w1 may enter at 1.4.
    told = [*opened(1, 1.0, 0), ev(1.3, LOST, n=1, rec=0, how="callback"), ev(1.5, LOST, n=1, rec=0, how="ensure_held"),
            ev(1.5, EXIT, n=1, rec=0)]
    verdict = verdict_of({"w0.0": told, "w1.0": section(1, 1.4, 0, 2.0)}, final=1)
    assert verdict.ok, verdict.problems()
    assert verdict.told == {"callback": 1}
    # Told at 1.3, but it wrote at 1.45 all the same: its section lasted until then.
    late = [*opened(1, 1.0, 0), ev(1.3, LOST, n=1, rec=0, how="callback"), ev(1.45, WRITING, n=1, rec=0, value=1),
            ev(1.46, WROTE, n=1, rec=0, value=1), ev(1.5, EXIT, n=1, rec=0)]
    verdict = verdict_of({"w0.0": late, "w1.0": section(1, 1.4, 0, 2.0)}, final=1)
    assert len(verdict.overlaps) == 1


def test_a_loss_told_only_at_release_ends_the_section_at_its_exit() -> None:
    w0 = [*section(1, 1.0, 0, 2.0)[:-1], ev(2.01, LOST, n=1, rec=0, how="release")]
    verdict = verdict_of({"w0.0": w0, "w1.0": section(1, 2.005, 1, 3.0)}, final=2)
    assert verdict.ok, verdict.problems()
    assert verdict.told == {"release": 1}


def test_a_section_that_never_ends_without_a_kill_breaks_the_history() -> None:
    verdict = verdict_of({"w0.0": opened(1, 1.0, 0)}, final=0)
    assert verdict.broken == ["w0.0: section #1 on R0 never ended and its worker was not killed"]


def test_a_late_callback_belongs_to_its_own_section() -> None:
    # The lost-lock callback of section 1 is written after section 2 began: it is section 1's.
    w0 = [*section(1, 1.0, 0, 2.0), *opened(2, 2.1, 1, rec=1), ev(2.2, LOST, n=1, rec=0, how="callback"),
          ev(2.3, EXIT, n=2, rec=1)]
    verdict = check(History(workers={"w0.0": w0}, initial={0: 0, 1: 1}, final={0: 1, 1: 1}))
    assert verdict.ok, verdict.problems()
    assert verdict.told == {"callback": 1}


def test_the_logs_read_back_as_written(tmp_path: Path) -> None:
    worker = Log(tmp_path / "w0.0.jsonl")
    worker.write(ENTER, n=1, rec=0)
    worker.write(READ, n=1, rec=0, value=0)
    worker.close()
    with (tmp_path / "w0.0.jsonl").open("a") as f:
        f.write('{"t": 1.0, "ev": "wri')  # a last line cut short by a kill
    faults = Log(tmp_path / history.FAULTS_LOG)
    faults.write(KILL, target=WORKER, worker="w0.0", pids=[1], final=False)
    faults.close()
    read = read_history(tmp_path, {0: 0}, {0: 0})
    assert [e["ev"] for e in read.workers["w0.0"]] == [ENTER, READ]
    assert read.faults[0]["worker"] == "w0.0" and read.faults[0]["t"] >= read.workers["w0.0"][1]["t"]
    assert last_event(tmp_path / "w0.0.jsonl") == read.workers["w0.0"][-1]
    assert check(read).ok
    assert json.loads((tmp_path / history.FAULTS_LOG).read_text())["ev"] == KILL
