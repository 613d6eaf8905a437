"""The layout planner: parameter counts, memory and time terms by hand, the search, the CLI, the README
table of published configurations, and the memory prediction against the peak of real training runs."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer
from lmstack.core._cli import main
from lmstack.train.plan import (
    Layout,
    PlanError,
    Workload,
    estimate,
    load_cluster,
    model_preset,
    parse_cluster,
    resolve_model,
)
from lmstack.train.plan._cost import Precision, count_parameters
from lmstack.train.plan._search import candidate_layouts, plan

CASES = Path(__file__).parent / "plan_cases"
README = Path(__file__).parents[1] / "README.md"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"plan_cases_{name}", CASES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama2-7b", 6_738_415_616),  # the published 6.74B
        ("llama2-70b", 68_976_648_192),
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", 70_553_706_496),
    ],
)
def test_parameter_counts_of_published_models(name: str, expected: int) -> None:
    assert count_parameters(model_preset(name)).total == expected


@pytest.mark.parametrize(
    "config",
    [
        model_preset("qwen2-7b"),  # q, k, v biases
        model_preset("internlm-7b"),  # q, k, v and o biases
        ModelConfig(
            model_type="llama",
            vocab_size=97,
            hidden_size=40,
            intermediate_size=72,
            num_hidden_layers=3,
            num_attention_heads=5,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            mlp_bias=True,
        ),
    ],
)
def test_parameter_count_equals_the_built_model(config: ModelConfig) -> None:
    # The reference: the model itself, built without memory on the meta device.
    assert count_parameters(config).total == CausalLM(config, device="meta").num_parameters()


# -- memory and time terms, by hand ----------------------------------------------------------------


def _toy(**overrides: int) -> ModelConfig:
    """C 8, F 12, 2 layers, 2 query heads and 1 key/value head of width 4, vocabulary 10."""
    shape: dict[str, Any] = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                             **overrides}  # fmt: skip
    return ModelConfig(model_type="llama", **shape)


TOY = _toy()


def test_memory_terms_of_a_toy_model_by_hand() -> None:
    # Per layer: q 8x8, k and v 8x4 each, o 8x8, gate/up/down 3 x 8x12, two norms of 8.
    per_layer = 64 + 32 + 32 + 64 + 3 * 96 + 16
    assert per_layer == 496
    total = 2 * per_layer + 10 * 8 + 10 * 8 + 8  # embedding, head, final norm
    assert count_parameters(TOY).total == total == 1160
    cpu = parse_cluster("cpu:1")
    e = estimate(TOY, Layout(micro_batch=1), Workload(seq_len=6, global_batch=1, precision="fp32"), cpu)
    assert e.memory.params == 4 * total  # fp32 weights
    assert e.memory.optimizer == 8 * total  # AdamW's two fp32 moments
    # Saved per token and layer, fp32: each norm its input, normalised output and rsqrt plus the
    # projections' input (3·8 + 1 elements, twice); q and the attention output (8 each), k and v (4
    # each), the log-sum-exp per query head (2); gate, up, silu(gate), their product (4 x 12).
    per_token_layer = 4 * (2 * (3 * 8 + 1) + 8 + 8 + 4 + 4 + 2 + 4 * 12)
    assert per_token_layer == 496
    assert e.memory.activations_per_token_layer == per_token_layer
    tokens = 6
    saved = (
        tokens * 2 * per_token_layer
        + tokens * 2 * 4 * 4  # RoPE cos and sin, fp32, head width 4
        + tokens * 8  # token ids
        + tokens * 4 * (2 * 8 + 1)  # the final norm's input, normalised output, rsqrt
        + tokens * (4 * 8 + 16)  # the fused loss's d hidden, loss indices and targets
        + 4 * 10 * 8  # and its fp32 d W
    )
    assert e.memory.saved_activations == saved == 7208
    assert e.memory.peak == e.memory.params + e.memory.grads + e.memory.optimizer + (
        e.memory.activations + e.memory.buffers
    )
    # Checkpointing keeps each layer's fp32 input only.
    ckpt = estimate(TOY, Layout(activation_checkpointing=True), Workload(6, 1, precision="fp32"), cpu).memory
    assert ckpt.activations_per_token_layer == 4 * 8
    assert ckpt.saved_activations == saved - tokens * 2 * (per_token_layer - 32)
    # FSDP over 2 ranks halves weights and optimizer state; 2 sequences then take one each.
    sharded = estimate(
        TOY, Layout(dp_shard=2), Workload(6, 2, precision="fp32"), parse_cluster("cpu:2")
    ).memory
    assert (sharded.params, sharded.optimizer) == (2 * total, 4 * total)
    assert sharded.saved_activations == saved


def test_tensor_and_sequence_parallel_divide_what_they_shard() -> None:
    config = _toy(num_key_value_heads=2)
    work = Workload(8, 1, precision="fp32")
    one = estimate(config, Layout(), work, parse_cluster("cpu:1")).memory
    tp = estimate(config, Layout(tp=2), work, parse_cluster("cpu:2")).memory
    sp = estimate(config, Layout(sp=2), work, parse_cluster("cpu:2")).memory
    c, f, s = 8, 12, 4
    norm = 4 * c + s * c + 4  # sharded on the sequence under tensor parallelism
    linear_in = s * c  # all-gathered whole
    rest = s * (2 * 8 + 2 * 8) + 4 * 2 + 4 * s * f  # attention and SwiGLU, split over heads
    assert one.activations_per_token_layer == 2 * (norm + linear_in) + rest
    assert tp.activations_per_token_layer == 2 * (norm / 2 + linear_in) + rest / 2
    # Sequence parallelism gives each rank half of the tokens of every sequence.
    assert sp.activations_per_token_layer == one.activations_per_token_layer
    assert sp.saved_activations < one.saved_activations


def test_time_terms_by_hand() -> None:
    cpu = parse_cluster("cpu:1")
    e = estimate(TOY, Layout(), Workload(6, 1, precision="fp32"), cpu)
    # 6 x (layers' and head's matmul weights) + causal attention 6·L·Cq·T, per token.
    layer_matmul = 64 + 32 + 32 + 64 + 3 * 96
    flops_token = 6 * (2 * layer_matmul + 10 * 8) + 6 * 2 * 8 * 6
    expected = 6 * flops_token / (cpu.fp32_tflops * 1e12 * cpu.compute_efficiency)
    assert e.time.compute == pytest.approx(expected, rel=1e-12)
    assert e.time.step == pytest.approx(expected, rel=1e-12)  # one device: nothing else
    assert e.tokens_per_s_per_device == pytest.approx(6 / expected)
    # Checkpointing recomputes the layers' forward: 8/6 of their work, the head's unchanged.
    ck = estimate(TOY, Layout(activation_checkpointing=True), Workload(6, 1, precision="fp32"), cpu)
    layers_flops = 6 * (2 * layer_matmul) + 6 * 2 * 8 * 6
    assert ck.time.compute - e.time.compute == pytest.approx(
        e.time.compute * (layers_flops / 3) / flops_token
    )


@pytest.mark.parametrize(("stages", "bubble_microbatches"), [(1, 3.0), (2, 1.5)])
def test_pipeline_bubble(stages: int, bubble_microbatches: float) -> None:
    config = _toy(num_hidden_layers=8)
    e = estimate(
        config, Layout(pp=4, stages_per_rank=stages), Workload(6, 8, precision="fp32"), parse_cluster("cpu:4")
    )
    assert e.micro_batches == 8
    # (pp - 1) / v micro-batch times of the slowest rank: (4 - 1) / v out of 8 + (4 - 1) / v.
    assert e.time.bubble == pytest.approx(bubble_microbatches * e.time.compute / 8)


def test_layouts_the_model_cannot_run_are_refused_with_the_reason() -> None:
    work = Workload(6, 4, precision="fp32")
    with pytest.raises(PlanError, match=r"tp=2 must divide .* key/value heads \(1\)"):
        estimate(TOY, Layout(tp=2), work, parse_cluster("cpu:2"))
    with pytest.raises(PlanError, match="sp=4 must divide the sequence length 6"):
        estimate(TOY, Layout(sp=4), work, parse_cluster("cpu:4"))
    with pytest.raises(PlanError, match="global batch 4 is not divisible by the 3"):
        estimate(TOY, Layout(dp_shard=3), work, parse_cluster("cpu:3"))
    with pytest.raises(PlanError, match="needs at least 2 micro-batches"):
        estimate(TOY, Layout(pp=2, micro_batch=4), work, parse_cluster("cpu:2"))


# -- clusters and models ----------------------------------------------------------------------------


def test_cluster_specs(tmp_path: Path) -> None:
    one = parse_cluster("8xH100")
    assert (one.nodes, one.gpus_per_node, one.device) == (1, 8, "H100-80G")
    assert (parse_cluster("4x8xH100").nodes, parse_cluster("64xA100-80G").nodes) == (4, 8)
    assert parse_cluster("cpu:4").world_size == 4
    with pytest.raises(PlanError, match="do not fill nodes of 8"):
        parse_cluster("12xH100")
    with pytest.raises(PlanError, match="unknown device 'TPU'"):
        parse_cluster("8xTPU")
    yaml_file = tmp_path / "cluster.yaml"
    yaml_file.write_text("base: 2x8xH100\ninter_node_gbps: 100\ncompute_efficiency: 0.4\n")
    custom = load_cluster(str(yaml_file))
    assert (custom.world_size, custom.inter_node_gbps, custom.compute_efficiency) == (16, 100, 0.4)
    yaml_file.write_text("base: 8xH100\ninter_node_gbit: 100\n")
    with pytest.raises(PlanError, match="unknown cluster field"):
        load_cluster(str(yaml_file))


def test_model_from_config_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TOY.to_dict()))
    name, config = resolve_model(str(tmp_path / "m"))
    assert (name, count_parameters(config).total) == ("m", 1160)
    with pytest.raises(PlanError, match=r"unknown model preset 'llama9-7b'.*llama2-7b"):
        resolve_model("llama9-7b")


# -- the search ------------------------------------------------------------------------------------


def test_search_returns_the_fastest_fitting_layouts() -> None:
    config, work, cluster = model_preset("llama2-7b"), Workload(4096, 512), parse_cluster("2x8xH100")
    result = plan(config, work, cluster, top=5)
    assert len(result.best) == 5 and 0 < result.fitting < result.searched
    for e in result.best:
        assert e.fits and e.memory.peak <= cluster.usable_bytes
        assert e.layout.dims().resolve(16).world_size == 16  # lmstack-core's mesh accepts it
        assert e.layout.tp <= 8
    everything = [estimate(config, lo, work, cluster) for lo in candidate_layouts(config, work, cluster)]
    fastest = min(e.time.step for e in everything if e.fits)
    assert result.best[0].time.step <= fastest * 1.01  # ties within 1% go to the smaller memory
    only_ckpt = plan(config, work, cluster, checkpointing="on")
    assert all(e.layout.activation_checkpointing for e in only_ckpt.best)


# -- the command line ----------------------------------------------------------------------------------


def test_cli_prints_a_table() -> None:
    lmstack = str(Path(sys.executable).with_name("lmstack"))
    cmd = [lmstack, "plan", "--model", "llama2-7b", "--seq-len", "4096", "--global-batch", "512"]
    done = subprocess.run([*cmd, "--cluster", "8xH100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "llama2-7b: 6.74B parameters" in out and "8 H100-80G" in out
    assert "params  grads  optim   acts   bufs   peak" in out
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3, 4, 5]


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", "llama3-8b", "--seq-len", "8192", "--global-batch", "64"]
    assert main([*args, "--cluster", "16xH100", "--json", "--top", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["parameters"] == 8_030_261_248
    steps = [e["time_s"]["step"] for e in report["layouts"]]
    assert len(steps) == 3 and all(e["fits"] for e in report["layouts"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "llama9-7b", "--cluster", "8xH100"], "unknown model preset 'llama9-7b'"),
        (["--model", "llama2-7b", "--cluster", "7xH100"], "no layout of 7 devices can run a global batch"),
        (["--model", "llama2-70b", "--cluster", "1xA100-40G"], "no layout fits in the 36.8 GiB usable"),
        (["--model", "llama2-7b", "--cluster", "8xTPU"], "unknown device 'TPU'"),
    ],
)
def test_cli_errors_are_clear(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--seq-len", "4096", "--global-batch", "512", *args]) == 2
    assert message in capsys.readouterr().err


# -- published configurations ----------------------------------------------------------------------


def test_readme_table_of_published_configurations_is_current() -> None:
    # Every row of the README's table is what the planner chooses today (and predicts for the
    # published layout); a change of the cost model that changes a choice must update the README.
    published = _load("published")
    readme = README.read_text(encoding="utf-8")
    for row in published.ROWS:
        line = "| " + " | ".join(published.row_cells(row)) + " |"
        assert line in readme, f"README row out of date, expected:\n{line}"


# -- measured peak memory ------------------------------------------------------------------------------

WORDS = [
    *("alpha", "beta", "gamma", "delta", "river", "stone", "seven"),
    *("quiet", "bright", "north", "green", "apple", "ocean"),
]


def _spec(name: str, model: dict[str, int], **run: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "steps": 2, "accum": 1, "checkpointing": False, **run}


# Shapes and batches not used while the cost model was written (odd widths, 5 heads, MQA, GQA).
SINGLE: dict[str, Any] = {"hidden_size": 80, "intermediate_size": 216, "num_hidden_layers": 3,
                          "num_attention_heads": 5, "num_key_value_heads": 1}  # fmt: skip
SHARDED: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
ONE_PROCESS = [
    _spec("plain", SINGLE, seq_len=96, batch=3),
    _spec("checkpointed", SINGLE, seq_len=96, batch=3, checkpointing=True),
    _spec("accumulated", SINGLE, seq_len=160, batch=1, accum=2, checkpointing=True),
    _spec("bf16", SINGLE, seq_len=96, batch=3, precision="bfloat16"),  # autocast, as lmstack runs it
]
TWO_PROCESSES = [
    _spec("fsdp", SHARDED, seq_len=128, batch=2, data_parallel="fsdp"),
    _spec("fsdp-bf16", SHARDED, seq_len=128, batch=2, data_parallel="fsdp", precision="bfloat16"),
    _spec(
        "fsdp-accumulated", SHARDED, seq_len=128, batch=2, accum=2, checkpointing=True, data_parallel="fsdp"
    ),
    # The parallel: layouts of the loop (lmstack.train._parallel), each over 2 processes.
    _spec("tp", SHARDED, seq_len=128, batch=2, parallel={"tp": 2, "dp_shard": 1}),
    _spec(
        "tp-bf16-checkpointed",
        SHARDED,
        seq_len=128,
        batch=2,
        checkpointing=True,
        precision="bfloat16",
        parallel={"tp": 2, "dp_shard": 1},
    ),
    _spec("sp", SHARDED, seq_len=128, batch=2, parallel={"sp": 2, "dp_shard": 1}),
    _spec("pp", SHARDED, seq_len=128, batch=2, accum=2, parallel={"pp": 2, "dp_shard": 1}),
]


@pytest.fixture(scope="module")
def measured(
    tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], list[int]]:
    """Peak tensor bytes of every step of each case: one torchrun of 2 FSDP processes, started first,
    and the one-process cases in this process meanwhile."""
    root = tmp_path_factory.mktemp("plan-memory")
    rng = random.Random(0)
    data = root / "docs.jsonl"
    # Documents longer than any bin, cut to one full bin each: every token is a target, as the planner
    # assumes of pretraining.
    with data.open("w") as f:
        for _ in range(40):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 400)))
            f.write(json.dumps({"text": words}) + "\n")
    tokenizer.save_pretrained(root / "tokenizer")
    common = {"tokenizer": str(root / "tokenizer"), "data": str(data)}
    specs = root / "two.json"
    specs.write_text(json.dumps([{**s, **common} for s in TWO_PROCESSES]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = str(CASES / "measure_memory.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*torchrun, script, str(specs), str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    harness = _load("measure_memory")
    out: dict[tuple[str, int], list[int]] = {}
    for spec in ONE_PROCESS:
        out[spec["name"], 1] = harness.run_case({**spec, **common}, root)["peaks"]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        for result in json.loads((root / f"rank{rank}.json").read_text()):
            out[f"{result['name']}/{rank}", 2] = result["peaks"]
    return out


def _predicted(spec: dict[str, Any], world: int, vocab: int) -> float:
    config = ModelConfig(model_type="llama", vocab_size=vocab, **spec["model"])
    degrees = {
        "tp": 1,
        "sp": 1,
        "pp": 1,
        **{k: v for k, v in spec.get("parallel", {}).items() if k != "dp_shard"},
    }
    dp_shard = world // (degrees["tp"] * degrees["sp"] * degrees["pp"])
    layout = Layout(
        dp_shard=dp_shard,
        micro_batch=1 if degrees["pp"] > 1 else spec["batch"],  # a pipeline micro-batch is one bin
        activation_checkpointing=spec["checkpointing"],
        **degrees,
    )
    precision: Precision = "bf16" if spec.get("precision") == "bfloat16" else "fp32"
    work = Workload(spec["seq_len"], spec["batch"] * spec["accum"] * dp_shard, precision=precision)
    return estimate(config, layout, work, parse_cluster(f"cpu:{world}")).memory.peak


@pytest.mark.parametrize(
    "spec",
    [
        *ONE_PROCESS,
        *TWO_PROCESSES,
    ],
    ids=lambda s: s["name"],
)
def test_memory_prediction_within_10_percent_of_the_measured_peak(
    spec: dict[str, Any], measured: dict[tuple[str, int], list[int]], tokenizer: Tokenizer
) -> None:
    # Measured: the peak bytes of live torch tensors over a real training step (the CPU counterpart of
    # torch.cuda.max_memory_allocated; see plan_cases/measure_memory.py), the largest over 2 steps and
    # over the ranks. Predicted: the cost model's peak for that exact layout, from the shapes alone.
    world = 2 if spec in TWO_PROCESSES else 1
    keys = [(spec["name"], 1)] if world == 1 else [(f"{spec['name']}/{r}", 2) for r in (0, 1)]
    peak = max(max(measured[k]) for k in keys)
    predicted = _predicted(spec, world, tokenizer.vocab_size)
    print(f"{spec['name']}: measured {peak:,} B, predicted {predicted:,.0f} B ({predicted / peak - 1:+.1%})")
    assert predicted == pytest.approx(peak, rel=0.10), f"predicted {predicted:,.0f} B, measured {peak:,} B"


def test_activation_formula_matches_the_loop_probe(tokenizer: Tokenizer) -> None:
    # The training loop's own probe counts what autograd saves (saved-tensor hooks) on a real batch.
    from lmstack.train._activations import measure_activation_memory
    from lmstack.train.data._packing import PackedBatch

    config = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, **SINGLE)
    torch.manual_seed(0)
    model = CausalLM(config).train()
    rows, length = 2, 72
    ids = torch.randint(0, config.vocab_size, (rows, length))
    labels = ids.clone()
    labels[:, 0] = -100  # one sample a row: every token but the first carries the loss
    batch = PackedBatch(
        input_ids=ids, labels=labels, position_ids=torch.arange(length).expand(rows, length).contiguous(),
        cu_seqlens=torch.tensor([0, length, 2 * length], dtype=torch.int32), max_seqlen=length,
        num_tokens=rows * length, num_loss_tokens=rows * (length - 1),
    )  # fmt: skip
    probe = measure_activation_memory(model, batch, fused_loss=True)
    work = Workload(length, rows, precision="fp32")
    for ckpt, per_token in ((False, probe.per_token), (True, probe.per_token_checkpointed)):
        layout = Layout(micro_batch=rows, activation_checkpointing=ckpt)
        saved = estimate(config, layout, work, parse_cluster("cpu:1")).memory.saved_activations
        # The formula counts the loss rows as every token (the first of each row carries none here).
        assert saved == pytest.approx(per_token * rows * length, rel=0.02)
