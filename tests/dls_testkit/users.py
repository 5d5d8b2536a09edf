"""Another local user: code run as ``nobody`` (and, when asked, as a member of a group), and a directory
that user can reach.

The test interpreter lives where ``nobody`` cannot exec it, so the other user is a forked child that drops
to that user (``setgroups``, ``setgid``, ``setuid``) and runs a function of the test: every module it needs
must be imported before the fork (codecs included), since nobody may not read them afterwards. pytest's
tmp_path sits under 0700 directories, so ``reachable_dir`` makes a fresh directory under /tmp with mode 0711.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

codecs.lookup("ascii")  # loaded now: a child may need it once it can no longer read the library

#: The unprivileged user and group of the tests.
NOBODY = 65534
#: A group nobody is in: the service's group of the permission tests (a number needs no /etc/group entry).
SERVICE_GID = 47110


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A new directory under /tmp that every user may enter but not list or write (0711), removed after.

    /tmp itself, not $TMPDIR: another user must reach it, whatever the modes of the directories the test
    run's own temporary directory sits in (a clone in a private directory has a private $TMPDIR)."""
    base = Path(tempfile.mkdtemp(prefix="dls-users-", dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(body: Callable[[], int | None], *, uid: int = NOBODY, gid: int = NOBODY,
            groups: Sequence[int] = ()) -> tuple[int, str]:
    """Run ``body`` in a forked child as ``uid``/``gid`` with supplementary ``groups``: (its exit code, what it
    wrote to stdout and stderr). An exception in ``body`` is printed and exits 99."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            code = body() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as output:
        while chunk := output.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")
