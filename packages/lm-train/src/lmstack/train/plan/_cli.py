"""``lmstack plan --model CONFIG --seq-len N --global-batch B --cluster SPEC``: the best layouts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

from lmstack.core import ModelConfig
from lmstack.train.plan._cluster import load_cluster
from lmstack.train.plan._cost import Estimate, Workload, count_parameters
from lmstack.train.plan._models import MODEL_PRESETS, resolve_model
from lmstack.train.plan._search import PlanResult, plan

__all__ = ["format_table", "register", "to_json"]

logger = logging.getLogger(__name__)

_GIB = 2**30


def _model_line(name: str, config: ModelConfig) -> str:
    count = count_parameters(config).total
    return (
        f"{name}: {count / 1e9:.2f}B parameters ({config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads}, "
        f"feed-forward {config.intermediate_size}, vocab {config.vocab_size})"
    )


def _seconds(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def format_table(name: str, config: ModelConfig, result: PlanResult) -> str:
    """The human report: model, cluster and workload, then one row per layout with its breakdown."""
    w, cl = result.workload, result.cluster
    precision = {
        "bf16": "bf16 autocast over fp32 weights and AdamW",
        "bf16-mp": "bf16 weights for compute (FSDP mixed precision), fp32 master weights and AdamW",
        "fp32": "fp32",
    }[w.precision]
    sync = "once per step" if w.grad_sync == "step" else "every micro-batch"
    lines = [
        f"model     {_model_line(name, config)}",
        f"cluster   {cl.describe()}",
        f"workload  {w.seq_len} tokens x {w.global_batch} sequences = {w.tokens:,} tokens/step; "
        f"{precision}; gradients reduced {sync}",
        f"searched  {result.searched:,} layouts, {result.fitting:,} fit in "
        f"{cl.usable_bytes / _GIB:.1f} GiB per device",
        "",
        "memory per device in GiB at its peak (params+grads+optim+acts+buffers = peak); time per step in "
        "seconds (compute+comm+bubble = step)",
    ]
    width = max([len("layout"), *(len(e.layout.describe()) for e in result.best)])
    header = (
        f"{'#':>2}  {'layout':<{width}} {'mb x m':>8} {'AC':>3}  {'params':>6} {'grads':>6} {'optim':>6} "
        f"{'acts':>6} {'bufs':>6} {'peak':>6}  {'compute':>7} {'comm':>6} {'bubble':>6} {'step':>7}  "
        f"{'tok/s/dev':>9} {'MFU':>5}"
    )
    lines += [header, "-" * len(header)]
    for i, e in enumerate(result.best, 1):
        lo, mem, t = e.layout, e.memory, e.time
        lines.append(
            f"{i:>2}  {lo.describe():<{width}} {f'{lo.micro_batch} x {e.micro_batches}':>8} "
            f"{'on' if lo.activation_checkpointing else 'off':>3}  "
            f"{mem.params / _GIB:>6.1f} {mem.grads / _GIB:>6.1f} {mem.optimizer / _GIB:>6.1f} "
            f"{mem.activations / _GIB:>6.1f} {mem.buffers / _GIB:>6.1f} {mem.peak / _GIB:>6.1f}  "
            f"{_seconds(t.compute):>7} {_seconds(t.comm_exposed):>6} {_seconds(t.bubble):>6} "
            f"{_seconds(t.step):>7}  {e.tokens_per_s_per_device:>9,.0f} {e.mfu:>5.1%}"
        )
    lines += [
        "",
        "mb x m: sequences per micro-batch x micro-batches per step on each data-parallel rank; AC: "
        "activation checkpointing; peak at the end of the forward, in the backward or at the optimizer "
        "step of the most loaded pipeline rank. The cost model and its assumptions: "
        "lmstack.train.plan._cost.",
    ]
    return "\n".join(lines)


def _estimate_json(e: Estimate) -> dict[str, Any]:
    return {
        "layout": dataclasses.asdict(e.layout),
        "describe": e.layout.describe(),
        "micro_batches": e.micro_batches,
        "memory_bytes": dataclasses.asdict(e.memory),
        "time_s": {**dataclasses.asdict(e.time), "comm_exposed": e.time.comm_exposed},
        "tokens_per_s_per_device": e.tokens_per_s_per_device,
        "mfu": e.mfu,
        "fits": e.fits,
    }


def to_json(name: str, config: ModelConfig, result: PlanResult) -> dict[str, Any]:
    """The report as JSON-ready data (``--json``)."""
    return {
        "model": {"name": name, "parameters": count_parameters(config).total, "config": config.to_dict()},
        "cluster": dataclasses.asdict(result.cluster),
        "workload": dataclasses.asdict(result.workload),
        "searched": result.searched,
        "fitting": result.fitting,
        "layouts": [_estimate_json(e) for e in result.best],
    }


def _run(args: argparse.Namespace) -> int:
    name, config = resolve_model(args.model)
    cluster = load_cluster(args.cluster)
    workload = Workload(
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        precision=args.precision,
        grad_sync=args.grad_sync,
    )
    result = plan(config, workload, cluster, top=args.top, checkpointing=args.activation_checkpointing)
    if args.json:
        print(json.dumps(to_json(name, config, result), indent=2))
    else:
        print(format_table(name, config, result))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lmstack plan``."""
    p = subparsers.add_parser(
        "plan",
        help="predict memory per device and step time of parallel layouts, print the best",
        description="Enumerate data/tensor/sequence/pipeline layouts of a model on a cluster, predict each "
        "one's peak memory per device and step time with a cost model (FLOPs, activations with and "
        "without checkpointing, optimizer state, communication over the node and network links, pipeline "
        "bubbles), and print the fastest that fit.",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"a config.json, a model directory, or a preset: {', '.join(sorted(MODEL_PRESETS))}",
    )
    p.add_argument("--seq-len", type=_positive_int, required=True, help="tokens per sequence")
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per optimizer step")
    p.add_argument(
        "--cluster",
        required=True,
        help="8xH100, 4x8xH100, 64xA100-80G, H200, cpu:4, or a YAML file (devices: H100-80G, H200, "
        "A100-80G, A100-40G, cpu)",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "bf16-mp", "fp32"),
        default="bf16",
        help="bf16: autocast over fp32 weights, fp32 gradients and AdamW state, as lmstack's loop runs "
        "run.precision bfloat16 (default); bf16-mp: FSDP2 mixed precision (bf16 weights gathered for "
        "compute, fp32 reduction, master weights and AdamW state), as torchtitan trains and run.precision "
        "bfloat16-mp runs; fp32",
    )
    p.add_argument(
        "--activation-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto tries both (default)",
    )
    p.add_argument(
        "--grad-sync",
        choices=("step", "microbatch"),
        default="step",
        help="reduce gradients once per step, accumulating them unsharded as lmstack's loop does "
        "(default), or every micro-batch",
    )
    p.add_argument("--top", type=_positive_int, default=5, help="layouts to print (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)
