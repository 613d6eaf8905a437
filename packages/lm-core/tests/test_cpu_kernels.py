"""lmstack's compiled CPU kernels (GEMV, RMSNorm, decode attention): results, threads, cache, failures."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lmstack.core import ConfigError
from lmstack.core.model import cpu_kernels
from lmstack.core.model._inference_layout import resolve_layout

CPU = torch.device("cpu")


def test_the_kernel_builds_on_this_machine() -> None:
    # CI's machines have gcc and torch's GNU OpenMP: the gemv layout is tested there, not skipped.
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
    assert cpu_kernels.unavailable_reason() == ""


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 13), (5, 1000), (300, 17), (64, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_a_float64_reference(rows: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n * 131 + k + rows)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = cpu_kernels.gemv(x, w, b)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # float32 accumulation in another order than the float64 reference: the error grows with the sum
    # of |terms|, about k * eps32 of it at worst; 4 * sqrt(k) * eps32 of it is what random signs give.
    scale = (x.abs().double() @ w.abs().double().T) + (0 if b is None else b.abs().double())
    assert ((got.double() - _reference(x, w, b)).abs() <= 4 * k**0.5 * 1.2e-7 * scale + 1e-30).all()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (37, 13), (300, 100), (64, 4096)])
def test_gemv_int8_matches_a_float64_reference(rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k + rows)
    x = torch.randn(rows, k, generator=g)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scales, bias = torch.rand(n, generator=g) / 100, torch.randn(n, generator=g)
    got = cpu_kernels.gemv_int8(x, codes, scales, bias)
    weight = codes.double() * scales.double()[:, None]
    want = x.double() @ weight.T + bias.double()
    # Exact float32 products of the dequantized weight, summed in float32 in another order.
    scale = x.abs().double() @ weight.abs().T + bias.abs().double()
    assert ((got.double() - want).abs() <= 4 * k**0.5 * 1.2e-7 * scale + 1e-30).all()
    with pytest.raises(ConfigError, match="gemv_int8 does not fit"):
        cpu_kernels.gemv_int8(x, codes.to(torch.int16), scales)


# Every kernel against its float64 reference, in a fresh process built with the given extra flags.
_ISA_CHECK = """
import torch
from lmstack.core.model import cpu_kernels as ck
assert ck.available(), ck.unavailable_reason()
g = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 200, generator=g), torch.randn(70, 200, generator=g)
q, s = torch.randint(-128, 128, (70, 200), generator=g, dtype=torch.int8), torch.rand(70, generator=g)
def rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()
errors = {
    "gemv": rel(ck.gemv(x, w), x.double() @ w.double().T),
    "gemv_int8": rel(ck.gemv_int8(x, q, s), x.double() @ (q.double() * s.double()[:, None]).T),
}
r = x[:1] * 3
want = r.double() * torch.rsqrt(r.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w[0].double()
errors["rms_norm"] = rel(ck.rms_norm(r, w[0], 1e-6), want)
# One row over keys 3..39 of a sequence on blocks 4, 1, 3 (5 slots each), 6 heads over 2 kv heads;
# 37 keys cover the vector loops and their scalar tails.
keys, values = torch.randn(50, 2, 24, generator=g), torch.randn(50, 2, 24, generator=g)
qh = torch.randn(1, 6, 24, generator=g)
table = [4, 1, 3, 8, 9, 0, 2, 5]
order = torch.tensor([table[t // 5] * 5 + t % 5 for t in range(3, 40)])
k, v = keys[order].double().repeat_interleave(3, 1), values[order].double().repeat_interleave(3, 1)
ref = torch.einsum("ht,thd->hd", (torch.einsum("hd,thd->ht", qh[0].double(), k) * 0.2).softmax(-1), v)
rows = ck.PagedRows.build(torch.tensor([table]), torch.tensor([0]), torch.tensor([3]), torch.tensor([40]), 5)
errors["paged_attention"] = rel(ck.paged_attention(qh, keys, values, rows, scale=0.2)[0], ref)
print("WIDTH", ck.vector_width(), "ERRORS", max(errors.values()), errors)
"""


@pytest.mark.parametrize(
    ("flags", "needs", "width"),
    [("", "avx512f", 512), ("-mno-avx512f", "avx2", 256), ("-mno-avx512f -mno-avx2 -mno-fma", "", 0)],
    ids=["avx512", "avx2", "plain"],
)
def test_every_vector_path_matches_its_reference(tmp_path: Path, flags: str, needs: str, width: int) -> None:
    if needs and needs not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip(f"this CPU has no {needs}")
    done = _fresh(_ISA_CHECK, {"LMSTACK_KERNEL_CACHE": str(tmp_path), "LMSTACK_KERNEL_CFLAGS": flags})
    assert done.returncode == 0, done.stdout + done.stderr
    words = done.stdout.split()
    assert int(words[words.index("WIDTH") + 1]) == width, done.stdout
    # Float32 sums of up to 200 products, relative to the largest output: ~1e-6 (20x margin).
    assert float(words[words.index("ERRORS") + 1]) < 2e-5, done.stdout


def test_gemv_keeps_leading_dimensions_and_reads_strided_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(1, 3, 80, generator=g)[..., ::2]  # strided: every other column
    assert not x.is_contiguous()
    got = cpu_kernels.gemv(x, w, b)
    assert got.shape == (1, 3, 24)
    torch.testing.assert_close(got.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert cpu_kernels.gemv(torch.empty(0, 40), w).shape == (0, 24)


def test_gemv_gives_the_same_bits_on_one_thread_and_two() -> None:
    # Each output is one thread's dot product, so splitting the rows over threads changes nothing.
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 512, generator=g), torch.randn(1000, 512, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.gemv(x, w)
        torch.set_num_threads(2)
        two = cpu_kernels.gemv(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (1, 7), (3, 513), (4, 4096)])
def test_rms_norm_matches_a_float64_reference(rows: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w = torch.randn(1, rows, n, generator=g) * 3, torch.randn(n, generator=g)
    got = cpu_kernels.rms_norm(x, w, 1e-6)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert got.shape == x.shape
    # float32 sum of squares and one rsqrt: a few ulps of each output, relative to |x * w| / rms.
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


def _paged_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: cpu_kernels.PagedRows, scale: float
) -> torch.Tensor:
    """Each row over its keys, looked up slot by slot in float64."""
    hq, hkv = q.shape[1], keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    bs = rows.block_size
    for r in range(q.shape[0]):
        table = rows.tables[int(rows.row_table[r])]
        t = torch.arange(int(rows.row_start[r]), int(rows.row_end[r]))
        slots = table[t // bs].long() * bs + t % bs
        k = keys[slots].double().repeat_interleave(hq // hkv, dim=1)  # [T, Hq, D]
        v = values[slots].double().repeat_interleave(hq // hkv, dim=1)
        weights = (torch.einsum("hd,thd->ht", q[r].double(), k) * scale).softmax(-1)
        out[r] = torch.einsum("ht,thd->hd", weights, v)
    return out


def _paged_case(
    hq: int, hkv: int, d: int, block_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, cpu_kernels.PagedRows]:
    """Rows of four sequences on shuffled blocks: a 1-key decode, a 300-key decode, a causal prefill chunk
    of 9 rows ending at 140, and a decode at 701 with a 50-key window; 3 spare blocks never read."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 300, 140, 701]
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 3
    blocks = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 2  # table entries past a sequence's keys are never read
    tables = torch.full((4, width), 10**6, dtype=torch.long)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor([blocks.pop() for _ in range(n)])
    row_table = torch.tensor([0, 1, *[2] * 9, 3])
    row_end = torch.tensor([1, 300, *range(132, 141), 701])
    row_start = torch.tensor([0, 0, *[0] * 9, 651])
    rows = cpu_kernels.PagedRows.build(tables, row_table, row_start, row_end, block_size)
    slots = num_blocks * block_size
    keys, values = torch.randn(slots, hkv, d, generator=g), torch.randn(slots, hkv, d, generator=g)
    q = torch.randn(len(row_table), hq, d, generator=g) * 2  # sharp softmax rows too
    return q, keys, values, rows


@pytest.mark.parametrize(("hq", "hkv", "d"), [(1, 1, 1), (6, 2, 7), (8, 8, 64), (12, 4, 64), (8, 1, 129)])
@pytest.mark.parametrize("block_size", [1, 5, 16, 100])
def test_paged_attention_matches_a_float64_reference(hq: int, hkv: int, d: int, block_size: int) -> None:
    q, keys, values, rows = _paged_case(hq, hkv, d, block_size, seed=hq * 7 + d + block_size)
    scale = d**-0.5
    got = cpu_kernels.paged_attention(q, keys, values, rows, scale=scale)
    # float32 dot products of length d and a float32 online softmax over up to 701 keys (blocks of 100
    # are read in runs of 64); outputs are convex combinations of values of size ~1, within ~1e-6 of the
    # float64 result here.
    torch.testing.assert_close(
        got.double(), _paged_reference(q, keys, values, rows, scale), rtol=0, atol=2e-5
    )


def test_paged_attention_gives_the_same_bits_on_one_thread_and_two() -> None:
    q, keys, values, rows = _paged_case(8, 4, 64, 16, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.paged_attention(q, keys, values, rows, scale=0.125)
        torch.set_num_threads(2)
        two = cpu_kernels.paged_attention(q, keys, values, rows, scale=0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_paged_rows_refuse_ranges_that_do_not_fit() -> None:
    tables = torch.tensor([[3, 1], [0, -1]])
    one, zero = torch.tensor([1]), torch.tensor([0])
    build = cpu_kernels.PagedRows.build
    assert build(tables, one, zero, torch.tensor([4]), 4).max_block == 0  # -1 lies past the keys read
    with pytest.raises(ConfigError, match="negative block"):
        build(tables, one, zero, torch.tensor([5]), 4)
    with pytest.raises(ConfigError, match="start < end"):
        build(tables, zero, torch.tensor([3]), torch.tensor([3]), 4)  # no key
    with pytest.raises(ConfigError, match="start < end"):
        build(tables, zero, zero, torch.tensor([9]), 4)  # past the table's 2 blocks of 4
    with pytest.raises(ConfigError, match="table row in range"):
        build(tables, torch.tensor([2]), zero, one, 4)
    with pytest.raises(ConfigError, match="do not fit"):
        build(tables, one, zero, torch.tensor([1, 2]), 4)
    with pytest.raises(ConfigError, match="must hold integers"):
        build(tables.float(), one, zero, one, 4)
    with pytest.raises(ConfigError, match="must hold integers"):
        build([[3, 1]], [0], [0], [2.0], 4)
    ragged = build([[3], [5, 2]], [1, 0], [0, 0], [6, 2], 4)  # lists of any lengths, zero-padded
    assert ragged.tables.tolist() == [[3, 0], [5, 2]] and ragged.max_block == 5
    with pytest.raises(ConfigError, match="start < end"):
        build([[3], [5, 2]], [0], [0], [5], 4)  # table 0 has one block of 4 keys


def test_few_rows_is_what_the_callers_route_to_the_kernels() -> None:
    w = torch.randn(8)
    assert cpu_kernels.few_rows(torch.randn(1, 4, 8), w)  # 4 rows: MAX_ROWS
    assert not cpu_kernels.few_rows(torch.randn(5, 8), w)
    assert not cpu_kernels.few_rows(torch.randn(1, 8, dtype=torch.bfloat16), w)
    assert not cpu_kernels.few_rows(torch.randn(1, 8), w.double())
    assert not cpu_kernels.few_rows(torch.randn(1, 8), w.as_subclass(_Wrapped))


class _Wrapped(torch.Tensor):
    pass


def test_kernels_refuse_tensor_subclasses() -> None:
    """A subclass's data_ptr is not its values (a DTensor's is its shard's): refused, never read."""
    x = torch.randn(1, 8).as_subclass(_Wrapped)
    assert not cpu_kernels.plain_tensors(x) and cpu_kernels.plain_tensors(
        torch.randn(2), nn.Parameter(torch.randn(2))
    )
    with pytest.raises(ConfigError, match="plain tensors"):
        cpu_kernels.rms_norm(x, torch.randn(8), 1e-6)
    with pytest.raises(ConfigError, match="plain tensors"):
        cpu_kernels.gemv(x, torch.randn(4, 8))


def test_kernels_refuse_what_does_not_fit() -> None:
    keys = torch.randn(12, 2, 8)
    rows = cpu_kernels.PagedRows.build(torch.tensor([[2, 0]]), torch.tensor([0]), torch.tensor([0]),
                                       torch.tensor([6]), 4)  # fmt: skip
    attend = cpu_kernels.paged_attention
    assert attend(torch.randn(1, 4, 8), keys, keys, rows, scale=1.0).shape == (1, 4, 8)
    with pytest.raises(ConfigError, match="does not fit"):
        attend(torch.randn(1, 4, 8), keys[:11], keys[:11], rows, scale=1.0)  # block 2 is slots 8..11
    with pytest.raises(ConfigError, match="does not fit"):
        attend(torch.randn(1, 3, 8), keys, keys, rows, scale=1.0)  # 3 heads over 2
    with pytest.raises(ConfigError, match="does not fit"):
        attend(torch.randn(2, 4, 8), keys, keys, rows, scale=1.0)  # 2 rows planned for 1
    with pytest.raises(ConfigError, match="does not fit"):
        attend(torch.randn(1, 4, 8), keys.transpose(0, 1).contiguous().transpose(0, 1), keys, rows, scale=1.0)
    with pytest.raises(ConfigError, match="float32 CPU tensors"):
        attend(torch.randn(1, 4, 8).half(), keys, keys, rows, scale=1.0)
    unchecked = cpu_kernels.PagedRows(rows.tables, rows.row_table, rows.row_start, rows.row_end + 99, 4, 2)
    with pytest.raises(ConfigError, match=r"PagedRows\.build only"):
        attend(torch.randn(1, 4, 8), keys, keys, unchecked, scale=1.0)
    with pytest.raises(ConfigError, match="rms_norm shapes"):
        cpu_kernels.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)


def test_gemv_refuses_what_it_cannot_multiply() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(ConfigError, match="float32 CPU tensors"):
        cpu_kernels.gemv(torch.randn(1, 16, dtype=torch.float64), w)
    with pytest.raises(ConfigError, match="shapes do not fit"):
        cpu_kernels.gemv(torch.randn(1, 15), w)
    with pytest.raises(ConfigError, match="contiguous: False"):
        cpu_kernels.gemv(torch.randn(1, 8), w.T)
    with pytest.raises(ConfigError, match="bias"):
        cpu_kernels.gemv(torch.randn(1, 16), w, torch.randn(9))


def _fresh(code: str, env: dict[str, str], unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new process (the kernels are built once per process), ``env`` over this one's."""
    merged = {k: v for k, v in {**os.environ, **env}.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-c", code], env=merged, capture_output=True, text=True, timeout=300
    )


def _fresh_build(env: dict[str, str], unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Build in a new process and print whether the kernels are available, and why not."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from lmstack.core.model import cpu_kernels\n"
        "print('AVAILABLE', cpu_kernels.available()); print('REASON', cpu_kernels.unavailable_reason())\n"
    )
    return _fresh(code, env, unset)


def test_the_kernel_shares_torchs_openmp_runtime(tmp_path: Path) -> None:
    """No second OpenMP runtime (and thread pool) starts: the kernel runs on the one torch loaded.

    faiss-cpu, imported first here, brings a renamed libgomp of its own, as it does in the ``lmstack``
    CLI, which loads every layer's commands: the kernel must still pick torch's.
    """
    code = (
        "from pathlib import Path\n"
        "import faiss, torch\n"
        "def runtimes():\n"
        "    return {l.split()[-1] for l in Path('/proc/self/maps').read_text().splitlines() if 'omp' in l}\n"
        "before = runtimes()\n"
        "from lmstack.core.model import cpu_kernels\n"
        "cpu_kernels.gemv(torch.randn(1, 64), torch.randn(64, 64))\n"
        "print('SAME', runtimes() == before, len(before))\n"
    )
    if importlib.util.find_spec("faiss") is None:
        code = code.replace("import faiss, torch", "import torch")
    done = _fresh(code, {"LMSTACK_KERNEL_CACHE": str(tmp_path)})
    assert "SAME True" in done.stdout, done.stdout + done.stderr


def test_a_fresh_cache_is_filled_with_one_library_and_no_leftovers(tmp_path: Path) -> None:
    done = _fresh_build({"LMSTACK_KERNEL_CACHE": str(tmp_path / "cache")})
    assert "AVAILABLE True" in done.stdout, done.stdout + done.stderr
    assert [
        p.name.startswith("cpu_kernels-") and p.suffix == ".so" for p in (tmp_path / "cache").iterdir()
    ] == [True]
    again = _fresh_build(
        {"LMSTACK_KERNEL_CACHE": str(tmp_path / "cache"), "CC": str(tmp_path / "no-such-cc")}
    )
    # The cached library is keyed by the compiler too: another compiler (here: none) does not reuse it.
    assert "AVAILABLE False" in again.stdout and "no C compiler" in again.stdout, again.stdout


def test_an_unwritable_cache_falls_back_to_a_private_temp_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the user's cache would be under a regular file: mkdir fails (as root too)
    (tmp_path / "tmp").mkdir()
    env = {"XDG_CACHE_HOME": str(blocker / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    done = _fresh_build(env, unset=("LMSTACK_KERNEL_CACHE",))
    assert "AVAILABLE True" in done.stdout and "building in" in done.stdout, done.stdout + done.stderr
    fallback = tmp_path / "tmp" / f"lmstack-kernels-{os.getuid()}"
    assert len(list(fallback.glob("cpu_kernels-*.so"))) == 1
    assert fallback.stat().st_mode & 0o777 == 0o700
    # A fallback directory others may write to is never loaded from.
    shared = tmp_path / "shared" / f"lmstack-kernels-{os.getuid()}"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    env["TMPDIR"] = str(tmp_path / "shared")
    done = _fresh_build(env, unset=("LMSTACK_KERNEL_CACHE",))
    assert "AVAILABLE False" in done.stdout and "not a private directory" in done.stdout, done.stdout


def test_a_failed_compile_says_why_and_the_layout_refuses(tmp_path: Path) -> None:
    fake = tmp_path / "fake-cc"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\necho "fake-cc: no way" >&2\nexit 1\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    done = _fresh_build({"LMSTACK_KERNEL_CACHE": str(tmp_path / "cache"), "CC": str(fake)})
    assert "AVAILABLE False" in done.stdout and "fake-cc: no way" in done.stdout, done.stdout
    assert "CPU kernels unavailable" in done.stdout  # logged once, at INFO
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built left behind


def test_layout_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_layout("auto", CPU, torch.float32, single_sequence=True) == "gemv"
    assert resolve_layout("auto", CPU, torch.float32) != "gemv"
    assert resolve_layout("auto", CPU, torch.bfloat16, single_sequence=True) != "gemv"
    with pytest.raises(ConfigError, match="runs float32 weights on a CPU"):
        resolve_layout("gemv", torch.device("meta"), torch.float32)
    # Where the kernel cannot build, an explicit "gemv" says why and "auto" quietly keeps oneDNN/dense.
    monkeypatch.setattr(cpu_kernels, "_loaded", (None, "no C compiler found (set $CC, or install gcc)"))
    with pytest.raises(ConfigError, match="cannot run here: no C compiler found"):
        resolve_layout("gemv", CPU, torch.float32)
    assert resolve_layout("auto", CPU, torch.float32, single_sequence=True) in ("onednn", "dense")
