"""LoRA and QLoRA: loss goes down, adapters load with peft on transformers, merges equal base + adapter.

One tiny random Llama base (2 layers, hidden 32, vocab 400) is saved as a Hugging Face directory with
a BPE tokenizer trained here; OpenAI-messages chats are the data. The LoRA run goes through the real
command line (in process), the QLoRA run through :func:`qlora`; a spy on ``save_adapter`` keeps the
trained model so its logits can be compared with what peft and transformers load from disk.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from lmstack.core import CausalLM, ModelConfig, Tokenizer, load_pretrained, save_pretrained
from lmstack.core._cli import main as lmstack_main
from lmstack.train import DataConfig, TrainConfigError, load_train_config
from lmstack.train._loop import OptimConfig, RunConfig
from lmstack.train.recipes import LoRAConfig, LoRASettings, apply_lora, lora, qlora

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

# The module (the package exports a function of the same name).
lora_module = importlib.import_module("lmstack.train.recipes.lora")

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ROOT = Path(__file__).resolve().parents[3]
R, ALPHA = 4, 8
STEPS = 30
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------
# fixtures: a base model, chats, one LoRA and one QLoRA run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one thread is as fast, and spin-waiting threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CausalLM(config, dtype=torch.float32)
    model.reset_parameters(std=0.1)  # logits of a useful size for a random model
    return save_pretrained(model, tmp_path_factory.mktemp("base") / "base", tokenizer=tokenizer)


PLACES = [("zorbia", "quill"), ("paris", "london"), ("the teeth", "the sun"), ("london", "rain")]


def _chat(i: int) -> dict[str, Any]:
    """Question/answer chats with a pattern to learn (OpenAI messages, some with a system turn)."""
    place, river = PLACES[i % len(PLACES)]
    messages = [{"role": "system", "content": "Answer in one sentence."}] if i % 3 == 0 else []
    messages += [
        {"role": "user", "content": f"What is the river of {place}?"},
        {"role": "assistant", "content": f"The river of {place} is called {river}, thank you."},
    ]
    return {"messages": messages}


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 chats of the bundled world (examples/world, the quickstart preset), as the issue asks."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "world"))
    import world

    rows = world.build_files(seed=0, params=world.PRESETS["quickstart"])["chats.jsonl"][:48]
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
    return path


def _settings(**changes: Any) -> dict[str, Any]:
    return {"r": R, "alpha": ALPHA, "dropout": 0.0, **changes}


def _config(base: Path, data: Path, out: Path, **lora: Any) -> LoRAConfig:
    return LoRAConfig(
        model=str(base),
        data=DataConfig(paths=[str(data)], format="messages", max_length=128),
        optim=OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0),
        run=RunConfig(output_dir=str(out), max_steps=STEPS, batch_size=4, save_every=0, device="cpu", seed=0),
        lora=LoRASettings(**_settings(**lora)),
        merge=True,
    )


class _Spy:
    """Wraps the recipe's ``save_adapter`` (which still runs) to keep the trained model."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model: Any = None
        real = lora_module.save_adapter

        def spy(model: nn.Module, path: Any, **kwargs: Any) -> Path:
            self.model = model
            return real(model, path, **kwargs)

        monkeypatch.setattr(lora_module, "save_adapter", spy)


