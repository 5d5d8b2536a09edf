"""``./dev bench`` in its smoke mode: every figure measured, the run appended to the history and compared
with the previous one, and nothing left behind (no process, no SysV IPC, no temporary directory).

The bench picks free ports itself; DLS_TEST_BENCH_PORT=P makes it use P to P+5 instead (for a machine
where each user has a range of ports).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
from dls_shm import ipc_key_for
from dls_testkit.ipc import ipc_left

TOOLS = Path(__file__).resolve().parent.parent / "tools"

#: What every run measures (the cases of issue 13's item 1, the floors, the references), by name in the history.
RATES = ["echo.single", "echo.parallel", "lockf.single", "lockf.parallel", "lockf.contended", "bare.single",
         "bare.parallel", "raw.single", "raw.parallel", "remote.single", "remote.parallel", "remote.contended",
         "local.single", "local.parallel", "local.contended", "server2.single", "tls.single"]
PARALLEL = [".min", ".max", ".spread"]
CONTENDED = [".p50_ms", ".p99_ms", ".p99_handoffs"]
FIGURES = {
    *RATES,
    *(case + tail for case in ("echo.parallel", "lockf.parallel", "bare.parallel", "raw.parallel",
                               "remote.parallel", "local.parallel",
                               "lockf.contended", "remote.contended", "local.contended") for tail in PARALLEL),
    *(case + tail for case in ("lockf.contended", "remote.contended", "local.contended") for tail in CONTENDED),
    "startup.help", "startup.lock", "startup.granted", "startup.lock_compiling",
    *(("flock.help", "flock.lock") if shutil.which("flock") else ()),
}
#: Issue 13's goals the table judges, each PASS or MISS.
GOALS = 11


def bench_processes(marker: str) -> list[str]:
    """Live processes whose command line or environment names ``marker`` (the test's directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if marker in " ".join(proc.info["cmdline"] or ()) or any(marker in v for v in proc.environ().values()):
                found.append(f"{proc.pid} {proc.info['cmdline']}")
        except (psutil.Error, OSError):
            continue
    return found


def test_bench_smoke_run_measures_everything_records_it_and_leaves_nothing(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    earlier = {"date": "2026-01-01T00:00:00+00:00", "commit": None, "load": [0.0, 0.0, 0.0],
               "figures": {"remote.single": 1000.0}}
    history.write_text(json.dumps(earlier) + "\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("JDLS", "DLS_IPC_KEY")}
    env.update(TMPDIR=str(scratch), JBCRELEASEDIR=str(tmp_path / "release"))
    port = os.environ.get("DLS_TEST_BENCH_PORT")
    result = subprocess.run(
        [sys.executable, str(TOOLS / "bench.py"), "--seconds", "0.2", "--quick", "--history", str(history),
         *(("--port", port) if port else ())],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = result.stdout
    assert result.returncode == 0, result.stderr + out

    lines = history.read_text().splitlines()
    assert len(lines) == 2, lines
    entry = json.loads(lines[-1])
    assert {"date", "commit", "load", "figures"} <= entry.keys()
    assert len(entry["load"]) == 3
    missing = FIGURES - entry["figures"].keys()
    assert not missing, f"figures not measured: {sorted(missing)}\n{out}"
    assert all(value > 0 for name, value in entry["figures"].items() if name in RATES)

    assert len(re.findall(r"\b(?:PASS|MISS)\b", out)) == GOALS, out
    client = next(line for line in out.splitlines() if line.startswith("Client, 1 process ") and "echo 1" in line)
    now = entry["figures"]["remote.single"]
    assert re.search(rf"1,000 /s +{now / 1000:.2f}$", client), client  # the previous run's value, now/previous

    root = re.search(r"temporary directory (\S+)", out)
    assert root, out
    assert not list(scratch.iterdir()), "the bench left files in its temporary directory"
    for instance in (Path(root[1]), Path(root[1]) / "secondary", Path(root[1]) / "tls"):
        assert not ipc_left(ipc_key_for(instance)), f"IPC of {instance} left"
    assert not bench_processes(str(tmp_path)), "processes of the bench left"


def test_bench_refuses_a_history_file_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--history", str(blocker / "history.jsonl")],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 73
    assert result.stderr.startswith("bench: cannot write the history file") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
