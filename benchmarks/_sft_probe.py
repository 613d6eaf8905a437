"""Run one side of the SFT benchmark in a fresh process; print what it measured as one JSON line.

Usage: python _sft_probe.py SIDE WORKLOAD_DIR RUN_DIR [--profile] [--plan NAME] [--device cpu|cuda]
[--precision float32|bfloat16], SIDE one of :data:`SIDES`; the workload is built in WORKLOAD_DIR for plan
NAME (``_sft_workload.PLANS``, default ``small``) when it is not there yet, else its own plan is used.
``--profile`` (lmstack only) adds a torch.profiler table.

Every side runs the plan's warm-up + measured optimizer steps of AdamW (constant learning rate, betas
0.9/0.95, no weight decay, gradient clipping at 1.0), without activation checkpointing, and times only the
measured steps: a step runs from the end of the previous one to the end of its optimizer update, so it
covers fetching and collating its batch, forward, backward, clipping and the update, and none of
tokenization, caching or saving. Per step it counts the real (non-padding) tokens, the token slots the
model computed (real + padding) and the tokens under the loss. On the CPU (the default) the weights and
the math are fp32; on ``cuda`` the weights stay fp32 and the steps run under bf16 autocast (lmstack's
``precision: bfloat16``, the Trainer's ``bf16=True``), and every step's end waits for the GPU
(``torch.cuda.synchronize``) before the clock is read.
Peak memory is the process's peak resident set (``ru_maxrss``), and ``baseline_rss`` the resident set
after the imports, before the model is loaded; on ``cuda`` also ``peak_cuda`` (``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _sft_workload as wl

SIDES = (
    "lmstack", "lmstack-compiled", "transformers", "transformers-grouped", "trl", "trl-padding-free",
    "trl-packed",
)  # fmt: skip


def run_side(
    side: str, workload: Path, run_dir: Path, *flags: str, threads: str | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Run this script for ``side`` in a fresh process; return its JSON result, or ``{"side", "error"}``.

    Args:
        side: One of :data:`SIDES`.
        workload: The workload directory (built by the child for its ``--plan`` when missing).
        run_dir: The side's run directory.
        flags: More command-line flags (``--device cuda``, ``--profile`` ...).
        threads: Torch intra-op threads of the child (``OMP_NUM_THREADS``); None: the environment's.
        timeout: Seconds before the child is killed (reported as an error).

    Returns:
        What the child printed last (its JSON line), or the error that stopped it.
    """
    # A fresh inductor (and Triton) cache per side: a compiled side's warm-up then times a cold compile, as
    # a user's first run has, not a cache filled by an earlier run on this machine.
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(run_dir.with_name(run_dir.name + "-inductor-cache"))}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **cache}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, str(Path(__file__)), side, str(workload), str(run_dir), *flags]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"side": side, "error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        result["error"] += "\n" + done.stderr.strip()[-2000:]
    return result


def warmup_extra_seconds(step_seconds: list[float], warmup_steps: int) -> float:
    """The warm-up steps' time beyond as many steady-state (median measured) steps: compile time and such."""
    steady = statistics.median(step_seconds[warmup_steps:])
    return sum(step_seconds[:warmup_steps]) - warmup_steps * steady


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _Meter:
    """Per-step counts, and the wall-clock and CPU time at the end of every step."""

    def __init__(self, plan: wl.Plan, device: str) -> None:
        self.plan, self.device = plan, device
        self.tokens: list[int] = []
        self.slots: list[int] = []
        self.loss_tokens: list[int] = []
        self.losses: list[float] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.setup_seconds = 0.0

    def tick(self) -> None:
        """Mark the start of training (first call) or the end of a step."""
        if self.device == "cuda":  # the step's kernels are queued, not done, until the GPU catches up
            torch.cuda.synchronize()
        if not self.wall:  # imports, loading, tokenizing: from the start of the process to the first step
            self.setup_seconds = time.time() - psutil.Process().create_time()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def summary(self, side: str) -> dict[str, Any]:
        """Totals over the measured steps (the warm-up steps are left out)."""
        counts = [
            len(self.wall) - 1,
            *(len(x) for x in (self.tokens, self.slots, self.loss_tokens, self.losses)),
        ]
        assert set(counts) == {self.plan.total_steps}, (side, counts)
        m, n = self.plan.warmup_steps, self.plan.total_steps
        return {
            "side": side, "steps": n, "seconds": self.wall[n] - self.wall[m],
            "cpu_seconds": self.cpu[n] - self.cpu[m], "tokens": sum(self.tokens[m:n]),
            "slots": sum(self.slots[m:n]), "loss_tokens": sum(self.loss_tokens[m:n]), "losses": self.losses,
            "step_seconds": [b - a for a, b in zip(self.wall[:-1], self.wall[1:], strict=False)],
            "setup_seconds": self.setup_seconds,
        }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# lmstack
