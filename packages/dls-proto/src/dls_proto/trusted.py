"""Trusted paths: the instance's and lock directories' files, made with fixed modes and checked before use.

sshd's StrictModes is the model. A directory or file the service relies on is
refused when it is a symlink, is owned by a user other than the one running
(or root), or can be written by group or others: with any of those, another
local user could put words in the daemon's mouth (a planted pid file), make it
write where they choose (a symlinked log), or read what it keeps. Each refusal
is an ``Untrusted`` error that names the path and what is wrong with it.

Two shapes are trusted, on purpose:

- ``PRIVATE`` (0750): what only the service writes (the instance directory, run/,
  log/). Group may read, nobody else may even look.
- ``SHARED`` (03770, owned by the service's group): what the application's
  processes write into too (proc/info, tmp/ with the error trace, the OS-lock
  directories). Sticky, so one writer cannot remove or replace another's file;
  set-group-ID, so every file made in it belongs to the group whoever makes it;
  not open to others at all. Each file in it is created by its writer 0640
  (lock files 0660) with O_EXCL and O_NOFOLLOW, and whatever the daemon reads
  from such a directory is input from the group, not the service's own word.

The checks live in dls-proto, not dls-shm, because a client without dls-shm (a
remote ``Client``) makes and checks its binary lock directory and trace files
by the same rules; ``dls_shm.trusted`` is this module under its old name.

Modes are always set explicitly (``fchmod``/``chmod`` after creating), so the
caller's umask does not matter.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
from pathlib import Path

#: The mode of a directory only the service writes.
PRIVATE = 0o750
#: The mode of a directory the application's processes (in the service's group) write into too.
SHARED = 0o3770
#: The mode of a file: readable by the group, never by others.
FILE = 0o640
#: The mode of a file every member of the group writes: a lock file (opened for writing to lock it) and the
#: error trace (appended to by the application's processes).
GROUP_FILE = 0o660
#: How a file in a checked directory is opened: never through a symlink, never inherited by a child.
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class Untrusted(OSError):
    """A path the service will not use, and why (its ``str`` names both)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def group_id(name: str) -> int:
    """A group given by name or number (``jdls --group``); ValueError names what is wrong."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"no group named {name!r}") from None


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def trusted_owners(*extra: int) -> frozenset[int]:
    """Who may own what this process trusts: root, this process's user, and ``extra`` (the service's user,
    for an application's process)."""
    return frozenset({0, os.geteuid(), *extra})


def owner_name(uid: int) -> str:
    """``uid`` as a message names it: the user's name and number."""
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


#: ``owners`` that accepts any owner: a file of a SHARED directory, which any member of the group may have made.
ANY_OWNER: frozenset[int] = frozenset({-1})


def problem_of(st: os.stat_result, *, shared: bool = False, owners: frozenset[int] | None = None) -> str | None:
    """What is wrong with a directory's or file's ``lstat``, or None when it may be trusted.

    ``shared`` allows group write on a sticky directory (the SHARED shape) and on
    a file (a lock file, the error trace); never write by others. ``owners``
    (default root and this user) ANY_OWNER: a file of a SHARED directory, where
    only one link, no symlink and no write by others are asked.
    """
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        return "is neither a directory nor a regular file"
    if owners is not ANY_OWNER and st.st_uid not in (owners if owners is not None else trusted_owners()):
        return f"owned by another {owner_name(st.st_uid)}"
    perms = stat.S_IMODE(mode)
    if mode & stat.S_IWOTH:
        return f"writable by others (mode {perms:04o})"
    if mode & stat.S_IWGRP:
        if not shared:
            return f"writable by group (mode {perms:04o})"
        if stat.S_ISDIR(mode) and not mode & stat.S_ISVTX:
            return f"writable by group without the sticky bit (mode {perms:04o})"
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        return f"has {st.st_nlink} hard links"
    return None


def check(path: str | os.PathLike[str], *, shared: bool = False, owners: frozenset[int] | None = None) -> None:
    """Raise Untrusted when ``path`` is not to be trusted (FileNotFoundError when it is not there)."""
    problem = problem_of(os.lstat(path), shared=shared, owners=owners)
    if problem is not None:
        raise Untrusted(path, problem)


def check_fd(fd: int, path: str | os.PathLike[str], *, shared: bool = False,
             owners: frozenset[int] | None = None) -> None:
    """``check`` for a file already opened (O_NOFOLLOW): what was opened is what is checked."""
    problem = problem_of(os.fstat(fd), shared=shared, owners=owners)
    if problem is not None:
        raise Untrusted(path, problem)


def check_ancestors(path: str | os.PathLike[str]) -> None:
    """The directories above ``path`` may be trusted: each owned by root or this user and writable by no
    one else, unless sticky (/tmp, /var/tmp), where nobody can rename what another made."""
    here = Path(os.path.abspath(path)).parent
    for directory in (here, *here.parents):
        st = os.stat(directory)  # a symlink above us is the administrator's choice (/var/tmp -> /tmp)
        if st.st_uid not in trusted_owners():
            raise Untrusted(directory, f"owned by another {owner_name(st.st_uid)}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise Untrusted(directory, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def make_dir(path: str | os.PathLike[str], mode: int, *, gid: int | None = None,
             owners: frozenset[int] | None = None) -> bool:
    """Make ``path`` with ``mode`` (and group ``gid``), or check the one there; True when made here.

    Only a directory made here is given its mode and group: one that exists is
    checked, never changed, so a mistake in it is reported to the operator
    rather than quietly repaired over someone's else's head.
    """
    shared = bool(mode & stat.S_IWGRP)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        check(path, shared=shared, owners=owners)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise Untrusted(path, "is not a directory") from None
        return False
    if gid is not None and gid != os.getegid():
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    return True


def open_file(path: str | os.PathLike[str], flags: int, *, mode: int = FILE, shared: bool = False,
              owners: frozenset[int] | None = None) -> int:
    """Open a file of a checked directory without following a symlink, and check what was opened; a file
    this call creates (``flags`` with O_CREAT) is given ``mode`` whatever the umask."""
    try:
        fd = os.open(path, flags | NOFOLLOW | os.O_NONBLOCK, mode)  # O_NONBLOCK: a planted FIFO cannot stall us
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Untrusted(path, "is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if flags & os.O_CREAT and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode \
                and st.st_size == 0:
            os.fchmod(fd, mode)  # made just now under a umask: set what was asked
            st = os.fstat(fd)
        problem = problem_of(st, shared=shared, owners=owners)
        if problem is not None:
            raise Untrusted(path, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_parent(path: Path) -> None:
    """Make the directory of ``path`` when missing (PRIVATE, its own parents as the umask makes them): what
    the instance's ``make_dirs`` normally made already."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, PRIVATE)


def write_new(path: Path, data: bytes, *, mode: int = FILE) -> tuple[int, int]:
    """Replace ``path`` atomically with a file of ``data`` made here (O_EXCL, never through a symlink); the
    (device, inode) of the file made, by which its maker can tell it from a later one of the same name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)  # left by a killed process of our pid: a new file is made below, never reused
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return st.st_dev, st.st_ino
