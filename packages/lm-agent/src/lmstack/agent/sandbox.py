"""The process sandbox agents run model-written code in: lmstack-core's ``lmstack.core.sandbox``, re-exported.

:func:`run_python` runs a piece of Python in a fresh, limited process tree and returns a
:class:`SandboxResult` (``ok``, ``stdout``, ``stderr``, ``error``, ``timed_out``, and more); a failure of the
code is a result with ``ok=False``, a failure to build the sandbox is a :class:`SandboxError`. The
``python`` tool (:func:`lmstack.agent.tools.python_tool`) runs each call here.

What it does (Linux only): a separate process in fresh PID, mount, network, IPC and UTS namespaces;
wall-clock, CPU-time, address-space, file-size, open-file and process-count limits (a fork bomb stops);
no network (a fresh network namespace whose loopback is down); a private temporary directory as the only
writable place, deleted afterwards, and nothing of the host file system visible besides the Python
installation and system libraries, read-only (no home directories, no other run's directory, no ``/etc``);
no privileges; stdout and stderr capped; the environment scrubbed.

What it does not protect against: kernel exploits (it shares the host kernel; it is not a virtual machine),
filling the disk with many files under the per-file size limit, CPU contention between sandboxes, or side
channels. State does not persist between calls: each run is a fresh process. Where the kernel refuses
unprivileged namespaces, :func:`run_python` raises :class:`SandboxError` rather than run unconfined.
"""

from __future__ import annotations

from lmstack.core.sandbox import SandboxError, SandboxResult, run_python

__all__ = ["SandboxError", "SandboxResult", "run_python"]
