"""The Python tool: the model's code runs in lmstack-core's process sandbox, never in this process."""

from __future__ import annotations

from lmstack.agent.tools._tool import Tool, ToolOutput
from lmstack.core.sandbox import SandboxResult, run_python

__all__ = ["python_tool"]


def _head(text: str, limit: int) -> str:
    """The start of ``text`` (output reads top down), with a note of what was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n... ({len(text) - limit} more characters cut)"


def _tail(text: str, limit: int) -> str:
    """The end of ``text`` (a traceback's last lines say what failed), with a note of what was cut."""
    if len(text) <= limit:
        return text
    return f"... ({len(text) - limit} characters cut)\n{text[-limit:]}"


def _render(result: SandboxResult, max_chars: int) -> ToolOutput:
    stdout = _head(result.stdout, max_chars)
    if result.stdout_truncated:
        stdout += "\n... (output limit reached)"
    stderr = _tail(result.stderr.strip(), max_chars)
    if result.ok:
        content = stdout if stdout.strip() else "(no output: print() the values you want to see)"
        if stderr:
            content += f"\n[stderr]\n{stderr}"
        return ToolOutput(ok=True, content=content, data=result)
    stopped = " (the sandbox stopped the code)" if result.timed_out or result.signal is not None else ""
    parts = [f"error: {result.error}{stopped}"]
    if stdout.strip():
        parts.append(f"[stdout]\n{stdout}")
    if stderr:
        parts.append(f"[stderr]\n{stderr}")
    return ToolOutput(ok=False, content="\n".join(parts), data=result)


def python_tool(
    *, timeout_s: float = 10, memory_mb: int = 512, max_processes: int = 32, max_output_chars: int = 4000
) -> Tool:
    """A tool that runs Python code in lmstack-core's sandbox (``lmstack.core.sandbox.run_python``).

    Each call is a fresh process (no state is kept between calls) with no network, a private temporary
    working directory as its only writable place, no view of the rest of the file system beyond the
    Python installation, and time, memory and process limits. A failure of the code (an exception, a
    limit hit, a denied write, read or connection) comes back as ``ToolOutput(ok=False)`` with the
    sandbox's message, stdout and the end of stderr; ``data`` holds the
    :class:`~lmstack.core.sandbox.SandboxResult`.

    Args:
        timeout_s: Wall-clock (and CPU-time) limit of one run, in seconds.
        memory_mb: Address-space limit of each process, in MiB.
        max_processes: Most processes and threads at once.
        max_output_chars: Characters of stdout (its start) and stderr (its end) fed back to the model.

    Returns:
        The tool, named ``python``, taking ``code: str``.
    """

    def python(code: str) -> SandboxResult:
        """Run Python code in the sandbox.

        Args:
            code: The Python source code to run.
        """
        return run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes)

    description = (
        "Run Python 3 code in a sandbox and return what it prints (use print()). Each call starts fresh: "
        f"no variables survive between calls. No network, no files outside the working directory, "
        f"{timeout_s:g} s and {memory_mb} MB at most. The standard library is available."
    )
    return Tool(python, name="python", description=description, render=lambda r: _render(r, max_output_chars))
