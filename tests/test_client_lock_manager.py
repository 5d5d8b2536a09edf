"""Issue 14 through the service with dls_client.Client: a real daemon (``jdls -ib``), a lock server per client.

- ``held.convert``: PR held by two clients, one converts to EX and waits ahead of a newer EX waiter, granted
  when the other PR goes; a conversion chosen as a deadlock victim raises Deadlock, the lock still PR (marked
  in the table by hand, and a real conversion deadlock of two PR holders found by the monitor: one refused
  within a second, the other granted);
- value blocks: written under EX at release, read by another client's PR (``value_block=True``); a PR may not
  write (NotWritable, still held); the EX holder process SIGKILLed mid-hold: the waiting reader gets
  ``value_block_valid`` False and the last value;
- fencing tokens strictly increasing across grants and conversions up;
- a converted lock whose lock server is killed is reclaimed in its new mode;
- a Cancel called from another thread withdraws a waiting lock within 100 ms (Cancelled);
- Unsupported, saying why, from a service of protocol 3 (a fake lock server) and from OS file locks (-ibD).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dls_client
import pytest
from dls_client import (
    Cancel,
    Cancelled,
    Client,
    Config,
    Deadlock,
    HeldLock,
    LockRefused,
    LockTimeout,
    NotWritable,
    Server,
    Unsupported,
    exitcodes,
)
from dls_proto import Granted, Hello, InfoPut, Lock, Mechanism, Mode, Unlock, Welcome
from dls_shm import SlotState, doorbell
from dls_testkit import DLS_LOCK, Service, client_for, data_file, make_service, readme
from dls_testkit.clients import attached
from dls_testkit.fake_service import SERVER_PID, FakeService
from dls_testkit.tokens import contended_run_with_a_kill
from dls_testkit.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def clients(daemon: Service) -> Iterator[Callable[[], Client]]:
    """Clients of the daemon, each its own connection (and lock server); closed at the end."""
    made: list[Client] = []

    def make() -> Client:
        made.append(client_for(daemon))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return data_file(tmp_path)


def queued(daemon: Service, key: bytes, count: int = 1, unless: Callable[[], object] = lambda: False) -> None:
    """Wait until ``count`` requests for ``key`` wait in the daemon's table (a conversion among them), or
    ``unless()`` says that what was waited for is past already."""
    def waiters() -> bool:
        with attached(daemon) as table:
            return sum(e.slot.state == SlotState.WAITING and e.slot.key[:e.slot.key_len] == key
                       for e in table.scan()) >= count or bool(unless())
    wait_for(waiters, 5, f"{count} request(s) for {key!r} queued")


def refuse_as_deadlocked(daemon: Service, key: bytes) -> None:
    """Mark the request waiting for ``key`` DEADLOCK in the table and ring it, as the monitor's detector does to
    the victim of a cycle (the detector's own tests make real cycles)."""
    with attached(daemon) as table:
        entry = next(e for e in table.scan() if e.slot.state == SlotState.WAITING and e.slot.key.startswith(key))
        with table._group_held(entry.group):
            table._mv[table.geometry.slot_offset(entry.index) + 8] = SlotState.DEADLOCK  # the slot's state byte
        doorbell.ring(entry.slot.doorbell)


def waiting(future: Future[Any], seconds: float = 0.3) -> bool:
    """The call behind ``future`` still waits after ``seconds``."""
    time.sleep(seconds)
    return not future.done()


def test_conversion_waits_in_the_convert_queue_ahead_of_a_newer_waiter(
    daemon: Service, clients: Callable[[], Client], data: Path, pool: ThreadPoolExecutor
) -> None:
    a, b, c = clients(), clients(), clients()
    held_a = a.lock(data, "QUEUE", Mode.PR, timeout=5)
    held_b = b.lock(data, "QUEUE", Mode.PR, timeout=5)
    first_token = held_a.token
    converting = pool.submit(held_a.convert, Mode.EX, timeout=10)
    queued(daemon, b"QUEUE")
    assert waiting(converting)
    assert held_a.mode == Mode.PR  # the lock stays PR while it waits
    newer = pool.submit(c.lock, data, "QUEUE", Mode.EX, timeout=10)
    queued(daemon, b"QUEUE", 2)
    assert waiting(newer)
    held_b.release()
    converting.result(5)
    assert held_a.mode == Mode.EX and held_a.token > first_token
    assert waiting(newer), "the newer EX waiter was granted beside the converted lock"
    held_a.release()
    held_c: HeldLock = newer.result(5)
    assert held_c.token > held_a.token
    held_c.convert(Mode.NL)  # down: at once, its token kept
    assert (held_c.mode, held_c.token) == (Mode.NL, held_c.token)
    held_c.release()


def test_a_converted_lock_is_reclaimed_in_its_new_mode(
    clients: Callable[[], Client], data: Path
) -> None:
    """The lock server of a client that converted a lock is killed: the client reclaims the lock, in the mode it
    was converted to, through a new lock server, and goes on converting it there."""
    a, b = clients(), clients()
    held = a.lock(data, "RECLAIM", Mode.PR, timeout=5)
    held.convert(Mode.EX)
    os.kill(a.connect().welcome.server_pid, signal.SIGKILL)
    wait_for(lambda: held.ensure_held() is None and a.connect().welcome.server_pid, 5, "the lock reclaimed")
    assert held.mode == Mode.EX and not held.lost
    with pytest.raises(LockRefused):
        b.try_lock(data, "RECLAIM", Mode.PR)  # still EX
    held.convert(Mode.PR)
    b.lock(data, "RECLAIM", Mode.PR, timeout=5).release()
    held.release()


def test_noqueue_conversion_refused_and_lock_kept(clients: Callable[[], Client], data: Path) -> None:
    a, b = clients(), clients()
    held_a = a.lock(data, "NOQUEUE", Mode.PR, timeout=5)
    held_b = b.lock(data, "NOQUEUE", Mode.PR, timeout=5)
    with pytest.raises(LockRefused):
        held_a.convert(Mode.EX, wait=False)
    assert held_a.mode == Mode.PR and not held_a.released
    held_b.release()  # unanswered: its lock server may take a moment
    held_a.convert(Mode.EX, timeout=5)
    assert held_a.mode == Mode.EX
    held_a.release()


def test_a_deadlock_victim_raises_deadlock_and_keeps_its_lock(
    daemon: Service, clients: Callable[[], Client], data: Path, pool: ThreadPoolExecutor
) -> None:
    """Two PR holders: one converts to EX and waits; its waiting slot is marked DEADLOCK in the table and rung,
    as the monitor's detector does to its victim (the real cycle's test comes with the detector)."""
    a, b = clients(), clients()
    held_a = a.lock(data, "CYCLE", Mode.PR, timeout=5)
    held_b = b.lock(data, "CYCLE", Mode.PR, timeout=5)
    converting = pool.submit(held_a.convert, Mode.EX)
    queued(daemon, b"CYCLE")
    assert waiting(converting, 0.2)
    refuse_as_deadlocked(daemon, b"CYCLE")
    with pytest.raises(Deadlock, match="deadlock"):
        converting.result(5)
    assert held_a.mode == Mode.PR
    held_b.release()
    held_a.convert(Mode.EX, timeout=5)
    held_a.release()


def test_two_pr_holders_converting_to_ex_one_deadlock_one_granted(
    daemon: Service, clients: Callable[[], Client], data: Path, pool: ThreadPoolExecutor
) -> None:
    """A conversion deadlock through the service, found by the monitor's detector: one of the two is refused
    (Deadlock) within a second of the cycle forming, its lock still PR; it lets go, and the other is granted."""
    a, b = clients(), clients()
    held = [a.lock(data, "BOTH", Mode.PR, timeout=5), b.lock(data, "BOTH", Mode.PR, timeout=5)]
    refused: list[float] = []

    def convert_or_give_up(lock: HeldLock) -> str:
        try:
            lock.convert(Mode.EX, timeout=10)
        except Deadlock:
            refused.append(time.monotonic())
            assert lock.mode == Mode.PR
            lock.release()
            return "deadlock"
        return "granted"

    first = pool.submit(convert_or_give_up, held[0])
    queued(daemon, b"BOTH")
    second = pool.submit(convert_or_give_up, held[1])
    queued(daemon, b"BOTH", 2, unless=lambda: refused)  # the cycle formed (or was broken already)
    formed = time.monotonic()
    assert sorted((first.result(10), second.result(10))) == ["deadlock", "granted"]
    assert refused[0] - formed < 1.0, refused[0] - formed
    for lock in held:
        lock.release()


def test_value_block_written_at_release_read_by_another_client(clients: Callable[[], Client], data: Path) -> None:
    keeper, writer, reader = clients(), clients(), clients()
    kept = keeper.lock(data, "LVB", Mode.NL, timeout=5)  # the block lives while a lock of its resource does
    held = writer.lock(data, "LVB", Mode.EX, value_block=True, timeout=5)
    assert held.value_block is not None and held.value_block.strip(b"\0") == b"" and held.value_block_valid
    held.release(value_block=b"balance=42")
    read = reader.lock(data, "LVB", Mode.PR, value_block=True, timeout=5)
    assert read.value_block is not None and read.value_block.rstrip(b"\0") == b"balance=42"
    assert read.value_block_valid
    with pytest.raises(NotWritable):
        read.release(value_block=b"nope")
    assert not read.released
    read.release()
    kept.release()


def test_value_block_not_valid_after_the_ex_holder_is_killed(
    daemon: Service, clients: Callable[[], Client], data: Path, pool: ThreadPoolExecutor, tmp_path: Path
) -> None:
    holder = textwrap.dedent("""
        import sys, time
        from dls_client import Client, Mode
        client = Client()
        held = client.lock(sys.argv[1], "KILLED", Mode.EX, timeout=5)
        held.convert(Mode.EX, value_block=b"last value")
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder, str(data)], env=daemon.env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        reader = clients()
        reading = pool.submit(reader.lock, data, "KILLED", Mode.PR, value_block=True, timeout=10)
        queued(daemon, b"KILLED")
        proc.send_signal(signal.SIGKILL)
        read: HeldLock = reading.result(10)
    finally:
        proc.kill()
        proc.wait()
    assert read.value_block is not None and read.value_block.rstrip(b"\0") == b"last value"
    assert read.value_block_valid is False
    read.convert(Mode.EX, timeout=5)
    read.convert(Mode.PR, value_block=b"new value")  # a writer writes: valid again
    assert read.value_block_valid and read.value_block.rstrip(b"\0") == b"new value"
    read.release()


def test_tokens_strictly_increase_across_grants_and_conversions(clients: Callable[[], Client], data: Path) -> None:
    a, b = clients(), clients()
    tokens = []
    for _ in range(3):
        held = a.lock(data, "TOKENS", Mode.NL, timeout=5)
        tokens.append(held.token)
        held.convert(Mode.EX, timeout=5)
        tokens.append(held.token)
        held.convert(Mode.PR)  # down: keeps its token
        assert held.token == tokens[-1]
        other = b.lock(data, "TOKENS", Mode.PR, timeout=5)
        tokens.append(other.token)
        other.release()
        held.release()
    assert tokens == sorted(set(tokens)) and tokens[0] > 0, tokens


def test_cancel_from_another_thread_within_100_ms(
    daemon: Service, clients: Callable[[], Client], data: Path, pool: ThreadPoolExecutor
) -> None:
    a, b = clients(), clients()
    held = a.lock(data, "CANCEL", Mode.EX, timeout=5)
    cancel = Cancel()
    locking = pool.submit(b.lock, data, "CANCEL", Mode.EX, cancel=cancel, timeout=30)
    queued(daemon, b"CANCEL")
    assert waiting(locking, 0.1)
    started = time.monotonic()
    threading.Thread(target=cancel).start()
    with pytest.raises(Cancelled):
        locking.result(5)
    assert time.monotonic() - started < 0.1
    # A Cancel called already withdraws the request as soon as it would wait; the lock is free once released.
    with pytest.raises(Cancelled):
        b.lock(data, "CANCEL", Mode.EX, cancel=cancel, timeout=30)
    held.release()
    b.lock(data, "CANCEL", Mode.EX, cancel=Cancel(), timeout=5).release()


def test_cancel_of_a_waiting_conversion_keeps_the_lock(
    daemon: Service, clients: Callable[[], Client], data: Path, pool: ThreadPoolExecutor
) -> None:
    a, b = clients(), clients()
    held_a = a.lock(data, "CANCEL-CONVERT", Mode.PR, timeout=5)
    held_b = b.lock(data, "CANCEL-CONVERT", Mode.PR, timeout=5)
    cancel = Cancel()
    converting = pool.submit(held_b.convert, Mode.EX, cancel=cancel)
    queued(daemon, b"CANCEL-CONVERT")
    assert waiting(converting, 0.1)
    cancel()
    with pytest.raises(Cancelled):
        converting.result(5)
    assert held_b.mode == Mode.PR and not held_b.released
    held_a.release()
    held_b.convert(Mode.EX, timeout=5)  # nothing of the cancelled conversion is left in the way
    held_b.release()


def test_server2_converts_on_both_and_keeps_the_value_block_in_step(tmp_path: Path, data: Path) -> None:
    """With SERVER2 a conversion is made on both services: one the secondary refuses (another client holds the
    record there) is undone on the primary and raised, the lock PR on both; granted by both, the lock is EX on
    both. A Release with a value block writes it on both: a client of either alone reads it."""
    with make_service(tmp_path / "primary").checked() as primary, \
            make_service(tmp_path / "secondary").checked() as secondary:
        primary.start()
        secondary.start()
        pair = Config(server=Server("127.0.0.1", primary.port), server2=Server("127.0.0.1", secondary.port),
                      timeout=10)
        keeper, writer = Client(pair), Client(pair)
        readers = [client_for(primary), client_for(secondary)]
        try:
            kept = keeper.lock(data, "PAIR", Mode.NL, timeout=5)  # keeps the resource, and its block, on both
            held = writer.lock(data, "PAIR", Mode.PR, value_block=True, timeout=5)
            assert held.token > 0 and held.value_block is not None
            other = readers[1].lock(data, "PAIR", Mode.PR, timeout=5)  # a reader of the secondary alone
            with pytest.raises(LockTimeout):
                held.convert(Mode.EX, timeout=0.5)  # the primary grants it, the secondary does not
            assert held.mode == Mode.PR and not held.lost
            readers[0].lock(data, "PAIR", Mode.PR, timeout=5).release()  # PR again on the primary: undone
            other.release()
            held.convert(Mode.EX, timeout=5)
            assert held.mode == Mode.EX
            for reader in readers:
                with pytest.raises(LockRefused):
                    reader.try_lock(data, "PAIR", Mode.PR)
            held.release(value_block=b"in step")
            for reader in readers:
                read = reader.lock(data, "PAIR", Mode.PR, value_block=True, timeout=5)
                assert read.value_block is not None and read.value_block.rstrip(b"\0") == b"in step"
                read.release()
            kept.release()
        finally:
            for client in (keeper, writer, *readers):
                client.close()


def test_a_service_of_protocol_3_is_unsupported_saying_so(data: Path) -> None:
    """A lock server of version 3 (a fake, as today's daemon speaks): value blocks, cancel and conversions raise
    Unsupported naming the version, and nothing of them is sent; the lock itself works as before."""
    def greeting(hello: Any) -> list[Welcome]:
        assert isinstance(hello, Hello)
        return [Welcome(hello.request_id, 3, Mechanism.TABLE, 0, SERVER_PID, 65536, 0, "127.0.0.1", "fake")]

    def answer(request: Any) -> list[Granted]:
        return [Granted(request.request_id, 77, request.mode, 1)] if isinstance(request, Lock) else []

    with FakeService(greeting=greeting, answer=answer) as fake:
        client = Client(Config(server=Server("127.0.0.1", 1)), connect=lambda _server, _timeout: fake.client_socket)
        try:
            for call in (lambda: client.lock(data, "K", value_block=True),
                         lambda: client.lock(data, "K", cancel=Cancel())):
                with pytest.raises(Unsupported, match="protocol version 3"):
                    call()
            held = client.lock(data, "K", Mode.EX)
            assert held.token == 0 and held.value_block is None
            with pytest.raises(Unsupported, match="protocol version 3"):
                held.convert(Mode.PR)
            with pytest.raises(Unsupported, match="protocol version 3"):
                held.release(value_block=b"x")
            assert held.mode == Mode.EX and not held.released
            held.release()
            wait_for(lambda: any(isinstance(r, Unlock) for r in fake.received), 2, "the Unlock")
            assert [type(r).__name__ for r in fake.received if not isinstance(r, InfoPut)] == ["Lock", "Unlock"], \
                fake.received
        finally:
            client.close()


def test_os_file_locks_are_unsupported_saying_so(tmp_path: Path, data: Path) -> None:
    with make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        svc.start("--lock-dir", str(svc.lock_dir), "--binary-lock-dir", str(svc.binary_lock_dir))
        client = client_for(svc)
        try:
            with pytest.raises(Unsupported, match="OS file locks"):
                client.lock(data, "OS", value_block=True)
            with pytest.raises(Unsupported, match="OS file locks"):
                client.lock(data, "OS", on_blocking=lambda held, mode: None)
            held = client.lock(data, "OS", Mode.EX, timeout=5)
            assert held.token == 0
            with pytest.raises(Unsupported, match="OS file locks"):
                held.convert(Mode.PR)
            with pytest.raises(Unsupported, match="OS file locks"):
                held.release(value_block=b"x")
            assert not held.released
            held.release()
        finally:
            client.close()
        # dls-lock's command gets no token from OS file locks, nor an outer dls-lock's (another lock's).
        done = subprocess.run([DLS_LOCK, str(data), "OS", "sh", "-c", 'echo "[${DLS_FENCING_TOKEN-unset}]"'],
                              env={**svc.env, "DLS_FENCING_TOKEN": "999"}, capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        assert (done.returncode, done.stdout) == (0, "[unset]\n"), done


def test_the_readme_examples_run_through_the_service(
    daemon: Service, clients: Callable[[], Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's section on the lock manager runs as it is with get_client() a Client of the service."""
    blocks = readme.examples("## Conversions, value blocks", "## Lock information", tmp_path, monkeypatch)
    assert blocks
    client = clients()
    monkeypatch.setattr(dls_client, "get_client", lambda: client)
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "reading under PR\nwriting under EX\n" in out and "got it" in out
    assert "reload" not in out and "rebuild" not in out


def test_dls_lock_passes_the_fencing_token_to_its_command(daemon: Service, data: Path) -> None:
    """dls-lock's command gets the lock's fencing token in DLS_FENCING_TOKEN: a number, greater at each run; an
    outer one's (a dls-lock inside another's command) is replaced, never passed on."""
    tokens = []
    for _ in range(2):
        done = daemon.dls_lock(str(data), "TOKEN", "sh", "-c", 'echo "$DLS_FENCING_TOKEN"')
        assert done.returncode == 0, done.stderr
        tokens.append(int(done.stdout))
    nested = daemon.dls_lock(str(data), "OUTER", "sh", "-c",
                             f'echo "$DLS_FENCING_TOKEN"; {DLS_LOCK} {data} TOKEN sh -c \'echo "$DLS_FENCING_TOKEN"\'')
    assert nested.returncode == 0, nested.stderr
    outer, inner = map(int, nested.stdout.split())
    tokens.append(inner)
    assert 0 < tokens[0] < tokens[1] < tokens[2] and outer > 0, (tokens, outer)


def test_dls_lock_refused_as_a_deadlock_victim_exits_with_its_own_code(daemon: Service, data: Path) -> None:
    """dls-lock waiting for a lock that its request is refused to break a deadlock: it says so and exits with
    EDEADLK (35), the command never run; another status than any other outcome of dls-lock's."""
    holder = client_for(daemon)
    try:
        held = holder.lock(data, "DEADLOCKED", Mode.EX, timeout=5)
        waiter = daemon.dls_lock_popen(str(data), "DEADLOCKED", "sh", "-c", "echo ran", stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
        queued(daemon, b"DEADLOCKED")
        refuse_as_deadlocked(daemon, b"DEADLOCKED")
        out, err = waiter.communicate(timeout=10)
        assert (waiter.returncode, out) == (exitcodes.DEADLOCK, b"") and exitcodes.DEADLOCK == 35, err
        assert b"deadlock" in err
        held.release()
    finally:
        holder.close()


def test_a_blocking_notice_reaches_an_idle_holder_within_100_ms(
    daemon: Service, clients: Callable[[], Client], data: Path,
) -> None:
    """Blocking notices through the service: the holder makes no request (nobody reads its connection but the
    notice reader), another client's request queues behind its lock: the holder's callback is called, once a
    round, on a thread of its own, with the mode wanted; converting down to NL lets the other in. From the
    request's queueing (its slot's timestamp) to the callback: the best of three rounds under 100 ms."""
    holder, other = clients(), clients()
    told: queue.Queue[tuple[HeldLock, int, str, float]] = queue.Queue()

    def on_blocking(held: HeldLock, mode: int) -> None:
        told.put((held, mode, threading.current_thread().name, time.time()))

    held = holder.lock(data, "RATE", mode=Mode.PW, on_blocking=on_blocking)
    latencies = []
    with ThreadPoolExecutor(1) as pool:
        for _ in range(3):
            waiter: Future[HeldLock] = pool.submit(other.lock, data, "RATE", mode=Mode.EX, timeout=30)
            notice, mode, thread, when = told.get(timeout=5)
            assert (notice, mode) == (held, Mode.EX) and thread != threading.current_thread().name
            with attached(daemon) as table:
                [queued] = [e.slot for e in table.scan() if e.slot.state == SlotState.WAITING]
            latencies.append(when - queued.timestamp)
            assert not waiter.done()
            held.convert(Mode.NL)
            waiter.result(timeout=10).release()
            held.convert(Mode.PW)  # nobody waits now: the next request is told of again
    assert min(latencies) < 0.1, latencies
    assert told.empty(), "told once a round"
    held.release()

#: A contender through the service: takes PW, records (token, time), converts up to EX (a new token),
#: records again, releases; at its iteration HANG it keeps PW until killed.
CONTENDER = textwrap.dedent("""
    import sys, time
    from dls_client import Client, Mode
    data, record, out, rounds, hang = sys.argv[1:6]
    with Client() as client, open(out, "a") as f:
        for i in range(int(rounds)):
            held = client.lock(data, record, Mode.PW, timeout=30)
            f.write(f"{held.token} {time.monotonic_ns()}\\n"); f.flush()
            if i == int(hang):
                time.sleep(3600)
            held.convert(Mode.EX, timeout=30)
            f.write(f"{held.token} {time.monotonic_ns()}\\n"); f.flush()
            held.release()
""")


def test_fencing_tokens_strictly_increase_through_the_service_across_a_contended_run_with_a_kill(
    daemon: Service, data: Path, tmp_path: Path,
) -> None:
    """Four client processes through the service take PW, convert up to EX and release, again and again; one
    is SIGKILLed holding PW. The recorded history (each grant's and conversion's token, in the order they
    happened) has strictly increasing tokens, the killed holder's followed by greater ones."""
    rounds, hang = 25, 4
    outs = [tmp_path / f"contender-{n}" for n in range(4)]
    contended_run_with_a_kill(lambda out, hang_at: subprocess.Popen(
        [sys.executable, "-c", CONTENDER, str(data), "FENCED", str(out), str(rounds), str(hang_at)], env=daemon.env),
        outs, rounds, hang)


def test_the_same_thread_locking_a_record_again_through_the_service_gets_the_lock_it_holds(
    clients: Callable[[], Client], data: Path,
) -> None:
    """Through the service as locally: a second lock() of the record by the thread that holds it is the same
    HeldLock, converted; once released, nothing says it is still held."""
    mine, other = clients(), clients()
    first = mine.lock(data, "AGAIN", Mode.EX)
    again = mine.lock(data, "AGAIN", Mode.PR)
    assert again is first and first.mode == Mode.PR
    other.lock(data, "AGAIN", Mode.PR, wait=False).release()
    first.release()
    with pytest.raises(dls_client.DlsError, match="released"):
        again.ensure_held()
    other.lock(data, "AGAIN", Mode.EX, timeout=5).release()  # the release is unanswered: its lock server may lag


def test_a_burst_of_blocking_notices_through_the_service_loses_none(
    daemon: Service, clients: Callable[[], Client], data: Path,
) -> None:
    """A Client holds 30 locks asking for notices; another process queues a request behind each while the
    lock server is stopped: its notice doorbell (a queue of 10) overflows, the lock server asks the table which
    notices stand, and the client is told of every lock, once."""
    from dls_client.locks import REMOTE_DEVICE

    count = 30
    holder = clients()
    told: list[tuple[int, int]] = []
    done = threading.Event()

    def on_blocking(held: HeldLock, mode: int) -> None:
        told.append((held.handle, mode))
        if len(told) >= count:
            done.set()

    held = [holder.lock(data, f"BURST{n}", Mode.PR, on_blocking=on_blocking) for n in range(count)]
    script = textwrap.dedent(f"""
        import os, time
        from dls_shm import LOCAL_IP, Doorbell, LockTable, Owner
        table, bell = LockTable.attach({daemon.instance.key}), Doorbell()
        me = Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP)
        for n in range({count}):
            table.lock(me, {data.stat().st_ino}, {REMOTE_DEVICE}, b"BURST%d" % n, 5, wait_token=bell.token)
        print("queued", flush=True)
        time.sleep(3600)
    """)
    server = holder.connect().welcome.server_pid
    os.kill(server, signal.SIGSTOP)  # it reads nothing while the burst comes: its doorbell's queue fills up
    try:
        burst = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=daemon.env)
        assert burst.stdout is not None and burst.stdout.readline() == "queued\n"
    finally:
        os.kill(server, signal.SIGCONT)
    try:
        assert done.wait(5), f"{len(told)} of {count} notices"
        time.sleep(0.3)
        assert sorted(told) == sorted((h.handle, Mode.EX) for h in held), "each told once"
    finally:
        burst.kill()
        burst.wait(timeout=10)
    for h in held:
        h.release()
