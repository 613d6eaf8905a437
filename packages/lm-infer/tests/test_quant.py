"""Weight-only quantization: packed layouts, int8/int4 linears, AWQ/GPTQ checkpoints, engine, CLI."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmstack.core import CausalLM, ModelConfig, save_pretrained
from lmstack.infer import LLM, SamplingParams
from lmstack.infer._errors import InferError
from lmstack.infer.quant import (
    WeightOnlyLinear,
    load_quantized,
    quantization_spec,
    quantize_model,
    save_quantized,
)
from lmstack.infer.quant._cli import register_quantize
from lmstack.infer.quant._linear import gptq8_pack, pack_rows, unpack_rows
from lmstack.infer.quant._packing import GroupQuant, pack_awq, quantize_groupwise, quantize_int8_per_channel

GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj"),
    ("mlp", ("gate_proj", "up_proj"), "down_proj"),
)


def _config(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _model(seed: int = 0, **kw: object) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(_config(**kw))
    model.reset_parameters(std=0.1)
    return model.eval()


def _dequantized_copy(float_model: CausalLM, quantized: CausalLM) -> CausalLM:
    """A float model (plain nn.Linear) whose projections hold ``quantized``'s dequantized weights."""
    ref = copy.deepcopy(float_model)
    with torch.no_grad():
        for layer, qlayer in zip(ref.model.layers, quantized.model.layers, strict=True):
            for sub, names, out in GROUPS:
                parent, qparent = getattr(layer, sub), getattr(qlayer, sub)
                fused = getattr(qparent, "qkv_proj" if sub == "self_attn" else "gate_up_proj")
                for name, w in zip(names, fused.dense_weight().split(fused.sizes), strict=True):
                    getattr(parent, name).weight.copy_(w)
                getattr(parent, out).weight.copy_(getattr(qparent, out).dense_weight())
        if isinstance(quantized.lm_head, WeightOnlyLinear):
            ref.lm_head.weight.copy_(quantized.lm_head.dense_weight())
    return ref


# -- packing layouts against hand-computed values --------------------------------------------------
def test_awq_packing_known_value() -> None:
    # One output row of 8 columns with codes 0..7 (transposed: one input row). AutoAWQ puts column
    # order[i] in nibble i with order (0, 2, 4, 6, 1, 3, 5, 7): 0x75316420.
    codes = torch.arange(8, dtype=torch.uint8).reshape(8, 1)  # [out=8, in=1]
    quant = GroupQuant(codes, torch.ones(8, 1), torch.full((8, 1), 3, dtype=torch.uint8), 4, 1)
    qweight, qzeros, scales = pack_awq(quant)
    assert qweight.dtype == torch.int32 and qweight.tolist() == [[0x75316420]]
    assert qzeros.tolist() == [[0x33333333]]
    assert scales.dtype == torch.float16 and scales.shape == (1, 8)


def test_gptq_packing_known_value() -> None:
    # GPTQ packs along the input: row r of each run of 8 (4-bit) in bits 4r..4r+3.
    codes = torch.arange(1, 9, dtype=torch.int64).reshape(8, 1)  # [in=8, out=1]
    packed = pack_rows(codes, 4)
    assert packed.tolist() == [[0x87654321 - 2**32]]  # the int32 view of 0x87654321
    assert torch.equal(unpack_rows(packed, 4), codes)
    # 8 bits: four per int32; symmetric int8 codes are stored as q + 128 and the zero as 128 - 1.
    q = torch.tensor([[-127, 0, 1, 127]], dtype=torch.int8)  # [out=1, in=4]
    t = gptq8_pack(torch.cat([q] * 4), torch.ones(4))
    assert t["qweight"][:, 0].tolist() == [(1 | 128 << 8 | 129 << 16 | 255 << 24) - 2**32]
    assert t["qzeros"].tolist() == [[0x7F7F7F7F]]


