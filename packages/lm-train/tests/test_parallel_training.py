"""Training under ``parallel:`` layouts (tp, sp, pp and their combinations) equals one process, step for step.

Each layout trains the same tiny Llama (4 layers, GQA, untied head) from the same seed on the same global
batch (4 bins of 64 tokens, 2 micro-batches a step) as one process does; the losses of every step and the
final weights must match. fp32 throughout; the tolerances cover the summation order that splitting heads,
the vocabulary, the sequence or the batch changes (one step alone agrees to ~1e-6; four AdamW steps at a
high learning rate amplify that to ~1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lmstack.core import Tokenizer, load_pretrained

TWO = [
    {"name": "tp2", "parallel": {"tp": 2}, "batch_size": 4},
    {"name": "tp2_no_sp", "parallel": {"tp": 2, "sequence_parallel": False}, "batch_size": 4},
    {"name": "sp2_ulysses", "parallel": {"sp": 2}, "batch_size": 4},
    {"name": "sp2_ring", "parallel": {"sp": 2, "sp_attention": "ring"}, "batch_size": 4},
    {"name": "pp2", "parallel": {"pp": 2}, "batch_size": 4},
    # run.compile on the mesh: each rank compiles its layers before FSDP2 wraps them.
    {"name": "dp2_compiled", "parallel": {"dp_shard": 2}, "batch_size": 2, "compile": True},
    {"name": "pp2_compiled", "parallel": {"pp": 2}, "batch_size": 4, "compile": True},
    # FSDP2 mixed precision (bf16 weights gathered and computed with, fp32 reduction and master weights).
    {"name": "dp2_bf16mp", "parallel": {"dp_shard": 2}, "batch_size": 2, "precision": "bfloat16-mp"},
    # A checkpoint written at tp=2 resumes sharded over the data instead.
    {"name": "tp2_to_dp2", "parallel": {"dp_shard": 2}, "batch_size": 2, "resume_from": "tp2"},
]
FOUR = [
    {"name": "dp2_tp2", "parallel": {"dp_shard": 2, "tp": 2}, "batch_size": 2},
    {"name": "tp2_pp2", "parallel": {"tp": 2, "pp": 2}, "batch_size": 4},
    {"name": "dp2_sp2", "parallel": {"dp_shard": 2, "sp": 2}, "batch_size": 2},
    {"name": "tp2_sp2", "parallel": {"tp": 2, "sp": 2}, "batch_size": 4},
    # Ring attention beside tensor parallelism without Megatron's sequence-sharded norms: those norm
    # weights are then sharded by FSDP2 on the data mesh alone, beside 2-D tensor-parallel shards.
    {"name": "tp2_sp2_ring", "parallel": {"tp": 2, "sp": 2, "sp_attention": "ring",
                                          "sequence_parallel": False}, "batch_size": 4},
    {"name": "sp2_pp2", "parallel": {"sp": 2, "pp": 2}, "batch_size": 4},
    {"name": "sp2_ring_pp2", "parallel": {"sp": 2, "sp_attention": "ring", "pp": 2}, "batch_size": 4},
    {"name": "hsdp", "parallel": {"dp_replicate": 2, "dp_shard": 2}, "batch_size": 1},
    {"name": "dp2_tp2_bf16mp", "parallel": {"dp_shard": 2, "tp": 2}, "batch_size": 2,
     "precision": "bfloat16-mp"},
    {"name": "pp2_interleaved", "parallel": {"pp": 2, "dp_shard": 2, "pp_schedule": "interleaved",
                                             "pp_stages_per_rank": 2}, "batch_size": 2},
]  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def runs(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory, layout_driver: ModuleType) -> Path:
    """Every layout above under torchrun (2 and 4 processes), and one process as the reference."""
    root = tmp_path_factory.mktemp("layouts")
    data = root / "docs.jsonl"
    layout_driver.write_docs(data)
    tokenizer.save_pretrained(root / "tokenizer")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    args = [str(layout_driver.__file__), str(data), str(root / "tokenizer"), str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for world, cases in ((2, TWO), (4, FOUR)):
        procs.append(
            subprocess.Popen(
                [*base, str(world), *args, json.dumps(cases)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            )
        )  # fmt: skip
        _, stderr = procs[-1].communicate(timeout=900)  # one at a time: two cores here
        assert procs[-1].returncode == 0, stderr[-6000:]
    layout_driver.run_case(tokenizer, data, root / "single", None, 4)
    return root


ALL = [c["name"] for c in TWO + FOUR if "precision" not in c]
MIXED = [c["name"] for c in TWO + FOUR if c.get("precision") == "bfloat16-mp"]


@pytest.mark.parametrize("name", ALL)
def test_layout_matches_one_process_step_for_step(runs: Path, name: str) -> None:
    one, other = _losses(runs / "single"), _losses(runs / name)
    assert sorted(other) == [1, 2, 3, 4]
    for step in one:
        assert other[step] == pytest.approx(one[step], rel=2e-5), (name, step)
    a = load_pretrained(runs / "single" / "final").state_dict()
    b = load_pretrained(runs / name / "final").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")


def test_layouts_write_distributed_checkpoints_and_report_the_mesh(runs: Path) -> None:
    for name in ALL:
        ckpt = runs / name / "checkpoints" / "step-00000002"
        assert (ckpt / "dcp" / ".metadata").is_file(), name
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["format"] == "dcp" and state["step"] == 2
        result: dict[str, Any] = json.loads((runs / name / "result.json").read_text())
        assert result["mode"] == "mesh"
    # The single process keeps the whole-tensor format.
    assert not (runs / "single" / "checkpoints" / "step-00000002" / "dcp").exists()


@pytest.mark.parametrize("name", MIXED)
def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_fp32_weights(runs: Path, name: str) -> None:
    # The projection's weight as its forward saw it: FSDP2 gathered it in bf16.
    result = json.loads((runs / name / "result.json").read_text())
    assert result["forward_weight"] == "torch.bfloat16"
    one, mixed = _losses(runs / "single"), _losses(runs / name)
    assert sorted(mixed) == [1, 2, 3, 4]
    # Same weights at step 1, computed in bf16 (8 mantissa bits: ~0.4% per rounding): close to the
    # fp32 run, and not equal to it.
    assert mixed[1] == pytest.approx(one[1], rel=1e-2) and mixed[1] != one[1]
    for step in (2, 3, 4):
        assert mixed[step] == pytest.approx(one[step], rel=3e-2), (name, step)
    # AdamW stepped fp32 master weights: the final weights are fp32 with more precision than bf16
    # holds, and each within the fp32 run's reach (Adam moves a weight by about lr a step, so after 4
    # steps at 3e-3 two runs differ by at most ~0.024; measured: 0.011).
    a = load_pretrained(runs / "single" / "final").state_dict()
    b = load_pretrained(runs / name / "final").state_dict()
    finer = sum(int((b[k].to(torch.bfloat16).float() != b[k]).sum()) for k in b)
    assert finer > 0.99 * sum(b[k].numel() for k in b)
    for key in a:
        assert b[key].dtype == torch.float32, key
        torch.testing.assert_close(b[key], a[key], rtol=0.0, atol=0.024, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", [c["name"] for c in TWO + FOUR if c.get("compile")])
def test_compiled_layouts_compile_once(runs: Path, name: str) -> None:
    # Equal to one process (test above); here: compiled on the first step, never again.
    summary = json.loads((runs / name / "result.json").read_text())["summary"]
    line = next(x for x in summary.splitlines() if x.strip().startswith("compile"))
    assert "0 recompilations after" in line and " 0 graphs" not in line, line


def test_compile_with_tensor_parallelism_is_refused(
    tokenizer: Tokenizer, layout_driver: ModuleType, tmp_path: Path
) -> None:
    from lmstack.train import TrainConfigError

    data = tmp_path / "docs.jsonl"
    layout_driver.write_docs(data)
    with pytest.raises(TrainConfigError, match=r"run\.compile does not combine with parallel\.tp"):
        layout_driver.run_case(tokenizer, data, tmp_path / "run", {"tp": 2}, 4, "float32", None, True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bf16_mixed_precision_without_sharding_is_refused(
    tokenizer: Tokenizer, layout_driver: ModuleType, tmp_path: Path
) -> None:
    from lmstack.train import TrainError

    data = tmp_path / "docs.jsonl"
    layout_driver.write_docs(data)
    with pytest.raises(TrainError, match="bfloat16-mp is FSDP2's mixed precision and needs sharded weights"):
        layout_driver.run_case(tokenizer, data, tmp_path / "run", None, 4, "bfloat16-mp")


def test_a_tp_checkpoint_resumes_under_another_layout(runs: Path) -> None:
    result = json.loads((runs / "tp2_to_dp2" / "result.json").read_text())
    assert result["start_step"] == 2
    tp, resumed = _losses(runs / "tp2"), _losses(runs / "tp2_to_dp2")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(tp[step], rel=2e-5)


# -- configuration errors (one process) ---------------------------------------------------------------


def test_parallel_section_parses_from_yaml_and_overrides(tmp_path: Path) -> None:
    from lmstack.train import ParallelConfig, load_train_config
    from lmstack.train.recipes import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("model: m\nparallel:\n  tp: 2\n  sp_attention: ring\n")
    cfg = load_train_config(SFTConfig, path, ["--parallel.dp_shard", "2"])
    assert cfg.parallel == ParallelConfig(dp_shard=2, tp=2, sp_attention="ring")
    assert not cfg.parallel.is_default and ParallelConfig().is_default
    assert cfg.parallel.dims.resolve(4).describe() == "dp_replicate=1 dp_shard=2 sp=1 tp=2 pp=1"


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"tp": 2}, "needs at least 2 processes but the world size is 1"),
        ({"pp": 2, "pp_schedule": "interleaved"}, "needs parallel.pp_stages_per_rank of 2 or more"),
        ({"pp": 2, "pp_stages_per_rank": 2}, "needs pp_schedule: interleaved"),
        ({"tp": 3}, "not divisible by 3.*Set parallel.tp to one of them"),
    ],
)
def test_layouts_that_cannot_run_are_refused_before_training(
    tokenizer: Tokenizer, tmp_path: Path, layout_driver: ModuleType, parallel: dict[str, Any], message: str
) -> None:
    from lmstack.train import TrainConfigError

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"the model {i} layer."}) + "\n" for i in range(40)))
    run_case = layout_driver.run_case
    with pytest.raises(TrainConfigError, match=message):
        run_case(tokenizer, data, tmp_path / "run", parallel, 4)
