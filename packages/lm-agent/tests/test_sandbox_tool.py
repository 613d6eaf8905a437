"""The python tool: each attack is stopped or denied by the sandbox and comes back as a failed tool result."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import lmstack.core.sandbox
from lmstack.agent import sandbox
from lmstack.agent.tools import ToolOutput, python_tool

PYTHON = python_tool(timeout_s=2, memory_mb=256)


def run(code: str) -> ToolOutput:
    return asyncio.run(PYTHON.acall({"code": code}))


def test_sandbox_is_cores_reexported() -> None:
    assert sandbox.run_python is lmstack.core.sandbox.run_python
    assert sandbox.SandboxResult is lmstack.core.sandbox.SandboxResult
    assert sandbox.SandboxError is lmstack.core.sandbox.SandboxError
    assert sorted(sandbox.__all__) == ["SandboxError", "SandboxResult", "run_python"]


def test_code_runs_and_its_output_comes_back() -> None:
    spec = PYTHON.spec()["function"]
    assert spec["name"] == "python" and spec["parameters"]["required"] == ["code"]
    out = run("import math\nprint(math.factorial(10))\n")
    assert out.ok and out.content == "3628800\n"
    assert isinstance(out.data, sandbox.SandboxResult) and out.data.ok
    silent = run("x = 1")
    assert silent.ok and silent.content.startswith("(no output")
    failed = run("print('before')\n1 / 0")
    assert not failed.ok
    assert failed.content.startswith(
        "error: ZeroDivisionError: division by zero\n[stdout]\nbefore\n\n[stderr]\nTraceback"
    )


def test_infinite_loop_is_stopped() -> None:
    out = run("while True:\n    pass\n")
    assert not out.ok
    assert out.content.startswith("error: timed out after 2 s (the sandbox stopped the code)")


def test_memory_bomb_is_stopped() -> None:
    out = run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n")
    assert not out.ok
    assert out.content.startswith("error: memory limit (256 MB) exceeded")


def test_fork_bomb_is_stopped() -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    out = run(code)
    assert not out.ok and out.data.timed_out
    assert out.content.startswith("error: timed out after 2 s (the sandbox stopped the code)")


def test_socket_is_denied() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        out = run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
        )
    assert not out.ok
    assert out.content.startswith("error: OSError: [Errno 101] Network is unreachable")
    assert "connected" not in out.content


def test_write_outside_its_directory_is_denied(tmp_path: Path) -> None:
    target = tmp_path / "planted.txt"
    out = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert not out.ok
    assert out.content.startswith("error: FileNotFoundError: [Errno 2] No such file or directory")
    assert not target.exists()
    inside = run("open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())\n")
    assert inside.ok and inside.content == "ok\n"  # its own directory is writable


def test_reading_outside_its_directory_is_denied(tmp_path: Path) -> None:
    other_run = tmp_path / "other-run-result.txt"  # a file another run or the host wrote
    other_run.write_text("secret of another run")
    home_file = Path.home() / f".lmstack-agent-sandbox-test-{uuid.uuid4().hex}"
    home_file.write_text("secret in the user's home")
    try:
        for path in (other_run, home_file):
            out = run(f"print(open({str(path)!r}).read())\n")
            assert not out.ok
            assert out.content.startswith("error: FileNotFoundError: [Errno 2] No such file or directory")
            assert "secret" not in out.content
    finally:
        home_file.unlink()