@pytest.fixture(scope="module")
def lora_run(base: Path, chat_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A LoRA run through ``lmstack train lora CONFIG.yaml --overrides`` (in process)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    config = tmp_path_factory.mktemp("cfg") / "lora.yaml"
    data = {
        "model": str(base),
        "data": {"paths": [str(chat_file)], "format": "messages", "max_length": 128},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "lora": _settings(),
        "merge": True,
    }
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        spy = _Spy(mp)
        argv = ["train", "lora", str(config), "--run.output_dir", str(out), "--run.max_steps", str(STEPS),
                "--run.batch_size", "4", "--run.save_every", "0", "--run.device", "cpu"]  # fmt: skip
        assert lmstack_main(argv) == 0
    return out, spy.model


@pytest.fixture(scope="module")
def qlora_run(base: Path, chat_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("qlora") / "run"
    with pytest.MonkeyPatch.context() as mp:
        spy = _Spy(mp)
        qlora(_config(base, chat_file, out))  # quantize "none": qlora picks nf4
    return out, spy.model


def _metrics_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def probe(tokenizer: Tokenizer) -> torch.Tensor:
    """Two rendered chats, cut to one length, as a batch of token ids."""
    rows = [tokenizer.apply_chat_template(_chat(i)["messages"], tokenize=True) for i in (1, 3)]
    n = min(len(r) for r in rows)
    return torch.tensor([list(r)[:n] for r in rows])


@torch.no_grad()
def _ours(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(ids).float()


@torch.no_grad()
def _hf(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def _hf_base(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path))  # fp32, as saved


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------


def test_lora_and_qlora_reduce_the_loss(lora_run: tuple[Path, Any], qlora_run: tuple[Path, Any]) -> None:
    for run, _ in (lora_run, qlora_run):
        losses = _metrics_losses(run)
        assert len(losses) == STEPS
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        print(
            f"{run.parent.name}: mean loss of steps 1-3 {first:.3f}, of steps {STEPS - 2}-{STEPS} {last:.3f}"
        )
        # Rank-4 adapters on a 32-wide random base, 30 steps of the world's varied chats: about -9%
        # (6.1 -> 5.5 for both); a run whose adapters did not train stays within noise of the start.
        assert last < 0.93 * first, (run, first, last)


def test_only_the_lora_matrices_train(base: Path) -> None:
    model = load_pretrained(base, dtype="float32")
    names = apply_lora(model, LoRASettings(**_settings()))
    assert len(names) == 7 * model.config.num_hidden_layers
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    expected = 0
    for name in names:
        base_layer = model.get_submodule(name).get_base_layer()
        expected += R * (base_layer.in_features + base_layer.out_features)
    assert sum(p.numel() for p in trainable.values()) == expected


def test_lora_adapter_is_peft_format_and_loads_on_transformers(
    lora_run: tuple[Path, Any], base: Path, probe: torch.Tensor
) -> None:
    run, trained = lora_run
    adapter = run / "final" / "adapter"
    assert sorted(p.name for p in (run / "final").iterdir()) == ["adapter", "merged"]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert Path(config["base_model_name_or_path"]) == base.absolute()
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    peft_model = peft.PeftModel.from_pretrained(_hf_base(base), str(adapter))
    ours = _ours(trained, probe)
    theirs = _hf(peft_model, probe)
    assert (ours - _ours(load_pretrained(base), probe)).abs().max() > 1e-2  # the adapter changed the model
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_lora_merged_equals_base_plus_adapter(
    lora_run: tuple[Path, Any], base: Path, probe: torch.Tensor
) -> None:
    run, _ = lora_run
    merged_dir = run / "final" / "merged"
    peft_logits = _hf(peft.PeftModel.from_pretrained(_hf_base(base), str(run / "final" / "adapter")), probe)
    merged_ours = load_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged_ours.named_parameters())
    torch.testing.assert_close(_ours(merged_ours, probe), peft_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_hf(_hf_base(merged_dir), probe), peft_logits, atol=1e-4, rtol=1e-4)
    assert Tokenizer.from_pretrained(merged_dir).vocab_size == Tokenizer.from_pretrained(base).vocab_size


# ------------------------------------------------------------------------------------------------
# QLoRA
# ------------------------------------------------------------------------------------------------


def test_qlora_base_linears_are_4bit(qlora_run: tuple[Path, Any]) -> None:
    _, model = qlora_run
    four_bit = 0
    for name, module in model.named_modules():
        if not name.endswith(TARGETS):
            continue
        layer = module.get_base_layer()
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert layer.weight.quant_state.quant_type == "nf4"
        # two 4-bit weights a byte: an eighth of the fp32 matrix
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features
        four_bit += 1
    assert four_bit == 7 * model.config.num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize(("quant_type", "double_quant", "limit"), [("nf4", True, 0.1), ("fp4", False, 0.13)])
def test_qlora_weights_are_4bit_roundings_of_the_base(
    base: Path, quant_type: str, double_quant: bool, limit: float
) -> None:
    reference = load_pretrained(base, dtype="float32")
    model = load_pretrained(base, dtype="float32")
    apply_lora(model, LoRASettings(**_settings(quantize=quant_type, double_quant=double_quant)))
    torch.manual_seed(0)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):  # in_features 32, 48
        layer = model.get_submodule(name).get_base_layer()
        exact = reference.get_submodule(name).weight
        dense = lora_module._dense_weight(layer)
        # NF4 keeps ~9% relative RMS error, FP4 ~12% (bitsandbytes' own CPU dequantization returns
        # 20-40% for these in_features, which are not multiples of its block size 64).
        error = ((dense - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
        assert 0.02 < error < limit, (name, error)
        # forward and backward: a linear layer with the dequantized weight
        x = torch.randn(3, 5, layer.in_features, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, ref = layer(x), torch.nn.functional.linear(x_ref, dense)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_qlora_adapter_loads_with_peft_and_merges(
    qlora_run: tuple[Path, Any], base: Path, probe: torch.Tensor
) -> None:
    run, trained = qlora_run
    adapter = run / "final" / "adapter"
    peft_model = peft.PeftModel.from_pretrained(_hf_base(base), str(adapter))
    # Every trained matrix arrives in the peft model unchanged.
    ours = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    theirs = dict(peft_model.named_parameters())
    assert len(ours) == 2 * 7 * 2
    for name, value in ours.items():
        torch.testing.assert_close(theirs[f"base_model.model.{name}"], value, atol=0, rtol=0)

    qlora_logits = _ours(trained, probe)
    # The merged checkpoint folds the adapters into the dequantized 4-bit base: the same function as
    # the QLoRA model up to float rounding.
    merged = _ours(load_pretrained(run / "final" / "merged"), probe)
    torch.testing.assert_close(merged, qlora_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        _hf(_hf_base(run / "final" / "merged"), probe), qlora_logits, atol=1e-4, rtol=1e-4
    )
    # The adapter on the original fp32 base differs from the QLoRA model by the 4-bit rounding of the
    # base (NF4 keeps about 3.5 significant bits a weight): which is why the merge uses the dequantized
    # base, the weights the adapters were trained against.
    gap = _hf(peft_model, probe) - qlora_logits
    rms = gap.pow(2).mean().sqrt()
    print(f"fp32 base + QLoRA adapter vs QLoRA: max {gap.abs().max():.3g}, rms {rms:.3g}; "
          f"logits rms {qlora_logits.pow(2).mean().sqrt():.3g}")  # fmt: skip
    assert gap.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# resume, configs
# ------------------------------------------------------------------------------------------------


def test_lora_resume_equals_an_uninterrupted_run(base: Path, chat_file: Path, tmp_path: Path) -> None:
    def run(out: Path, steps: int) -> Any:
        cfg = _config(base, chat_file, out, dropout=0.1)  # dropout: random state resumes too
        cfg.run.max_steps, cfg.run.save_every, cfg.merge = steps, 1, False
        with pytest.MonkeyPatch.context() as mp:
            spy = _Spy(mp)
            lora(cfg)
        return spy.model

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    checkpoint = tmp_path / "split" / "checkpoints" / "step-00000001" / "model.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    resumed = run(tmp_path / "split", 4)

    reference = _metrics_losses(tmp_path / "whole")
    losses: dict[int, float] = {}
    for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    assert [losses[s] for s in range(1, 5)] == reference
    a = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_configs_and_errors(base: Path) -> None:
    example = load_train_config(LoRAConfig, ROOT / "examples" / "configs" / "lora_world.yaml")
    assert example.lora.target_modules == list(TARGETS) and example.optim.lr >= 1e-4
    assert example.lora.quantize == "none"  # the same file serves lmstack train lora and qlora
    q = load_train_config(
        LoRAConfig, None, ["--model", "m", "--lora.quantize", "fp4", "--lora.double_quant", "false"]
    )
    assert (q.lora.quantize, q.lora.double_quant) == ("fp4", False)
    with pytest.raises(TrainConfigError, match=r"did you mean 'lora\.alpha'"):
        load_train_config(LoRAConfig, None, ["--lora.alpah", "8"])
    with pytest.raises(TrainConfigError, match=r"expected one of 'none', 'nf4', 'fp4'.*did you mean 'nf4'"):
        load_train_config(LoRAConfig, None, ["--lora.quantize", "nf5"])
    model = load_pretrained(base)
    with pytest.raises(TrainConfigError, match="did you mean 'q_proj'"):
        apply_lora(model, LoRASettings(target_modules=["q_prj"]))
    with pytest.raises(TrainConfigError, match="linear layers only"):
        apply_lora(model, LoRASettings(target_modules=["embed_tokens"]))
    with pytest.raises(TrainConfigError, match=r"lora\.r must be at least 1"):
        LoRASettings(r=0)