# -- the linear modules ----------------------------------------------------------------------------
def _ref_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("shape", [(48, 96), (40, 72)])  # (out, in); 40 outputs: no 16-multiple
def test_int8_linear(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    w, b = torch.randn(*shape), torch.randn(shape[0])
    q, scales = quantize_int8_per_channel(w)
    mod = WeightOnlyLinear.from_int8(
        q, scales, names=["p"], sizes=[shape[0]], attr="p", dtype=torch.float32, bias=b, kernel_dtype=None
    )
    assert mod.kernel == "int8_cpu"
    x = torch.randn(2, 7, shape[1])
    y = mod(x)
    deq = q.double() * scales.double()[:, None]
    # Against the dequantized matmul: only float summation order differs.
    torch.testing.assert_close(y.double(), _ref_linear(x, deq, b), rtol=1e-5, atol=1e-4)
    # Against the float layer: each weight is off by at most half a step, so |dy| <= |x| @ (s/2).
    bound = x.abs().double() @ (scales.double()[:, None] / 2).expand(shape).t() + 1e-4
    assert bool(((y.double() - _ref_linear(x, w, b)).abs() <= bound).all())
    assert mod.weight_bytes() <= w.numel() + 8 * shape[0]  # one byte a weight, scales: a few bytes a row


@pytest.mark.parametrize(
    ("shape", "group", "kernel"), [((48, 96), 32, "int4_cpu"), ((40, 64), 16, "int4_awq")]
)
def test_int4_linear(shape: tuple[int, int], group: int, kernel: str) -> None:
    torch.manual_seed(2)
    w, b = torch.randn(*shape), torch.randn(shape[0])
    quant = quantize_groupwise(w, 4, group)
    # fp16 scales, as checkpoints (and the AWQ-layout storage) keep them.
    quant = GroupQuant(quant.q, quant.scales.half().float(), quant.zeros, 4, group)
    mod = WeightOnlyLinear.from_groups(
        quant, names=["p"], sizes=[shape[0]], attr="p", dtype=torch.float32, bias=b, kernel_dtype=None
    )
    assert mod.kernel == kernel
    x = torch.randn(3, 5, shape[1])
    y = mod(x)
    deq = quant.dequantize(torch.float64)
    torch.testing.assert_close(y.double(), _ref_linear(x, deq, b), rtol=1e-5, atol=1e-4)
    step = quant.scales.double().repeat_interleave(group, dim=1)  # [out, in]
    bound = x.abs().double() @ (step / 2).t() + 1e-4
    assert bool(((y.double() - _ref_linear(x, w, b)).abs() <= bound).all())
    # The codes read back out of the module are the ones it was built from.
    back = mod.group_codes()
    assert torch.equal(back.q, quant.q) and torch.equal(back.zeros, quant.zeros)
    assert mod.weight_bytes() * 4 < w.numel() * 4  # 4-bit codes plus per-group scales and zeros


@pytest.mark.parametrize("bits", [8, 4])
def test_bfloat16_kernel_activations(bits: int) -> None:
    """The default CPU path: fp32 in and out, bf16 inside torch's kernels."""
    torch.manual_seed(3)
    w = torch.randn(48, 128)
    if bits == 8:
        q, scales = quantize_int8_per_channel(w)
        mod = WeightOnlyLinear.from_int8(q, scales, names=["p"], sizes=[48], attr="p", dtype=torch.float32)
    else:
        mod = WeightOnlyLinear.from_groups(
            quantize_groupwise(w, 4, 32), names=["p"], sizes=[48], attr="p", dtype=torch.float32
        )
    assert mod.kernel_dtype == torch.bfloat16 and mod.kernel.endswith("_cpu")
    x = torch.randn(5, 128)
    y = mod(x)
    assert y.dtype == torch.float32
    deq = mod.dense_weight(torch.float64)
    # bf16 rounds the inputs, the scales (and zero terms) and the outputs, each by at most 2**-9
    # relative: |dy| <= 3 * 2**-9 * (|x| @ |W|.T), plus the products' own rounding.
    bound = 4 * 2**-9 * (x.abs().double() @ deq.abs().t()) + 1e-3
    assert bool(((y.double() - x.double() @ deq.t()).abs() <= bound).all())


# -- whole models ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "group"), [(8, 128), (4, 32)])
def test_quantized_model_matches_dequantized_float_model(bits: int, group: int) -> None:
    base = _model()
    model = quantize_model(copy.deepcopy(base), bits=bits, group_size=group, kernel_dtype=None)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, WeightOnlyLinear) and attn.qkv_proj.names == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    ref = _dequantized_copy(base, model)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)
        # prepare_for_inference (the engine calls it) leaves the quantized layers as they are.
        before = model(ids)
        model.prepare_for_inference()
        assert model.model.layers[0].self_attn.qkv_proj is attn.qkv_proj
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_quantizing_a_prepared_model() -> None:
    base = _model()
    prepared = copy.deepcopy(base).prepare_for_inference()
    a = quantize_model(prepared, bits=4, group_size=32, lm_head=True)
    b = quantize_model(copy.deepcopy(base), bits=4, group_size=32, lm_head=True)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)
    assert isinstance(a.lm_head, WeightOnlyLinear)


