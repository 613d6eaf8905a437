"""``run_python``: one submission, one fresh sandbox process tree, one :class:`SandboxResult`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lmstack.core._errors import LMStackError
from lmstack.core.sandbox import _boot

__all__ = ["SandboxError", "SandboxResult", "run_python"]

_BOOT = Path(_boot.__file__)
# After a kill, how long to wait for the pipes to close before giving up on the rest of the output.
_DRAIN_AFTER_KILL_S = 5.0
# Shared libraries the interpreter and its extension modules link against, besides its own prefix.
_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache")


class SandboxError(LMStackError):
    """The sandbox itself could not be built or run (not a failure of the submitted code).

    Raised, for example, where the kernel refuses the namespaces the sandbox needs. Callers such as a
    pass@k scorer should report it rather than count the submission as failed.
    """


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    Attributes:
        ok: The code ran to completion and exited with status 0 within every limit.
        stdout: Its standard output (decoded as UTF-8, undecodable bytes replaced), at most
            ``max_output_bytes``.
        stderr: Its standard error (tracebacks included), at most ``max_output_bytes``.
        error: ``None`` when ``ok``; else a short message: ``"timed out after 10 s"``, ``"memory limit
            (512 MB) exceeded"``, ``"killed by signal 9 (SIGKILL)"``, or the last line of an uncaught
            exception such as ``"ZeroDivisionError: division by zero"``.
        timed_out: The wall-clock or CPU-time limit stopped it.
        returncode: The exit status of the code's process; ``None`` when a signal ended it.
        duration_s: Wall-clock seconds from launch to the end of the process tree.
        stdout_truncated: ``stdout`` was cut at ``max_output_bytes``.
        stderr_truncated: ``stderr`` was cut at ``max_output_bytes``.
        signal: The signal that ended the code's process, if any.
        exception: The type name of an uncaught exception (``"MemoryError"``...), if any.
    """

    ok: bool
    stdout: str
    stderr: str
    error: str | None
    timed_out: bool
    returncode: int | None
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    signal: int | None = None
    exception: str | None = None


def _python_paths() -> list[str]:
    """Read-only paths the interpreter needs: its prefixes (a venv's and its base's) and system libraries."""
    paths: list[str] = []
    candidates = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    candidates += [os.path.dirname(os.path.realpath(sys.executable)), sys.executable]
    candidates += [sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    for path in candidates + list(_LIBRARY_DIRS):
        path = os.path.abspath(path)
        # Never the whole root filesystem, even for an interpreter installed in /.
        if path != "/" and path not in paths:
            paths.append(path)
    return paths


def _write_files(work: Path, files: Mapping[str, str | bytes]) -> None:
    for name, content in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"sandbox file name must be a relative path inside the sandbox, got {name!r}")
        target = work.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)


