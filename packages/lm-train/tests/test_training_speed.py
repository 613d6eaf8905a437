"""Training-speed paths: compiled steps equal eager ones; activation-memory figures meet known values."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer
from lmstack.train import DataConfig, TrainError
from lmstack.train._activations import measure_activation_memory
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train.data import build_dataset

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "seven", "quiet", "bright", "north", "ocean"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents of 1 to 90 words: bins of 64 tokens hold many short samples, or one cut long one."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with path.open("w") as f:
        for i in range(240):
            n = rng.choice([1, 2, 3, rng.randint(4, 20), rng.randint(40, 90)])
            f.write(json.dumps({"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    return path


def _model(tokenizer: Tokenizer, layers: int = 2) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return CausalLM(cfg)


def _data(docs: Path) -> DataConfig:
    return DataConfig(paths=[str(docs)], format="text", train_on="all", max_length=64)


def _train(tokenizer: Tokenizer, docs: Path, out: Path, **run: Any) -> tuple[CausalLM, TrainResult]:
    model = _model(tokenizer)
    settings: dict[str, Any] = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "save_every": 0, **run}
    result = train_loop(
        model, tokenizer, _data(docs), OptimConfig(lr=1e-3, warmup_steps=0, decay="constant"),
        RunConfig(output_dir=str(out), tensorboard=False, **settings),
    )  # fmt: skip
    return model, result


def test_compiled_run_equals_eager_and_compiles_once(
    tokenizer: Tokenizer, docs: Path, tmp_path: Path
) -> None:
    eager, plain = _train(tokenizer, docs, tmp_path / "eager")
    compiled, fast = _train(tokenizer, docs, tmp_path / "compiled", compile=True)
    # Inductor fuses the norms, RoPE and SwiGLU, so fp32 sums round differently: a few ulps per step,
    # compounded over 4 AdamW steps.
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
    # Every step packs other samples into the same bin shape: compiled on the first step, never again.
    records = [
        json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()
    ]
    per_step = [r["compiled_graphs"] for r in records]
    assert per_step[0] > 0 and per_step[1:] == [0, 0, 0], per_step
    assert fast.compiled and fast.recompilations == 0 and fast.compiled_graphs == per_step[0]
    assert fast.compile_seconds > 0 and fast.steady_tokens_per_s > 0
    assert "recompilations after" in fast.summary() and "\n  compile " not in plain.summary()


def test_compile_with_activation_checkpointing(tokenizer: Tokenizer, docs: Path, tmp_path: Path) -> None:
    _, plain = _train(tokenizer, docs, tmp_path / "eager", max_steps=2)
    _, both = _train(
        tokenizer, docs, tmp_path / "both", max_steps=2, compile=True, activation_checkpointing=True
    )
    assert both.losses == pytest.approx(plain.losses, rel=1e-4)
    assert both.recompilations == 0


def test_activation_memory_figures(tokenizer: Tokenizer, docs: Path, tmp_path: Path) -> None:
    dataset = build_dataset(_data(docs), tokenizer)
    batch = dataset.collate([dataset[i] for i in range(2)])
    two, four = _model(tokenizer, 2).train(), _model(tokenizer, 4).train()
    a, b = measure_activation_memory(two, batch), measure_activation_memory(four, batch)
    assert a.tokens == b.tokens == batch.num_tokens
    # Checkpointed, a layer keeps only its input hidden state: two more layers keep exactly two more
    # [B, T, C] fp32 tensors (B * T slots, padding included).
    slots = batch.input_ids.numel()
    assert (b.per_token_checkpointed - a.per_token_checkpointed) * a.tokens == pytest.approx(
        2 * slots * 48 * 4
    )
    # Without checkpointing every layer keeps the same tensors: the growth is linear in depth, and larger.
    per_layer = (b.per_token - a.per_token) / 2
    assert per_layer > 8 * 48 * 4 * slots / a.tokens  # far more than the input alone
    assert a.per_token > a.per_token_checkpointed
    # Settings are left as they were, and the loop reports the figures.
    assert not two.model.activation_checkpointing
    _, result = _train(tokenizer, docs, tmp_path / "run", max_steps=1, activation_checkpointing=True)
    assert result.activation_bytes_per_token > result.activation_bytes_per_token_checkpointed > 0
    assert "/token with it (this run: with)" in result.summary()


def test_compile_refuses_qlora_layers(tokenizer: Tokenizer, docs: Path, tmp_path: Path) -> None:
    from lmstack.train._compile import compile_decoder_layers

    model = _model(tokenizer)

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes' class (matched by name)
        pass

    model.model.layers[0].mlp.up_proj = Linear4bit(48, 96)
    with pytest.raises(TrainError, match="QLoRA"):
        compile_decoder_layers(model)


def test_compiled_lora_gradients_equal_eager() -> None:
    peft = pytest.importorskip("peft")
    from lmstack.core import PackedAttention

    def build() -> CausalLM:
        torch.manual_seed(0)
        cfg = ModelConfig(
            model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        model = peft.inject_adapter_in_model(lora, CausalLM(cfg))
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model

    eager, compiled = build(), build()
    for layer in compiled.model.layers:
        layer.compile()
    positions = torch.cat([torch.arange(n) for n in [5, 17, 1, 9]])[None]
    ids = torch.randint(0, 97, positions.shape, generator=torch.Generator().manual_seed(0))
    for model in (eager, compiled):
        model(ids, positions, PackedAttention.from_positions(positions)).logsumexp(-1).sum().backward()
    trained = [(n, p, q) for (n, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True)]
    assert sum(p.grad is not None for _, p, _ in trained) == 12  # A and B of 3 targets x 2 layers
    for name, p, q in trained:
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_compiled_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    rng = random.Random(0)
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))}) + "\n"
                for _ in range(200))
    )  # fmt: skip
    lmstack = str(Path(sys.executable).with_name("lmstack"))
    args = [
        "train", "pretrain", "--data.paths", str(data), "--data.max_length", "64", "--run.max_steps", "3",
        "--run.save_every", "0", "--run.grad_accum", "2", "--tokenizer.vocab_size", "300",
        "--arch.hidden_size", "64", "--arch.intermediate_size", "128", "--arch.num_hidden_layers", "2",
        "--arch.num_attention_heads", "4", "--arch.num_key_value_heads", "2", "--run.compile", "true",
        "--run.tensorboard", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [lmstack, *args, "--run.output_dir", str(tmp_path / "one"), "--run.batch_size", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "lmstack.core", *args, "--run.output_dir", str(tmp_path / "two"),
         "--run.batch_size", "1", "--run.data_parallel", "fsdp"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    # The same global batch: sharded and compiled, step for step (fp32; compiled kernels on both sides).
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert "0 recompilations after" in two.stdout


def test_fused_loss_run_equals_plain(
    tokenizer: Tokenizer, docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmstack.train._fused_loss as fused_module

    calls = {"n": 0}
    original = fused_module.fused_linear_cross_entropy

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_module, "fused_linear_cross_entropy", counted)
    plain_model, plain = _train(
        tokenizer, docs, tmp_path / "plain", fused_loss=False, measure_activations=False
    )
    assert calls["n"] == 0
    fused_model, fused = _train(tokenizer, docs, tmp_path / "fused", measure_activations=False)
    assert calls["n"] == 4 * 2  # every micro-batch of the 4 steps took the fused path
    # Same sums in another order (chunked rows): fp32 rounding, compounded over 4 AdamW steps.
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)
    for (name, a), b in zip(plain_model.state_dict().items(), fused_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
