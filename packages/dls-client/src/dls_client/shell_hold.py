"""dls-lock --hold and -u: a record lock held for the life of the calling shell, as ``exec 9>F; flock 9``.

flock(1)'s descriptor form locks a descriptor the shell keeps open, so the lock
lasts until the shell (or whatever inherited the descriptor) ends. A dls lock
is held by a connection to the service, which no shell can keep; here a
process keeps it for the shell:

- ``dls-lock --hold FILE KEY`` forks the *hold* process (ps: "dls-lock hold"),
  which takes the lock and tells the command's first process the outcome; that
  one exits with it (0: held). The hold process keeps the lock until the shell
  (dls-lock's parent) ends, however it ends: it waits on a pidfd of the shell,
  opened before the fork, so no other process that takes the pid later counts.
- ``dls-lock -u FILE KEY`` from the same shell asks it to release the lock,
  over a unix socket named after the shell (pid and start time), the file's
  inode and the key, in a directory of the user's own,
  $TMPDIR/dls-lock-UID.XXXXXXXX (/tmp without TMPDIR), made by mkdtemp (mode
  0700) and found again by its owner and mode. Another user can neither bind
  that name first (squat it, as an abstract socket's name can be: audit F4)
  nor enter the directory; a directory of the same name pattern that is not a
  0700 directory of the user's own is ignored. The hold process
  also serves only a peer of the same user (or root) whose parent is that
  shell, and -u only a server of its own user, so neither a stranger nor
  another shell can release it or pose as it.
- A lost lock is told: the hold process says so on the standard error it was
  given (the shell's), sends TERM (and CONT) to the shell and every process
  below it, and KILL to those left -k seconds later: the shell's work must not
  go on without the lock, as dls-lock stops a command's. A -u asked meanwhile
  is answered "lost" (75).
- If the hold process itself is killed, even by SIGKILL, the service releases
  the lock with its connection, and its *guard* (a child forked before any
  thread, ps: "dls-lock guard") finds the pipe between them closed without a
  word: it tells the loss and stops the shell the same way. Only killing both
  at once leaves the shell running untold.
- If the hold process is stopped (SIGSTOP, frozen), it can no longer hear that
  its lock is lost: the guard stops the shell before the hold process's lease
  runs out (``dls_client.lease``), as dls-lock's keeper stops a command.
- The guard keeps duplicates of the lock's connections
  (``dls_client.kept_connections``): a killed hold process's lock is freed only
  once the guard has killed the shell and ended (and not while it is stopped).

Processes the shell leaves running after it ends do not keep the lock (the
hold process is not their parent and cannot follow them): the page says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
import socket
import stat as file_stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable

from dls_proto import Mode

from . import exitcodes
from .client import Client
from .config import Config
from .errors import ConfigurationError, DlsError, Holder, LockLost, LockRefused
from .kept_connections import KeptConnections
from .lease import Lease, Renewal, Watch, boottime, ran_out_message
from .locks import FileRef
from .process_tree import die_with_parent, pin_descendants, set_name, stat

#: What the hold process writes to its guard: granted (it now answers for the shell), done (released).
_GRANTED, _DONE = b"g", b"d"
#: What the hold process answers -u: released, or lost (followed by the reason).
_RELEASED, _LOST = b"r", b"l"
#: The poll period of the wait for the shell's end after the lock was lost (the KILL deadline).
_TICK = 0.05


def _start_time(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat, field 22): with the pid, it
    names one process for as long as the machine runs."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        text = f.read().decode("ascii", "replace")
    return text[text.rfind(")") + 2:].split()[19]


def socket_parent() -> str:
    """Where the users' socket directories are made (each user's own, found again by name, owner and mode):
    $TMPDIR, else /tmp. -u must see the same TMPDIR as --hold (the same shell does)."""
    return os.environ.get("TMPDIR") or "/tmp"  # noqa: S108 - a directory of the user's own is made there, checked


def socket_file(shell: int, inode: int, key: bytes) -> str:
    """The socket's name, in the user's directory, of the hold process of (the file's inode, key) for ``shell``."""
    return f"{shell}.{_start_time(shell)}.{inode}.{hashlib.sha256(key).hexdigest()[:24]}"


def _own_dir(path: str) -> int | None:
    """A descriptor of the directory ``path`` if it is this user's own with mode 0700 (not a symlink; checked on
    the descriptor, so what is checked is what is used); None if it is not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and file_stat.S_IMODE(st.st_mode) == 0o700:
        return fd
    os.close(fd)
    return None


def socket_dirs() -> list[int]:
    """The user's socket directories, in name order, as open descriptors (the caller closes them): dls-lock-UID.*
    in socket_parent() that are directories of this user's own with mode 0700. What another user made with
    such a name (to squat it, or to see who locks what) is ignored; /tmp is sticky, so one that passes stays
    the user's. A socket in one is reached as /proc/self/fd/N/NAME: a TMPDIR's path may be longer than a
    unix socket's address may be (108 bytes)."""
    prefix = f"dls-lock-{os.geteuid()}."
    try:
        names = sorted(name for name in os.listdir(socket_parent()) if name.startswith(prefix))
    except OSError:
        return []
    return [fd for fd in (_own_dir(os.path.join(socket_parent(), name)) for name in names) if fd is not None]


def _address(directory: int, file: str) -> str:
    return f"/proc/self/fd/{directory}/{file}"


def _connected(address: str) -> socket.socket | None:
    """A connection to the socket at ``address``; None if nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None
    return sock


def _listen(file: str) -> tuple[socket.socket, int] | None:
    """Listen on ``file`` in the user's first socket directory (made if there is none): the socket and the
    directory's descriptor (to remove the socket at the end); None if a hold process listens on ``file``
    already (in any of the user's directories). A socket file nothing listens on is a killed hold process's,
    and is replaced. OSError if none can be made."""
    directories = socket_dirs()
    try:
        for directory in directories:
            live = _connected(_address(directory, file))
            if live is not None:
                live.close()
                return None
        if not directories:
            made = _own_dir(tempfile.mkdtemp(prefix=f"dls-lock-{os.geteuid()}.", dir=socket_parent()))
            if made is None:
                raise OSError("the directory it made is not its own any more")
            directories.append(made)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                server.bind(_address(directories[0], file))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                os.unlink(file, dir_fd=directories[0])  # nothing listened on it above: a killed hold process's
                server.bind(_address(directories[0], file))
            server.listen(4)
        except BaseException:
            server.close()
            raise
        return server, directories.pop(0)
    finally:
        for directory in directories:
            os.close(directory)


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket (SO_PEERCRED, from the kernel)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def stop_shell(shell_fd: int, shell: int, grace: float, spare: tuple[int, ...]) -> None:
    """TERM (and CONT) to the shell and every process below it but ``spare`` (and what is below those), KILL
    to what is left after ``grace`` seconds. Each process found is pinned by a pidfd and looked below again
    until the KILL: a shell that dies of the TERM leaves its children to init, and they are still reached."""
    pinned: dict[int, int] = {}

    def send(signum: int) -> None:
        pin_descendants([shell, *pinned], pinned, spare)
        for pidfd in [*pinned.values(), shell_fd]:  # the shell last: its children first, while still below it
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)

    try:
        if grace > 0:
            send(signal.SIGTERM)
            send(signal.SIGCONT)
            deadline = time.monotonic() + grace
            while (left := deadline - time.monotonic()) > 0:
                select.select([], [], [], min(left, _TICK))
                pin_descendants([shell, *pinned], pinned, spare)  # what was forked meanwhile
        send(signal.SIGKILL)
    finally:
        for pidfd in pinned.values():
            os.close(pidfd)


class Hold:
    """The hold process's side, once it has the lock: serve -u, watch the shell, tell a loss."""

    def __init__(self, *, shell: int, shell_fd: int, name: str, grace: float, guard: int, guard_pid: int,
                 server: socket.socket) -> None:
        self.shell = shell
        self.shell_fd = shell_fd
        self.name = name
        self.grace = grace
        self.guard = guard
        self.guard_pid = guard_pid
        self.server = server
        #: Releases the lock: None, or why it was found lost. Set once the lock is held.
        self.release: Callable[[], str | None] = lambda: None
        self.lost: str | None = None
        self._wake_read, self._wake_write = os.pipe()

    def on_lost(self, reason: str) -> None:
        """From the client's watcher thread: the lock is lost; the main loop acts on it."""
        if self.lost is None:
            self.lost = reason
            os.write(self._wake_write, b"!")

    def run(self) -> int:
        """Until the shell ends, or -u: the lock released (or found lost) by then. The exit status nobody
        reads but a test: 0 released, LOST lost. A guard that ends first (killed) leaves nothing to stop the
        shell should this process be killed next: that is told and acted on as a lost lock."""
        stopped = False
        guard_fd = os.pidfd_open(self.guard_pid)
        watched = [self.shell_fd, self.server.fileno(), self._wake_read, guard_fd]
        while True:
            ready = select.select(watched, [], [])[0]
            if guard_fd in ready:
                watched.remove(guard_fd)
                os.close(guard_fd)
                if self.lost is None:
                    self.lost = (f"its guard, pid {self.guard_pid}, ended: nothing would stop the shell if the "
                                 "hold process were killed next")
            if self.lost is not None and not stopped:
                stopped = True
                _tell(f"lost the lock on {self.name} ({self.lost}): stopping the shell, pid {self.shell}, and "
                      f"what it started (TERM now, KILL after {self.grace:g} s)")
                stop_shell(self.shell_fd, self.shell, self.grace, (os.getpid(), self.guard_pid))
            if self.server.fileno() in ready and self._serve_unlock():
                return self._end()
            if self.shell_fd in ready:
                return self._end()

    def _serve_unlock(self) -> bool:
        """Answer one -u; True if it was the shell's (the lock is then released, or was lost)."""
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(5)
            pid, uid = _peer(conn)
            caller = stat(pid)
            if uid not in (0, os.getuid()) or caller is None or caller.ppid != self.shell:
                return False  # not of this shell: no answer, the connection is closed
            if self.lost is None:
                self.lost = self.release()
            with contextlib.suppress(OSError):
                conn.sendall(_RELEASED if self.lost is None else _LOST + self.lost.encode())
        return True

    def _end(self) -> int:
        if self.lost is None:
            self.lost = self.release()
        with contextlib.suppress(BrokenPipeError):  # a guard that stopped the shell (the lease ran out) ended
            os.write(self.guard, _DONE)
        os.close(self.guard)
        os.waitpid(self.guard_pid, 0)  # it ends at once, told: reaped here rather than left to init
        return exitcodes.OK if self.lost is None else exitcodes.LOST


def fork_guard(shell: int, shell_fd: int, name: str, grace: float,
               close: tuple[int, ...]) -> tuple[int, int, Lease, KeptConnections]:
    """Fork the guard of the hold process (call it while the process has one thread); (the write end of the
    pipe the guard reads, its pid, the lease the hold process renews once it holds the lock, where it hands
    the guard the lock's connections). The guard
    stops the shell if the hold process ends holding the lock without saying it released it, or lets its
    lease run out. ``close``: the hold process's descriptors the guard must not keep open (the outcome
    pipe, the -u socket)."""
    read_end, write_end = os.pipe()
    lease = Lease(grace)
    connections = KeptConnections()
    holder = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = exitcodes.SOFTWARE
        try:
            for fd in (write_end, *close):
                os.close(fd)
            connections.watchdog_side()
            code = _guard(holder, read_end, shell, shell_fd, name, Watch(lease), connections)
        finally:
            os._exit(code)
    os.close(read_end)
    connections.holder_side()
    return write_end, pid, lease, connections


def _guard(holder: int, read_end: int, shell: int, shell_fd: int, name: str, lease: Watch,
           connections: KeptConnections) -> int:
    set_name("dls-lock guard")
    # TERM too: `pkill dls-lock` (or a service stop) must not take the guard with the hold process, or nothing
    # would stop the shell; the guard ends when its work is done, and KILL ends it.
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    said = b""
    while True:
        wait, kill_after = lease.due()
        if kill_after is not None:
            print(ran_out_message(holder, f"the shell, pid {shell}, and what it started",
                                  min(lease.grace, kill_after)), file=sys.stderr, flush=True)
            stop_shell(shell_fd, shell, min(lease.grace, kill_after), (os.getpid(), holder))
            return exitcodes.LOST
        until = boottime() + wait
        readable = select.select([read_end, connections.fileno()], [], [], wait)[0]
        lease.slept(until)
        connections.take()
        if read_end in readable:
            chunk = os.read(read_end, 16)
            if not chunk:
                break
            said += chunk
    if _GRANTED in said and _DONE not in said:
        # The service freed the lock the moment the hold process's connection closed and may have handed it
        # on already: no grace, or the shell would run beside the next holder (KILL at once, as the keeper).
        _tell(f"the process holding the lock on {name} (pid {holder}) ended: the lock is gone; killing the "
              f"shell, pid {shell}, and what it started (KILL now: the lock may be someone else's already)")
        stop_shell(shell_fd, shell, 0, (os.getpid(),))
        return exitcodes.LOST
    return exitcodes.OK


def unlock(shell: int, inode: int, key: bytes, name: str) -> int:
    """``dls-lock -u``: ask the hold process of this shell to release the lock; the exit status."""
    file = socket_file(shell, inode, key)
    directories = socket_dirs()
    sock = next(filter(None, (_connected(_address(directory, file)) for directory in directories)), None)
    for directory in directories:
        os.close(directory)
    if sock is None:
        _tell(f"{name} is not held for this shell (pid {shell}): nothing to release")
        return exitcodes.FAILED
    with sock:
        _, uid = _peer(sock)
        if uid not in (0, os.getuid()):
            _tell(f"{name}: the socket of its hold process belongs to uid {uid}, not to you: not asked")
            return exitcodes.FAILED
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
    if answer == _RELEASED:
        return exitcodes.OK
    if answer.startswith(_LOST):
        _tell(f"lost the lock on {name} ({answer[1:].decode(errors='replace')}) before -u")
        return exitcodes.LOST
    _tell(f"{name} is not held for this shell (pid {shell}): nothing to release")
    return exitcodes.FAILED


def _tell(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"dls-lock: {text}", file=sys.stderr, flush=True)


def wait_for_outcome(read_end: int) -> int | None:
    """The foreground's side: the hold process's outcome (an exit status), None if it ended without one."""
    data = b""
    while chunk := os.read(read_end, 4):
        data += chunk
    return data[0] if data else None


def detach_from_foreground() -> None:
    """The hold process, once it has the lock: no longer killed with the foreground dls-lock (which exits
    now), and not by the terminal's signals to the shell's job (the shell's end is what ends the hold)."""
    die_with_parent(0)
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_IGN)


class HoldRequest:
    """What --hold needs from the command line (see ``lock_command``)."""

    def __init__(self, *, file: str, key: str, ref: FileRef, mode: Mode, nonblock: bool, timeout: float | None,
                 conflict: int, grace: float, say: Callable[[str], None] | None,
                 on_wait: Callable[[Holder], None]) -> None:
        self.file, self.key, self.ref, self.mode = file, key, ref, mode
        self.nonblock, self.timeout, self.conflict, self.grace, self.say = nonblock, timeout, conflict, grace, say
        self.on_wait = on_wait  # what says "waiting for" (lock_command.wait_notice)
        self.name = f"{file} {key}"


def hold(request: HoldRequest, config: Config) -> int:
    """``dls-lock --hold``: fork the hold process and exit with the outcome it reports (0: the lock is held
    for the shell, this process's parent)."""
    shell = os.getppid()
    shell_fd = os.pidfd_open(shell)
    if os.getppid() != shell or shell == 1:  # the parent ended (before pidfd_open), or there is none
        _tell("--hold holds the lock for the shell that runs it, and there is none (dls-lock's parent is init)")
        return exitcodes.FAILED
    name = socket_file(shell, request.ref.inode, os.fsencode(request.key))
    outcome_read, outcome_write = os.pipe()
    foreground = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = exitcodes.SOFTWARE
        try:
            os.close(outcome_read)
            code = _hold_process(request, config, foreground, shell, shell_fd, name, outcome_write)
        except BaseException:
            import traceback  # only here: with linecache and tokenize, milliseconds of dls-lock's start-up

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(outcome_write)
    os.close(shell_fd)
    outcome = wait_for_outcome(outcome_read)
    if outcome is None:
        _tell(f"the process that was to hold the lock on {request.name} ended without it")
        return exitcodes.SOFTWARE
    return outcome


def _hold_process(request: HoldRequest, config: Config, foreground: int, shell: int, shell_fd: int, name: str,
                  outcome: int) -> int:
    set_name("dls-lock hold")
    die_with_parent(signal.SIGKILL)  # until the lock is held, it goes with the dls-lock the shell waits for
    if os.getppid() != foreground:
        return exitcodes.OK
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # not the shell's: a $(...) or a pipe reading dls-lock's output must see its end
        os.dup2(null, fd)
    os.close(null)

    try:
        listening = _listen(name)
    except OSError as exc:
        _tell(f"cannot make the socket dls-lock -u asks the hold process through (in a directory of yours under "
              f"{socket_parent()}): {exc}")
        return _report(outcome, exitcodes.CANT_CREATE)
    if listening is None:
        _tell(f"{request.name} is held for this shell already (release it with dls-lock -u first)")
        return _report(outcome, request.conflict)
    server, directory = listening
    try:
        return _holding(request, config, shell, shell_fd, server, outcome)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=directory)


