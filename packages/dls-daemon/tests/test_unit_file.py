"""The shipped systemd unit is one systemd accepts, and it is the locked-down one the README describes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dls_daemon.cli import unit_file

#: What the README's "Security" section promises of the unit.
HARDENING = ("User=dls\n", "Group=dls\n", "UMask=0027\n", "NoNewPrivileges=yes\n", "ProtectSystem=strict\n",
             "PrivateTmp=yes\n", "CapabilityBoundingSet=\n", "StateDirectoryMode=0750\n")


def test_the_unit_runs_the_service_as_its_own_user_in_a_sandbox() -> None:
    text = unit_file()
    for line in HARDENING:
        assert f"\n{line}" in text, line
    # PrivateTmp hides /tmp: the OS-lock directories must be where local processes see them too.
    assert "Environment=JDLS_LOCK_DIR=/var/lib/dls/jbase\n" in text
    assert "Environment=JDLS_BINARY_LOCK_DIR=/var/lib/dls/jbase_lock\n" in text
    assert "DynamicUser" not in text.replace("Do not use DynamicUser=", "")


def test_the_unit_waits_for_readiness_and_watches_the_monitor() -> None:
    """Type=notify: the service is started when the listener accepts (READY=1), only the monitor (the main
    process) is heard, and a monitor whose loop hangs is killed by the watchdog; the comments say so."""
    text = unit_file()
    for line in ("Type=notify\n", "NotifyAccess=main\n", "WatchdogSec=30\n"):
        assert f"\n{line}" in text, line
    assert "Type=simple" not in text
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "READY=1" in comments and "WatchdogSec=30" in comments and "NotifyAccess=main" in comments


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    jdls = Path(sys.executable).with_name("jdls")
    assert jdls.is_file(), jdls
    unit = tmp_path / "dls-daemon.service"
    unit.write_text(unit_file().replace("ExecStart=jdls ", f"ExecStart={jdls} ").replace("ExecStop=jdls ",
                                                                                         f"ExecStop={jdls} "))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "dls-daemon.service" not in result.stderr, result.stderr  # no warning about the unit either
