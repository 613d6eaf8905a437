"""lmstack's float32 CPU kernels for decoding, compiled here at first use.

Decoding one sequence is a chain of small operations on one token, and torch's general kernels are
built for large ones. Four C kernels (``_cpu_kernels.c``) take over where that costs the most:

* :func:`gemv`: every weight matrix times one row (the ``gemv`` weight layout of
  :meth:`~lmstack.core.CausalLM.prepare_for_inference`). A decode step costs about the time it takes
  to stream the weights from memory once. On the 2-core AMD EPYC (AVX-512) machine, all of one step's
  weights of a 56M llama (160 MB), cold in cache, two threads: ``F.linear`` (MKL) 17.1 ms a step
  (9.3 GB/s), oneDNN over its packed weight 7.9 ms (20.1 GB/s), this kernel 4.5 ms (35.7 GB/s).
* :func:`gemv_int8`: the same over int8 codes with one scale per row, in exact float32 (lmstack-infer's
  weight-only int8 layers at decode): 2.35 ms for those matrices against torch's bfloat16 kernel's 2.29.
* :func:`rms_norm`: a few rows; torch's ``rms_norm`` took 12 us a call alone and 19-27 us right after a
  GEMV (38 us on average inside the engine), this kernel 2-3 us.
* :func:`paged_attention`: query rows over a paged KV cache, read in place through the block tables
  (decode tokens and causal prefill chunks alike, grouped-query, sliding windows): lmstack-infer's
  float32 CPU attention. At 64 decoding sequences of 100-700 tokens, 2.0-3.3 ms a layer against 19.8-21.8
  for gathering the blocks into SDPA.

The kernels are plain C loops that the compiler vectorises for this CPU (``-O3 -march=native``); the
GEMV splits its output rows over OpenMP threads. They are compiled the first time one is needed, with
``$CC`` or ``cc``/``gcc``, into ``$LMSTACK_KERNEL_CACHE`` (default ``~/.cache/lmstack/kernels``, or a
private ``$TMPDIR/lmstack-kernels-<uid>`` where that cannot be written), keyed
by the source, the compiler, the CPU's flags and the OpenMP runtime, and loaded with ctypes (which
releases the GIL during a call). The library links against the very OpenMP runtime file torch loaded,
so the kernels and torch's own ops share one thread pool: a second runtime's idle threads spinning on
the same two cores made a BLAS GEMV here slower than torch's (13 against 87 tok/s).

Where they cannot be built (not Linux, no C compiler, a torch that does not use GNU OpenMP),
:func:`available` is false and :func:`unavailable_reason` says why; callers then keep torch's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.core._errors import ConfigError

__all__ = [
    "MAX_ROWS",
    "PagedRows",
    "available",
    "few_rows",
    "gemv",
    "gemv_int8",
    "paged_attention",
    "plain_tensors",
    "rms_norm",
    "unavailable_reason",
    "vector_width",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
_ABI = 4
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
_COMPILE_TIMEOUT_S = 120
_UNWRITABLE = "cannot write the kernel cache"


def _flags() -> tuple[str, ...]:
    # $LMSTACK_KERNEL_CFLAGS adds flags after ours, e.g. "-mno-avx512f" to build the AVX2 code paths.
    return (*_FLAGS, *os.environ.get("LMSTACK_KERNEL_CFLAGS", "").split())


# Inputs of up to this many rows go through the kernel (it reads each weight once for all of them);
# more rows are a GEMM, which oneDNN does better. Measured on the 56M llama's shapes, two threads.
MAX_ROWS = 4

_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, str] | None = None


def _cache_dirs() -> list[Path]:
    """Where to build: ``$LMSTACK_KERNEL_CACHE`` alone if set, else the user's cache, then a private temp dir.

    The temp dir is the fallback for a read-only home (containers); it is made with mode 0700 and used
    only if this user owns it and no one else can write to it, so no one else's library gets loaded.
    """
    env = os.environ.get("LMSTACK_KERNEL_CACHE")
    if env:
        return [Path(env)]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [
        Path(base) / "lmstack" / "kernels",
        Path(tempfile.gettempdir()) / f"lmstack-kernels-{os.getuid()}",
    ]


def _private(directory: Path) -> bool:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


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


def _build() -> tuple[ctypes.CDLL | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"the CPU kernels are built on Linux only, not {sys.platform}"
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "this torch does not parallelise with OpenMP, so the kernels would not share its threads"
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
        b"\0".join([source, cc.encode(), version.encode(), " ".join(_flags()).encode(), _cpu_flags().encode(),
                    str(runtime).encode(), str(_ABI).encode()])
    ).hexdigest()[:20]  # fmt: skip
    dirs = _cache_dirs()
    error: str | None = None
    for i, directory in enumerate(dirs):
        target = directory / f"cpu_kernels-{key}.so"
        if i > 0 and not _private(directory):
            return None, f"{error}; and the fallback {directory} is not a private directory of this user"
        if target.exists():
            break
        error = _compile(cc, runtime, target)
        if error is None:
            break
        if not error.startswith(_UNWRITABLE) or i == len(dirs) - 1:
            return None, error
        logger.info("%s; building in %s instead", error, dirs[i + 1])
    try:
        lib = ctypes.CDLL(str(target))
        if lib.lmstack_kernels_abi() != _ABI:
            return None, f"{target} has another ABI version; delete it to rebuild"
    except (OSError, AttributeError) as exc:
        return None, f"could not load the compiled kernels {target}: {exc}"
    lib.lmstack_kernels_isa.restype = ctypes.c_int
    ptr, long, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    signatures = {
        "lmstack_gemv_f32": [ptr] * 4 + [long] * 3 + [i32],
        "lmstack_gemv_i8_f32": [ptr] * 5 + [long] * 3 + [i32],
        "lmstack_rms_norm_f32": [ptr] * 3 + [long] * 2 + [f32],
        "lmstack_paged_attention_f32": [ptr] * 4 + [ptr, long] + [ptr] * 3 + [long] * 5 + [f32, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    logger.debug("CPU kernels loaded from %s", target)
    return lib, ""


def _compile(cc: str, runtime: Path, target: Path) -> str | None:
    """Compile to a temporary file next to ``target``, then rename: concurrent builders never see half."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    except OSError as exc:
        return f"{_UNWRITABLE} {target.parent} ({exc}); set LMSTACK_KERNEL_CACHE"
    try:
        obj, lib = work / "kernels.o", work / "kernels.so"
        # Link against the runtime file torch loaded (not -lgomp): the library then names the same
        # soname, so the loader hands it torch's copy and no second thread pool starts.
        commands = [
            [cc, *_flags(), "-c", str(_SOURCE), "-o", str(obj)],
            [cc, "-shared", str(obj), str(runtime), f"-Wl,-rpath,{runtime.parent}", "-o", str(lib)],
        ]
        for command in commands:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"compiling the CPU kernels failed: {exc}"
            if done.returncode != 0:
                said = done.stderr.strip()[-800:]
                return f"compiling the CPU kernels failed ({' '.join(command)}): {said}"
        os.replace(lib, target)
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _library() -> tuple[ctypes.CDLL | None, str]:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
                if _loaded[0] is None:
                    logger.info("CPU kernels unavailable: %s", _loaded[1])
    return _loaded


