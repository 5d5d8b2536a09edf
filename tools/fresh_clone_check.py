"""The README's two commands from a fresh clone where a new user's clone may well be (./dev fresh-clone-check).

A clone in the developer's own directory hides what a new user meets: a home directory that only its owner
may enter, a long path, a later day than the one the files were committed on. This check:

1. clones the repository's committed HEAD (what is not committed is not checked, and it says so) into a
   private directory (0700, as a home directory or a mktemp directory is) whose path is long (at least
   ``--length`` characters: longer than a shebang line may be, and than dls-ipcrm shows of a command line);
2. runs ``./dev demo`` and ``./dev test`` there, as the README's Quick start says, on a later day: 400 days
   on (``--days``; 0 leaves the clock alone), with libfaketime (Debian's faketime package, installed when
   missing and we are root) shifting the calendar, not the monotonic clock (see ``later_day``);
3. checks that they left nothing behind: no process, no SysV IPC object, nothing in their temporary
   directory (TMPDIR, a private one as pam_tmpdir gives each user; pytest's own aside). As root they run in
   their own PID and IPC namespaces (``unshare``), so that what they leave is told apart from what other
   runs on the machine do and is gone with them; otherwise leftover processes are found by the clone's path
   and IPC objects by comparing /proc/sysvipc before and after (another run on the machine may show there);
4. removes the clone, its venv and everything else it made, whatever happened (``--keep`` keeps the clone).

Exit status 0 when both commands passed and nothing was left behind; 1 when a command failed; 3 when
something was left behind; 2 for a usage error or a clone that could not be made. It uses only the standard
library: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (("./dev", "demo"), ("./dev", "test"))
#: The namespaces the two commands run in, as root: their own processes (pid 1 is this script, which reaps
#: the orphans as init does) and their own SysV IPC objects.
UNSHARE = ("unshare", "--ipc", "--pid", "--fork", "--mount-proc")
#: Variables of the developer's shell that point into this checkout; a new user's shell has none of them.
OURS = ("VIRTUAL_ENV", "DLS_VENV", "PYTHONPATH", "PYTHONHOME", "JBCRELEASEDIR", "JDLS", "DLS_IPC_KEY")
#: The SysV IPC lists in /proc/sysvipc, and the column of each that holds the owner's uid.
SYSVIPC = {"shm": 7, "sem": 4, "msg": 7}
EXIT_LEFT_BEHIND = 3


def say(text: str) -> None:
    print(f"fresh-clone-check: {text}", flush=True)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def deep_private_directory(parent: Path | None, length: int) -> tuple[Path, Path]:
    """A new 0700 directory (removed at the end) and, under it, a path of at least ``length`` characters for
    the clone, each directory on the way 0700 too."""
    top = Path(tempfile.mkdtemp(prefix="dls-fresh-clone-", dir=parent))  # mkdtemp makes it 0700
    path, n = top, 0
    while len(str(path / "dls")) < length:
        n += 1
        path = path / f"a-private-directory-with-a-long-name-{n:02d}"
        path.mkdir(mode=0o700)
    return top, path / "dls"


def clean_environment() -> dict[str, str]:
    """The environment of a new user's shell: this checkout's venv and instance variables left out."""
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not Path(p).resolve().is_relative_to(ROOT))
    return env


#: Makes a monotonic clock_nanosleep a plain system call, past libfaketime 0.9.10: with the monotonic clock
#: left alone (FAKETIME_DONT_FAKE_MONOTONIC) its clock_nanosleep fails with EINVAL, and so does every
#: time.sleep.
SLEEP_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
typedef int (*sleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);
int clock_nanosleep(clockid_t clock, int flags, const struct timespec *req, struct timespec *rem) {
    static sleep_fn next;
    if (clock == CLOCK_MONOTONIC)
        return syscall(SYS_clock_nanosleep, clock, flags, req, rem) == -1 ? errno : 0;
    if (!next)
        next = (sleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, req, rem);
}
"""
LIBFAKETIME = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
               "/usr/local/lib/faketime/libfaketime.so.1")


