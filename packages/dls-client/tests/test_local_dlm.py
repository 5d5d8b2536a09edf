"""Issue 14 through LocalClient: conversions and the convert queue, value blocks with VALNOTVALID, fencing
tokens, cancel, deadlock victims, and what OS file locks cannot do.

Each test has a lock table of its own (``own_table``, removed after it, nothing left under its key) and real
processes: ``Actor`` is another process's LocalClient, doing what the test tells it one request at a time and
answering each when it returns (so a request that waits is seen not answering), killed at will.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dls_client
import dls_shm
import pytest
from dls_client import (
    Cancel,
    Cancelled,
    Deadlock,
    InvalidRequest,
    LocalClient,
    LockRefused,
    LockTimeout,
    Mode,
    NotWritable,
    Unsupported,
)
from dls_shm import LockTable, SlotFlag, SlotState, geometry_for, modes
from dls_testkit import KEY, free_key, own_table, readme, wait_for
from dls_testkit.tokens import contended_run_with_a_kill

#: The other process: a LocalClient of the table (or of OS file locks, "os") taking requests as JSON lines.
ACTOR = textwrap.dedent("""
    import json, sys, time
    from dls_client import DlsError, LocalClient, Mode
    key, data, record = sys.argv[1:4]
    client = LocalClient() if key == "os" else LocalClient(int(key))
    held = None
    print(json.dumps({"ready": client.mechanism}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if "mode" in request:
            request["mode"] = Mode[request["mode"]]
        if "value_block" in request and op != "lock":
            request["value_block"] = bytes.fromhex(request["value_block"])
        try:
            if op == "lock":
                held = client.lock(data, record, **request)
            elif op == "convert":
                held.convert(**request)
            elif op == "release":
                held.release(**request)
            reply = {"ok": True}
        except DlsError as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        reply["t"] = time.monotonic()
        if held is not None:
            block = held.value_block
            reply.update(mode=Mode(held.mode).name, token=held.token, valid=held.value_block_valid,
                         block=None if block is None else block.hex())
        print(json.dumps(reply), flush=True)
""")


class Actor:
    """Another process locking ``data``'s record KEY through its own LocalClient, one request at a time."""

    def __init__(self, key: int | str, data: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ACTOR, str(key), str(data), KEY], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.reply()
        assert "ready" in ready, ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))

    def send(self, op: str, **request: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 10) -> dict[str, Any]:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"actor {self.pid} did not answer in {timeout} s") from None

    def silent(self, during: float = 0.3) -> bool:
        """Whether the actor answers nothing for ``during`` seconds (its request still waits)."""
        time.sleep(during)
        return self._replies.empty()

    def do(self, op: str, **request: Any) -> dict[str, Any]:
        """Send a request and return its answer, which must be a success."""
        self.send(op, **request)
        reply = self.reply()
        assert reply.get("ok"), reply
        return reply

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def table(tmp_path: Path) -> Iterator[LockTable]:
    with own_table(free_key(tmp_path), geometry_for(100, 10)) as made:
        yield made


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "FBNK.ACCOUNT"
    path.touch()
    return path


@pytest.fixture
def client(table: LockTable) -> Iterator[LocalClient]:
    with LocalClient(table.key) as made:
        yield made


@pytest.fixture
def actors(table: LockTable, data: Path) -> Iterator[Callable[[], Actor]]:
    """``actors()``: a new Actor in the test's table; all closed (or killed) at the end."""
    made: list[Actor] = []

    def make() -> Actor:
        made.append(Actor(table.key, data))
        return made[-1]

    try:
        yield make
    finally:
        for actor in made:
            actor.close()


def slots(table: LockTable) -> list[dls_shm.Slot]:
    return [entry.slot for entry in table.scan()]


def waiting(table: LockTable, pid: int | None = None) -> list[dls_shm.Slot]:
    return [s for s in slots(table) if s.state == SlotState.WAITING and pid in (None, s.pid)]


# -- conversions ------------------------------------------------------------------------------------------


