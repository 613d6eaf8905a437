"""Checkpoint round trips with transformers, sharding, dtypes, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import (
    CausalLM,
    CheckpointError,
    ConfigError,
    LMStackError,
    ModelConfig,
    load_pretrained,
    save_pretrained,
)
from lmstack.core.checkpoint import _save as save_module


def _model(tiny_config: Any, **overrides: Any) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_dict(tiny_config(**overrides))).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("model_type", "tied", "shard"),
    [
        ("llama", False, "5GB"),
        ("qwen2", True, "40KB"),
        ("mistral", False, "30KB"),
        ("internlm3", True, "5GB"),
    ],
)
def test_save_then_transformers_loads_same_logits(
    tmp_path: Path, tiny_config: Any, model_type: str, tied: bool, shard: str
) -> None:
    import transformers

    extra = {"head_dim": 8} if model_type == "internlm3" else {}
    model = _model(tiny_config, model_type=model_type, tie_word_embeddings=tied, **extra)
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_size=shard)
    files = sorted(os.listdir(out))
    if shard != "5GB":
        assert "model.safetensors.index.json" in files
        assert len([f for f in files if f.endswith(".safetensors")]) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.model_type == model_type
    with torch.no_grad():
        assert (hf(_ids()).logits - model(_ids())).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "internlm3"])
def test_transformers_save_then_load_pretrained_same_logits(
    tmp_path: Path, tiny_config: Any, hf_model: Any, model_type: str
) -> None:
    raw = tiny_config(model_type, tie_word_embeddings=model_type == "qwen2")
    if model_type == "internlm3":
        raw["head_dim"] = 8
    hf = hf_model(raw)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # really sharded
    model = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert (model(_ids()) - hf(_ids()).logits).abs().max() <= 1e-4


def test_dtype_on_load_and_save(tmp_path: Path, tiny_config: Any) -> None:
    model = _model(tiny_config)
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16  # the declared dtype
    as_fp32 = load_pretrained(tmp_path / "bf16", dtype="float32")
    assert as_fp32.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(as_fp32.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
    with pytest.raises(CheckpointError, match="not a floating-point"):
        load_pretrained(tmp_path / "bf16", dtype="int8")


def test_tied_model_stays_tied_after_load(tmp_path: Path, tiny_config: Any) -> None:
    save_pretrained(_model(tiny_config, tie_word_embeddings=True), tmp_path / "t")
    loaded = load_pretrained(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    from safetensors import safe_open

    with safe_open(tmp_path / "t" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118


def test_save_keeps_other_files_and_replaces_old_shards(tmp_path: Path, tiny_config: Any) -> None:
    model = _model(tiny_config)
    target = tmp_path / "ckpt"
    save_pretrained(model, target, max_shard_size="30KB")
    (target / "tokenizer.json").write_text("{}")
    save_pretrained(model, target)  # now a single file: the old shards must go, the tokenizer stay
    files = set(os.listdir(target))
    assert "tokenizer.json" in files and "model.safetensors" in files
    assert not any(f.startswith("model-0") for f in files) and "model.safetensors.index.json" not in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_failed_save_leaves_existing_checkpoint_intact(
    tmp_path: Path, tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny_config)
    target = tmp_path / "ckpt"
    save_pretrained(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = {"n": 0}
    real = save_module.save_file

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(*args, **kwargs)

    monkeypatch.setattr(save_module, "save_file", flaky)
    changed = _model(tiny_config, rms_norm_eps=1e-3)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(changed, target, max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    calls["n"] = 0
    with pytest.raises(OSError):
        save_pretrained(changed, tmp_path / "fresh", max_shard_size="30KB")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_failed_swap_leaves_existing_checkpoint_loadable(
    tmp_path: Path, tiny_config: Any, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    # The old save moved the checkpoint aside before moving the new one in: a failure between the two
    # left no checkpoint at all. Whatever step of the swap fails, the old one must stay in place.
    from lmstack.core import _atomic

    model = _model(tiny_config)
    target = tmp_path / "ckpt"
    save_pretrained(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_replace, real_rename = os.replace, os.rename

    def refuse_staging(real: Any) -> Any:
        def move(src: Any, dst: Any) -> None:
            if Path(dst) == target and Path(src).name.startswith(".ckpt.tmp"):
                raise OSError(5, "Input/output error (simulated)")
            real(src, dst)

        return move

    def failing_exchange(a: Path, b: Path) -> bool:
        raise OSError(5, "Input/output error (simulated)")

    monkeypatch.setattr(os, "replace", refuse_staging(real_replace))
    monkeypatch.setattr(os, "rename", refuse_staging(real_rename))
    monkeypatch.setattr(_atomic, "_exchange", failing_exchange if swap == "exchange" else lambda a, b: False)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(_model(tiny_config, rms_norm_eps=1e-3), target, max_shard_size="30KB")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(target)(_ids()), model(_ids()), rtol=0, atol=0)


# -- bad input -------------------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path: Path, tiny_config: Any) -> None:
    save_pretrained(_model(tiny_config), tmp_path / "c", max_shard_size="30KB")
    second = sorted((tmp_path / "c").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard.*{second.name}"):
        load_pretrained(tmp_path / "c")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path: Path, tiny_config: Any) -> None:
    save_pretrained(_model(tiny_config), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["intermediate_size"] = 70
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "c")
    message = str(info.value)
    assert (
        "'model.layers.0.mlp.down_proj.weight'" in message and "[48, 68]" in message and "[48, 70]" in message
    )


def test_unknown_model_type(tmp_path: Path, tiny_config: Any) -> None:
    save_pretrained(_model(tiny_config), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["model_type"] = "lama"
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'lama' is not supported.*Did you mean 'llama'") as info:
        load_pretrained(tmp_path / "c")
    assert info.value.field == "model_type"
    assert isinstance(info.value, LMStackError)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "huge_header", "empty"])
def test_corrupt_safetensors(tmp_path: Path, tiny_config: Any, damage: str) -> None:
    save_pretrained(_model(tiny_config), tmp_path / "c")
    file = tmp_path / "c" / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage_header":
        (n,) = struct.unpack("<Q", data[:8])
        file.write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    elif damage == "huge_header":
        file.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    else:
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(tmp_path / "c")


def test_missing_and_unexpected_tensors(tmp_path: Path, tiny_config: Any) -> None:
    from safetensors.torch import load_file, save_file

    save_pretrained(_model(tiny_config), tmp_path / "c")
    file = tmp_path / "c" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"does not use.*self_attn\.extra"):
        load_pretrained(tmp_path / "c")
    assert load_pretrained(tmp_path / "c", strict=False) is not None
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path / "c", strict=False)


def test_no_weights_or_no_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8}
    config.update(num_hidden_layers=1, num_attention_heads=2)
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*pickled"):
        load_pretrained(tmp_path / "empty")
