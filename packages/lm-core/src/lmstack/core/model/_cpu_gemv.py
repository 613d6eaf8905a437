"""A float32 matrix-vector product for CPU decoding, compiled here at first use (the ``gemv`` layout).

Decoding one sequence multiplies every weight matrix by one row, so a step costs about the time it takes
to stream the weights from memory once. On the 2-core AMD EPYC (AVX-512) machine, all of one decode
step's weights of a 56M llama (160 MB), cold in cache, two threads:

========================================  ==========  =========
one row times every weight                ms a step   GB/s
========================================  ==========  =========
``F.linear`` (MKL)                        17.1        9.3
oneDNN over the packed weight             7.9         20.1
this kernel (``_cpu_gemv.c``)             4.5         35.7
========================================  ==========  =========

The kernel is a plain C loop (``_cpu_gemv.c``) that the C compiler vectorises for this CPU
(``-O3 -march=native``) and splits over OpenMP threads. It is compiled the first time it is needed,
with ``$CC`` or ``cc``/``gcc``, into ``$LMSTACK_KERNEL_CACHE`` (default ``~/.cache/lmstack/kernels``),
keyed by the source, the compiler, the CPU's flags and the OpenMP runtime, and loaded with ctypes (which
releases the GIL during the call). It links against the very OpenMP runtime file torch loaded, so the
kernel and torch's own ops share one thread pool: a second runtime's idle threads spinning on the same
two cores made a BLAS GEMV here slower than torch's (13 against 87 tok/s).

Where it cannot be built (not Linux, no C compiler, a torch that does not use GNU OpenMP), :func:`available`
is false and :func:`unavailable_reason` says why; the engine then keeps oneDNN.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lmstack.core._errors import ConfigError

__all__ = ["MAX_ROWS", "available", "gemv", "unavailable_reason"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_cpu_gemv.c")
_ABI = 1
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
_COMPILE_TIMEOUT_S = 120

# Inputs of up to this many rows go through the kernel (it reads each weight once for all of them);
# more rows are a GEMM, which oneDNN does better. Measured on the 56M llama's shapes, two threads.
MAX_ROWS = 4

_lock = threading.Lock()
_loaded: tuple[Callable[..., None] | None, str] | None = None


def _cache_dir() -> Path:
    env = os.environ.get("LMSTACK_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmstack" / "kernels"


def _openmp_runtime() -> Path | None:
    """The GNU OpenMP runtime torch runs its threads on, as mapped into this process; None if unclear.

    Other libraries may bring runtimes of their own (faiss-cpu ships a renamed libgomp), so torch's is
    the one inside torch's package (``torch/lib``, ``torch.libs``), or else the system's ``libgomp.so.1``.
    """
    torch.get_num_threads()  # torch's libraries, and with them its OpenMP runtime, are loaded by now
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    mapped = {Path(line.split()[-1]) for line in maps.splitlines() if "/libgomp" in line}
    package = Path(torch.__file__).resolve().parent
    homes = (package, package.with_name("torch.libs"))
    own = [p for p in mapped if any(home in p.resolve().parents for home in homes)]
    if not own:
        own = [p for p in mapped if p.name == "libgomp.so.1"]
    return own[0] if len(own) == 1 else None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    chosen = os.environ.get("CC", "").strip()
    if chosen:  # a compiler named in $CC is the one used, or none: never another behind the user's back
        return shutil.which(chosen.split()[0])
    return shutil.which("cc") or shutil.which("gcc")


def _build() -> tuple[Callable[..., None] | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"the CPU GEMV kernel is built on Linux only, not {sys.platform}"
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "this torch does not parallelise with OpenMP, so the kernel would not share its threads"
    runtime = _openmp_runtime()
    if runtime is None:
        return None, "torch's GNU OpenMP runtime (libgomp) was not found among the loaded libraries"
    cc = _compiler()
    if cc is None:
        named = os.environ.get("CC", "").strip()
        hint = f"$CC={named} is not on PATH" if named else "set $CC, or install gcc"
        return None, f"no C compiler found ({hint})"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"the C compiler {cc} did not run: {exc}"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), version.encode(), " ".join(_FLAGS).encode(), _cpu_flags().encode(),
                    str(runtime).encode(), str(_ABI).encode()])
    ).hexdigest()[:20]  # fmt: skip
    target = _cache_dir() / f"cpu_gemv-{key}.so"
    if not target.exists():
        error = _compile(cc, runtime, target)
        if error is not None:
            return None, error
    try:
        lib = ctypes.CDLL(str(target))
        if lib.lmstack_gemv_abi() != _ABI:
            return None, f"{target} has another ABI version; delete it to rebuild"
    except (OSError, AttributeError) as exc:
        return None, f"could not load the compiled kernel {target}: {exc}"
    fn = lib.lmstack_gemv_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    fn.restype = None
    logger.debug("CPU GEMV kernel loaded from %s", target)
    return fn, ""


def _compile(cc: str, runtime: Path, target: Path) -> str | None:
    """Compile to a temporary file next to ``target``, then rename: concurrent builders never see half."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    except OSError as exc:
        return f"cannot write the kernel cache {target.parent} ({exc}); set LMSTACK_KERNEL_CACHE"
    try:
        obj, lib = work / "gemv.o", work / "gemv.so"
        # Link against the runtime file torch loaded (not -lgomp): the library then names the same
        # soname, so the loader hands it torch's copy and no second thread pool starts.
        commands = [
            [cc, *_FLAGS, "-c", str(_SOURCE), "-o", str(obj)],
            [cc, "-shared", str(obj), str(runtime), f"-Wl,-rpath,{runtime.parent}", "-o", str(lib)],
        ]
        for command in commands:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"compiling the CPU GEMV kernel failed: {exc}"
            if done.returncode != 0:
                said = done.stderr.strip()[-800:]
                return f"compiling the CPU GEMV kernel failed ({' '.join(command)}): {said}"
        os.replace(lib, target)
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel() -> tuple[Callable[..., None] | None, str]:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
                if _loaded[0] is None:
                    logger.info("CPU GEMV kernel unavailable: %s", _loaded[1])
    return _loaded


def available() -> bool:
    """Whether the kernel is built (compiling it now, once per process, if it has to be)."""
    return _kernel()[0] is not None


def unavailable_reason() -> str:
    """Why the kernel cannot run here; empty when it can."""
    return _kernel()[1]


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for float32 CPU tensors, by this module's kernel.

    Args:
        x: ``[..., in]``; a few rows (up to :data:`MAX_ROWS` is where it beats a GEMM), any strides.
        weight: ``[out, in]``, contiguous.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]``, float32.

    Raises:
        ConfigError: The kernel is unavailable here (the message says why), or the tensors are not
            float32 CPU tensors of matching sizes.
    """
    fn, reason = _kernel()
    if fn is None:
        raise ConfigError(f"the CPU GEMV kernel cannot run here: {reason}")
    n, k = weight.shape
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ConfigError("the CPU GEMV kernel takes float32 CPU tensors only.")
    if x.shape[-1] != k or not weight.is_contiguous() or (bias is not None and bias.shape != (n,)):
        raise ConfigError(
            f"gemv shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)} (contiguous: "
            f"{weight.is_contiguous()}), bias {None if bias is None else tuple(bias.shape)}."
        )
    rows = x.reshape(-1, k).contiguous()
    bias = None if bias is None else bias.contiguous()  # held here, so it lives through the call
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    fn(
        weight.data_ptr(), rows.data_ptr(), None if bias is None else bias.data_ptr(),
        out.data_ptr(), rows.shape[0], n, k, torch.get_num_threads(),
    )  # fmt: skip
    return out