def test_a_conversion_up_waits_in_the_convert_queue_ahead_of_a_newer_waiter(
    table: LockTable, actors: Callable[[], Actor],
) -> None:
    converter, other, newer = actors(), actors(), actors()
    converter.do("lock", mode="PR")
    other.do("lock", mode="PR")
    converter.send("convert", mode="EX")
    wait_for(lambda: waiting(table, converter.pid), 5, "the conversion to wait")
    assert waiting(table, converter.pid)[0].flags & SlotFlag.CONVERTING
    newer.send("lock", mode="EX")
    wait_for(lambda: waiting(table, newer.pid), 5, "the newer EX request to wait")
    assert converter.silent() and newer.silent(0)
    other.do("release")
    converted = converter.reply()
    assert converted["ok"] and converted["mode"] == "EX", converted
    assert newer.silent(), "the EX waiter was let in before the conversion"
    converter.do("release")
    granted = newer.reply()
    assert granted["ok"] and granted["mode"] == "EX" and granted["t"] > converted["t"]
    assert granted["token"] > converted["token"]


def test_a_conversion_down_is_granted_at_once_and_lets_in_the_waiters_it_no_longer_blocks(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    held = client.lock(data, KEY, Mode.EX)
    readers, writer = [actors(), actors()], actors()
    for n, (actor, mode) in enumerate([(readers[0], "PR"), (readers[1], "PR"), (writer, "EX")], 1):
        actor.send("lock", mode=mode)  # queued in this order: a reader behind the writer would stay behind it

        def queued(count: int = n) -> bool:
            return len(waiting(table)) == count

        wait_for(queued, 5, f"{n} requests to wait")
    token = held.token
    started = time.monotonic()
    held.convert(Mode.PR, wait=False)  # granted at once, waiters or not
    assert time.monotonic() - started < 0.1
    assert held.mode == Mode.PR and held.token == token  # a conversion down keeps the token
    for reader in readers:
        assert reader.reply()["mode"] == "PR"
    assert writer.silent()
    for reader in readers:
        reader.do("release")
    held.release()
    assert writer.reply()["mode"] == "EX"


def test_a_conversion_up_not_granted_at_once_leaves_the_lock_in_its_old_mode(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    other = actors()
    other.do("lock", mode="PR")
    held = client.lock(data, KEY, Mode.PR)
    token = held.token
    with pytest.raises(LockRefused) as refused:
        held.convert(Mode.EX, wait=False)
    assert refused.value.holder.client_pid == other.pid and type(refused.value) is LockRefused
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        held.convert(Mode.EX, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert held.mode == Mode.PR and held.token == token
    assert not waiting(table) and {(s.pid, s.mode) for s in slots(table)} == {(os.getpid(), Mode.PR),
                                                                                (other.pid, Mode.PR)}
    other.do("release")
    held.convert(Mode.EX, wait=False)
    assert held.mode == Mode.EX and held.token > token
    held.release()
    assert not slots(table)


@pytest.mark.parametrize("requested", list(Mode), ids=lambda m: m.name)
@pytest.mark.parametrize("holding", list(Mode), ids=lambda m: f"held-{m.name}")
def test_every_mode_pair(holding: Mode, requested: Mode, client: LocalClient, data: Path,
                         actors: Callable[[], Actor]) -> None:
    """One process holds ``holding``, another asks ``requested`` without waiting: granted exactly when the
    compatibility matrix says (every ordered pair, so both orders of each)."""
    holder = actors()
    holder.do("lock", mode=holding.name)
    if modes.compatible(requested, holding):
        with client.try_lock(data, KEY, requested) as held:
            assert held.mode == requested
    else:
        with pytest.raises(LockRefused) as refused:
            client.try_lock(data, KEY, requested)
        assert refused.value.holder.client_pid == holder.pid and refused.value.holder.mode == holding


# -- value blocks ---------------------------------------------------------------------------------------


def test_a_value_block_written_under_ex_is_read_by_another_process_and_not_valid_after_a_killed_writer(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    keeper, writer = actors(), actors()
    keeper.do("lock", mode="NL")  # the block lives as long as a lock of the resource does
    taken = writer.do("lock", mode="EX", value_block=True)
    assert taken["block"] == "00" * table.block_size and taken["valid"]
    writer.do("release", value_block=b"balance=100".hex())

    def read() -> tuple[bytes | None, bool]:
        with client.lock(data, KEY, Mode.PR, value_block=True, timeout=10) as held:
            return held.value_block, held.value_block_valid

    assert read() == (b"balance=100".ljust(table.block_size, b"\0"), True)
    writer.do("lock", mode="EX")
    writer.kill()  # mid-hold, after it wrote a value on an earlier release
    assert read() == (b"balance=100".ljust(table.block_size, b"\0"), False)
    assert read()[1] is False  # not valid until someone writes
    with client.lock(data, KEY, Mode.EX, value_block=True) as held:
        assert held.value_block_valid is False
        held.release(value_block=b"balance=90")
    assert read() == (b"balance=90".ljust(table.block_size, b"\0"), True)
    with client.lock(data, KEY, Mode.PW) as held:
        held.release(invalidate=True)  # what the block says may be half done
    assert read() == (b"balance=90".ljust(table.block_size, b"\0"), False)


def test_a_value_block_is_written_at_a_conversion_down_and_read_at_a_conversion(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    reader = actors()
    reader.do("lock", mode="NL", value_block=True)
    held = client.lock(data, KEY, Mode.EX)
    held.convert(Mode.PR, value_block=b"v1")
    converted = reader.do("convert", mode="PR")
    assert bytes.fromhex(converted["block"]).rstrip(b"\0") == b"v1" and converted["valid"]
    assert held.value_block is None  # not asked for at the lock


def test_only_pw_and_ex_write_the_value_block_and_nothing_is_done_otherwise(
    table: LockTable, client: LocalClient, data: Path,
) -> None:
    held = client.lock(data, KEY, Mode.PR)
    with pytest.raises(NotWritable, match="only a PW or EX holder"):
        held.release(value_block=b"x")
    with pytest.raises(NotWritable):
        held.convert(Mode.NL, invalidate=True)
    assert not held.released and held.mode == Mode.PR and client.status(data, KEY)[0] == 1
    held.convert(Mode.EX)
    with pytest.raises(InvalidRequest, match=f"this lock table's are {table.block_size} bytes"):
        held.release(value_block=b"x" * (table.block_size + 1))
    assert not held.released and client.status(data, KEY)[0] == 1
    held.release(value_block=b"x" * table.block_size)
    assert client.status(data, KEY) == (0, None)


# -- fencing tokens -------------------------------------------------------------------------------------

#: A contender: takes PW, records (token, time), converts up to EX (a new token), records again, releases;
#: at its iteration HANG it keeps PW until killed.
CONTENDER = textwrap.dedent("""
    import sys, time
    from dls_client import LocalClient, Mode
    key, data, record, out, rounds, hang = sys.argv[1:7]
    client = LocalClient(int(key))
    with open(out, "a") as f:
        for i in range(int(rounds)):
            held = client.lock(data, record, Mode.PW, timeout=30)
            f.write(f"{held.token} {time.monotonic_ns()}\\n"); f.flush()
            if i == int(hang):
                time.sleep(3600)
            held.convert(Mode.EX)
            f.write(f"{held.token} {time.monotonic_ns()}\\n"); f.flush()
            held.release()
""")


def test_fencing_tokens_strictly_increase_across_a_contended_run_with_a_kill(
    table: LockTable, data: Path, tmp_path: Path,
) -> None:
    rounds, hang = 40, 5
    outs = [tmp_path / f"contender-{n}" for n in range(4)]
    contended_run_with_a_kill(lambda out, hang_at: subprocess.Popen(
        [sys.executable, "-c", CONTENDER, str(table.key), str(data), KEY, str(out), str(rounds), str(hang_at)]),
        outs, rounds, hang)


def test_a_lock_without_a_table_has_token_0_and_cannot_convert_or_keep_value_blocks(
    local_env: Path, data: Path, tmp_path: Path,
) -> None:
    """OS file locks (a service run with -ibD, or none on this host): Unsupported, saying so, nothing done."""
    with LocalClient() as local:
        assert local.mechanism == "oslocks"
        with pytest.raises(Unsupported, match="OS file locks"):
            local.lock(data, KEY, value_block=True)
        assert local.status(data, KEY) == (0, None)
        held = local.lock(data, KEY, Mode.EX)
        assert held.token == 0 and held.value_block is None
        with pytest.raises(Unsupported, match="OS file locks"):
            held.convert(Mode.PR)
        with pytest.raises(Unsupported, match="OS file locks"):
            held.release(value_block=b"x")
        assert held.mode == Mode.EX and not held.released and local.status(data, KEY)[0] == 1
        # cancel needs no table: another process's OS lock in the way
        other = Actor("os", data)
        try:
            held.release()
            other.do("lock", mode="EX")
            cancel = Cancel()
            threading.Timer(0.2, cancel).start()
            with pytest.raises(Cancelled):
                local.lock(data, KEY, timeout=10, cancel=cancel)
        finally:
            other.close()


def test_a_blocking_notice_reaches_its_holder_within_100_ms_on_a_thread_of_its_own(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    """The holder is told (once) that its lock blocks another process's request, with the mode wanted, on the
    notices' own thread while the application's threads go on; it converts down to NL and the other gets in.
    The time from the request's queueing (its slot's timestamp) to the callback: the best of three rounds
    under 100 ms (one round on a machine busy with other work may be slower)."""
    told: queue.Queue[tuple[Any, int, str, float]] = queue.Queue()

    def on_blocking(held: Any, mode: int) -> None:
        told.put((held, mode, threading.current_thread().name, time.time()))
        time.sleep(0.5)  # a slow callback stalls nobody else

    held = client.lock(data, KEY, mode=Mode.PW, on_blocking=on_blocking)
    other = actors()
    latencies = []
    for _ in range(3):
        other.send("lock", mode="EX", timeout=30)
        notice, mode, thread, when = told.get(timeout=5)
        assert (notice, mode) == (held, Mode.EX) and thread != threading.current_thread().name
        [queued] = [s for s in slots(table) if s.state == SlotState.WAITING]
        latencies.append(when - queued.timestamp)
        started = time.monotonic()
        with client.lock(data, "OTHER", mode=Mode.EX):  # the application's thread is not held up by the callback
            pass
        assert time.monotonic() - started < 0.3
        assert other.silent(0.2)
        held.convert(Mode.NL)
        assert other.reply(5).get("ok")
        other.do("release")
        held.convert(Mode.PW)  # nobody waits now: the next request is told of again
    assert min(latencies) < 0.1, latencies
    assert told.empty(), "told once a round"
    held.release()

def test_blocking_notices_need_the_lock_table(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JBCRELEASEDIR", str(tmp_path / "none"))
    monkeypatch.setenv("JDLS_LOCK_DIR", str(tmp_path / "locks"))
    with LocalClient() as local:
        assert local.mechanism == "oslocks"
        with pytest.raises(Unsupported, match="OS file locks"):
            local.lock(data, KEY, on_blocking=lambda held, mode: None)
        assert local.status(data, KEY) == (0, None)


# -- cancel ---------------------------------------------------------------------------------------------


def test_cancel_from_another_thread_withdraws_a_waiting_lock_at_once(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    holder = actors()
    holder.do("lock", mode="EX")
    cancel = Cancel()
    cancelled_at: list[float] = []

    def cancel_it() -> None:
        cancelled_at.append(time.monotonic())
        cancel()

    with pytest.raises(Cancelled, match="cancelled by its Cancel"):
        client.lock(data, KEY, Mode.PR, cancel=cancel, on_wait=lambda _: threading.Timer(0.2, cancel_it).start())
    assert time.monotonic() - cancelled_at[0] < 0.1
    assert [s.pid for s in slots(table)] == [holder.pid]  # no slot of this process left
    cancel()  # again: nothing more
    with pytest.raises(Cancelled):  # a Cancel once called withdraws a request as soon as it would wait
        client.lock(data, KEY, Mode.PR, timeout=10, cancel=cancel)
    holder.do("release")
    with client.lock(data, KEY, Mode.PR, cancel=cancel) as held:  # granted at once: not withdrawn
        assert held.mode == Mode.PR


def test_a_grant_that_won_the_race_with_cancel_stays_granted(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    holder = actors()
    holder.do("lock", mode="EX")
    cancel = Cancel()
    waits = threading.Event()
    result: list[object] = []

    def wait() -> None:
        try:
            result.append(client.lock(data, KEY, timeout=10, cancel=cancel, on_wait=lambda _: waits.set()))
        except Cancelled as exc:
            result.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert waits.wait(5)
    holder.do("release")
    wait_for(lambda: result, 5, "the waiter to be granted")
    cancel()  # too late: the lock was granted and returned
    waiter.join(5)
    held = result[0]
    assert isinstance(held, dls_client.HeldLock) and not held.released
    assert [(s.pid, s.state) for s in slots(table)] == [(os.getpid(), SlotState.GRANTED)]
    held.release()


def test_cancel_and_a_hand_off_at_the_same_moment_leave_either_a_lock_or_nothing(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    """The holder hands the lock over while the Cancel is called: whichever wins, the outcome is whole: a
    HeldLock that is held, or Cancelled and no slot of this process left."""
    for _ in range(5):
        holder = actors()
        holder.do("lock", mode="EX")
        cancel = Cancel()

        def hand_off_and_cancel(_: object, holder: Actor = holder, cancel: Cancel = cancel) -> None:
            holder.send("release")
            cancel()

        try:
            held = client.lock(data, KEY, timeout=10, cancel=cancel, on_wait=hand_off_and_cancel)
        except Cancelled:
            assert os.getpid() not in [s.pid for s in slots(table)]
        else:
            assert [(s.pid, s.state) for s in slots(table)] == [(os.getpid(), SlotState.GRANTED)]
            held.release()
        holder.reply()
        holder.close()
        assert not slots(table)


def test_cancel_withdraws_a_waiting_conversion_and_the_lock_stays_in_its_old_mode(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    other = actors()
    other.do("lock", mode="PR")
    held = client.lock(data, KEY, Mode.PR)
    cancel = Cancel()
    threading.Timer(0.2, cancel).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        held.convert(Mode.EX, timeout=10, cancel=cancel)
    assert time.monotonic() - started < 1
    assert held.mode == Mode.PR and not waiting(table)
    assert sorted((s.pid, s.mode) for s in slots(table)) == sorted([(os.getpid(), Mode.PR), (other.pid, Mode.PR)])
    held.release()


def test_a_cancel_runs_each_hooked_withdrawal_once_and_a_late_hook_at_once() -> None:
    """The contract a client relies on (Client hooks a wire Cancel the same way)."""
    cancel, ran = Cancel(), []
    first, second = (lambda: ran.append("first")), (lambda: ran.append("second"))
    cancel.hook(first)
    cancel.hook(second)
    cancel.unhook(second)  # its request ended: not withdrawn
    assert not cancel.requested and not ran
    cancel()
    cancel.cancel()  # again: nothing more
    assert cancel.requested and ran == ["first"]
    with cancel.hooked(lambda: ran.append("late")):
        assert ran == ["first", "late"]  # called before the request waited: withdrawn at once
    assert repr(cancel) == "<Cancel requested>"


# -- deadlock victims -----------------------------------------------------------------------------------


def refuse_as_deadlocked(table: LockTable, pid: int) -> None:
    """Do what the deadlock detector does to its victim: mark its waiting request DEADLOCK, ring it."""
    wait_for(lambda: waiting(table, pid), 5, "the request to wait")
    [entry] = [e for e in table.scan() if e.slot.pid == pid and e.slot.state == SlotState.WAITING]
    with table._group_held(entry.group):
        table._mv[table.geometry.slot_offset(entry.index) + 8] = SlotState.DEADLOCK
    dls_shm.ring(entry.slot.doorbell)


def test_a_conversion_refused_as_a_deadlock_victim_raises_deadlock_and_keeps_the_old_mode(
    table: LockTable, data: Path, actors: Callable[[], Actor],
) -> None:
    victim, other = actors(), actors()
    victim.do("lock", mode="PR")
    other.do("lock", mode="PR")
    victim.send("convert", mode="EX", timeout=30)
    refuse_as_deadlocked(table, victim.pid)
    refused = victim.reply(2)
    assert refused["error"] == "Deadlock" and refused["mode"] == "PR", refused
    assert sorted((s.pid, s.state, s.mode) for s in slots(table)) == sorted(
        [(victim.pid, SlotState.GRANTED, Mode.PR), (other.pid, SlotState.GRANTED, Mode.PR)])


def test_a_lock_refused_as_a_deadlock_victim_raises_deadlock(
    table: LockTable, client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    holder = actors()
    holder.do("lock", mode="EX")
    threading.Timer(0.1, refuse_as_deadlocked, (table, os.getpid())).start()
    with pytest.raises(Deadlock, match="deadlock"):
        client.lock(data, KEY, timeout=30)
    assert [s.pid for s in slots(table)] == [holder.pid]


# -- the README -----------------------------------------------------------------------------------------


def test_the_readme_examples_run(table: LockTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The README's section runs as it is, its blocks one after the other, with get_client() a LocalClient."""
    blocks = readme.examples("## Conversions, value blocks", "## Lock information", tmp_path, monkeypatch)
    assert len(blocks) == 5
    with LocalClient(table.key) as local:
        monkeypatch.setattr(dls_client, "get_client", lambda: local)
        namespace: dict[str, Any] = {}
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "reading under PR\nwriting under EX\n" in out and "got it" in out
    assert "reload" not in out and "rebuild" not in out
    assert not slots(table)


def test_the_same_thread_locking_a_record_again_gets_the_lock_it_holds_in_its_new_mode(
    client: LocalClient, data: Path, actors: Callable[[], Actor],
) -> None:
    """A second lock() of a record by the thread that holds it converts the lock (as jDLS does): it returns the
    HeldLock the application has already, in its new mode, so that no stale object says EX once it is gone."""
    first = client.lock(data, KEY, mode=Mode.EX)
    again = client.lock(data, KEY, mode=Mode.PR)
    assert again is first and first.mode == Mode.PR
    other = actors()
    assert other.do("lock", mode="PR")  # PR goes with PR now
    other.do("release")
    first.release()
    assert first.released and not first.lost
    with pytest.raises(dls_client.DlsError, match="released"):
        again.ensure_held()
    assert other.do("lock", mode="EX", wait=False)["mode"] == "EX"
    fresh = client.lock(data, "OTHER", mode=Mode.EX)  # another lock, another object
    assert fresh is not first
    fresh.release()


#: Queues a request (EX, not waiting for it) behind each of KEYS at once, then sleeps until killed: a burst of
#: blocking notices larger than a doorbell's queue (net.unix.max_dgram_qlen, 10 by default).
BURST = textwrap.dedent("""
    import os, sys, time
    from dls_shm import LOCAL_IP, Doorbell, LockTable, Owner
    key, inode, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    table, bell = LockTable.attach(key), Doorbell()
    me = Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP)
    for n in range(count):
        table.lock(me, inode, -1, b"BURST%d" % n, 5, wait_token=bell.token)
    print("queued", flush=True)
    time.sleep(3600)
""")


def test_a_burst_of_blocking_notices_larger_than_the_doorbell_queue_loses_none(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30 locks asking for notices, 30 requests queued behind them by another process while the holder is
    busy (its notice thread held at its next look): the table sends 30 notices to one doorbell, whose queue
    holds 10; the holder asks the table which stand, and every lock's callback is called, once. (A table of
    its own, roomy enough for 60 slots in any groups.)"""
    busy = threading.Event()
    real = dls_shm.readable

    def held_up(fds: Any, timeout: float | None) -> set[int]:
        busy.wait(10)
        return real(fds, timeout)

    monkeypatch.setattr(dls_shm, "readable", held_up)  # what the notice thread of LocalClient sleeps on
    with own_table(free_key(tmp_path), geometry_for(2000, 50)) as table, LocalClient(table.key) as client:
        _burst_of_notices(table, client, data, busy)


def _burst_of_notices(table: LockTable, client: LocalClient, data: Path, busy: threading.Event) -> None:
    count = 30
    told: queue.Queue[tuple[int, int]] = queue.Queue()
    held = [client.lock(data, f"BURST{n}", mode=Mode.PR, on_blocking=lambda h, m: told.put((h.handle, m)))
            for n in range(count)]
    burst = subprocess.Popen([sys.executable, "-c", BURST, str(table.key), str(data.stat().st_ino), str(count)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert burst.stdout is not None and burst.stdout.readline() == "queued\n"
        busy.set()
        got = [told.get(timeout=5) for _ in range(count)]
        assert sorted(got) == sorted((h.handle, Mode.EX) for h in held)
        time.sleep(0.3)
        assert told.empty(), "each told once"
    finally:
        burst.kill()
        burst.wait(timeout=10)
    for h in held:
        h.release()


def test_the_locks_a_client_remembers_drop_the_lost_ones(client: LocalClient, data: Path) -> None:
    """A client remembers its locks by handle (a record locked again by its holder is the same HeldLock); the
    lost ones, never released through it, are dropped once it remembers more than it prunes at."""
    held = [client.lock(data, f"R{n}") for n in range(5)]
    for h in held[:3]:
        h.lose("lost for the test")
    client._prune_at = 5
    more = client.lock(data, "R5")
    assert sorted(client._live) == sorted(h.handle for h in [*held[3:], more])
    assert client._prune_at >= 5
    for h in [*held, more]:
        if not h.lost:
            h.release()
        else:
            client.unlock(h.handle)
