"""The preference and LoRA recipes under ``parallel:`` layouts equal one process, step for step.

DPO, ORPO, SimPO and KTO train the same tiny Llama from the same checkpoint on the same global batch
(4 packed bins of 128 tokens per micro-batch, 2 micro-batches a step) under tensor parallelism (the
completion tokens' logits gathered from the vocabulary shards), sequence parallelism (Ulysses and ring:
each rank scores its slice of every bin and the per-sequence log-prob sums are added over the sp group)
and their combinations with FSDP2; every step's loss and reward metrics, the reference table computed
before the first step, and the final weights must match the one-process run. LoRA adapters (full-precision
base, no dropout) train under FSDP2 (the frozen base sharded with them), HSDP, pipeline and sequence
parallelism, alone and as DPO's policy with the adapters-off base as the reference; their merged final
models and adapter files must match too; under tp each adapter is split as its projection is (``B``
of a column-wise projection on its outputs, ``A`` of a row-wise one on its inputs). fp32; the tolerances
cover the summation order that splitting heads, the vocabulary or the tokens changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from _preference_rows import polite_pairs
from safetensors.torch import load_file

from lmstack.core import CausalLM, ModelConfig, Tokenizer, load_pretrained, save_pretrained

TWO = [
    {"name": "dpo_tp2", "method": "dpo", "parallel": {"tp": 2}, "batch_size": 4},
    {"name": "orpo_tp2_no_sp", "method": "orpo", "parallel": {"tp": 2, "sequence_parallel": False},
     "batch_size": 4},
    {"name": "dpo_sp2_ulysses", "method": "dpo", "parallel": {"sp": 2}, "batch_size": 4},
    # KTO's reference point z0 is a mean over the ranks' micro-batches: with one data-parallel rank it is
    # the one process's, so KTO is compared without data parallelism.
    {"name": "kto_sp2_ring", "method": "kto", "parallel": {"sp": 2, "sp_attention": "ring"}, "batch_size": 4},
    {"name": "dpo_pp2", "method": "dpo", "parallel": {"pp": 2}, "batch_size": 4},
    {"name": "rm_tp2", "method": "rm", "parallel": {"tp": 2}, "batch_size": 4},
    {"name": "rm_sp2_ring", "method": "rm", "parallel": {"sp": 2, "sp_attention": "ring"}, "batch_size": 4},
    {"name": "lora_dp2", "method": "lora", "parallel": {"dp_shard": 2}, "batch_size": 2},
    {"name": "lora_pp2", "method": "lora", "parallel": {"pp": 2}, "batch_size": 4},
    {"name": "lora_tp2", "method": "lora", "parallel": {"tp": 2}, "batch_size": 4},
    {"name": "lora_tp2_no_sp", "method": "lora", "parallel": {"tp": 2, "sequence_parallel": False},
     "batch_size": 4},
    {"name": "lora_sp2", "method": "lora", "parallel": {"sp": 2}, "batch_size": 4},
    {"name": "dpo_lora_dp2", "method": "dpo_lora", "parallel": {"dp_shard": 2}, "batch_size": 2},
]  # fmt: skip
FOUR = [
    {"name": "dpo_dp2_tp2", "method": "dpo", "parallel": {"dp_shard": 2, "tp": 2}, "batch_size": 2},
    {"name": "simpo_dp2_sp2", "method": "simpo", "parallel": {"dp_shard": 2, "sp": 2}, "batch_size": 2},
    {"name": "orpo_tp2_sp2", "method": "orpo", "parallel": {"tp": 2, "sp": 2}, "batch_size": 4},
    {"name": "rm_dp2_sp2", "method": "rm", "parallel": {"dp_shard": 2, "sp": 2}, "batch_size": 2},
    {"name": "orpo_tp2_pp2", "method": "orpo", "parallel": {"tp": 2, "pp": 2}, "batch_size": 4},
    {"name": "simpo_dp2_pp2", "method": "simpo", "parallel": {"dp_shard": 2, "pp": 2}, "batch_size": 2},
    {"name": "lora_hsdp", "method": "lora", "parallel": {"dp_replicate": 2, "dp_shard": 2}, "batch_size": 1},
    {"name": "dpo_lora_dp2_tp2", "method": "dpo_lora", "parallel": {"dp_shard": 2, "tp": 2}, "batch_size": 2},
    {"name": "dpo_lora_dp2_sp2", "method": "dpo_lora", "parallel": {"dp_shard": 2, "sp": 2}, "batch_size": 2},
]
METHODS = sorted({c["method"] for c in TWO + FOUR})


def _records(run: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tokenizer: Tokenizer, recipe_driver: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every layout above under torchrun (2 and 4 processes), and one process per method as the reference."""
    root = tmp_path_factory.mktemp("recipe_layouts")
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # pipeline stages need their own head
    )  # fmt: skip
    save_pretrained(CausalLM(config), root / "model", tokenizer=tokenizer)
    pairs, unpaired = root / "pairs.jsonl", root / "kto.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in polite_pairs(40, seed=0)))
    rows = []
    for r in polite_pairs(24, seed=1):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    unpaired.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = root / "chats.jsonl"
    messages = [
        {"messages": [*r["prompt"], {"role": "assistant", "content": r["chosen"]}]}
        for r in polite_pairs(48, seed=2)
    ]
    chats.write_text("".join(json.dumps(m) + "\n" for m in messages))
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    args = [
        str(recipe_driver.__file__),
        str(root / "model"),
        str(pairs),
        str(unpaired),
        str(chats),
        str(root),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world, cases in ((2, TWO), (4, FOUR)):
        proc = subprocess.run(
            [*base, str(world), *args, json.dumps(cases)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-6000:]
    for method in METHODS:
        recipe_driver.run_case(
            root / "model", pairs, unpaired, chats, root / f"single_{method}", method, None, 4
        )
    return root


@pytest.mark.parametrize("case", TWO + FOUR, ids=lambda c: c["name"])
def test_preference_layout_matches_one_process_step_for_step(runs: Path, case: dict[str, Any]) -> None:
    name, method = case["name"], case["method"]
    one, other = _records(runs / f"single_{method}"), _records(runs / name)
    assert sorted(other) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "accuracy", "grad_norm"):
            if one[step].get(key) is None:
                assert other[step].get(key) is None, (name, step, key)
                continue
            assert other[step][key] == pytest.approx(one[step][key], rel=5e-5, abs=1e-6), (name, step, key)
        unit = {"kto": "samples", "lora": "loss_tokens"}.get(method, "pairs")  # rm: pairs
        assert other[step][unit] == one[step][unit], (name, step)
    # The final weights: a causal LM (merged with its adapters), or the reward model's classifier files.
    final = "final/merged" if "lora" in method else "final"
    files = ["final/adapter/adapter_model.safetensors"] if "lora" in method else []
    if method == "rm":
        files = [f"final/{f.name}" for f in (runs / f"single_{method}" / "final").glob("*.safetensors")]
        assert files
    else:
        a = load_pretrained(runs / f"single_{method}" / final).state_dict()
        b = load_pretrained(runs / name / final).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")
    for file in files:
        a, b = load_file(runs / f"single_{method}" / file), load_file(runs / name / file)
        assert a.keys() == b.keys() and (method == "rm" or any("lora_B" in k for k in a))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {file}: {key}")
    assert json.loads((runs / name / "result.json").read_text())["mode"] == "mesh"


@pytest.mark.parametrize(
    "case", [c for c in TWO + FOUR if c["method"] in ("dpo", "kto")], ids=lambda c: c["name"]
)
def test_reference_table_under_a_layout_equals_one_process(runs: Path, case: dict[str, Any]) -> None:
    # Each rank group scored its share of the bins; the table was summed over the world and divided by
    # the ranks that scored the same share.
    (mine,) = (runs / case["name"] / "cache" / "reference").glob("*.npy")
    (single,) = (runs / f"single_{case['method']}" / "cache" / "reference").glob("*.npy")
    a, b = np.load(single), np.load(mine)
    assert a.shape == b.shape and np.isfinite(a).all()
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "parallel", "message"),
    [
        ("dpo", {"pp": 2, "sp": 2}, "parallel.pp trains DPO, ORPO and SimPO .* without sp"),
        ("rm", {"pp": 2}, "the rm recipe here takes dp_replicate, dp_shard, tp and sp: drop parallel.pp"),
        (
            "lora",
            {"tp": 2},
            "parallel.tp splits the output head over the vocabulary, and lora.target_modules",
        ),
        (
            "qlora",
            {"dp_shard": 2},
            "a parallel: layout cannot shard; train QLoRA with run.data_parallel: ddp",
        ),
    ],
)
def test_layouts_that_cannot_run_are_refused_before_training(
    tokenizer: Tokenizer, tmp_path: Path, method: str, parallel: dict[str, Any], message: str
) -> None:
    from lmstack.train import DataConfig, ParallelConfig, TrainConfigError
    from lmstack.train._loop import RunConfig
    from lmstack.train.recipes import DPOConfig, LoRAConfig, LoRASettings, RewardConfig, dpo, lora, qlora, rm

    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    save_pretrained(CausalLM(config), tmp_path / "model", tokenizer=tokenizer)
    rows = tmp_path / "rows.jsonl"
    if method in ("lora", "qlora"):
        chats = [
            {"messages": [*r["prompt"], {"role": "assistant", "content": r["chosen"]}]}
            for r in polite_pairs(8, 0)
        ]
        rows.write_text("".join(json.dumps(c) + "\n" for c in chats))
    else:
        rows.write_text("".join(json.dumps(r) + "\n" for r in polite_pairs(8, seed=0)))
    cls, recipe, extra = {
        "dpo": (DPOConfig, dpo, {}),
        "rm": (RewardConfig, rm, {}),
        "lora": (LoRAConfig, lora, {"lora": LoRASettings(target_modules=["q_proj", "lm_head"])}),
        "qlora": (LoRAConfig, qlora, {"lora": LoRASettings(quantize="nf4")}),
    }[method]
    cfg = cls(
        model=str(tmp_path / "model"),
        data=DataConfig(
            paths=[str(rows)], format="messages" if "lora" in method else "preference", max_length=128
        ),
        run=RunConfig(output_dir=str(tmp_path / "run"), max_steps=1, device="cpu", tensorboard=False),
        parallel=ParallelConfig(**parallel),
        **extra,
    )
    with pytest.raises(TrainConfigError, match=message):
        recipe(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
