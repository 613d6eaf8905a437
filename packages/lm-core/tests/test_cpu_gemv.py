"""lmstack's compiled CPU GEMV (the ``gemv`` weight layout): results, threads, cache, and clear failures."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.core import ConfigError
from lmstack.core.model import _cpu_gemv
from lmstack.core.model._inference_layout import resolve_layout

CPU = torch.device("cpu")


def test_the_kernel_builds_on_this_machine() -> None:
    # CI's machines have gcc and torch's GNU OpenMP: the gemv layout is tested there, not skipped.
    assert _cpu_gemv.available(), _cpu_gemv.unavailable_reason()
    assert _cpu_gemv.unavailable_reason() == ""


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
    got = _cpu_gemv.gemv(x, w, b)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # float32 accumulation in another order than the float64 reference: the error grows with the sum
    # of |terms|, about k * eps32 of it at worst; 4 * sqrt(k) * eps32 of it is what random signs give.
    scale = (x.abs().double() @ w.abs().double().T) + (0 if b is None else b.abs().double())
    assert ((got.double() - _reference(x, w, b)).abs() <= 4 * k**0.5 * 1.2e-7 * scale + 1e-30).all()


def test_gemv_keeps_leading_dimensions_and_reads_strided_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(1, 3, 80, generator=g)[..., ::2]  # strided: every other column
    assert not x.is_contiguous()
    got = _cpu_gemv.gemv(x, w, b)
    assert got.shape == (1, 3, 24)
    torch.testing.assert_close(got.double(), _reference(x, w, b), rtol=1e-5, atol=1e-5)
    assert _cpu_gemv.gemv(torch.empty(0, 40), w).shape == (0, 24)


def test_gemv_gives_the_same_bits_on_one_thread_and_two() -> None:
    # Each output is one thread's dot product, so splitting the rows over threads changes nothing.
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 512, generator=g), torch.randn(1000, 512, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpu_gemv.gemv(x, w)
        torch.set_num_threads(2)
        two = _cpu_gemv.gemv(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_gemv_refuses_what_it_cannot_multiply() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(ConfigError, match="float32 CPU tensors"):
        _cpu_gemv.gemv(torch.randn(1, 16, dtype=torch.float64), w)
    with pytest.raises(ConfigError, match="shapes do not fit"):
        _cpu_gemv.gemv(torch.randn(1, 15), w)
    with pytest.raises(ConfigError, match="contiguous: False"):
        _cpu_gemv.gemv(torch.randn(1, 8), w.T)
    with pytest.raises(ConfigError, match="bias"):
        _cpu_gemv.gemv(torch.randn(1, 16), w, torch.randn(9))


def _fresh_build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Build in a new process (the kernel is built once per process) with ``env`` over this one's."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from lmstack.core.model import _cpu_gemv\n"
        "print('AVAILABLE', _cpu_gemv.available()); print('REASON', _cpu_gemv.unavailable_reason())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


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
        "from lmstack.core.model import _cpu_gemv\n"
        "_cpu_gemv.gemv(torch.randn(1, 64), torch.randn(64, 64))\n"
        "print('SAME', runtimes() == before, len(before))\n"
    )
    if importlib.util.find_spec("faiss") is None:
        code = code.replace("import faiss, torch", "import torch")
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "LMSTACK_KERNEL_CACHE": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "SAME True" in done.stdout, done.stdout + done.stderr


def test_a_fresh_cache_is_filled_with_one_library_and_no_leftovers(tmp_path: Path) -> None:
    done = _fresh_build({"LMSTACK_KERNEL_CACHE": str(tmp_path / "cache")})
    assert "AVAILABLE True" in done.stdout, done.stdout + done.stderr
    assert [p.name.startswith("cpu_gemv-") and p.suffix == ".so" for p in (tmp_path / "cache").iterdir()] == [
        True
    ]
    again = _fresh_build(
        {"LMSTACK_KERNEL_CACHE": str(tmp_path / "cache"), "CC": str(tmp_path / "no-such-cc")}
    )
    # The cached library is keyed by the compiler too: another compiler (here: none) does not reuse it.
    assert "AVAILABLE False" in again.stdout and "no C compiler" in again.stdout, again.stdout


def test_a_failed_compile_says_why_and_the_layout_refuses(tmp_path: Path) -> None:
    fake = tmp_path / "fake-cc"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\necho "fake-cc: no way" >&2\nexit 1\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    done = _fresh_build({"LMSTACK_KERNEL_CACHE": str(tmp_path / "cache"), "CC": str(fake)})
    assert "AVAILABLE False" in done.stdout and "fake-cc: no way" in done.stdout, done.stdout
    assert "CPU GEMV kernel unavailable" in done.stdout  # logged once, at INFO
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built left behind


def test_layout_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_layout("auto", CPU, torch.float32, single_sequence=True) == "gemv"
    assert resolve_layout("auto", CPU, torch.float32) != "gemv"
    assert resolve_layout("auto", CPU, torch.bfloat16, single_sequence=True) != "gemv"
    with pytest.raises(ConfigError, match="runs float32 weights on a CPU"):
        resolve_layout("gemv", torch.device("meta"), torch.float32)
    # Where the kernel cannot build, an explicit "gemv" says why and "auto" quietly keeps oneDNN/dense.
    monkeypatch.setattr(_cpu_gemv, "_loaded", (None, "no C compiler found (set $CC, or install gcc)"))
    with pytest.raises(ConfigError, match="cannot run here: no C compiler found"):
        resolve_layout("gemv", CPU, torch.float32)
    assert resolve_layout("auto", CPU, torch.float32, single_sequence=True) in ("onednn", "dense")