# ------------------------------------------------------------------------------------------------


Result = tuple[dict[str, Any], dict[str, Any]]
"""What a side measured, and how it was configured."""


def run_lmstack(
    w: wl.Workload, run_dir: Path, device: str, precision: str, compiled: bool = False, profile: bool = False
) -> Result:
    """``lmstack.train.recipes.sft``: packed best-fit bins, per-sample attention, loss on assistant turns.

    With ``compiled``, ``run.compile: true`` (``torch.compile`` per decoder layer): its compilation falls in
    the warm-up steps. With ``profile``, the measured steps run under ``torch.profiler`` (slower) and the
    result holds its table of the operators that took the most time (``profile``).

    Raises:
        RuntimeError: ``compiled`` while this lmstack-train's ``RunConfig`` has no ``compile`` option.
    """
    import lmstack.train._loop as loop
    from lmstack.train import DataConfig
    from lmstack.train._loop import OptimConfig, RunConfig
    from lmstack.train.recipes import SFTConfig, sft

    plan = w.steps
    options = {f.name for f in dataclasses.fields(RunConfig)}
    if compiled and "compile" not in options:
        raise RuntimeError("this lmstack-train's RunConfig has no `compile` option (added by issue 17)")
    meter = _Meter(plan, device)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None

    class Clock(loop.tqdm):  # type: ignore[misc, name-defined]
        """The loop's progress bar: made just before the first step, updated at the end of each."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            meter.tick()

        def update(self, n: float | None = 1) -> bool | None:
            meter.tick()
            if profiler is not None and len(meter.wall) - 1 == plan.warmup_steps:
                profiler.start()
            if profiler is not None and len(meter.wall) - 1 == plan.total_steps:
                profiler.stop()
            return super().update(n)

    # The loop's own names (private): should they change, no step is counted and summary() says so.
    loop.tqdm = Clock  # type: ignore[misc]
    optim = OptimConfig(
        lr=wl.LEARNING_RATE, weight_decay=0.0, betas=list(wl.BETAS), warmup_steps=0, decay="constant",
        grad_clip=1.0,
    )  # fmt: skip
    # device and precision are checked by argparse; RunConfig validates them again.
    extra: dict[str, Any] = {
        "device": device,
        "precision": precision,
        **({"compile": True} if compiled else {}),
    }
    run = RunConfig(
        output_dir=str(run_dir), max_steps=plan.total_steps, batch_size=plan.lmstack_bins, save_every=0,
        seed=wl.SEED, log_every=10_000, **extra,
    )  # fmt: skip
    data = DataConfig(paths=[w.chats], format="messages", max_length=plan.max_length, pack=True)
    cfg = SFTConfig(model=w.model, data=data, optim=optim, run=run)
    sft(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    meter.tokens = [r["tokens"] - (records[i - 1]["tokens"] if i else 0) for i, r in enumerate(records)]
    meter.slots = [round(n / (1 - r["padding_ratio"])) for n, r in zip(meter.tokens, records, strict=True)]
    meter.losses = [r["loss"] for r in records]
    meter.loss_tokens = [r["loss_tokens"] for r in records]
    result = meter.summary("lmstack-compiled" if compiled else "lmstack")
    if compiled and all("compiled_graphs" in r for r in records):  # per step: a recompilation shows here
        result["compiled_graphs"] = [r["compiled_graphs"] for r in records]
    if profiler is not None:
        result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    config: dict[str, Any] = {
        "batch": f"{plan.lmstack_bins} packed bins x {plan.max_length} tokens (best-fit)",
        "attention": "PackedAttention (causal attention per sample)",
        "precision": precision,
        # The issue-17 options as this run had them (absent: this lmstack-train predates them).
        **{k: getattr(run, k) for k in ("compile", "fused_loss") if k in options},
    }
    return result, config


# ------------------------------------------------------------------------------------------------
# transformers Trainer and TRL SFTTrainer
# ------------------------------------------------------------------------------------------------


def _count_batch(meter: _Meter, inputs: dict[str, Any]) -> None:
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    # Padding-free batches (one flattened row, positions restarting per sample) have no mask.
    meter.tokens.append(int(mask.sum()) if mask is not None else ids.numel())
    meter.slots.append(ids.numel())
    meter.loss_tokens.append(int((inputs["labels"][..., 1:] != -100).sum()))


def _hf_trainer(base: type, meter: _Meter, **kwargs: Any) -> Any:
    """An instance of ``base`` (Trainer or SFTTrainer) that reports its batches and losses to ``meter``."""
    import transformers

    class Recording(base):  # type: ignore[misc, valid-type]
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            _count_batch(meter, inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            meter.losses.append(float(loss))  # the mean over the step's loss tokens (no accumulation)
            return loss

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.tick()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.tick()

    return Recording(callbacks=[Clock()], **kwargs)


def _common_args(
    w: wl.Workload, run_dir: Path, batch_size: int, device: str, precision: str
) -> dict[str, Any]:
    return {
        "output_dir": str(run_dir), "per_device_train_batch_size": batch_size,
        "max_steps": w.steps.total_steps,
        "learning_rate": wl.LEARNING_RATE, "weight_decay": 0.0, "adam_beta1": wl.BETAS[0],
        "adam_beta2": wl.BETAS[1], "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch", "save_strategy": "no",
        "report_to": [], "logging_steps": 10_000, "dataloader_num_workers": 0, "use_cpu": device == "cpu",
        "seed": wl.SEED, "disable_tqdm": True, "bf16": precision == "bfloat16",
    }  # fmt: skip


def _attention(device: str) -> str:
    """On a GPU, FlashAttention-2 where it is installed (what a GPU user of padding-free/packed TRL runs).

    ``SFT_BENCH_HF_ATTENTION`` (``sdpa``, ``eager``, ``flash_attention_2`` ...) overrides the choice.
    """
    if os.environ.get("SFT_BENCH_HF_ATTENTION"):
        return os.environ["SFT_BENCH_HF_ATTENTION"]
    if device == "cuda" and find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _load_hf_model(w: wl.Workload, device: str) -> Any:
    import transformers

    # fp32 weights on every device: on the GPU the Trainer's bf16 autocast, like lmstack's, does the math.
    return transformers.AutoModelForCausalLM.from_pretrained(
        w.model, dtype=torch.float32, attn_implementation=_attention(device)
    )


def run_transformers(w: wl.Workload, run_dir: Path, grouped: bool, device: str, precision: str) -> Result:
    """transformers ``Trainer`` on lmstack's ids and labels: a sample a row, padded to the batch's longest."""
    import transformers

    rows = [json.loads(line) for line in Path(w.tokenized).read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(w.model)
    model = _load_hf_model(w, device)
    strategy = "group_by_length" if grouped else "random"
    args = transformers.TrainingArguments(
        **_common_args(w, run_dir, w.hf_batch_size, device, precision), train_sampling_strategy=strategy
    )
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    meter = _Meter(w.steps, device)
    trainer = _hf_trainer(
        transformers.Trainer, meter, model=model, args=args, train_dataset=rows, data_collator=collator
    )
    trainer.train()
    name = "transformers-grouped" if grouped else "transformers"
    result = meter.summary(name)
    config = {
        "batch": f"{w.hf_batch_size} samples, padded to the longest (DataCollatorForSeq2Seq)",
        "sampler": strategy,
        "attention": model.config._attn_implementation,
        "precision": precision,
    }
    return result, config


def run_trl(w: wl.Workload, run_dir: Path, mode: str, device: str, precision: str) -> Result:
    """TRL ``SFTTrainer`` on the messages, ``assistant_only_loss`` with the template's generation markers."""
    import datasets
    import transformers
    import trl

    rows = [json.loads(line) for line in Path(w.chats).read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(w.model)
    # The model's own template has no {% generation %} markers, which assistant_only_loss needs: TRL
    # refuses it (the error is recorded); the training template renders the same text, with markers.
    try:
        from trl.chat_template_utils import get_training_chat_template

        get_training_chat_template(tokenizer)
        stock_template = "accepted"
    except Exception as exc:  # recorded verbatim in the report
        stock_template = f"{type(exc).__name__}: {exc}"
    for r in rows:
        a = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        b = tokenizer.apply_chat_template(
            r["messages"], tokenize=False, chat_template=wl.TRAINING_CHAT_TEMPLATE
        )
        assert a == b, "the training template must render exactly the model's template"
    tokenizer.chat_template = wl.TRAINING_CHAT_TEMPLATE
    model = _load_hf_model(w, device)
    plan = w.steps
    batch_size = plan.lmstack_bins if mode == "packed" else w.hf_batch_size
    options: dict[str, Any] = {
        "padded": {"max_length": plan.max_length},
        "padding-free": {"padding_free": True, "max_length": None},
        "packed": {"packing": True, "packing_strategy": "bfd", "max_length": plan.max_length},
    }[mode]
    args = trl.SFTConfig(
        **_common_args(w, run_dir, batch_size, device, precision), assistant_only_loss=True,
        gradient_checkpointing=False, **options,
    )  # fmt: skip
    meter = _Meter(plan, device)
    trainer = _hf_trainer(
        trl.SFTTrainer, meter, model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    # What TRL will train on, over the whole dataset: its labels must select lmstack's tokens.
    dataset_loss_tokens = sum(sum(x != -100 for x in labels) for labels in trainer.train_dataset["labels"])
    trainer.train()
    name = {"padded": "trl", "padding-free": "trl-padding-free", "packed": "trl-packed"}[mode]
    result = {**meter.summary(name), "dataset_loss_tokens": dataset_loss_tokens}
    batch = {
        "padded": f"{batch_size} samples, padded to the longest",
        "padding-free": f"{batch_size} samples flattened into one row (position_ids), no padding",
        "packed": f"{batch_size} BFD-packed sequences of <= {plan.max_length} tokens, flattened (no padding)",
    }[mode]
    config = {
        "batch": batch, "options": options, "attention": model.config._attn_implementation,
        "precision": precision,
        "stock_template_with_assistant_only_loss": stock_template,
    }  # fmt: skip
    return result, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("workload_dir", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--profile", action="store_true", help="lmstack only: a torch.profiler table")
    parser.add_argument("--plan", choices=sorted(wl.PLANS), default="small", help="for a new workload")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), help="default: bfloat16 on cuda")
    a = parser.parse_args()
    side, workload_dir, run_dir, device = a.side, a.workload_dir, a.run_dir, a.device
    precision = a.precision or ("bfloat16" if device == "cuda" else "float32")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is false here")
    if not (workload_dir / "workload.json").exists():
        wl.build(workload_dir, a.plan)
    w = wl.Workload.load(workload_dir)
    # Everything imported before the baseline, so peak - baseline is the training itself.
    if side.startswith("lmstack"):
        import lmstack.train.recipes  # noqa: F401
    else:
        import transformers  # noqa: F401

        if side.startswith("trl"):
            import datasets  # noqa: F401
            import trl  # noqa: F401
    baseline = _rss_bytes()
    try:
        if side.startswith("lmstack"):
            compiled = side == "lmstack-compiled"
            result, config = run_lmstack(w, run_dir, device, precision, compiled=compiled, profile=a.profile)
        elif side.startswith("transformers"):
            result, config = run_transformers(w, run_dir, side.endswith("grouped"), device, precision)
        else:
            mode = side.removeprefix("trl").lstrip("-") or "padded"
            result, config = run_trl(w, run_dir, mode, device, precision)
    except Exception as exc:  # a baseline that fails is reported, not fatal
        traceback.print_exc()
        print(json.dumps({"side": side, "error": f"{type(exc).__name__}: {exc}"}))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    finite = all(math.isfinite(x) for x in result["losses"])
    config["threads"] = torch.get_num_threads()
    memory = {"baseline_rss": baseline, "peak_rss": peak}
    if device == "cuda":  # nothing was on the GPU before the side started: the whole peak is training's
        memory["peak_cuda"] = torch.cuda.max_memory_allocated()
    print(json.dumps({**result, **memory, "config": config, "finite": finite}))


if __name__ == "__main__":
    main()