def available() -> bool:
    """Whether the kernels are built (compiling them now, once per process, if they have to be)."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why the kernels cannot run here; empty when they can."""
    return _library()[1]


def vector_width() -> int:
    """The vector code the kernels were built with: 512 (AVX-512), 256 (AVX2 and FMA) or 0 (plain C)."""
    return int(_lib_or_raise().lmstack_kernels_isa())


def _lib_or_raise() -> ctypes.CDLL:
    lib, reason = _library()
    if lib is None:
        raise ConfigError(f"lmstack's CPU kernels cannot run here: {reason}")
    return lib


def plain_tensors(*tensors: Tensor) -> bool:
    """Whether every tensor is a plain tensor or parameter (not a DTensor or another subclass).

    The kernels read raw memory: a subclass's ``data_ptr`` is not its values (a DTensor's local
    shard, a fake tensor's nothing), so callers route subclasses to torch's ops.
    """
    return all(type(t) is torch.Tensor or type(t) is nn.Parameter for t in tensors)


def few_rows(x: Tensor, *others: Tensor) -> bool:
    """Whether ``x`` is a decode-sized input for these kernels, which are built here.

    That is: at most :data:`MAX_ROWS` rows (over its last dimension), and ``x`` and ``others`` plain
    float32 CPU tensors. Callers check this and keep torch's op otherwise (more rows, another dtype
    or device, a DTensor).
    """
    return (
        x.numel() <= MAX_ROWS * x.shape[-1]
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, *others))
        and plain_tensors(x, *others)
        and available()
    )