def _libfaketime() -> Path | None:
    for pattern in LIBFAKETIME:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    return None


def later_day(days: int, shared: Path) -> dict[str, str] | None:
    """The environment that moves the calendar ``days`` on for a process and its children, or None.

    libfaketime (0.9.10, Debian 12) does it, with two repairs. The monotonic clock is left alone
    (FAKETIME_DONT_FAKE_MONOTONIC): faked, it is what Python's timed waits on a lock (sem_clockwait, which
    libfaketime does not intercept) take their deadline from, and they then last the shift. And sleeping on
    the monotonic clock goes straight to the kernel (SLEEP_SHIM, compiled here into ``shared``, which every
    user can read: the tests run programs as nobody). man-db's helpers run without their seccomp sandbox
    (MAN_DISABLE_SECCOMP), in which libfaketime cannot open its semaphore and says so on every page.
    """
    library = _libfaketime()
    if library is None and os.geteuid() == 0 and shutil.which("apt-get"):
        say("installing faketime (libfaketime) to run the commands on a later day")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-qq", "-y", "--no-install-recommends", "faketime"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        library = _libfaketime()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if library is None or compiler is None:
        say(f"{'libfaketime (faketime)' if library is None else 'a C compiler'} is missing: the commands run "
            "on today's date")
        return None
    (shared / "sleep_shim.c").write_text(SLEEP_SHIM)
    shim = shared / "sleep_shim.so"
    built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(shared / "sleep_shim.c"),
                            "-ldl"], capture_output=True, text=True, check=False)
    if built.returncode != 0:
        say(f"the sleep shim did not compile, the commands run on today's date:\n{built.stderr}")
        return None
    shim.chmod(0o755)
    return {"LD_PRELOAD": f"{shim} {library}", "FAKETIME": f"+{days}d", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "MAN_DISABLE_SECCOMP": "1"}


def namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run([*UNSHARE, "true"], capture_output=True, check=False).returncode == 0


def ipc_objects() -> set[str]:
    """This IPC namespace's SysV objects, as "shm key 0x... id N (owner uid U)"."""
    found = set()
    for kind, uid in SYSVIPC.items():
        try:
            lines = Path("/proc/sysvipc", kind).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            found.add(f"{kind} key 0x{int(fields[0]) & 0xFFFFFFFF:08x} id {fields[1]} (uid {fields[uid]})")
    return found


