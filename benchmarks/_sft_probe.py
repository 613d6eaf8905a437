"""Run one side of the SFT benchmark in a fresh process; print what it measured as one JSON line.

Usage: python _sft_probe.py SIDE WORKLOAD_DIR RUN_DIR [--profile], SIDE one of :data:`SIDES`; the workload
is built in WORKLOAD_DIR when it is not there yet. ``--profile`` (lmstack only) adds a torch.profiler table.

Every side runs ``WARMUP_STEPS + MEASURED_STEPS`` optimizer steps of AdamW (constant learning rate,
betas 0.9/0.95, no weight decay, gradient clipping at 1.0) in fp32 on the CPU, without activation
checkpointing, and times only the measured steps: a step runs from the end of the previous one to the
end of its optimizer update, so it covers fetching and collating its batch, forward, backward, clipping
and the update, and none of tokenization, caching or saving. Per step it counts the real (non-padding)
tokens, the token slots the model computed (real + padding) and the tokens under the loss.
Peak memory is the process's peak resident set (``ru_maxrss``), and ``baseline_rss`` the resident set
after the imports, before the model is loaded.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _sft_workload as wl

SIDES = ("lmstack", "transformers", "transformers-grouped", "trl", "trl-padding-free", "trl-packed")
TOTAL_STEPS = wl.WARMUP_STEPS + wl.MEASURED_STEPS


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _Meter:
    """Per-step counts, and the wall-clock and CPU time at the end of every step."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.slots: list[int] = []
        self.loss_tokens: list[int] = []
        self.losses: list[float] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.setup_seconds = 0.0

    def tick(self) -> None:
        """Mark the start of training (first call) or the end of a step."""
        if not self.wall:  # imports, loading, tokenizing: from the start of the process to the first step
            self.setup_seconds = time.time() - psutil.Process().create_time()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def summary(self, side: str) -> dict[str, Any]:
        """Totals over the measured steps (the warm-up steps are left out)."""
        counts = [len(self.wall) - 1, *map(len, (self.tokens, self.slots, self.loss_tokens, self.losses))]
        assert set(counts) == {TOTAL_STEPS}, (side, counts)
        m, n = wl.WARMUP_STEPS, TOTAL_STEPS
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


