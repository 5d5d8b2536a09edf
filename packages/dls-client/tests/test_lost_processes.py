"""The holder is told, with real processes: a real lock service (``jdls`` of the test's own instance), its
lock server killed with SIGKILL under a held lock.

- A service that keeps nothing of a lost client: the lock is lost, ``held.lost``, ``on_lost`` runs
  within a second with no call from the application, another client gets the lock, the holder's
  ``release()`` raises LockLost, and its next request works without ``close()``.
- A lock server killed while a request of the client waits: the request is asked again through a new lock
  server, and granted when the holder releases.

The rules one by one, against fakes, are in test_lost.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from dls_client import Client, HeldLock, LockLost
from dls_testkit import KEY, alive, wait_for
from dls_testkit import Service as Daemon


def kill_lock_server(client: Client) -> int:
    """SIGKILL the lock server serving ``client``; its pid, once it is gone."""
    pid = client.connect().welcome.server_pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 5, f"lock server {pid} to die")
    return pid


def test_a_lock_the_service_does_not_keep_is_lost_and_the_holder_told_within_a_second(
        daemon: Daemon, data: Path) -> None:
    told: list[tuple[HeldLock, float]] = []
    called = threading.Event()

    def on_lost(held: HeldLock) -> None:
        told.append((held, time.monotonic()))
        called.set()

    with daemon.client() as client, daemon.client() as other:
        held = client.lock(data, KEY, on_lost=on_lost)
        assert client.connect().welcome.lock_delay_ms == 0, "this service keeps a lost client's locks"
        first = kill_lock_server(client)
        killed = time.monotonic()
        assert called.wait(2.0), "on_lost was not called"
        assert told[0][0] is held and told[0][1] - killed < 1.0, f"told {told[0][1] - killed:.2f} s after the kill"
        assert held.lost
        other.try_lock(data, KEY).release()  # the service freed it: someone else may have it now
        with pytest.raises(LockLost, match=KEY):
            held.ensure_held()
        with pytest.raises(LockLost, match=KEY):
            held.release()
        again = client.lock(data, KEY)  # no close() needed: the client connected again by itself
        assert client.connect().welcome.server_pid != first
        again.release()


def test_a_request_waiting_when_its_lock_server_is_killed_is_asked_again(daemon: Daemon, data: Path) -> None:
    with daemon.client() as client, daemon.client() as other:
        blocker = other.lock(data, KEY)
        client.connect()
        got: list[HeldLock] = []
        waiter = threading.Thread(target=lambda: got.append(client.lock(data, KEY, timeout=20)))
        waiter.start()
        try:
            time.sleep(0.3)  # the request waits on the service
            kill_lock_server(client)
            time.sleep(0.5)  # asked again through a new lock server, where it waits
            assert not got
            blocker.release()
        finally:
            waiter.join(25)
        assert got and not got[0].lost
        got[0].release()
