"""The sandbox's bootstrap, run as its own process: ``python -I -S -B _boot.py CONFIG STATUS REPORT``.

Standard library only (it runs before, and apart from, any lmstack import). Three processes:

* **boot** (this script's first process, outside the new PID namespace): reads the JSON config,
  hands the work directory to the sandbox user, unshares the namespaces and forks *init*.
* **init** (PID 1 of a fresh PID namespace, in fresh mount, network, IPC and UTS namespaces): builds
  a new root on a tmpfs holding only read-only binds of the Python installation and the shared
  libraries, the work directory (read-write) and a minimal ``/dev`` and ``/proc``, switches into it,
  forks the *runner* and reaps until the runner exits. When init exits, the kernel kills every
  process left in the namespace, so nothing the submission started outlives it.
* **runner**: applies the resource limits, drops every privilege (a fresh unprivileged uid when run
  as root; an emptied capability set inside the user namespace otherwise), sets no-new-privs and
  executes the interpreter on the submitted code.

Status travels back to the parent as JSON lines on two pipes. The STATUS pipe is trusted: only boot,
init and the runner before it executes the submission hold it (``setup_error``, ``started``, ``exit``,
``signal``); it is closed on exec, so the submitted code can never forge an exit status or name a pid
for the parent to kill. The REPORT pipe is fd 4 of the submission's interpreter, which writes an
uncaught exception's type and message there (``exception``); whatever else the code writes there
only changes how its own failure is described.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import resource
import signal
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECUREBITS = 28
# SECBIT_NOROOT | its lock | SECBIT_NO_SETUID_FIXUP | its lock: uid 0 gets no capabilities on exec.
SECUREBITS_NOROOT = 0x0F

SETUP_FAILED = 125  # exit status of boot/init when the sandbox itself could not be built
INSIDE_DIR = "/sandbox"
SANDBOX_UID_BASE = 1_000_000_000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _emit(fd: int, **event: Any) -> None:
    with contextlib.suppress(OSError):  # the parent has gone: nobody to tell
        os.write(fd, (json.dumps(event) + "\n").encode())


def _ensure_path(newroot: str, path: str) -> str:
    """Recreate ``path``'s directories (and symlinks, like ``/lib -> usr/lib``) under ``newroot``.

    Returns the host path the last component resolves to, which is what gets bind-mounted.
    """
    current = "/"
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        host = os.path.join(current, part)
        inside = newroot + host
        if os.path.islink(host):
            target = os.readlink(host)
            if not os.path.lexists(inside):
                os.symlink(target, inside)
            rest = "/".join(parts[i + 1 :])
            resolved = os.path.normpath(os.path.join(current, target))
            return _ensure_path(newroot, os.path.join(resolved, rest) if rest else resolved)
        if os.path.isdir(host):
            os.makedirs(inside, exist_ok=True)
        elif not os.path.lexists(inside):
            with open(inside, "w"):  # a file bind-mount target
                pass
        current = host
    return current


def _bind(
    newroot: str, path: str, *, writable: bool = False, device: bool = False, source: str | None = None
) -> None:
    host = _ensure_path(newroot, path) if source is None else source
    target = newroot + (path if source is not None else host)
    if source is not None:
        os.makedirs(target, exist_ok=True)
    _mount(host, target, None, MS_BIND | MS_REC)
    # Read-only and nosuid/nodev come with a remount. In a user namespace the kernel refuses to
    # clear flags the original mount has locked, so those are carried over.
    vfs = os.statvfs(host)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID
    flags |= 0 if device else MS_NODEV
    flags |= 0 if writable else MS_RDONLY
    flags |= MS_NOEXEC if vfs.f_flag & os.ST_NOEXEC else 0
    flags |= MS_NOATIME if vfs.f_flag & os.ST_NOATIME else 0
    flags |= MS_NODIRATIME if vfs.f_flag & os.ST_NODIRATIME else 0
    flags |= MS_RELATIME if vfs.f_flag & os.ST_RELATIME else 0
    _mount(None, target, None, flags)


def _build_root(cfg: dict[str, Any]) -> None:
    """Build the new root in init's mount namespace and switch into it."""
    newroot = cfg["root_dir"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("tmpfs", newroot, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in cfg["ro_paths"]:
        if os.path.exists(path):
            _bind(newroot, path)
    _bind(newroot, INSIDE_DIR, writable=True, source=cfg["work_dir"])
    dev = newroot + "/dev"
    os.makedirs(dev, exist_ok=True)
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            _bind(newroot, "/dev/" + name, writable=True, device=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(target, f"{dev}/{name}")
    os.symlink("/proc/self/fd/1", f"{dev}/stdout")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
    os.makedirs(newroot + "/proc", exist_ok=True)
    # The PID namespace's own /proc (it lists only the sandbox's processes). Some container runtimes
    # forbid it in a user namespace; Python runs without /proc.
    with contextlib.suppress(OSError):
        _mount("proc", newroot + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not os.path.lexists(newroot + "/tmp"):
        os.symlink(INSIDE_DIR, newroot + "/tmp")  # code that hard-codes /tmp lands in its own dir
    _mount(None, newroot, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(newroot)
    _mount(newroot, "/", None, MS_MOVE)
    _check(_libc.chroot(b"."), "chroot")
    os.chdir("/")
    _libc.sethostname(b"sandbox", 7)


def _drop_privileges(cfg: dict[str, Any]) -> None:
    if cfg["as_root"]:
        uid = cfg["sandbox_uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # a non-root uid keeps no capabilities
    else:
        # uid 0 of our own user namespace: empty the bounding set and forbid regaining on exec.
        cap = 0
        while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
            cap += 1
        _check(_libc.prctl(PR_SET_SECUREBITS, SECUREBITS_NOROOT, 0, 0, 0), "securebits")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _set_limits(limits: dict[str, int], as_root: bool) -> None:
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    # Unprivileged, boot and init share the sandbox's count (one user namespace): add them back.
    processes = limits["processes"] + (0 if as_root else 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# The runner's descriptors: the code (3), the untrusted report pipe (4), and the trusted status pipe
# (5, close-on-exec: the runner can report its own setup errors, the submission never holds it).
_CODE_FD, _REPORT_FD, _STATUS_FD = 3, 4, 5


def _place_fds(wanted: dict[int, int]) -> None:
    """Put each source descriptor at its target number and close every other one above 2."""
    # Copies far above the targets first, so no dup2 overwrites a source still to be placed.
    high = {target: fcntl.fcntl(source, fcntl.F_DUPFD, 100) for target, source in wanted.items()}
    for target, copy in high.items():
        os.dup2(copy, target)
    os.closerange(max(wanted) + 1, 65536)


def _runner(cfg: dict[str, Any], status_fd: int, report_fd: int) -> None:
    """In the runner process: limits, privileges, then exec the interpreter on the code."""
    code_fd = os.memfd_create("sandbox-code", 0)
    os.write(code_fd, cfg["code"].encode("utf-8", "surrogateescape"))
    os.lseek(code_fd, 0, os.SEEK_SET)
    _place_fds({_CODE_FD: code_fd, _REPORT_FD: report_fd, _STATUS_FD: status_fd})
    os.set_inheritable(_STATUS_FD, False)
    os.chdir(INSIDE_DIR)
    _set_limits(cfg["limits"], cfg["as_root"])
    _drop_privileges(cfg)
    # Set after the uid change, which clears it: dies with init even if init is SIGKILLed.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    python = cfg["python"]
    argv = [python, "-I", "-B", "-X", "utf8", "-c", RUNNER_SOURCE, cfg["token"]]
    os.execve(python, argv, cfg["env"])


def _init(cfg: dict[str, Any], status_fd: int, report_fd: int) -> int:
    """PID 1 of the sandbox: build the root, start the runner, reap until it exits."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _build_root(cfg)
    runner = os.fork()
    if runner == 0:
        try:
            _runner(cfg, status_fd, report_fd)
        except BaseException as exc:
            # Before or after _place_fds moved it: one of the two is the status pipe.
            for fd in {_STATUS_FD, status_fd}:
                _emit(fd, event="setup_error", message=f"runner: {exc}")
        os._exit(SETUP_FAILED)
    os.close(report_fd)  # only the runner reports on it: the parent sees EOF when the runner ends
    while True:
        pid, status = os.wait()  # orphans of the submission are reparented here and reaped
        if pid == runner:
            break
    if os.WIFSIGNALED(status):
        _emit(status_fd, event="signal", signal=os.WTERMSIG(status))
        return 128 + os.WTERMSIG(status)
    code = os.WEXITSTATUS(status)
    _emit(status_fd, event="exit", code=code)
    return code


def _enter_namespaces(cfg: dict[str, Any]) -> None:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if cfg["as_root"]:
        uid = cfg["sandbox_uid"]
        for base, dirs, files in os.walk(cfg["work_dir"]):
            for name in (base, *(os.path.join(base, n) for n in dirs + files)):
                os.lchown(name, uid, uid)
        _check(_libc.unshare(flags), "unshare")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def main(argv: list[str]) -> int:
    """Run the sandbox described by the JSON config on fd ``argv[1]``.

    Status goes to fd ``argv[2]``, the submission's own report to fd ``argv[3]``.
    """
    config_fd, status_fd, report_fd = int(argv[1]), int(argv[2]), int(argv[3])
    with os.fdopen(config_fd, "rb") as f:
        cfg = json.loads(f.read())
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cfg["as_root"] = os.geteuid() == 0
    cfg["sandbox_uid"] = SANDBOX_UID_BASE + os.getpid()  # unique among live sandboxes
    try:
        _enter_namespaces(cfg)
    except OSError as exc:
        _emit(status_fd, event="setup_error", message=f"namespaces unavailable ({exc})")
        return SETUP_FAILED
    init = os.fork()
    if init == 0:
        try:
            code = _init(cfg, status_fd, report_fd)
        except BaseException as exc:
            _emit(status_fd, event="setup_error", message=f"init: {exc}")
            code = SETUP_FAILED
        os._exit(code)
    os.close(report_fd)
    _emit(status_fd, event="started", pid=init)
    _, status = os.waitpid(init, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


# Executed by the interpreter in the runner (``python -I -c``): reads the code from fd 3, runs it as
# ``__main__`` and reports an uncaught exception's type on fd 4 before the usual traceback.
RUNNER_SOURCE = """
import sys, types, builtins
def _run():
    import json, linecache, os
    with open(3, "rb") as f:
        src = f.read()
    name = "<sandbox>"
    linecache.cache[name] = (len(src), None, src.decode("utf-8", "replace").splitlines(True), name)
    mod = types.ModuleType("__main__")
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    sys.argv = [name]
    try:
        exec(compile(src, name, "exec"), mod.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        import traceback
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        try:
            os.write(4, (json.dumps({"event": "exception", "type": type(exc).__name__,
                                     "message": last}) + "\\n").encode())
        except OSError:
            pass
        tb = exc.__traceback__
        # Hide this runner's own frame: the traceback starts in the submitted code.
        traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)
        sys.exit(1)
_run()
"""


if __name__ == "__main__":
    sys.exit(main(sys.argv))
