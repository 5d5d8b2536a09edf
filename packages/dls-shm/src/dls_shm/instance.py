"""An instance of the lock service, named by its release directory (JBCRELEASEDIR).

Everything of one instance derives from that directory: the table's IPC key,
pid files, logs, the error trace and the proc/info directory. Two instances
with different directories never meet, which is how a primary and a secondary
service, or many test runs, share one machine.

The names of the service's two long-lived processes live here too, beside the
pid files named after them: the daemon that writes those files and the
operator tools that read them (dls-utils never imports dls-daemon) must spell
them alike.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

from dls_proto import ConfigurationError, environment

from . import trusted

#: The release directory used when JBCRELEASEDIR is not set (as every dls program reads it).
DEFAULT_RELEASE_DIR = environment.DEFAULT_RELEASE_DIR
#: Environment variable that overrides the derived IPC key (decimal or 0x hex).
IPC_KEY_VARIABLE = "DLS_IPC_KEY"

#: The two long-lived processes of a service, as their pid files (run/jdls-<role>.pid) name them.
MONITOR = "monitor"
LISTENER = "listener"
#: In the order they start: the listener looks for the monitor's table when it starts.
ROLES = (MONITOR, LISTENER)
#: How messages name them.
LABELS = {MONITOR: "lock monitor", LISTENER: "lock listener"}


def parse_ipc_key(text: str) -> int:
    """A table's IPC key as DLS_IPC_KEY or a tool's --key gives it (0x hex or decimal, 1 to 0x7fffffff);
    ValueError says what is wrong with it."""
    try:
        if not text.isascii():  # int() takes other scripts' digits too: ASCII only, as every number of dls
            raise ValueError(text)
        key = int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a number such as 0x1a2b3c4d") from None
    if not 0 < key < 1 << 31:
        raise ValueError(f"{text!r} is not between 1 and 0x7fffffff")
    return key


def ipc_key_for(root: Path) -> int:
    """A positive 31-bit SysV key from the directory's real path (an ftok that needs no inode)."""
    key = zlib.crc32(b"dls-table:" + os.fsencode(os.path.realpath(root))) & 0x7FFFFFFF
    return key or 1


#: Room left under a release directory for the instance's own paths (run/jdls-listener.pid,
#: tmp/jbase_error_trace, proc/info/<file>): a directory longer than PATH_MAX less this is refused.
_ROOM = 64


def _checked_root(path: Path, named: str) -> Path:
    """``path`` if it can be an instance's release directory: a directory, or nothing yet (jdls -i makes it;
    the other tools say no service runs there); else ConfigurationError naming ``named`` and the problem (a
    regular file, a name too long, a component that is a file), before any tool trips over it."""
    shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:60]}... ({len(os.fsencode(path))} bytes)"
    try:
        mode: int | None = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP):  # no instance can be there
            raise ConfigurationError(f"{named}={shown}: {exc.strerror}") from None
        mode = None  # not made yet (jdls -i makes it), or not ours to look into: each tool says so its way
    if mode is not None and not stat.S_ISDIR(mode):
        raise ConfigurationError(f"{named}={shown}: not a directory")
    if len(os.fsencode(path)) > os.pathconf("/", "PC_PATH_MAX") - _ROOM:
        raise ConfigurationError(f"{named}={shown}: too long a path for the instance's files (at most "
                                 f"{os.pathconf('/', 'PC_PATH_MAX') - _ROOM} bytes)")
    return path


