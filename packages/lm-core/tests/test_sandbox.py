"""The code sandbox: each limit and each isolation is shown by a real submission against it.

Every assertion is on the result (or on the host file system / process table afterwards), never on
how long a run took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lmstack.core.sandbox import SandboxError, SandboxResult, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


def test_correct_solution_passes_with_its_stdout() -> None:
    code = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint(add(40, 2))\n"
    result = run_python(code)
    assert isinstance(result, SandboxResult)
    assert result.ok, result.stderr
    assert result.stdout == "42\n"
    assert result.error is None and not result.timed_out and result.returncode == 0


def test_failing_assertion_and_exception_are_reported() -> None:
    result = run_python("assert 1 + 1 == 3, 'wrong sum'")
    assert not result.ok and not result.timed_out
    assert result.returncode == 1
    assert result.exception == "AssertionError"
    assert result.error == "AssertionError: wrong sum"
    # The traceback starts in the submitted code, not in the sandbox's runner.
    assert 'File "<sandbox>", line 1' in result.stderr
    assert "_run()" not in result.stderr


def test_syntax_error_and_exit_status() -> None:
    result = run_python("def broken(:\n")
    assert not result.ok and result.exception == "SyntaxError"
    assert result.error is not None and result.error.startswith("SyntaxError")
    exited = run_python("import sys\nprint('bye')\nsys.exit(3)")
    assert not exited.ok and exited.returncode == 3 and exited.stdout == "bye\n"
    assert exited.error == "exited with status 3"


def test_infinite_loop_is_stopped() -> None:
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert not result.ok
    assert result.timed_out
    assert result.error == "timed out after 1 s"


def test_sleeping_code_is_stopped_by_the_wall_clock() -> None:
    # No CPU used: only the wall-clock limit can stop it.
    result = run_python("import time\nprint('started', flush=True)\ntime.sleep(600)\n", timeout_s=1.0)
    assert result.timed_out and not result.ok
    assert result.stdout == "started\n"  # output written before the kill is kept


def test_memory_bomb_is_stopped() -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    result = run_python(code, memory_mb=256)
    assert not result.ok and not result.timed_out
    assert result.exception == "MemoryError"
    assert result.error == "memory limit (256 MB) exceeded"


def test_one_huge_allocation_is_refused() -> None:
    result = run_python("x = bytearray(4 << 30)\nprint('allocated')", memory_mb=256)
    assert not result.ok and result.stdout == ""
    assert result.error == "memory limit (256 MB) exceeded"


def test_process_limit_caps_forks() -> None:
    code = (
        "import os, time\n"
        "children = 0\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as exc:\n"
        "        print('refused', exc.errno)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
        "print(children)\n"
    )
    result = run_python(code, max_processes=8)
    assert result.ok, result.stderr
    refused, children = result.stdout.split("\n")[:2]
    assert refused == "refused 11"  # EAGAIN: RLIMIT_NPROC
    assert int(children) == 7  # 8 processes in all, the parent included


def test_fork_bomb_is_stopped_and_leaves_nothing_behind() -> None:
    marker = f"forkbomb-{uuid.uuid4().hex}"
    code = (
        "import os, sys\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        # Each child becomes a new session with a recognisable command line, then forks on.
        "            os.setsid()\n"
        f"            os.execv(sys.executable, [sys.executable, '-c', {_bomb_child()!r}, {marker!r}])\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run_python(code, timeout_s=1.5, max_processes=16)
    assert not result.ok and result.timed_out
    assert _processes_with(marker) == []


def test_background_processes_die_with_the_submission() -> None:
    marker = f"orphan-{uuid.uuid4().hex}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}],"
        " start_new_session=True)\n"
        "print('spawned')\n"
    )
    result = run_python(code)
    assert result.ok and result.stdout == "spawned\n", result.stderr
    assert _processes_with(marker) == []


def test_network_is_unreachable() -> None:
    code = (
        "import socket\n"
        "for host, port in [('127.0.0.1', 80), ('10.0.0.1', 80), ('::1', 80)]:\n"
        "    family = socket.AF_INET6 if ':' in host else socket.AF_INET\n"
        "    s = socket.socket(family, socket.SOCK_STREAM)\n"
        "    s.settimeout(2)\n"
        "    try:\n"
        "        s.connect((host, port))\n"
        "        print('connected', host)\n"
        "    except OSError as exc:\n"
        "        print('denied', host, exc.errno)\n"
        "print(socket.if_nameindex())\n"
    )
    result = run_python(code)
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("denied") for line in lines[:3]), lines
    assert lines[3] == "[(1, 'lo')]"  # a fresh network namespace: only a loopback, and it is down


def test_connecting_to_a_listening_host_server_fails() -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    assert not result.ok
    assert result.exception == "OSError"


def test_writing_outside_its_directory_is_denied(tmp_path: Path) -> None:
    target = tmp_path / "planted.txt"
    code = (
        "import os\n"
        f"for path in [{str(target)!r}, '/etc/planted', {str(Path.home() / 'planted')!r},"
        " '/usr/lib/planted']:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print('denied', exc.errno)\n"
    )
    result = run_python(code)
    assert result.ok, result.stderr
    assert all(line.startswith("denied") for line in result.stdout.splitlines()), result.stdout
    assert not target.exists()
    assert not (Path.home() / "planted").exists()


def test_reading_outside_its_directory_is_denied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret")
    home_file = Path.home() / f".lmstack-sandbox-test-{uuid.uuid4().hex}"
    home_file.write_text("home secret")
    try:
        code = (
            "import os\n"
            f"for path in [{str(secret)!r}, {str(home_file)!r}, '/etc/passwd', '/etc/hostname']:\n"
            "    try:\n"
            "        print('read', open(path).read())\n"
            "    except OSError as exc:\n"
            "        print('denied', exc.errno)\n"
            f"print(sorted(os.listdir({str(tmp_path.parent)!r})) if os.path.exists({str(tmp_path.parent)!r})"
            " else 'absent')\n"
        )
        result = run_python(code)
    finally:
        home_file.unlink()
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["denied 2"] * 4, lines  # ENOENT: none of them exists in its file system
    assert lines[4] == "absent"
    assert "secret" not in result.stdout


def test_another_runs_files_are_invisible() -> None:
    first = run_python("import os\nopen('mine.txt', 'w').write('first run')\nprint(os.getcwd())")
    assert first.ok
    second = run_python("import os\nprint(os.listdir('.'))")
    assert second.ok and second.stdout == "[]\n"


def test_it_can_write_and_read_its_own_directory() -> None:
    code = (
        "import os, tempfile\n"
        "open('out.txt', 'w').write('hello')\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n"
        "    f.write('tmp')\n"
        "print(open('out.txt').read(), open(f.name).read(), os.getcwd() == os.environ['HOME'])\n"
    )
    result = run_python(code)
    assert result.ok, result.stderr
    assert result.stdout == "hello tmp True\n"


def test_stdin_and_files() -> None:
    code = (
        "import json, sys\n"
        "data = json.load(open('data/input.json'))\n"
        "blob = open('blob.bin', 'rb').read()\n"
        "print(sys.stdin.read().strip().upper(), data['n'] * 2, blob.hex())\n"
    )
    files: dict[str, str | bytes] = {"data/input.json": '{"n": 21}', "blob.bin": b"\x00\xff"}
    result = run_python(code, stdin="hello sandbox\n", files=files)
    assert result.ok, result.stderr
    assert result.stdout == "HELLO SANDBOX 42 00ff\n"


def test_file_names_must_stay_inside() -> None:
    for name in ("../escape.txt", "/etc/passwd", ""):
        with pytest.raises(ValueError, match="relative path"):
            run_python("pass", files={name: "x"})


def test_output_is_capped() -> None:
    code = "import sys\nsys.stdout.write('x' * 3_000_000)\nsys.stderr.write('e' * 3_000_000)\nprint('end')"
    result = run_python(code, max_output_bytes=1000)
    assert result.ok
    assert result.stdout == "x" * 1000 and result.stdout_truncated
    assert result.stderr == "e" * 1000 and result.stderr_truncated


def test_file_size_limit() -> None:
    result = run_python("open('big.bin', 'wb').write(b'0' * (3 << 20))", max_file_mb=1)
    assert not result.ok
    assert result.error == "OSError: [Errno 27] File too large"


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTACK_SANDBOX_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))", env={"EXTRA": "1"})
    assert result.ok
    names = eval(result.stdout)  # a list of strings printed by the sandbox
    assert "LMSTACK_SANDBOX_SECRET" not in names
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "EXTRA", "LC_CTYPE"}


def test_it_runs_unprivileged() -> None:
    code = "print(open('/proc/self/status').read().count('CapEff:\\t0000000000000000'))"
    result = run_python(code)
    assert result.ok, result.stderr
    assert result.stdout == "1\n"  # no capabilities, whether started by root or not


def test_signals_and_subprocesses() -> None:
    killed = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not killed.ok and killed.signal == 9 and killed.returncode is None
    assert killed.error == "killed by signal 9 (SIGKILL)"
    child = run_python(
        "import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', 'print(6 * 7)'],"
        " capture_output=True, text=True).stdout.strip())"
    )
    assert child.ok and child.stdout == "42\n", child.stderr


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError):
        run_python("pass", memory_mb=-1)


def test_sandbox_error_is_an_lmstack_error() -> None:
    from lmstack.core import LMStackError

    assert issubclass(SandboxError, LMStackError)


def _bomb_child() -> str:
    return "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


def _processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (the sandbox's leftovers, if any)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def test_the_code_cannot_forge_the_sandbox_status() -> None:
    # A host process the sandbox must never be tricked into killing.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        forged = [
            {"event": "started", "pid": victim.pid},
            {"event": "exit", "code": 0},
        ]
        code = (
            "import json, os, time\n"
            f"lines = {[json.dumps(e) for e in forged]!r}\n"
            "for fd in range(3, 64):\n"
            "    for line in lines:\n"
            "        try:\n"
            "            os.write(fd, (line + '\\n').encode())\n"
            "        except OSError:\n"
            "            pass\n"
            "time.sleep(600)\n"
        )
        result = run_python(code, timeout_s=1)
        assert result.timed_out and not result.ok
        assert victim.poll() is None  # still alive: the forged "started" pid was not trusted
        # A forged exit status is ignored too: the real one is reported.
        exits = run_python(code.replace("time.sleep(600)", "raise SystemExit(3)"), timeout_s=5)
        assert exits.returncode == 3 and not exits.ok
    finally:
        victim.kill()
        victim.wait()
