"""All 36 pairs of lock modes, both orders, through the service and through the table (issue 14): a request
for one mode while another owner holds another is granted exactly when the DLM's compatibility matrix
says so (``dls_shm.modes.compatible``), and a refused request leaves the holder's lock as it was.

Real processes: a real ``jdls -ib`` and two raw protocol connections (two lock servers). The table's own
test of the pairs is packages/dls-shm/tests/test_mode_pairs.py.
"""

from __future__ import annotations

import itertools
import socket

from dls_client.locks import REMOTE_DEVICE
from dls_proto import Acquired, Connection, Granted, Lock, Refused, RefuseReason, Unlock
from dls_shm import modes
from dls_testkit import Service
from dls_testkit.wire import greet, receive

NAMES = modes.NAMES
PAIRS = list(itertools.product(range(6), range(6)))


def _lock(rid: int, mode: int, key: bytes) -> Lock:
    return Lock(rid, mode, 0, 0, 1, 5151, REMOTE_DEVICE, key, "pairs.dat")  # timeout 0: do not wait


def test_every_pair_through_the_service_both_orders(service: Service) -> None:
    first = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    second = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    with first, second:
        conns: list[tuple[socket.socket, Connection]] = [(first, greet(first, 5001)[0]),
                                                         (second, greet(second, 5002)[0])]
        rid = 10
        wrong = []
        for (held, asked), order in itertools.product(PAIRS, (0, 1)):
            key = f"PAIR*{held}*{asked}*{order}".encode()
            (hs, hc), (ws, wc) = conns if order == 0 else conns[::-1]
            rid += 2
            hs.sendall(hc.send(_lock(rid, held, key)))
            holding = receive(hs, hc, Granted | Acquired)
            ws.sendall(wc.send(_lock(rid + 1, asked, key)))
            answer = receive(ws, wc, Granted | Acquired | Refused)
            granted = not isinstance(answer, Refused)
            if granted != modes.compatible(asked, held):
                wrong.append(f"{NAMES[asked]} asked while {NAMES[held]} held: {answer}")
            if granted:
                ws.sendall(wc.send(Unlock(rid + 1, answer.handle)))
            else:
                assert answer.reason == RefuseReason.BUSY and answer.holder_mode == held
            hs.sendall(hc.send(Unlock(rid, holding.handle)))
        assert wrong == []