@pytest.mark.parametrize(("bits", "lm_head"), [(8, False), (4, False), (4, True)])
def test_save_load_round_trip(tmp_path: Path, bits: int, lm_head: bool) -> None:
    model = quantize_model(_model(), bits=bits, group_size=32, lm_head=lm_head)
    save_quantized(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if bits == 4:
        want = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}  # fmt: skip
        assert qc == ({**want, "lm_head": True} if lm_head else want)
    else:
        assert qc["quant_method"] == "gptq" and qc["bits"] == 8 and qc["group_size"] == -1 and qc["sym"]
    loaded = load_quantized(tmp_path / "q", dtype="float32")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_awq_checkpoint_layout_by_independent_unpack(tmp_path: Path) -> None:
    """Decode our AWQ tensors with a hand-written reader of AutoAWQ's published GEMM layout."""
    model = quantize_model(_model(), bits=4, group_size=32)
    save_quantized(model, tmp_path / "q")
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column order[i] of each group of eight
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.1.mlp.up_proj.qweight")  # [in, out / 8]
        qzeros = f.get_tensor("model.layers.1.mlp.up_proj.qzeros")  # [in / 32, out / 8]
        scales = f.get_tensor("model.layers.1.mlp.up_proj.scales")  # [in / 32, out] fp16
    assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty(n_out, n_in, dtype=torch.float64)
    for i in range(n_in):
        for c in range(qweight.shape[1]):
            word, zword = int(qweight[i, c]) & 0xFFFFFFFF, int(qzeros[i // 32, c]) & 0xFFFFFFFF
            for nib in range(8):
                col = 8 * c + order[nib]
                q, z = (word >> (4 * nib)) & 0xF, (zword >> (4 * nib)) & 0xF
                w[col, i] = (q - z) * float(scales[i // 32, col])
    fused = model.model.layers[1].mlp.gate_up_proj
    up = fused.dense_weight(torch.float64)[fused.sizes[0] :]
    torch.testing.assert_close(w, up, rtol=0, atol=1e-12)


def _gptq_tensors(
    w: torch.Tensor, group: int, *, act_order: bool, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``w`` quantized 4-bit asymmetric and written in GPTQ's v1 layout, by hand; returns the tensors
    and the dequantized weight they stand for."""
    out_f, in_f = w.shape
    g_idx = torch.arange(in_f) // group
    if act_order:  # GPTQ's desc_act: groups are assigned in a permuted column order
        perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(in_f, dtype=torch.int64)
        g_idx[perm] = torch.arange(in_f) // group
    deq = torch.empty(out_f, in_f, dtype=torch.float64)
    codes = torch.empty(in_f, out_f, dtype=torch.int64)
    n_groups = in_f // group
    scales = torch.empty(n_groups, out_f, dtype=torch.float16)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int64)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().flatten()
        block = w[:, cols]
        lo, hi = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-6).half()
        z = torch.round(-lo / s.float()).clamp(1, 15).long()  # >= 1: v1 stores zero - 1
        q = (torch.round(block / s.float()[:, None]) + z[:, None]).clamp(0, 15).long()
        scales[g], zeros[g] = s, z
        codes[cols] = q.t()
        deq[:, cols] = (q - z[:, None]).double() * s.double()[:, None]

    def pack(c: torch.Tensor) -> torch.Tensor:  # 8 rows per int32, row r in bits 4r
        out = torch.zeros(c.shape[0] // 8, c.shape[1], dtype=torch.int64)
        for r in range(8):
            out |= c[r::8] << (4 * r)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)

    tensors = {
        "qweight": pack(codes), "qzeros": pack((zeros - 1).t()).t().contiguous(), "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }  # fmt: skip
    return tensors, deq


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_loads_and_matches(tmp_path: Path, act_order: bool) -> None:
    base = _model(seed=4)
    save_pretrained(base, tmp_path / "f")  # for the config.json and the float tensors
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    ref = copy.deepcopy(base)
    for i in range(2):
        for j, (sub, names, out) in enumerate(GROUPS):
            for k, name in enumerate((*names, out)):
                key = f"model.layers.{i}.{sub}.{name}"
                tensors, deq = _gptq_tensors(
                    state.pop(f"{key}.weight"), 32, act_order=act_order, seed=10 * i + 3 * j + k
                )
                state.update({f"{key}.{t}": v for t, v in tensors.items()})
                with torch.no_grad():
                    getattr(getattr(ref.model.layers[i], sub), name).weight.copy_(deq)
    ckpt = tmp_path / "gptq"
    ckpt.mkdir()
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order, "sym": False,
        "checkpoint_format": "gptq",
    }  # fmt: skip
    (ckpt / "config.json").write_text(json.dumps(config))
    model = load_quantized(ckpt, dtype="float32", kernel_dtype=None)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)
    qkv = model.model.layers[0].self_attn.qkv_proj
    if act_order:  # different permutations per projection: loaded unfused
        assert qkv is None and isinstance(model.model.layers[0].self_attn.q_proj, WeightOnlyLinear)
    else:
        assert isinstance(qkv, WeightOnlyLinear) and qkv.perm is None


@pytest.mark.parametrize(
    ("qc", "match"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True}, "per-channel"),
    ],
)
def test_unsupported_quantization_config(tmp_path: Path, qc: dict, match: str) -> None:
    save_pretrained(_model(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(InferError, match=match):
        quantization_spec(tmp_path / "m")
    with pytest.raises(InferError, match=match):
        LLM(tmp_path / "m")


def test_quantize_model_errors() -> None:
    with pytest.raises(InferError, match="bits=8"):
        quantize_model(_model(), bits=3)
    with pytest.raises(InferError, match="group_size"):
        quantize_model(_model(), bits=4, group_size=48)
    with pytest.raises(InferError, match="untied"):
        quantize_model(_model(tie_word_embeddings=True), bits=8, lm_head=True)
    with pytest.raises(InferError, match="no quantized layers"):
        save_quantized(_model(), "/nonexistent/never-written")


# -- the engine and the CLI ------------------------------------------------------------------------
def test_engine_greedy_rtn8_equals_dequantized_float(model_dir: Path, tmp_path: Path) -> None:
    from lmstack.core import Tokenizer, load_pretrained

    tokenizer = Tokenizer.from_pretrained(model_dir)
    float_model = load_pretrained(model_dir, dtype="float32")
    quantized = quantize_model(copy.deepcopy(float_model), bits=8)
    save_quantized(quantized, tmp_path / "q8", tokenizer)
    reference = _dequantized_copy(float_model, quantized)
    prompts = ["the quick brown fox", "seven wizards quietly", "a lazy dog jumps over", "hex"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def greedy(llm: LLM) -> list[list[int]]:
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.close()

    want = greedy(LLM(reference, tokenizer))
    # Exact arithmetic (fp32 activations in the kernels): the same tokens as the dequantized fp32 model.
    exact = load_quantized(tmp_path / "q8", dtype="float32", kernel_dtype=None)
    assert greedy(LLM(exact, tokenizer)) == want
    # LLM(path) loads through load_quantized (config.json has quantization_config), with the default
    # bf16 kernels: bf16 rounding (2**-9 relative) can flip near-ties, so its tokens are not compared;
    # its logits along the reference continuations are, against the dequantized fp32 model.
    served = LLM(tmp_path / "q8")
    net = served.engine.model
    qkv = net.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, WeightOnlyLinear) and qkv.kernel_dtype == torch.bfloat16
    served.close()
    with torch.no_grad():
        for prompt, cont in zip(prompts, want, strict=True):
            ids = torch.tensor([tokenizer.encode(prompt) + cont])
            got, ref, exact_fp32 = net(ids), reference(ids), float_model(ids)
            # bf16 rounding adds less error than the int8 weights themselves (fp32 vs dequantized).
            bf16_error, int8_error = (got - ref).abs().max(), (exact_fp32 - ref).abs().max()
            assert bf16_error < int8_error, (bf16_error, int8_error)


def test_int8_decode_rows_take_the_exact_float32_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmstack.core.model import cpu_kernels

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 128, generator=g), torch.randn(48, generator=g)
    q, scales = quantize_int8_per_channel(weight)
    layer = WeightOnlyLinear.from_int8(
        q, scales, names=["p"], sizes=[48], attr="p", dtype=torch.float32, bias=bias
    )
    calls: list[int] = []
    real = cpu_kernels.gemv_int8
    monkeypatch.setattr(cpu_kernels, "gemv_int8", lambda *a: calls.append(1) or real(*a))
    dense = layer.dense_weight(torch.float64)
    for rows in (1, 4, 5):
        x = torch.randn(1, rows, 128, generator=g)
        got = layer(x)
        want = x.double() @ dense.T + bias.double()
        if rows <= cpu_kernels.MAX_ROWS:  # exact float32 arithmetic over the dequantized weight
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        else:  # more rows: torch's kernel with bfloat16 activations (2**-9 relative per rounding)
            torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.3)
    assert calls == [1, 1]


@pytest.mark.parametrize("in_features", [24, 72, 100])
def test_int8_inputs_torchs_kernel_crashes_on_are_dequantized(in_features: int) -> None:
    # torch 2.13's _weight_int8pack_mm dies with SIGSEGV on 5 bfloat16 rows of 72 inputs: not called there.
    g = torch.Generator().manual_seed(in_features)
    weight = torch.randn(40, in_features, generator=g)
    q, scales = quantize_int8_per_channel(weight)
    layer = WeightOnlyLinear.from_int8(q, scales, names=["p"], sizes=[40], attr="p", dtype=torch.float32)
    assert layer.kernel == "int8_dense"
    x = torch.randn(5, in_features, generator=g)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight(torch.float32).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        layer(x[:1]), x[:1] @ layer.dense_weight(torch.float32).T, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("lm_head", [False, True])
def test_one_sequence_engine_over_quantized_weights(model_dir: Path, lm_head: bool) -> None:
    """max_num_seqs=1 picks the gemv layout: a float head takes the one-row kernel, a quantized one stays."""
    from lmstack.core import Tokenizer, load_pretrained

    tokenizer = Tokenizer.from_pretrained(model_dir)
    float_model = load_pretrained(model_dir, dtype="float32")
    assert not float_model.config.tie_word_embeddings
    quantized = quantize_model(copy.deepcopy(float_model), bits=8, lm_head=lm_head, kernel_dtype=None)
    reference = _dequantized_copy(float_model, quantized)
    prompts = ["the quick brown fox", "seven wizards quietly", "hex"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(reference, tokenizer) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with LLM(quantized, tokenizer, max_num_seqs=1) as llm:
        assert llm.engine.model.inference_layout == "gemv"
        assert isinstance(llm.engine.model.lm_head, WeightOnlyLinear) is lm_head
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want


def test_cli_quantize_rtn(model_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="lmstack")
    register_quantize(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "q4"
    argv = ["quantize", "rtn", str(model_dir), str(out), "--bits", "4", "--group-size", "16", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["group_size"] == 16
    assert (out / "tokenizer.json").is_file()
    model = load_quantized(out, dtype="float32")
    assert all(isinstance(m, WeightOnlyLinear) for m in (model.model.layers[0].mlp.down_proj,))
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "rtn", str(model_dir), str(out), "--bits", "3"])


def test_plain_linear_untouched_by_prepare() -> None:
    # The core edit only skips modules that say they are inference-ready; plain models fuse as before.
    model = _model().prepare_for_inference()
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "InferenceLinear"
    assert not isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


def test_cli_quantize_awq(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lmstack.infer.quant._awq")
    from conftest import corpus

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus(200)), encoding="utf-8")
    parser = argparse.ArgumentParser(prog="lmstack")
    register_quantize(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "awq"
    argv = ["quantize", "awq", str(model_dir), str(out), "--group-size", "16", "--calib", str(calib)]
    args = parser.parse_args([*argv, "--n-samples", "4", "--seq-len", "32", "--no-progress"])
    assert args.func(args) == 0
    assert quantization_spec(out).method == "awq"
    model = load_quantized(out, dtype="float32")
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, WeightOnlyLinear)