def _check_f32(*tensors: Tensor) -> None:
    if not plain_tensors(*tensors):
        raise ConfigError("lmstack's CPU kernels take plain tensors, not DTensors or other subclasses.")
    if any(t.dtype is not torch.float32 or not t.is_cpu for t in tensors):
        raise ConfigError("lmstack's CPU kernels take float32 CPU tensors only.")


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` by the GEMV kernel.

    Args:
        x: ``[..., in]``; a few rows (up to :data:`MAX_ROWS` is where it beats a GEMM), any strides.
        weight: ``[out, in]``, contiguous.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]``, float32.

    Raises:
        ConfigError: The kernels are unavailable here (the message says why), or the tensors are not
            float32 CPU tensors of matching sizes.
    """
    lib = _lib_or_raise()
    n, k = weight.shape
    _check_f32(x, weight, *(() if bias is None else (bias,)))
    if x.shape[-1] != k or not weight.is_contiguous() or (bias is not None and bias.shape != (n,)):
        raise ConfigError(
            f"gemv shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)} (contiguous: "
            f"{weight.is_contiguous()}), bias {None if bias is None else tuple(bias.shape)}."
        )
    rows = x.reshape(-1, k).contiguous()
    bias = None if bias is None else bias.contiguous()  # held here, so it lives through the call
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    lib.lmstack_gemv_f32(
        weight.data_ptr(), rows.data_ptr(), None if bias is None else bias.data_ptr(),
        out.data_ptr(), rows.shape[0], n, k, torch.get_num_threads(),
    )  # fmt: skip
    return out


def gemv_int8(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (codes * scales[:, None]).T + bias`` for int8 codes with one float32 scale per output row.

    The codes are converted to float32 in the kernel, so the arithmetic is exact float32 over the
    dequantized weight, while a quarter of the float32 matrix's bytes is read.

    Args:
        x: ``[..., in]`` float32; a few rows.
        codes: ``[out, in]`` int8, contiguous.
        scales: ``[out]`` float32.
        bias: ``[out]`` float32 or None.

    Raises:
        ConfigError: The kernels are unavailable, or dtypes or shapes do not fit.
    """
    lib = _lib_or_raise()
    n, k = codes.shape
    _check_f32(x, scales, *(() if bias is None else (bias,)))
    if (
        codes.dtype != torch.int8
        or not plain_tensors(codes)
        or not codes.is_contiguous()
        or x.shape[-1] != k
        or scales.shape != (n,)
        or (bias is not None and bias.shape != (n,))
    ):
        raise ConfigError(
            f"gemv_int8 does not fit: x {tuple(x.shape)}, codes {tuple(codes.shape)} {codes.dtype} "
            f"(contiguous: {codes.is_contiguous()}), scales {tuple(scales.shape)}, "
            f"bias {None if bias is None else tuple(bias.shape)}."
        )
    rows = x.reshape(-1, k).contiguous()
    s = scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    lib.lmstack_gemv_i8_f32(
        codes.data_ptr(), s.data_ptr(), rows.data_ptr(), None if bias is None else bias.data_ptr(),
        out.data_ptr(), rows.shape[0], n, k, torch.get_num_threads(),
    )  # fmt: skip
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` by the norm kernel (one thread: meant for few rows).

    Raises:
        ConfigError: The kernels are unavailable, or ``x``'s last size is not ``weight``'s.
    """
    lib = _lib_or_raise()
    _check_f32(x, weight)
    n = weight.numel()
    if x.shape[-1] != n or weight.dim() != 1:
        raise ConfigError(f"rms_norm shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}.")
    rows, w = x.contiguous(), weight.contiguous()
    out = torch.empty_like(rows)
    lib.lmstack_rms_norm_f32(rows.data_ptr(), w.data_ptr(), out.data_ptr(), rows.numel() // max(n, 1), n, eps)
    return out


@dataclass(frozen=True)
class PagedRows:
    """Which keys each query row of :func:`paged_attention` reads, checked once for every layer's call.

    Build it with :meth:`build`, which checks every range against its table; :func:`paged_attention`
    refuses rows made otherwise. Its tensors are int32 and contiguous, and are not to be modified: the
    kernel trusts them.

    Attributes:
        tables: ``[S, B]`` block tables, one row per sequence.
        row_table: ``[N]`` the table row of each query row.
        row_start: ``[N]`` the first key each query row attends to.
        row_end: ``[N]`` one past the last (a query at position ``p`` ends at ``p + 1``: causal).
        block_size: Token slots per block.
        max_block: The largest block the tables name for a key some row reads (-1: none).
    """

    tables: Tensor
    row_table: Tensor
    row_start: Tensor
    row_end: Tensor
    block_size: int
    max_block: int
    _pointers: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _checked: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        # The kernel's table and row arguments, read once (every layer's call passes the same).
        pointers = (self.tables.data_ptr(), self.tables.shape[1], self.row_table.data_ptr(),
                    self.row_start.data_ptr(), self.row_end.data_ptr())  # fmt: skip
        object.__setattr__(self, "_pointers", pointers)

    @staticmethod
    def build(
        tables: Tensor | Sequence[Sequence[int]],
        row_table: Tensor | Sequence[int],
        row_start: Tensor | Sequence[int],
        row_end: Tensor | Sequence[int],
        block_size: int,
    ) -> PagedRows:
        """Check and convert the rows' key ranges.

        Args:
            tables: Block ids, a table per sequence: an ``[S, B]`` integer tensor, or lists (of any
                lengths). Entries past the keys the rows read are ignored.
            row_table: ``[N]`` table of each query row.
            row_start: ``[N]`` first key of each row.
            row_end: ``[N]`` one past each row's last key; at most the table's blocks times ``block_size``.
            block_size: Token slots per block.

        Raises:
            ConfigError: Lengths disagree, a value is not an integer, a range is empty or reversed or runs
                past its table, a row names a missing table, or a block id a row reads is negative.
        """
        # Checked in Python: one engine step builds these once for all its layers, and for the few rows
        # of a decode step a dozen small tensor ops cost more (170-190 us a step) than the lists.
        index = operator.index  # ints (and numpy's), never floats
        try:
            table_lists = [
                [index(b) for b in t] for t in (tables.tolist() if isinstance(tables, Tensor) else tables)
            ]
            rt, r0, r1 = ([index(x) for x in (v.tolist() if isinstance(v, Tensor) else v)]
                          for v in (row_table, row_start, row_end))  # fmt: skip
        except TypeError as exc:
            raise ConfigError(f"PagedRows: tables and rows must hold integers ({exc}).") from exc
        if not (len(rt) == len(r0) == len(r1)) or block_size < 1:
            raise ConfigError(
                f"PagedRows: {len(rt)}/{len(r0)}/{len(r1)} rows (table/start/end) and block size {block_size}"
                " do not fit: give one of each per row and a positive block size."
            )
        blocks_read = [0] * len(table_lists)
        for t, start, end in zip(rt, r0, r1, strict=True):
            if not (0 <= t < len(table_lists) and 0 <= start < end <= len(table_lists[t]) * block_size):
                raise ConfigError(
                    "PagedRows: every row needs a table row in range and keys start < end <= its table's "
                    f"blocks x block_size; got table {t} of {len(table_lists)}, keys {start}..{end - 1}."
                )
            blocks_read[t] = max(blocks_read[t], (end - 1) // block_size + 1)
        read = [b for table, n in zip(table_lists, blocks_read, strict=True) for b in table[:n]]
        if read and min(read) < 0:
            raise ConfigError("PagedRows: a block table names a negative block for a key a row reads.")
        width = max((len(t) for t in table_lists), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in table_lists] or [[0]]
        as_tensor = torch.tensor  # int32: the C kernel's index type
        rows = PagedRows(
            as_tensor(padded, dtype=torch.int32), as_tensor(rt, dtype=torch.int32),
            as_tensor(r0, dtype=torch.int32), as_tensor(r1, dtype=torch.int32), block_size,
            max(read, default=-1),
        )  # fmt: skip
        object.__setattr__(rows, "_checked", True)
        return rows


# Each thread keeps hq * (d + 2 + 64) floats of sums and scores on its stack: at most 1 MiB.
_MAX_STACK_FLOATS = 1 << 18


def paged_attention(q: Tensor, keys: Tensor, values: Tensor, rows: PagedRows, *, scale: float) -> Tensor:
    """Query rows' attention over a paged cache, read in place (nothing gathered), grouped-query.

    Row ``r`` attends to keys ``rows.row_start[r]`` to ``rows.row_end[r] - 1`` of its sequence (table
    ``rows.tables[rows.row_table[r]]``), key ``t`` being cache slot
    ``table[t // block_size] * block_size + t % block_size``. Decode rows and causal prefill chunks
    (each row ending at its own position) go through the same call; a sliding window is a later start.

    Args:
        q: ``[N, Hq, D]`` float32.
        keys: ``[slots, Hkv, D]``, contiguous (one layer's cache).
        values: Like ``keys``.
        rows: The rows' key ranges (:meth:`PagedRows.build`).
        scale: Multiplies the scores.

    Returns:
        ``[N, Hq, D]``, float32.

    Raises:
        ConfigError: The kernels are unavailable, the shapes do not fit, a block lies past the cache, or
            ``rows`` was not made by :meth:`PagedRows.build`.
    """
    lib = _lib_or_raise()
    _check_f32(q, keys, values)
    if not rows._checked:
        raise ConfigError("paged_attention reads rows made by PagedRows.build only (it checks their ranges).")
    n, hq, d = q.shape
    slots, hkv = keys.shape[0], keys.shape[1]
    if (
        n != len(rows.row_table)
        or keys.shape != values.shape
        or keys.shape[2] != d
        or hq % hkv
        or not (keys.is_contiguous() and values.is_contiguous())
        or (rows.max_block + 1) * rows.block_size > slots
        or hq * (d + 66) > _MAX_STACK_FLOATS
    ):
        raise ConfigError(
            f"paged_attention does not fit: q {tuple(q.shape)} for {rows.row_table.numel()} rows, keys "
            f"{tuple(keys.shape)}, values {tuple(values.shape)} (contiguous: {keys.is_contiguous()}, "
            f"{values.is_contiguous()}), blocks up to {rows.max_block} of {rows.block_size} slots."
        )
    qc = q.contiguous()
    out = torch.empty(n, hq, d, dtype=torch.float32)
    lib.lmstack_paged_attention_f32(
        qc.data_ptr(), out.data_ptr(), keys.data_ptr(), values.data_ptr(), *rows._pointers,
        n, hq, hkv, d, rows.block_size, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out