def run_lmstack(w: wl.Workload, run_dir: Path, profile: bool = False) -> Result:
    """``lmstack.train.recipes.sft``: packed best-fit bins, per-sample attention, loss on assistant turns.

    With ``profile``, the measured steps run under ``torch.profiler`` (slower) and the result holds its
    table of the operators that took the most time (``profile``).
    """
    import lmstack.train._loop as loop
    from lmstack.train import DataConfig
    from lmstack.train._loop import OptimConfig, RunConfig
    from lmstack.train.recipes import SFTConfig, sft

    meter = _Meter()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None

    class Clock(loop.tqdm):  # type: ignore[misc, name-defined]
        """The loop's progress bar: made just before the first step, updated at the end of each."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            meter.tick()

        def update(self, n: float | None = 1) -> bool | None:
            meter.tick()
            if profiler is not None and len(meter.wall) - 1 == wl.WARMUP_STEPS:
                profiler.start()
            if profiler is not None and len(meter.wall) - 1 == TOTAL_STEPS:
                profiler.stop()
            return super().update(n)

    # The loop's own names (private): should they change, no step is counted and summary() says so.
    loop.tqdm = Clock  # type: ignore[misc]
    optim = OptimConfig(
        lr=wl.LEARNING_RATE, weight_decay=0.0, betas=list(wl.BETAS), warmup_steps=0, decay="constant",
        grad_clip=1.0,
    )  # fmt: skip
    run = RunConfig(
        output_dir=str(run_dir), max_steps=TOTAL_STEPS, batch_size=wl.LMSTACK_BINS, save_every=0,
        device="cpu", seed=wl.SEED, log_every=10_000,
    )  # fmt: skip
    data = DataConfig(paths=[w.chats], format="messages", max_length=wl.MAX_LENGTH, pack=True)
    cfg = SFTConfig(model=w.model, data=data, optim=optim, run=run)
    sft(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    meter.tokens = [r["tokens"] - (records[i - 1]["tokens"] if i else 0) for i, r in enumerate(records)]
    meter.slots = [round(n / (1 - r["padding_ratio"])) for n, r in zip(meter.tokens, records, strict=True)]
    meter.losses = [r["loss"] for r in records]
    meter.loss_tokens = [r["loss_tokens"] for r in records]
    result = meter.summary("lmstack")
    if profiler is not None:
        result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    config = {
        "batch": f"{wl.LMSTACK_BINS} packed bins x {wl.MAX_LENGTH} tokens (best-fit, window 1024)",
        "attention": "PackedAttention (causal SDPA per sample)",
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


def _common_args(w: wl.Workload, run_dir: Path, batch_size: int) -> dict[str, Any]:
    return {
        "output_dir": str(run_dir), "per_device_train_batch_size": batch_size, "max_steps": TOTAL_STEPS,
        "learning_rate": wl.LEARNING_RATE, "weight_decay": 0.0, "adam_beta1": wl.BETAS[0],
        "adam_beta2": wl.BETAS[1], "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch", "save_strategy": "no",
        "report_to": [], "logging_steps": 10_000, "dataloader_num_workers": 0, "use_cpu": True,
        "seed": wl.SEED, "disable_tqdm": True,
    }  # fmt: skip


def _load_hf_model(w: wl.Workload) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(w.model, dtype=torch.float32)


def run_transformers(w: wl.Workload, run_dir: Path, grouped: bool) -> Result:
    """transformers ``Trainer`` on lmstack's ids and labels: a sample a row, padded to the batch's longest."""
    import transformers

    rows = [json.loads(line) for line in Path(w.tokenized).read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(w.model)
    model = _load_hf_model(w)
    strategy = "group_by_length" if grouped else "random"
    args = transformers.TrainingArguments(
        **_common_args(w, run_dir, w.hf_batch_size), train_sampling_strategy=strategy
    )
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    meter = _Meter()
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
    }
    return result, config


def run_trl(w: wl.Workload, run_dir: Path, mode: str) -> Result:
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
    model = _load_hf_model(w)
    batch_size = wl.LMSTACK_BINS if mode == "packed" else w.hf_batch_size
    options: dict[str, Any] = {
        "padded": {"max_length": wl.MAX_LENGTH},
        "padding-free": {"padding_free": True, "max_length": None},
        "packed": {"packing": True, "packing_strategy": "bfd", "max_length": wl.MAX_LENGTH},
    }[mode]
    args = trl.SFTConfig(
        **_common_args(w, run_dir, batch_size), assistant_only_loss=True, gradient_checkpointing=False,
        bf16=False, **options,
    )  # fmt: skip
    meter = _Meter()
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
        "packed": f"{batch_size} BFD-packed sequences of <= {wl.MAX_LENGTH} tokens, flattened (padding-free)",
    }[mode]
    config = {
        "batch": batch, "options": options, "attention": model.config._attn_implementation,
        "stock_template_with_assistant_only_loss": stock_template,
    }  # fmt: skip
    return result, config


def main() -> None:
    side, workload_dir, run_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if side not in SIDES:
        raise SystemExit(f"unknown side {side!r}; choose one of {', '.join(SIDES)}")
    if not (workload_dir / "workload.json").exists():
        wl.build(workload_dir)
    w = wl.Workload.load(workload_dir)
    # Everything imported before the baseline, so peak - baseline is the training itself.
    if side == "lmstack":
        import lmstack.train.recipes  # noqa: F401
    else:
        import transformers  # noqa: F401

        if side.startswith("trl"):
            import datasets  # noqa: F401
            import trl  # noqa: F401
    baseline = _rss_bytes()
    try:
        if side == "lmstack":
            result, config = run_lmstack(w, run_dir, profile="--profile" in sys.argv[4:])
        elif side.startswith("transformers"):
            result, config = run_transformers(w, run_dir, grouped=side.endswith("grouped"))
        else:
            result, config = run_trl(w, run_dir, mode=side.removeprefix("trl").lstrip("-") or "padded")
    except Exception as exc:  # a baseline that fails is reported, not fatal
        traceback.print_exc()
        print(json.dumps({"side": side, "error": f"{type(exc).__name__}: {exc}"}))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    finite = all(math.isfinite(x) for x in result["losses"])
    config["threads"] = torch.get_num_threads()
    memory = {"baseline_rss": baseline, "peak_rss": peak}
    print(json.dumps({**result, **memory, "config": config, "finite": finite}))


if __name__ == "__main__":
    main()