def _remove_tree(path: Path) -> None:
    """Remove the sandbox's directory even where the code made parts of it unreadable."""

    def fix(func: Any, name: str, exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
            func(name)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe(
    *,
    timed_out: bool,
    timeout_s: float,
    cpu_exceeded: bool,
    cpu_s: float,
    signum: int | None,
    returncode: int | None,
    exception: dict[str, Any] | None,
    memory_mb: int,
    file_mb: float,
    stderr: str,
) -> str | None:
    """The one-line error message for a run (None for success)."""
    if timed_out:
        if cpu_exceeded:
            return f"CPU time limit ({cpu_s:g} s) exceeded"
        return f"timed out after {timeout_s:g} s"
    memory = f"memory limit ({memory_mb} MB) exceeded"
    if exception is not None:
        return memory if exception.get("type") == "MemoryError" else str(exception.get("message"))
    if signum is not None:
        if signum == signal.SIGXFSZ:
            return f"file size limit ({file_mb:g} MB) exceeded"
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            return memory  # the interpreter aborted where it could not raise MemoryError
        return f"killed by signal {signum} ({_signal_name(signum)})"
    if returncode:
        return f"exited with status {returncode}"
    return None


class _Capture:
    """Reads the sandbox's pipes until they close, keeping at most ``limit`` bytes of each output."""

    def __init__(self, proc: subprocess.Popen[bytes], status_fd: int, report_fd: int, limit: int) -> None:
        self.limit = limit
        names = ("stdout", "stderr", "status", "report")
        self.data: dict[str, bytearray] = {name: bytearray() for name in names}
        self.truncated = dict.fromkeys(names, False)
        self.selector = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stderr is not None
        for name, fd in (
            ("stdout", proc.stdout.fileno()),
            ("stderr", proc.stderr.fileno()),
            ("status", status_fd),
            ("report", report_fd),
        ):
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, name)

    def pump(self, deadline: float) -> bool:
        """Read until every pipe is closed (True) or ``deadline`` passes (False)."""
        while self.selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self.selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    self.selector.unregister(key.fd)
                    continue
                buf = self.data[key.data]
                room = self.limit - len(buf)
                if len(chunk) > room:
                    self.truncated[key.data] = True
                buf += chunk[: max(room, 0)]  # keep draining past the cap so the writer never blocks
        return True

    def close(self) -> None:
        self.selector.close()

    def text(self, name: str) -> str:
        return self.data[name].decode("utf-8", "replace")


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 32,
    max_file_mb: float = 64.0,
    max_open_files: int = 256,
    files: Mapping[str, str | bytes] | None = None,
    stdin: str | bytes | None = None,
    max_output_bytes: int = 1 << 20,
    env: Mapping[str, str] | None = None,
) -> SandboxResult:
    """Run untrusted Python ``code`` in a fresh, limited sandbox process and return what happened.

    The code runs as ``__main__`` under this interpreter (same version, same installed packages,
    isolated mode) in its own PID, mount, network, IPC and UTS namespaces, with cwd a private
    temporary directory (``/sandbox``, also ``HOME``, ``TMPDIR`` and ``/tmp``) that is its only
    writable place and is deleted afterwards. It sees only that directory, the Python installation
    and the system libraries, read-only; it has no network (a fresh network namespace whose loopback
    is down); its environment holds only ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and ``env``.

    Args:
        code: Python source to run.
        timeout_s: Wall-clock limit; on expiry the whole sandbox (every process in it) is killed.
            CPU time is limited to the same number of seconds (rounded up).
        memory_mb: Address-space limit (``RLIMIT_AS``) of each process, in MiB.
        max_processes: Most processes and threads at once (``RLIMIT_NPROC`` for a uid of its own).
        max_file_mb: Largest file it may write (``RLIMIT_FSIZE``), in MiB.
        max_open_files: Most open file descriptors per process (``RLIMIT_NOFILE``).
        files: Files to place in the working directory first: relative path to text or bytes.
        stdin: Data on its standard input (empty when ``None``).
        max_output_bytes: Cap on each of stdout and stderr; the rest is read and discarded.
        env: Extra environment variables.

    Returns:
        A :class:`SandboxResult`. A failure of the *code* (exception, limit, signal) is a result with
        ``ok=False``, never an exception.

    Raises:
        SandboxError: The sandbox could not be built (no Linux namespaces, for example).
        ValueError: A limit is not positive or a file name escapes the working directory.
    """
    if sys.platform != "linux":
        raise SandboxError(f"the lmstack sandbox needs Linux namespaces; this is {sys.platform}")
    if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0 or max_file_mb <= 0 or max_output_bytes < 0:
        raise ValueError("sandbox limits must be positive")
    base = Path(tempfile.mkdtemp(prefix="lmstack-sandbox-"))
    try:
        work, root = base / "work", base / "root"
        work.mkdir(mode=0o700)
        root.mkdir()
        _write_files(work, files or {})
        inside = _boot.INSIDE_DIR
        child_env = {
            "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": inside,
            "TMPDIR": inside,
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        cpu_s = max(1, math.ceil(timeout_s))
        config = {
            "code": code,
            "work_dir": str(work),
            "root_dir": str(root),
            "ro_paths": _python_paths(),
            "python": sys.executable,
            "env": child_env,
            "token": f"lmstack-sandbox-{uuid.uuid4().hex}",
            "limits": {
                "cpu_s": cpu_s,
                "memory_bytes": memory_mb << 20,
                "processes": max_processes,
                "file_bytes": int(max_file_mb * (1 << 20)),
                "open_files": max_open_files,
            },
        }
        return _launch(config, stdin, timeout_s, max_output_bytes, memory_mb, max_file_mb, cpu_s)
    finally:
        _remove_tree(base)


def _launch(
    config: dict[str, Any],
    stdin: str | bytes | None,
    timeout_s: float,
    max_output_bytes: int,
    memory_mb: int,
    file_mb: float,
    cpu_s: int,
) -> SandboxResult:
    # Config and stdin go through unlinked temporary files: no pipe to deadlock on, whatever their size.
    with tempfile.TemporaryFile() as cfg_file, tempfile.TemporaryFile() as in_file:
        cfg_file.write(json.dumps(config).encode())
        cfg_file.seek(0)
        in_file.write(stdin.encode() if isinstance(stdin, str) else (stdin or b""))
        in_file.seek(0)
        # Two pipes back: status from the sandbox's own processes (trusted) and the submission's
        # report of an uncaught exception (untrusted: the code holds it).
        status_r, status_w = os.pipe()
        report_r, report_w = os.pipe()
        start = time.monotonic()
        try:
            fds = (cfg_file.fileno(), status_w, report_w)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(_BOOT), *map(str, fds)],
                stdin=in_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                start_new_session=True,  # one process group to kill, whatever the code does
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                cwd="/",
            )
        finally:
            os.close(status_w)
            os.close(report_w)
        capture = _Capture(proc, status_r, report_r, max_output_bytes)
        timed_out = False
        try:
            if not capture.pump(start + timeout_s):
                timed_out = True
                _kill(proc, capture)
                capture.pump(time.monotonic() + _DRAIN_AFTER_KILL_S)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
        finally:
            capture.close()
            os.close(status_r)
            os.close(report_r)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        duration = time.monotonic() - start
    by_kind = _events(capture.text("status"))
    # The submission's own report: only its "exception" event is read, and only to describe it.
    reported = _events(capture.text("report")).get("exception")
    if reported is not None:
        by_kind["exception"] = reported
    if "setup_error" in by_kind and "exit" not in by_kind:
        raise SandboxError(f"could not start the sandbox: {by_kind['setup_error'].get('message')}")
    signum = by_kind.get("signal", {}).get("signal")
    returncode = by_kind["exit"]["code"] if "exit" in by_kind else None
    # The CPU-time rlimit ends the code with SIGXCPU (or SIGKILL at the hard limit).
    cpu_used = usage.ru_utime + usage.ru_stime
    cpu_exceeded = not timed_out and (
        signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_used >= cpu_s)
    )
    timed_out = timed_out or cpu_exceeded
    stderr = capture.text("stderr")
    error = _describe(
        timed_out=timed_out,
        timeout_s=timeout_s,
        cpu_exceeded=cpu_exceeded,
        cpu_s=cpu_s,
        signum=signum,
        returncode=returncode,
        exception=by_kind.get("exception"),
        memory_mb=memory_mb,
        file_mb=file_mb,
        stderr=stderr,
    )
    if error is None and returncode is None:
        error = "the sandbox ended without reporting an exit status"
    return SandboxResult(
        ok=error is None,
        stdout=capture.text("stdout"),
        stderr=stderr,
        error=error,
        timed_out=timed_out,
        returncode=returncode,
        duration_s=duration,
        stdout_truncated=capture.truncated["stdout"],
        stderr_truncated=capture.truncated["stderr"],
        signal=signum,
        exception=by_kind.get("exception", {}).get("type"),
    )


def _events(text: str) -> dict[str, dict[str, Any]]:
    """The JSON-line events of a pipe by kind (the first of each kind), skipping anything malformed."""
    found: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                found.setdefault(event["event"], event)
    return found


def _kill(proc: subprocess.Popen[bytes], capture: _Capture) -> None:
    """Kill the sandbox and wait (bounded) until every process in it is gone.

    Killing init (PID 1 of the sandbox's namespace) makes the kernel kill every other process in
    the namespace before init itself ends; boot still waits on init, so its pid cannot have been
    reused yet when the pidfd is opened.
    """
    init_fd = None
    started = _events(capture.text("status")).get("started")  # written by boot alone
    if started is not None:
        try:
            init_fd = os.pidfd_open(int(started["pid"]))
            signal.pidfd_send_signal(init_fd, signal.SIGKILL)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    if init_fd is not None:
        with selectors.DefaultSelector() as sel:
            sel.register(init_fd, selectors.EVENT_READ)
            sel.select(_DRAIN_AFTER_KILL_S)  # readable once init (and so its namespace) has ended
        os.close(init_fd)
