"""The processes below a process, as /proc shows them, and signals sent to them without hitting a stranger.

dls-lock answers for every process its command starts (see ``command_keeper``):
it must find them all, and it must never signal a process that only took the
pid of one of them after it ended. Descendants are found from the parent pids
in /proc/<pid>/stat (the kernel's per-process ``children`` lists are not built
into every kernel); each is signalled through a pidfd opened before its parent
is checked once more, so a pid that was reused between the scan and the signal
is left alone. The prctl(2) settings dls-lock relies on are here too: they are
what makes the tree complete (a subreaper adopts the orphans of its tree) and
what ties a process's life to its parent's.
"""


# No ``from __future__ import annotations`` (as in dls_proto.messages): the NamedTuple's fields would be
# strings, each compiled when the class is made, and the first compile() of a process costs about 2 ms.
import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Collection, Iterable
from typing import NamedTuple

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")


def become_subreaper() -> None:
    """Adopt the orphans of this process's tree (PR_SET_CHILD_SUBREAPER), instead of init, so that
    ``waitpid(-1)`` sees every process it started, however deep, until the last has ended."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int) -> None:
    """Be sent ``signum`` when the parent (the thread that forked this process) ends (PR_SET_PDEATHSIG).
    The caller checks ``os.getppid()`` afterwards: a parent that ended before this call sends nothing."""
    _prctl(_PR_SET_PDEATHSIG, signum)


def set_name(name: str) -> None:
    """This process's name in ps and /proc/<pid>/comm (at most 15 bytes are kept)."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


def exec_command(argv: list[str]) -> None:
    """Replace this process with the command ``argv``, found in PATH, as POSIX execvp does: an executable file
    without a ``#!`` line (exec fails with ENOEXEC) is run by /bin/sh as a script, as flock(1) and the shells
    run it. Python's os.execvp does not (it tries the next PATH directory, then raises). OSError when it
    cannot be run."""
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - the command as given, as flock(1) runs it
    except OSError as exc:
        if exc.errno != errno.ENOEXEC:
            raise
        import shutil  # only here: the keeper's start-up does without it

        path = shutil.which(argv[0])
        if path is None:
            raise
    os.execv("/bin/sh", ["/bin/sh", path, *argv[1:]])  # noqa: S606 - POSIX execvp's fallback


class Proc(NamedTuple):
    """A process as /proc/<pid>/stat shows it: what finding and signalling a tree needs."""

    pid: int
    ppid: int
    pgid: int
    state: str

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def stat(pid: int) -> Proc | None:
    """The process ``pid`` now; None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after its last ")".
    fields = text[text.rfind(")") + 2:].split()
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0])


def _every_process() -> Iterable[Proc]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            proc = stat(int(entry.name))
            if proc is not None:
                yield proc


def descendants(root: int) -> list[Proc]:
    """Every process below ``root`` (not ``root`` itself), parents before their children."""
    children: dict[int, list[Proc]] = {}
    for proc in _every_process():
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    parents = [root]
    while parents:
        below = [child for parent in parents for child in children.get(parent, ())]
        found.extend(below)
        parents = [child.pid for child in below]
    return found


def signal_descendants(root: int, signum: int, *, skip_group: int | None = None) -> list[int]:
    """Send ``signum`` to every live process below ``root`` (but those of process group ``skip_group``);
    the pids it was sent to. A process whose pid was taken by a stranger since the scan is not signalled:
    it is pinned by a pidfd, then its parent must still be in the tree."""
    tree = descendants(root)
    members = {root, *(proc.pid for proc in tree)}
    sent = []
    for proc in tree:
        if proc.zombie or (skip_group is not None and proc.pgid == skip_group):
            continue
        try:
            pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            continue  # ended since the scan
        try:
            now = stat(proc.pid)
            if now is not None and now.ppid in members:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signum)
                    sent.append(proc.pid)
        finally:
            os.close(pidfd)
    return sent


def pin_descendants(roots: Collection[int], pinned: dict[int, int], spare: Collection[int] = ()) -> None:
    """Add to ``pinned`` (pid: pidfd) every live process below any of ``roots`` not pinned yet (but ``spare``
    and what is below them). A pidfd names its process even after it is orphaned or ends, so a caller that
    pins again, with the pinned pids among the roots, keeps reaching a tree whose top has ended (its
    orphans went to init) and never signals a stranger that took a pid since."""
    children: dict[int, list[Proc]] = {}
    for proc in _every_process():
        children.setdefault(proc.ppid, []).append(proc)
    spared = set(spare)
    parents = [root for root in roots if root not in spared]
    while parents:
        below = [child for parent in parents for child in children.get(parent, ()) if child.pid not in spared]
        for proc in below:
            if proc.pid in pinned or proc.zombie:
                continue
            try:
                pidfd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue
            now = stat(proc.pid)
            if now is not None and now.ppid == proc.ppid:  # the same process as the scan's
                pinned[proc.pid] = pidfd
            else:
                os.close(pidfd)
        parents = [child.pid for child in below]