@dataclass(frozen=True)
class Instance:
    """One lock service's release directory and table key: where each of its files and IPC objects is."""

    root: Path
    key: int

    @classmethod
    def from_environment(cls, root: str | os.PathLike[str] | None = None) -> Instance:
        """The instance of ``root``, else of $JBCRELEASEDIR, else of the default directory; ConfigurationError
        (a ValueError) names the variable when the directory cannot be one, or DLS_IPC_KEY is no key."""
        named = "instance directory" if root else environment.RELEASE_DIR
        path = _checked_root((Path(root) if root else environment.release_dir()).absolute(), named)
        override = os.environ.get(IPC_KEY_VARIABLE)
        if override:
            try:
                key = parse_ipc_key(override)
            except ValueError as exc:
                raise ConfigurationError(f"{IPC_KEY_VARIABLE}: {exc}") from None
        else:
            key = ipc_key_for(path)
        return cls(path, key)

    @property
    def info_dir(self) -> Path:
        return self.root / "proc" / "info"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "jdls.log"

    @property
    def error_trace(self) -> Path:
        return self.root / environment.ERROR_TRACE

    def pid_file(self, role: str) -> Path:
        """The pid file of the monitor or the listener (a role of ROLES)."""
        return self.run_dir / f"jdls-{role}.pid"

    @property
    def lock_dir_file(self) -> Path:
        """Where the listener says which directory its OS record locks are in (its --lock-dir), for the tools
        that show them (show-item-locks, jdls -dvL): one line, the directory's path."""
        return self.run_dir / "lock-dir"

    def recorded_lock_dir(self) -> Path | None:
        """The OS record-lock directory the instance's listener last said it uses, or None (none said, or
        not readable by this user)."""
        try:
            fd = os.open(self.lock_dir_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            text = os.read(fd, 4097).decode("utf-8", "surrogateescape").strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return Path(text) if text.startswith("/") and "\n" not in text and len(text) <= 4096 else None

    def trusted_lock_dir(self) -> Path | None:
        """The recorded OS record-lock directory (``recorded_lock_dir``) for a process to lock in, or None when
        none is recorded; ``trusted.Untrusted`` when the path there is not to be trusted: a symbolic link, not
        a directory, another user's than root's, this user's or the service's (the instance directory's
        owner), or writable by others. One not there (yet) is fine: OsLocks makes it, and checks it."""
        recorded = self.recorded_lock_dir()
        if recorded is None:
            return None
        try:
            st = os.lstat(recorded)
        except FileNotFoundError:
            return recorded
        except OSError as exc:
            raise trusted.Untrusted(recorded, f"cannot be looked at: {exc.strerror or exc}") from None
        problem = trusted.problem_of(st, shared=True, owners=self.owners())
        if problem is None and not stat.S_ISDIR(st.st_mode):
            problem = "is not a directory"
        if problem is not None:
            raise trusted.Untrusted(recorded, problem)
        return recorded

    def lock_dir(self) -> Path:
        """The OS record-lock directory of the instance: the listener's, else where a local process would
        lock ($JDLS_LOCK_DIR, else /tmp/jbase)."""
        return self.recorded_lock_dir() or environment.lock_dir()

    @property
    def servers_dir(self) -> Path:
        """Where the lock servers' pid files are: one file per running lock server."""
        return self.run_dir / "servers"

    def server_pid_file(self, pid: int) -> Path:
        return self.servers_dir / f"{pid}.pid"

    def group(self) -> int:
        """The service's group when --group does not name one: the group of the instance directory (so
        ``chgrp`` of the directory is all an operator does), else this process's, which a new one gets."""
        try:
            return os.stat(self.root).st_gid
        except FileNotFoundError:
            return os.getegid()

    def owners(self) -> frozenset[int]:
        """Whom an application's process trusts in this instance: root, itself and the directory's owner
        (the service's user). The service itself trusts only root and itself (``trusted.trusted_owners``)."""
        try:
            return trusted.trusted_owners(os.stat(self.root).st_uid)
        except OSError:  # not there, or not this user's to look at: root and itself only
            return trusted.trusted_owners()

    def dir_modes(self) -> tuple[tuple[Path, int], ...]:
        """Each directory of the instance with its mode: PRIVATE where only the service writes, SHARED where
        application processes write too (proc/info for local clients, tmp/ for the error trace)."""
        return (
            (self.root, trusted.PRIVATE), (self.root / "proc", trusted.PRIVATE), (self.info_dir, trusted.SHARED),
            (self.run_dir, trusted.PRIVATE), (self.servers_dir, trusted.PRIVATE), (self.log_dir, trusted.PRIVATE),
            (self.error_trace.parent, trusted.SHARED),
        )

    def make_dirs(self, gid: int | None = None) -> None:
        """Make the instance's directories (modes of ``dir_modes``, group ``gid``, default ``group()``), or
        check those there; trusted.Untrusted names a directory the service must not use."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        trusted.check_ancestors(self.root)
        gid = self.group() if gid is None else gid
        for directory, mode in self.dir_modes():
            trusted.make_dir(directory, mode, gid=gid)

    def check_files(self) -> None:
        """Check the service's files that exist (log, error trace, the monitor's and listener's pid files):
        Untrusted names one that is a symlink, another user's or writable by others."""
        for path, shared in ((self.log_file, False), (self.error_trace, True),
                             *((self.pid_file(role), False) for role in ROLES)):
            try:  # the error trace, in tmp/ (SHARED), may have been made by any process of the group
                trusted.check(path, shared=shared, owners=trusted.ANY_OWNER if shared else None)
            except FileNotFoundError:
                continue

    def check_dirs(self) -> None:
        """Check the directories that exist (jdls -k, -K): Untrusted names one that must not be used."""
        for directory, mode in self.dir_modes():
            try:
                trusted.check(directory, shared=mode == trusted.SHARED)
            except FileNotFoundError:
                continue
