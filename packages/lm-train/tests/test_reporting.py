"""What a run reports: TensorBoard scalars, the TrainResult totals and the CLI's end-of-run summary."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer
from lmstack.core._cli import main as lmstack_main
from lmstack.train import DataConfig, TrainError
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train._monitor import tensorboard_available

WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "seven", "quiet", "bright", "north", "ocean")
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "padding_ratio")


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    lines = [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50)))})
        for _ in range(200)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tokenizer: Tokenizer, model: Any, docs: Path, out: Path, steps: int, **run: Any) -> TrainResult:
    return train_loop(
        model,
        tokenizer,
        DataConfig(paths=[str(docs)], format="text", train_on="all", max_length=48),
        OptimConfig(lr=1e-3, warmup_steps=0, decay="constant"),
        RunConfig(output_dir=str(out), max_steps=steps, batch_size=2, save_every=2, device="cpu", **run),
    )


def _metrics(run: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record  # a step logged again after resuming: the later one counts
    return out


def _tiny(tokenizer: Tokenizer) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return CausalLM(cfg)


@pytest.fixture(scope="module")
def resumed_run(
    tokenizer: Tokenizer, docs: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainResult, TrainResult]:
    """A 5-step run (checkpoints at steps 2 and 4), then the same directory continued to 8 steps: the
    second call resumes at step 4 and logs steps 5-8 again, as after a crash."""
    out = tmp_path_factory.mktemp("run")
    first = _train(tokenizer, _tiny(tokenizer), docs, out, 5)
    second = _train(tokenizer, _tiny(tokenizer), docs, out, 8)
    return out, first, second


def test_tensorboard_scalars_equal_metrics_and_resume_continues(
    resumed_run: tuple[Path, TrainResult, TrainResult],
) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out, _, second = resumed_run
    assert second.tensorboard_dir == out / "tensorboard"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per call
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    metrics = _metrics(out)
    assert sorted(metrics) == list(range(1, 9))
    for name in SCALARS:
        events = acc.Scalars(f"train/{name}")
        # Step 5 of the first call was purged: the resumed call's points replace it, steps continue.
        assert [e.step for e in events] == list(range(1, 9)), name
        for e in events:
            assert e.value == pytest.approx(metrics[e.step][name], rel=1e-6, abs=1e-12), (name, e.step)


def test_train_result_totals_cover_the_resumed_run(
    resumed_run: tuple[Path, TrainResult, TrainResult],
) -> None:
    out, first, second = resumed_run
    metrics = _metrics(out)
    losses = {step: m["loss"] for step, m in metrics.items()}
    assert (first.start_step, len(first.losses)) == (0, 5)
    assert (second.start_step, second.steps, len(second.losses)) == (4, 8, 4)
    assert second.losses == [losses[s] for s in range(5, 9)]
    assert second.final_loss == losses[8]
    best_step = min(losses, key=lambda s: losses[s])
    assert (second.best_step, second.best_loss) == (best_step, losses[best_step])
    assert second.tokens == metrics[8]["tokens"]
    assert second.tokens_this_call == metrics[8]["tokens"] - metrics[4]["tokens"]
    assert second.tokens_per_s > 0 and second.seconds > 0
    # Padding over the whole run: padded slots over all slots, steps before the resume included.
    tokens = {s: metrics[s]["tokens"] - (metrics[s - 1]["tokens"] if s > 1 else 0) for s in metrics}
    slots = sum(tokens[s] / (1 - metrics[s]["padding_ratio"]) for s in metrics)
    assert second.padding_ratio == pytest.approx(1 - sum(tokens.values()) / slots, rel=1e-9)
    assert 0 < second.padding_ratio < 1
    assert second.peak_memory_bytes > 10 * 2**20 and second.peak_memory_kind == "process peak RSS"
    assert second.model_dir == out / "final" and (out / "final" / "config.json").is_file()
    assert second.last_checkpoint == out / "checkpoints" / "step-00000006"
    assert second.metrics_file == out / "metrics.jsonl"
    assert (second.world_size, second.data_parallel) == (1, "none")
    text = second.summary()
    assert "Training finished: 8 steps (4 in this call, resumed at step 4) on 1 process" in text
    assert f"best {losses[best_step]:.4f} (step {best_step})" in text
    assert f"{second.tokens:,} ({second.tokens_this_call:,} in this call)" in text
    assert f"checkpoints   {out / 'checkpoints'} (latest: step-00000006)" in text


def test_tensorboard_true_without_tensorboard_is_a_clear_error(
    tokenizer: Tokenizer, docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # None in sys.modules: import raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrainError, match=r"run.tensorboard is true.*pip install tensorboard"):
        _train(tokenizer, _tiny(tokenizer), docs, tmp_path / "required", 1, tensorboard=True)
    assert not (tmp_path / "required" / "metrics.jsonl").exists()  # failed before any work
    # The default logs only when TensorBoard is there.
    result = _train(tokenizer, _tiny(tokenizer), docs, tmp_path / "auto", 1)
    assert result.tensorboard_dir is None and not (tmp_path / "auto" / "tensorboard").exists()
    assert "--logdir" not in result.summary()
    monkeypatch.undo()
    off = _train(tokenizer, _tiny(tokenizer), docs, tmp_path / "off", 1, tensorboard=False)
    assert off.tensorboard_dir is None and not (tmp_path / "off" / "tensorboard").exists()


def test_train_result_keeps_its_positional_fields() -> None:
    result = TrainResult(3, 1.5, 1234, 2.0, Path("run/final"), [2.0, 1.75, 1.5])
    assert (result.steps, result.final_loss, result.tokens, result.model_dir) == (
        3,
        1.5,
        1234,
        Path("run/final"),
    )
    text = result.summary()
    assert "Training finished: 3 steps (3 in this call) on 1 process" in text
    assert "best n/a" in text and "peak memory   unknown" in text and "none kept" in text


def test_cli_prints_the_run_summary(docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = [
        "train", "pretrain", "--data.paths", str(docs), "--data.max_length", "48",
        "--run.output_dir", str(out), "--run.max_steps", "3", "--run.save_every", "2",
        "--run.batch_size", "2", "--run.device", "cpu",
        "--tokenizer.vocab_size", "300", "--arch.hidden_size", "32", "--arch.intermediate_size", "48",
        "--arch.num_hidden_layers", "1", "--arch.num_attention_heads", "4", "--arch.num_key_value_heads", "2",
    ]  # fmt: skip
    assert lmstack_main(argv) == 0
    printed = capsys.readouterr().out
    metrics = _metrics(out)
    assert "Training finished: 3 steps (3 in this call) on 1 process" in printed
    assert f"tokens        {metrics[3]['tokens']:,} in " in printed and "tokens/s)" in printed
    assert f"loss          final {metrics[3]['loss']:.4f}, best " in printed
    assert "% of batch slots" in printed
    assert "peak memory   " in printed and "MiB (process peak RSS)" in printed
    assert f"final model   {out / 'final'}" in printed
    assert f"checkpoints   {out / 'checkpoints'} (latest: step-00000002)" in printed
    assert f"metrics       {out / 'metrics.jsonl'}" in printed
    if tensorboard_available():
        assert f"tensorboard   tensorboard --logdir {out / 'tensorboard'}" in printed


def test_tensorboard_writer_is_closed_when_the_run_fails(
    tokenizer: Tokenizer, docs: Path, tmp_path: Path
) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = _tiny(tokenizer)
    calls = {"n": 0}

    def poison(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output  # step 4 fails

    model.model.norm.register_forward_hook(poison)  # the final norm: before any (fused) output head
    with pytest.raises(TrainError, match="non-finite loss at step 4"):
        _train(tokenizer, model, docs, tmp_path, 6, tensorboard=True, measure_activations=False)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()  # the points of the good steps were flushed by closing the writer
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
