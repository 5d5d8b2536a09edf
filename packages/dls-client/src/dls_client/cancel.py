"""A cancel handle: how an application withdraws one of its waiting requests from another thread.

``dls_client.Cancel`` is the clients' own, so that dls-client imports without
dls-shm: each client hooks its own way of withdrawing a request into it
(``hooked``): LocalClient a dls-shm ``Cancel``, Client a Cancel message sent to
its service.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Cancel:
    """Withdraws the waiting request it is given to (``lock(..., cancel=c)``, ``held.convert(..., cancel=c)``):
    calling it, from any thread, makes that request's call raise Cancelled at once. A call that returned its
    lock keeps it; one handed the lock just as the Cancel came ends either way, never half (the lock held, or
    Cancelled and the lock given back). A Cancel once called stays called: a request given it afterwards is
    withdrawn as soon as it would wait (one granted at once is granted). One not called may serve request
    after request.
    """

    __slots__ = ("_actions", "_guard", "_requested")

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._requested = False
        #: How to withdraw each request now given this Cancel (usually one), hooked by its client.
        self._actions: list[Callable[[], None]] = []

    def __call__(self) -> None:
        """Withdraw the waiting request(s) this Cancel was given to; calling it again does nothing more."""
        with self._guard:
            if self._requested:
                return
            self._requested = True
            actions = list(self._actions)
        for action in actions:  # outside the guard: an action may take the client's own locks
            action()

    cancel = __call__

    @property
    def requested(self) -> bool:
        """Whether this Cancel was called."""
        return self._requested

    def hook(self, action: Callable[[], None]) -> None:
        """For a client: ``action`` withdraws the request it is about to make; it is run (in the thread that
        calls this Cancel) when this Cancel is called, at once if it was called already, until ``unhook``.
        ``action`` must be quick, safe from any thread and harmless once the request is granted or gone."""
        with self._guard:
            already = self._requested
            if not already:
                self._actions.append(action)
        if already:
            action()

    def unhook(self, action: Callable[[], None]) -> None:
        """The request ``action`` withdraws is over (granted, refused, withdrawn): forget it."""
        with self._guard:
            for index, hooked in enumerate(self._actions):
                if hooked is action:
                    del self._actions[index]
                    return

    @contextmanager
    def hooked(self, action: Callable[[], None]) -> Iterator[None]:
        """``hook(action)`` for the ``with`` block, in which the client makes and waits for the request."""
        self.hook(action)
        try:
            yield
        finally:
            self.unhook(action)

    def __repr__(self) -> str:
        return f"<Cancel{' requested' if self._requested else ''}>"


__all__ = ["Cancel"]
