"""Tensor, sequence and 2-D FSDP2 + TP parallelism against the single-process model.

One torchrun launch per world size (2 and 4 CPU processes on gloo) runs every case of that size
(``parallel_cases/tensor_case.py``); each test here computes the same case in this process with the
whole model and ``F.cross_entropy`` (``parallel_cases/tensor_common.py``) and compares: the loss,
every parameter's gradient made whole, the logits, and after an AdamW step the loss and parameters.

Tolerance: float32, ``1e-5`` of the largest reference magnitude of each tensor (measured: under
``1e-6``). Tensor parallelism changes only the order of float sums (a matmul's reduction split over
ranks and all-reduced, vocab-parallel softmax sums, data-parallel gradient averages), so results
agree to a few float32 ulps of the tensor's scale; a wrong shard, a missing reduction or a
mis-scaled loss is off by the tensor's own magnitude.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _torchrun import torchrun

from lmstack.core import ConfigError, ModelConfig
from lmstack.core.parallel._tensor import check_sequence_length, check_tensor_parallel, tp_cross_entropy

CASES_DIR = Path(__file__).parent / "parallel_cases"


def _load_common() -> Any:
    spec = importlib.util.spec_from_file_location("tensor_common", CASES_DIR / "tensor_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tensor_common"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


tc = _load_common()
RTOL = 1e-5
# An AdamW step moves each weight by about lr = 1e-2; float noise in a gradient moves it by at most
# noise * lr / eps (eps = 1e-4), far below this, while a wrong update is off by about lr.
PARAM_ATOL = 1e-5


def _run(tmp_path_factory: pytest.TempPathFactory, world: int) -> Path:
    out = tmp_path_factory.mktemp(f"tensor_parallel_{world}")
    torchrun(CASES_DIR / "tensor_case.py", world, str(out))
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 2-process case, run once for the module."""
    return _run(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 4-process case, run once for the module."""
    return _run(tmp_path_factory, 4)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float | None = None) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = atol if atol is not None else RTOL * float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def _compare(out_dir: Path, case: Any) -> None:
    got = torch.load(out_dir / f"{case.name}.pt", weights_only=False)
    want = tc.reference(case)
    dims = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, **dict(case.dims)}
    tp, dp = dims["tp"], dims["dp_replicate"] * dims["dp_shard"]

    _close(got["loss"].reshape(()), want["loss"], "loss")
    assert set(got["grads"]) == set(want["grads"]), "a parameter lost (or gained) its gradient"
    for name, grad in want["grads"].items():
        _close(got["grads"][name], grad, f"grad of {name}")
    # The attention backend got whole rows of this rank's batch (packed cu_seqlens are global) and
    # this rank's heads only: 8 query and 4 key-value heads over tp.
    assert set(got["seen"]) == {(len(tc.ROWS) // dp, tc.T, 8 // tp, 8, 4 // tp)}
    # The last layer ran on the logits rows alone where it can: not on a sequence-sharded stream.
    assert got["rows_calls"] == int(case.indices and not (tp > 1 and case.sequence_parallel))
    assert got["logits_is_dtensor"] == (tp > 1 and case.loss_parallel)
    if tp > 1:
        assert got["tied"] == (case.model == "tied"), "the tied embedding is no longer one parameter"
    if dp == 1:
        _close(got["logits"], want["logits"], "logits")
        for reduction in ("none", "mean"):
            loss, plain = got[f"ce_{reduction}"]
            _close(loss, plain, f"tp_cross_entropy(reduction={reduction!r})")
    if case.step:
        _close(got["grad_norm"].reshape(()), want["grad_norm"], "clip_grad_norm_")
        _close(got["loss2"].reshape(()), want["loss2"], "loss after an AdamW step")
        for name, param in want["params2"].items():
            _close(got["params2"][name], param, f"{name} after an AdamW step", atol=PARAM_ATOL)


@pytest.mark.parametrize("case", tc.CASES_2, ids=lambda c: c.name)
def test_two_ranks_match_one_process(world2: Path, case: Any) -> None:
    _compare(world2, case)


@pytest.mark.parametrize("case", tc.CASES_4, ids=lambda c: c.name)
def test_four_ranks_match_one_process(world4: Path, case: Any) -> None:
    _compare(world4, case)


def test_sharded_model_refuses_what_it_cannot_do(world2: Path) -> None:
    messages = torch.load(world2 / "errors.pt", weights_only=False)
    assert "input_ids is [2, 35] and 35 tokens per row is not divisible by 2" in messages["odd_rows"]
    assert "sequence_parallel=False" in messages["odd_rows"]
    assert "cannot take head=" in messages["head"] and "tp_cross_entropy" in messages["head"]
    assert "already tensor-parallel" in messages["twice"]
    assert "takes a 1-D device mesh" in messages["tp_mesh_2d"] and "5 dims" in messages["tp_mesh_2d"]
    assert "apply_fsdp takes a 1-D mesh" in messages["fsdp_mesh_5d"]


def _config(**overrides: Any) -> ModelConfig:
    raw: dict[str, Any] = {
        "model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 88,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4,
    }  # fmt: skip
    return ModelConfig(**{**raw, **overrides})


@pytest.mark.parametrize(
    ("overrides", "tp", "message"),
    [
        ({}, 3, r"num_attention_heads=8 is not divisible by 3.*\(here: 1, 2, 4\)"),
        ({"num_key_value_heads": 2}, 4, r"num_key_value_heads=2 is not divisible by 4.*\(here: 1, 2\)"),
        ({"intermediate_size": 90}, 4, r"intermediate_size=90 is not divisible by 4.*\(here: 1, 2\)"),
        ({}, 0, "must be a positive integer, got 0"),
    ],
)
def test_widths_tp_does_not_divide_are_refused(overrides: dict[str, Any], tp: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        check_tensor_parallel(_config(**overrides), tp)
    assert tp == 0 or info.value.field in message


def test_an_uneven_vocabulary_is_allowed() -> None:
    check_tensor_parallel(_config(), 4)  # vocab 97 shards 25/24/24/24: the 4-rank cases run it
    check_tensor_parallel(_config(num_attention_heads=8, num_key_value_heads=8), 8)


def test_sequence_parallel_needs_rows_that_tp_divides() -> None:
    check_sequence_length((3, 36), 4)
    with pytest.raises(
        ConfigError, match=r"input_ids is \[3, 34\] and 34 tokens per row is not divisible by 4"
    ):
        check_sequence_length((3, 34), 4)


def test_tp_cross_entropy_of_plain_logits_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 0] = -100
    flat = logits.float().reshape(-1, 11)
    want = F.cross_entropy(flat, targets.reshape(-1), reduction="none").reshape(3, 5)
    got = tp_cross_entropy(logits, targets, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    mean = tp_cross_entropy(logits, targets)
    torch.testing.assert_close(mean, want.reshape(-1)[1:].mean(), rtol=1e-6, atol=0)
    mean.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"logits \(3, 5, 11\) and targets \(3, 4\) disagree"):
        tp_cross_entropy(logits, targets[:, :4])