def other_processes() -> dict[int, list[str]]:
    """Every live process but this one (zombies are not), with its command line, program and working
    directory (what of them can be read)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            places = [(proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()]
        except (OSError, IndexError):
            continue
        for link in ("exe", "cwd"):
            try:
                places.append(os.readlink(proc / link))
            except OSError:
                pass
        found[int(proc.name)] = places
    return found


def shown(processes: dict[int, list[str]]) -> list[str]:
    return [f"process {pid}: {places[0][:200]}" for pid, places in sorted(processes.items())]


def processes_under(path: Path) -> dict[int, list[str]]:
    """Live processes whose command line, program or working directory is under ``path``."""
    return {pid: places for pid, places in other_processes().items() if any(str(path) in p for p in places)}


def reap_orphans() -> None:
    """As init: collect every child that has ended (orphans of daemons included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_as_init(command: Sequence[str], cwd: Path, env: dict[str, str]) -> int:
    """Run ``command`` and return its exit status, reaping whatever else ends meanwhile (a daemon's orphans
    are ours in the namespace: left as zombies, they would still look alive to the tests)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode


def inside(clone: Path) -> int:
    """The two commands in the clone (in the environment given: perhaps a later day); then what they left
    behind. Run as pid 1 of the namespaces when isolated, else as a plain child."""
    isolated = os.getpid() == 1
    env = os.environ.copy()
    today = subprocess.run(["date", "+%Y-%m-%d"], capture_output=True, text=True, env=env, check=False)
    say(f"the clock of the two commands says {today.stdout.strip()}")
    failed = []
    for command in COMMANDS:
        say(f"$ {' '.join(command)}   (in {clone})")
        started = time.monotonic()
        status = run_as_init(command, clone, env) if isolated else subprocess.run(
            command, cwd=clone, env=env, check=False).returncode
        say(f"{' '.join(command)}: exit status {status} after {time.monotonic() - started:.0f} s")
        if status != 0:
            failed.append(" ".join(command))
    if not isolated:
        return 1 if failed else 0
    time.sleep(1)  # let daemons that are stopping finish
    reap_orphans()
    left = shown(other_processes()) + sorted(ipc_objects())
    for item in left:
        say(f"left behind: {item}")
    if failed:
        say(f"failed: {', '.join(failed)}")
        return 1
    return EXIT_LEFT_BEHIND if left else 0


def kill(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check(args: argparse.Namespace) -> int:
    started = time.monotonic()
    head = git("rev-parse", "HEAD")
    if git("status", "--porcelain", "--untracked-files=no"):
        say("note: this checkout has uncommitted changes; only the committed HEAD is checked")
    isolate = namespaces_available()
    if not isolate:
        say("not isolated (needs root and unshare): leftovers are found by path and by comparing ipcs")
    top, clone = deep_private_directory(args.dir, args.length)
    tmp = top / "tmp"
    tmp.mkdir(mode=0o700)
    # /tmp, not TMPDIR (perhaps private): every user must reach what is preloaded into its programs
    shared = Path(tempfile.mkdtemp(prefix="dls-fresh-clone-faketime-", dir="/tmp"))
    shared.chmod(0o755)
    status = 0
    try:
        env = {**clean_environment(), "TMPDIR": str(tmp)}
        if args.days:
            env.update(later_day(args.days, shared) or {})
        say(f"cloning {head[:12]} into a 0700 directory, a path of {len(str(clone))} characters:\n  {clone}")
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], check=True)
        git("checkout", "--quiet", "--detach", head, cwd=clone)
        ipc_before = ipc_objects()
        command = [sys.executable, str(Path(__file__).resolve()), "--inside", str(clone)]
        if isolate:
            command = [*UNSHARE, *command]
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            say(f"timed out after {args.timeout} s: stopping it")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = 1
        processes = processes_under(top)
        left = shown(processes)
        kill(list(processes))
        left += [f"{path} in TMPDIR" for path in sorted(tmp.iterdir()) if not path.name.startswith("pytest-of-")]
        if not isolate:  # in the namespaces, the inner run has looked (and the IPC objects are gone with them)
            left += [f"{item} (or another run's on this machine)" for item in sorted(ipc_objects() - ipc_before)]
        for item in left:
            say(f"left behind: {item}")
        if left and status == 0:
            status = EXIT_LEFT_BEHIND
    except subprocess.CalledProcessError as exc:
        say(f"{' '.join(map(str, exc.cmd))} failed ({exc.returncode})")
        status = 2
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        if args.keep:
            say(f"kept: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
            if top.exists():
                say(f"could not remove {top}")
                status = status or EXIT_LEFT_BEHIND
    if not args.keep:
        still = processes_under(top)
        if still:
            say(f"still running after the clean-up: {sorted(still)}")
            status = status or EXIT_LEFT_BEHIND
    verdict = "passed" if status == 0 else f"FAILED (exit status {status})"
    say(f"{verdict} in {time.monotonic() - started:.0f} s")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fresh-clone-check", description=__doc__.split("\n\n")[0] if __doc__
                                     else None)
    parser.add_argument("--length", type=int, default=220, metavar="N",
                        help="the clone's path has at least N characters (default 220)")
    parser.add_argument("--days", type=int, default=400, metavar="N",
                        help="run the commands N days later (libfaketime; default 400, 0: today)")
    parser.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help="make the private directory in DIR (default: the temporary directory)")
    parser.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                        help="stop the two commands after this long (default 3600)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (to look into a failure)")
    parser.add_argument("--inside", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside is not None:
        return inside(args.inside)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
