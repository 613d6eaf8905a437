"""Run untrusted Python in a separate, limited process: ``lmstack.core.sandbox``.

lmstack-eval runs pass@k submissions here and lmstack-agent's Python tool runs here; neither has a
sandbox of its own. :func:`run_python` runs one piece of code in a fresh sandbox and returns a
:class:`SandboxResult`; a failure of the code is a result with ``ok=False``, a failure to build the
sandbox is a :class:`SandboxError`.

What it does (Linux only, stdlib and kernel features only):

* a separate process tree in fresh PID, mount, network, IPC and UTS namespaces;
* wall-clock limit (the whole namespace is killed), CPU-time, address-space, file-size, open-file
  and process-count limits (``RLIMIT_NPROC`` of a uid no other process has, so a fork bomb stops);
* no network: the network namespace has only a loopback that is down;
* a new root holding read-only the Python installation and system libraries, and one private
  writable directory (cwd, ``HOME``, ``TMPDIR``, ``/tmp``) deleted afterwards; nothing else of the host
  file system (home directories, other sandboxes' directories, ``/etc``) is visible;
* no privileges: a fresh unprivileged uid (when started by root) or no capabilities in its own user
  namespace (when started by a normal user), and no-new-privs;
* stdout and stderr capped, environment scrubbed.

What it does not protect against: kernel exploits (it shares the host kernel; it is not a VM),
filling the disk with many files under the per-file size limit, CPU contention between sandboxes, or
side channels. See the lmstack-core README.
"""

from __future__ import annotations

from lmstack.core.sandbox._run import SandboxError, SandboxResult, run_python

__all__ = ["SandboxError", "SandboxResult", "run_python"]
