"""A real browser for the tests: headless Chromium (Debian's package ``chromium``; ``./dev setup`` installs it).

``dump_dom`` loads a URL and returns the DOM after the page's scripts ran (``--dump-dom`` with a virtual time
budget: the page's timers and fetches run, virtual time standing still while a fetch is under way, and the
DOM is written when the budget is spent); ``screenshot`` loads it and writes a PNG. Each run has a profile
directory of its own in a temporary directory, removed after it, and runs in a process group of its own, killed
whole if it outlives its time: nothing is left running. Chromium missing is a clear failure, never a skip:
the status page must really be seen in a browser.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

#: The names Debian's and others' packages give the browser's command.
COMMANDS = ("chromium", "chromium-browser", "google-chrome")
#: Flags of every run: headless without a sandbox (tests may run as root, where Chromium's sandbox refuses
#: to start), no GPU, nothing fetched on the browser's own account.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-sync", "--disable-component-update", "--hide-scrollbars", "--mute-audio")
#: Milliseconds of the page's own (virtual) time before the DOM is taken: the status page refreshes every 2 s.
BUDGET_MS = 6000
#: The browser window a screenshot is taken in.
WINDOW = (1400, 1800)
#: A PNG file starts with these bytes.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BrowserMissing(RuntimeError):
    """No Chromium to run."""


def command() -> str:
    """The Chromium command, or BrowserMissing saying how to install it."""
    for name in COMMANDS:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing("headless Chromium is needed for the status page's tests and none was found "
                         f"({', '.join(COMMANDS)}): run ./dev setup as root, or apt-get install chromium")


def _real_clock(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """``env`` without libfaketime (which ``./dev fresh-clone-check`` preloads to run the tests on a later day):
    Chromium hangs under it, and the browser is the test's instrument, not what is tested; the page takes its
    times from the service's (its plots end at the last sample's time, not the browser's)."""
    return {name: value for name, value in env.items() if name != "LD_PRELOAD" and not name.startswith("FAKETIME")}


def _run(url: str, *args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Chromium on ``url`` with ``args``, its own profile directory, its process group killed if it overruns."""
    with tempfile.TemporaryDirectory(prefix="dls-chromium-") as profile:
        argv = [command(), *FLAGS, f"--user-data-dir={profile}", *args, url]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                env=_real_clock(os.environ))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a helper process left behind by the browser
            except ProcessLookupError:
                pass
        if proc.returncode != 0:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def dump_dom(url: str, *, budget_ms: int = BUDGET_MS, timeout: float = 90.0) -> str:
    """The DOM of ``url`` once its scripts have run for ``budget_ms`` of virtual time, as HTML."""
    return _run(url, "--dump-dom", f"--virtual-time-budget={budget_ms}", timeout=timeout).stdout.decode()


def screenshot(url: str, path: Path, *, budget_ms: int = BUDGET_MS, window: tuple[int, int] = WINDOW,
               timeout: float = 90.0) -> Path:
    """A PNG of ``url`` as drawn after ``budget_ms`` of virtual time, written to ``path``."""
    _run(url, f"--screenshot={path}", f"--window-size={window[0]},{window[1]}",
         f"--virtual-time-budget={budget_ms}", timeout=timeout)
    return path


def png_size(path: Path) -> tuple[int, int]:
    """The width and height of the PNG at ``path`` (from its IHDR chunk); ValueError if it is no PNG."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
