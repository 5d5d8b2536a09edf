"""The two long-lived processes of a lock service, by the names their pid files and messages use."""

from __future__ import annotations

MONITOR = "monitor"
LISTENER = "listener"
#: In the order they start: the listener looks for the monitor's table when it starts.
ROLES = (MONITOR, LISTENER)
LABELS = {MONITOR: "lock monitor", LISTENER: "lock listener"}
