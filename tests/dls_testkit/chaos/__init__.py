"""Fault injection with a history checker: does a lock keep one holder, and is a holder that loses it told?

Worker processes (``worker``) take exclusive locks on a few records through the public client API and
log every step of their critical sections (``history``) around a counter per record (``records``); a
chaos loop (``injector``) kills and stops workers, lock servers, listeners, monitors and whole services
and restarts what it killed (``workers`` keeps the worker processes); the checker (``checker``) proves
from the logs alone that no two sections of a record overlapped and that every counter is exact.
``chaos_run`` (``run``) does it all with real services of its own: a bounded run is a test
(tests/test_chaos.py), a long one is ``./dev chaos``.
"""

from . import history
from .checker import Section, Verdict, check
from .history import History, Log, read_history
from .run import Settings, chaos_run

__all__ = ["History", "Log", "Section", "Settings", "Verdict", "chaos_run", "check", "history", "read_history"]