def _report(outcome: int, status: int) -> int:
    """Tell the foreground dls-lock its exit status (it exits with it)."""
    os.write(outcome, bytes([status]))
    os.close(outcome)
    return status


def _holding(request: HoldRequest, config: Config, shell: int, shell_fd: int, server: socket.socket,
             outcome: int) -> int:
    """The hold process, listening for -u: take the lock, report the outcome, and keep it for the shell."""
    # Before the client starts its threads: a fork copies only the calling thread.
    guard, guard_pid, lease, connections = fork_guard(shell, shell_fd, request.name, request.grace,
                                                      (outcome, server.fileno()))
    keeper = Hold(shell=shell, shell_fd=shell_fd, name=request.name, grace=request.grace, guard=guard,
                  guard_pid=guard_pid, server=server)

    client = Client(config)
    try:
        try:
            held = client.lock(request.ref, os.fsencode(request.key), request.mode, wait=not request.nonblock,
                               timeout=request.timeout, on_wait=request.on_wait,
                               on_lost=lambda lost: keeper.on_lost(lost.lost_reason or "lost"))
        except LockRefused as exc:
            if request.say:
                request.say(str(exc))
            return _report(outcome, request.conflict)
        except ConfigurationError as exc:  # found only when the services answered (SERVER2 naming SERVER's)
            _tell(str(exc))
            return _report(outcome, exitcodes.CONFIG)
        except DlsError as exc:
            _tell(str(exc))
            return _report(outcome, exitcodes.UNAVAILABLE)
        if held.lost:
            _tell(f"lost the lock on {request.name} ({held.lost_reason or 'lost'}) as it was granted")
            return _report(outcome, exitcodes.UNAVAILABLE)

        def release() -> str | None:
            try:
                held.release()
            except LockLost as exc:
                return exc.reason
            except DlsError:
                pass  # the lock goes with the connection, closed next
            return None

        keeper.release = release
        Renewal(lease, lambda: client.held_until(held), also=lambda: connections.keep(client.held_through(held)))
        os.write(guard, _GRANTED)
        detach_from_foreground()
        os.chdir("/")  # not to keep the shell's directory busy (a file system it is on could not be unmounted)
        if request.say:
            request.say(f"locked {request.name} ({Mode(held.mode).name}) for the shell, pid {shell}, by pid "
                        f"{os.getpid()}")
        _report(outcome, exitcodes.OK)
        return keeper.run()
    finally:
        client.close()
