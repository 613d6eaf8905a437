"""The sandbox started by an unprivileged user: the user-namespace path of the bootstrap.

The test suite runs as root in CI, which takes the other path (a fresh uid). Here root drops to
``nobody`` with ``setpriv`` and drives the bootstrap with the system interpreter (``nobody`` cannot
read the test interpreter), checking the same isolation from the unprivileged side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmstack.core.sandbox import _boot

SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    sys.platform != "linux"
    or os.geteuid() != 0
    or shutil.which("setpriv") is None
    or not SYSTEM_PYTHON.exists(),
    reason="needs root (to become nobody), setpriv and /usr/bin/python3",
)

CODE = """
import os, socket
print(os.getuid(), sorted(os.listdir('/sandbox')))
children = 0
for _ in range(50):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        import time
        time.sleep(30)
        os._exit(0)
    children += 1
print('children', children)
try:
    socket.create_connection(('127.0.0.1', 1), timeout=2)
except OSError as exc:
    print('network', exc.errno)
for path in [SECRET, '/etc/passwd']:
    try:
        open(path).read()
    except OSError as exc:
        print('read', exc.errno)
try:
    open('/usr/lib/planted', 'w')
except OSError as exc:
    print('write', exc.errno)
print(open('/proc/self/status').read().count('CapEff:\\t0000000000000000'))
"""

DRIVER = """
import json, os, subprocess, sys, tempfile
boot, config_path = sys.argv[1], sys.argv[2]
with open(config_path, "rb") as cfg:
    r, w = os.pipe()
    report_r, report_w = os.pipe()
    proc = subprocess.run([sys.executable, "-I", "-S", boot, str(cfg.fileno()), str(w), str(report_w)],
                          pass_fds=(cfg.fileno(), w, report_w), capture_output=True, text=True)
os.close(w)
os.close(report_w)
status = os.read(r, 65536).decode()
print(json.dumps({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "status": status}))
"""


@pytest.fixture
def shared_dirs() -> Iterator[tuple[Path, Path]]:
    """Two fresh directories under the system temp dir (pytest's own is private to root)."""
    dirs = [Path(tempfile.mkdtemp(prefix="lmstack-userns-")) for _ in range(2)]
    yield dirs[0], dirs[1]
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def test_unprivileged_user_gets_the_same_isolation(shared_dirs: tuple[Path, Path]) -> None:
    secrets, base = shared_dirs
    secret = secrets / "secret.txt"
    secret.write_text("secret")
    (base / "work").mkdir(parents=True)
    (base / "root").mkdir()
    (base / "work" / "given.txt").write_text("x")
    (base / "driver.py").write_text(DRIVER)
    config = {
        "code": CODE.replace("SECRET", repr(str(secret))),
        "work_dir": str(base / "work"),
        "root_dir": str(base / "root"),
        "ro_paths": [str(SYSTEM_PYTHON), "/usr/lib", "/lib", "/lib64", "/etc/ld.so.cache"],
        "python": str(SYSTEM_PYTHON),
        "env": {"PATH": "/usr/bin"},
        "token": "userns-test",
        "limits": {
            "cpu_s": 10,
            "memory_bytes": 512 << 20,
            "processes": 6,
            "file_bytes": 1 << 20,
            "open_files": 64,
        },
    }
    (base / "config.json").write_text(json.dumps(config))
    for path in [base, *base.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    secrets.chmod(0o755)
    secret.chmod(0o644)  # readable to nobody on the host: only the sandbox can hide it
    out = subprocess.run(
        [
            *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
            *(str(SYSTEM_PYTHON), "-I", str(base / "driver.py"), _boot.__file__, str(base / "config.json")),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["rc"] == 0, report
    lines = report["stdout"].splitlines()
    assert lines == [
        "0 ['given.txt']",  # uid 0 of its own user namespace
        "children 5",  # 6 processes in all, the parent included
        "network 101",  # ENETUNREACH
        "read 2",
        "read 2",
        "write 30",  # EROFS
        "1",  # no capabilities
    ], report
