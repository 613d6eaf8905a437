"""Checkpoint writes: a writer killed at any moment of a save leaves a complete, resumable checkpoint."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer, load_pretrained
from lmstack.train import DataConfig, OptimConfig, RunConfig, train_loop
from lmstack.train._state import STATE_FILE, latest_checkpoint

STEPS = 6
MODEL = {
    "model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip

# Re-saves checkpoint step 4 of a run over itself (keep_last=1, so step 2 is pruned afterwards), and
# exits with 9, as SIGKILL would (no cleanup), before or after the K-th file-system step of the save:
# a torch.save, a rename, a replace, a directory swap or a tree removal.
_KILLED_SAVE = """
import json, os, shutil, sys
from pathlib import Path
import torch
from lmstack.core import CausalLM, ModelConfig
from lmstack.train import OptimConfig, RunConfig
from lmstack.train import _state
from lmstack.train._loop import _Training

run, kill_at, when, model_json = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
count = [0]

def killing(fn):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == kill_at and when == "before":
            os._exit(9)
        result = fn(*args, **kwargs)
        if count[0] == kill_at and when == "after":
            os._exit(9)
        return result
    return wrapper

training = _Training(CausalLM(ModelConfig(**json.loads(model_json))), None, None, OptimConfig(),
                     RunConfig(output_dir=str(run), max_steps=6))
training._setup_optimizer()
ckpt = run / "checkpoints" / "step-00000004"
state = _state.load_checkpoint(ckpt, model=training.model, optimizer=training.optimizer,
                               scheduler=training.scheduler)
state.pop("step")
import lmstack.core._atomic as atomic
for module, name in ((torch, "save"), (os, "rename"), (os, "replace"), (shutil, "rmtree"),
                     (atomic, "_exchange")):
    setattr(module, name, killing(getattr(module, name)))
_state.save_checkpoint(run, 4, model=training.model, optimizer=training.optimizer,
                       scheduler=training.scheduler, trainer_state=state, keep_last=1)
"""


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "seven",
        "quiet",
        "bright",
        "north",
        "green",
        "apple",
        "ocean",
    ]
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    lines = [
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))})
        for _ in range(200)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tokenizer: Tokenizer, data: Path, out: Path) -> list[float]:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, **MODEL))  # type: ignore[arg-type]
    result = train_loop(
        model,
        tokenizer,
        DataConfig(paths=[str(data)], format="text", train_on="all", max_length=64),
        OptimConfig(lr=1e-3, warmup_steps=2),
        RunConfig(
            output_dir=str(out), max_steps=STEPS, batch_size=2, save_every=2, keep_last=2, device="cpu"
        ),
    )
    return result.losses


@pytest.fixture(scope="module")
def reference(tokenizer: Tokenizer, text_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: checkpoints step 2 and step 4, metrics, final model."""
    root = tmp_path_factory.mktemp("reference")
    losses = _train(tokenizer, text_data, root / "run")
    assert len(losses) == STEPS
    return root / "run"


def _assert_complete(checkpoint: Path) -> None:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert checkpoint.name == f"step-{state['step']:08d}"
    for name in ("model.pt", "optimizer.pt", "state.pt"):
        torch.load(checkpoint / name, map_location="cpu", weights_only=True)  # whole, readable files


@pytest.mark.parametrize(
    ("kill_at", "when"),
    [
        pytest.param(k, when, marks=() if (k, when) == (4, "after") else pytest.mark.slow)
        for k in range(1, 9)
        for when in ("before", "after")
    ],
)
def test_a_writer_killed_mid_save_leaves_a_complete_resumable_checkpoint(
    tokenizer: Tokenizer, text_data: Path, reference: Path, tmp_path: Path, kill_at: int, when: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    args = [str(run), str(kill_at), when, json.dumps({**MODEL, "vocab_size": tokenizer.vocab_size})]
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, *args], capture_output=True, text=True)
    assert done.returncode in (0, 9), done.stderr[-2000:]  # 0: the save has fewer steps than kill_at
    # The checkpoint being rewritten is whole at its path, old or new; whatever else looks like a
    # checkpoint is whole too.
    step4 = run / "checkpoints" / "step-00000004"
    _assert_complete(step4)
    for path in (run / "checkpoints").iterdir():
        if not path.name.startswith(".") and (path / STATE_FILE).exists():
            _assert_complete(path)
    assert latest_checkpoint(run) == step4
    # And the run resumes from it onto the same losses and weights as the run that was never killed.
    resumed = _train(tokenizer, text_data, run)
    expected = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx(expected[4:], rel=1e-6)
    a, b = (load_pretrained(r / "final").state_dict() for r in (reference, run))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
