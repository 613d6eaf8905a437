"""Run one side of the DPO benchmark in a fresh process; print what it measured as one JSON line.

Usage: python _dpo_probe.py SIDE WORKLOAD_DIR RUN_DIR, SIDE one of :data:`SIDES`; the workload is built in
WORKLOAD_DIR when it is not there yet.

Every side runs ``WARMUP_STEPS + MEASURED_STEPS`` optimizer steps of DPO (sigmoid loss, beta 0.1, the
reference = the initial model) with AdamW (constant learning rate, betas 0.9/0.95, no weight decay,
gradient clipping at 1.0) in fp32 on the CPU, without activation checkpointing, and times only the
measured steps: a step runs from the end of the previous one to the end of its optimizer update, so it
covers fetching and collating its batch, the policy's forward and backward, the reference's forward
(unless precomputed), clipping and the update, and none of tokenization, caching or saving. Per step it
counts the pairs, the real (non-padding) tokens of both sequences of every pair and the token slots the
model computed (real + padding). Where the reference log-probs are precomputed before training (lmstack
always, TRL with ``precompute_ref_log_probs``), that pass is timed on its own (``reference_seconds``).
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
import _dpo_workload as wl
from _sft_probe import _rss_bytes

SIDES = ("lmstack", "lmstack-padded", "trl", "trl-precomputed", "trl-padding-free")
TOTAL_STEPS = wl.WARMUP_STEPS + wl.MEASURED_STEPS


class _Meter:
    """Per-step counts, and the wall-clock and CPU time at the end of every step."""

    def __init__(self) -> None:
        self.pairs: list[int] = []
        self.tokens: list[int] = []
        self.slots: list[int] = []
        self.losses: list[float] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.setup_seconds = 0.0
        self.reference_seconds: float | None = None

    def tick(self) -> None:
        """Mark the start of training (first call) or the end of a step."""
        if not self.wall:  # imports, loading, tokenizing, reference pass: process start to the first step
            self.setup_seconds = time.time() - psutil.Process().create_time()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def summary(self, side: str) -> dict[str, Any]:
        """Totals over the measured steps (the warm-up steps are left out)."""
        series: list[list[Any]] = [self.pairs, self.tokens, self.slots, self.losses]
        counts = [len(self.wall) - 1, *(len(x) for x in series)]
        assert set(counts) == {TOTAL_STEPS}, (side, counts)
        m, n = wl.WARMUP_STEPS, TOTAL_STEPS
        return {
            "side": side, "steps": n, "seconds": self.wall[n] - self.wall[m],
            "cpu_seconds": self.cpu[n] - self.cpu[m], "pairs": sum(self.pairs[m:n]),
            "tokens": sum(self.tokens[m:n]), "slots": sum(self.slots[m:n]),
            "losses": self.losses,
            "step_seconds": [b - a for a, b in zip(self.wall[:-1], self.wall[1:], strict=False)],
            "setup_seconds": self.setup_seconds, "reference_seconds": self.reference_seconds,
        }  # fmt: skip


Result = tuple[dict[str, Any], dict[str, Any]]
"""What a side measured, and how it was configured."""


# ------------------------------------------------------------------------------------------------
# lmstack
# ------------------------------------------------------------------------------------------------


def run_lmstack(w: wl.Workload, run_dir: Path, packed: bool) -> Result:
    """``lmstack.train.recipes.dpo``: whole pairs packed into best-fit bins (or padded: a sequence a row)."""
    import lmstack.train._loop as loop
    from lmstack.train import DataConfig
    from lmstack.train._loop import OptimConfig, RunConfig
    from lmstack.train.recipes import DPOConfig, DPOSettings, dpo

    meter = _Meter()

    class Clock(loop.tqdm):  # type: ignore[misc, name-defined]
        """The loop's progress bar: made just before the first step, updated at the end of each."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            meter.tick()

        def update(self, n: float | None = 1) -> bool | None:
            meter.tick()
            return super().update(n)

    prepare_reference = loop.prepare_reference

    def timed_reference(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return prepare_reference(*args, **kwargs)
        finally:
            meter.reference_seconds = (meter.reference_seconds or 0.0) + time.perf_counter() - start

    # The loop's own names (private): should they change, no step is counted and summary() says so (and
    # the reference pass is not timed apart: reference_seconds stays None).
    loop.tqdm = Clock  # type: ignore[misc]
    loop.prepare_reference = timed_reference
    optim = OptimConfig(
        lr=wl.LEARNING_RATE, weight_decay=0.0, betas=list(wl.BETAS), warmup_steps=0, decay="constant",
        grad_clip=1.0,
    )  # fmt: skip
    batch_size = wl.LMSTACK_BINS if packed else w.pairs_per_step
    run = RunConfig(
        output_dir=str(run_dir), max_steps=TOTAL_STEPS, batch_size=batch_size, save_every=0, device="cpu",
        seed=wl.SEED, log_every=10_000, tensorboard=False,
    )  # fmt: skip
    # "preference" is the DPO recipe's data format (DataConfig's type may not list it yet).
    fmt: Any = "preference"
    data = DataConfig(paths=[w.preferences], format=fmt, max_length=wl.MAX_LENGTH, pack=packed)
    settings = DPOSettings(beta=wl.BETA, loss="sigmoid")
    cfg = DPOConfig(model=w.model, data=data, optim=optim, run=run, dpo=settings)
    started = time.perf_counter()
    dpo(cfg)
    # The recipe's own setup (loading, tokenizing, the reference pass) ends where the progress bar starts.
    recipe_setup = meter.wall[0] - started if meter.wall else None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    meter.tokens = [r["tokens"] - (records[i - 1]["tokens"] if i else 0) for i, r in enumerate(records)]
    meter.slots = [round(n / (1 - r["padding_ratio"])) for n, r in zip(meter.tokens, records, strict=True)]
    meter.pairs = [int(r["pairs"]) for r in records]
    meter.losses = [r["loss"] for r in records]
    result = meter.summary("lmstack" if packed else "lmstack-padded")
    batch = (
        f"{wl.LMSTACK_BINS} packed bin(s) x {wl.MAX_LENGTH} tokens (whole pairs, best-fit)"
        if packed
        else f"{batch_size} pairs, a sequence a row, padded to the longest"
    )
    result["recipe_setup_seconds"] = recipe_setup
    config = {"batch": batch, "reference": "log-probs precomputed before the first step (prepare_reference)"}
    return result, config


# ------------------------------------------------------------------------------------------------
# TRL DPOTrainer
# ------------------------------------------------------------------------------------------------


def run_trl(w: wl.Workload, run_dir: Path, mode: str) -> Result:
    """TRL ``DPOTrainer`` on the pairs (conversational: prompt messages, assistant-message completions)."""
    import datasets
    import transformers
    import trl

    rows = [json.loads(line) for line in Path(w.preferences).read_text().splitlines()]
    rows = [
        {
            "prompt": r["prompt"],
            **{k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")},
        }
        for r in rows
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(w.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(w.model, dtype=torch.float32)
    meter = _Meter()

    class Recording(trl.DPOTrainer):  # type: ignore[misc]
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            mask = inputs["attention_mask"]
            meter.pairs.append(mask.shape[0] // 2)  # rows: the chosen sequences, then the rejected ones
            meter.tokens.append(int(mask.sum()))
            meter.slots.append(mask.numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            meter.losses.append(float(loss))
            return loss

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            start = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            meter.reference_seconds = (meter.reference_seconds or 0.0) + time.perf_counter() - start
            return out

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.tick()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.tick()

    options: dict[str, Any] = {
        "padded": {},
        "precomputed": {"precompute_ref_log_probs": True},
        "padding-free": {"padding_free": True},
    }[mode]
    args = trl.DPOConfig(
        output_dir=str(run_dir), per_device_train_batch_size=w.pairs_per_step, max_steps=TOTAL_STEPS,
        learning_rate=wl.LEARNING_RATE, weight_decay=0.0, adam_beta1=wl.BETAS[0], adam_beta2=wl.BETAS[1],
        adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10_000,
        dataloader_num_workers=0,
        use_cpu=True, seed=wl.SEED, disable_tqdm=True, activation_checkpointing=False, bf16=False,
        max_length=wl.MAX_LENGTH, beta=wl.BETA, loss_type=["sigmoid"], **options,
    )  # fmt: skip
    trainer = Recording(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[Clock()],
    )  # fmt: skip
    # The sequences TRL will train on, over the whole dataset, counted as lmstack counts them.
    data: Any = trainer.train_dataset
    dataset_tokens: int = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    )
    trainer.train()
    name = {"padded": "trl", "precomputed": "trl-precomputed", "padding-free": "trl-padding-free"}[mode]
    result = {**meter.summary(name), "dataset_tokens": dataset_tokens}
    reference = (
        "log-probs precomputed before training" if trainer.precompute_ref_logps else "a second model copy"
    )
    config = {
        "batch": f"{w.pairs_per_step} pairs, a sequence a row, padded to the longest",
        "options": options, "padding_free_in_effect": bool(trainer.padding_free), "reference": reference,
        "attention": model.config._attn_implementation,
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
    if side.startswith("lmstack"):
        import lmstack.train.recipes  # noqa: F401
    else:
        import datasets  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    baseline = _rss_bytes()
    try:
        if side.startswith("lmstack"):
            result, config = run_lmstack(w, run_dir, packed=side == "lmstack")
        else:
            result, config = run_trl(w, run_dir, mode=side.removeprefix("trl").lstrip("-") or "padded")
    except Exception as exc:  # a side that fails is reported, not fatal
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
