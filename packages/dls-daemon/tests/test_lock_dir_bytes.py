"""Issue 15 (L6): lock directories whose names are not UTF-8, with a real ``jdls -ibD`` and a real client.

A directory name on Linux is bytes; Python hands it around as a str with surrogates (os.fsdecode). The
listener used to fail at start writing run/lock-dir (``.encode()`` of those surrogates: a traceback, exit 1):
it writes the name's own bytes (os.fsencode), the instance reads them back as the same name, locks are taken in
it, and ``jdls -dL`` shows it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dls_testkit import Service


def test_a_lock_dir_that_is_not_utf8_is_recorded_as_its_bytes_and_used(service: Service, tmp_path: Path) -> None:
    lock_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/locks-\xff\xfe"))
    binary_lock_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/binary-\xff"))
    service.start("-D", "--lock-dir", str(lock_dir), "--binary-lock-dir", str(binary_lock_dir))
    log = service.log()
    assert "Traceback" not in log and "failed" not in log, log
    assert service.instance.lock_dir_file.read_bytes() == os.fsencode(lock_dir) + b"\n"
    assert service.instance.recorded_lock_dir() == lock_dir
    data = tmp_path / "data"
    data.write_bytes(b"")
    with service.client() as client, client.lock(data, "record"):
        assert os.listdir(lock_dir), "no lock file in the lock directory"
        shown = subprocess.run([*service.program, "-dL"], env=service.env, capture_output=True, timeout=60,
                               check=False)  # bytes: the name is shown as the bytes it is
        assert shown.returncode == 0 and b"Traceback" not in shown.stderr, shown.stderr
        assert os.fsencode(lock_dir) in shown.stdout, shown.stdout
