"""The training loop: exact resume after SIGKILL, gradient accumulation, NaN stop, configs, CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.core import CausalLM, ModelConfig, Tokenizer, load_pretrained
from lmstack.train import DataConfig, TrainError
from lmstack.train._loop import OptimConfig, RunConfig, train_loop

WORDS = [
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


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with path.open("w") as f:
        for i in range(300):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"id": i, "text": words.capitalize() + "."}) + "\n")
    return path


def _lmstack() -> str:
    return str(Path(sys.executable).with_name("lmstack"))


def _pretrain_cmd(data: Path, out: Path, steps: int) -> list[str]:
    return [
        _lmstack(), "train", "pretrain", "--data.paths", str(data), "--data.max_length", "64",
        "--run.output_dir", str(out), "--run.max_steps", str(steps), "--run.save_every", "3",
        "--run.batch_size", "2", "--run.grad_accum", "2", "--tokenizer.vocab_size", "300",
        "--arch.hidden_size", "64", "--arch.intermediate_size", "128", "--arch.num_hidden_layers", "2",
        "--arch.num_attention_heads", "4", "--arch.num_key_value_heads", "2", "--optim.warmup_steps", "3",
    ]  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]  # a step logged again after resuming: the later one counts
    return out


# ``lmstack ARGS...`` that stops itself (SIGSTOP) once the step given first has been logged.


def test_sigkill_and_resume_reproduces_the_loss_curve(
    text_data: Path, tmp_path: Path, stop_after_script: str
) -> None:
    steps = 24
    whole = subprocess.run(
        _pretrain_cmd(text_data, tmp_path / "whole", steps), capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = _losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, steps + 1))
    # The ChatML end-of-turn token stops generation as well as the document end.
    written = json.loads((tmp_path / "whole" / "final" / "config.json").read_text())
    tok = Tokenizer.from_pretrained(tmp_path / "whole" / "final")
    assert written["eos_token_id"] == [tok.eos_token_id, tok.token_to_id("<|im_end|>")]

    run = tmp_path / "killed"
    # The same command, stopped (SIGSTOP) by itself right after step 14 is logged: waiting for that
    # stop is the condition, so the kill lands after step 14 whatever the machine's speed.
    cmd = [sys.executable, "-c", stop_after_script, "14", *_pretrain_cmd(text_data, run, steps)[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), proc.stderr.read()[-2000:] if proc.stderr else status
    proc.kill()  # SIGKILL: no cleanup, no final save
    proc.wait()
    assert proc.returncode == -9
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 14
    assert not (run / "final").exists()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints and checkpoints[-1] >= "step-00000012"

    resumed = subprocess.run(_pretrain_cmd(text_data, run, steps), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    whole_model = load_pretrained(tmp_path / "whole" / "final")
    resumed_model = load_pretrained(run / "final")
    for (name, a), (_, b) in zip(
        whole_model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def _tiny_model(tokenizer: Tokenizer) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return CausalLM(cfg)


def _run(tokenizer: Tokenizer, data: Path, out: Path, batch: int, accum: int, steps: int = 3) -> CausalLM:
    model = _tiny_model(tokenizer)
    train_loop(
        model,
        tokenizer,
        DataConfig(paths=[str(data)], format="text", train_on="all", max_length=64),
        OptimConfig(lr=1e-3, warmup_steps=0, decay="constant", grad_clip=0.0),
        RunConfig(output_dir=str(out), max_steps=steps, batch_size=batch, grad_accum=accum, save_every=0),
    )
    return model


def test_gradient_accumulation_equals_a_big_batch(
    tokenizer: Tokenizer, text_data: Path, tmp_path: Path
) -> None:
    small = _run(tokenizer, text_data, tmp_path / "a", batch=1, accum=8)
    big = _run(tokenizer, text_data, tmp_path / "b", batch=8, accum=1)
    for (name, a), (_, b) in zip(small.state_dict().items(), big.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-5)


def _trained_order(tokenizer: Tokenizer, data: Path, out: Path, seed: int, **data_options: Any) -> list[int]:
    """Which documents of ``data`` (by line) the loop trained on, step by step (one a step)."""
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    tail = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    line_of = {
        tuple((head + tokenizer.encode(d, add_special_tokens=False) + tail)[:64]): i
        for i, d in enumerate(docs)
    }
    rows: list[tuple[int, ...]] = []

    def record(module: Any, args: Any) -> None:
        ids, positions = args[0][0].tolist(), args[1][0].tolist()
        end = positions.index(0, 1) if 0 in positions[1:] else len(ids)  # a packed bin's padding after
        rows.append(tuple(ids[:end]))

    model = _tiny_model(tokenizer)
    model.register_forward_pre_hook(record)
    options = {"format": "text", "train_on": "all", "max_length": 64, "pack": False, **data_options}
    train_loop(
        model,
        tokenizer,
        DataConfig(paths=[str(data)], **options),
        OptimConfig(warmup_steps=0),
        RunConfig(
            output_dir=str(out), max_steps=5, batch_size=1, save_every=0, seed=seed, tensorboard=False,
            measure_activations=False,  # its forwards would be recorded too
        ),
    )  # fmt: skip
    return [line_of[row] for row in rows]


def test_data_shuffle_settings_reach_the_loader(
    tokenizer: Tokenizer, text_data: Path, tmp_path: Path
) -> None:
    # shuffle: false trains on the documents in file order (some are over max_length and truncated).
    assert _trained_order(tokenizer, text_data, tmp_path / "a", 0, shuffle=False) == [0, 1, 2, 3, 4]
    one_a_bin = {"pack": True, "pack_window": 1}
    assert _trained_order(tokenizer, text_data, tmp_path / "p", 0, shuffle=False, **one_a_bin) == [
        0,
        1,
        2,
        3,
        4,
    ]
    # The order is data.shuffle_seed's: run.seed (the initialisation) leaves it alone.
    first = _trained_order(tokenizer, text_data, tmp_path / "b", 0, shuffle_seed=1)
    assert first != [0, 1, 2, 3, 4]
    assert _trained_order(tokenizer, text_data, tmp_path / "c", 5, shuffle_seed=1) == first
    assert _trained_order(tokenizer, text_data, tmp_path / "d", 0, shuffle_seed=2) != first


def test_non_finite_loss_stops_with_last_checkpoint_intact(
    tokenizer: Tokenizer, text_data: Path, tmp_path: Path
) -> None:
    model = _tiny_model(tokenizer)
    calls = {"n": 0}

    def poison(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 8 else output  # from step 5 (2 micro-batches a step)

    model.model.norm.register_forward_hook(poison)  # the final norm: before any (fused) output head
    with pytest.raises(TrainError, match=r"non-finite loss at step 5.*step-00000004"):
        train_loop(
            model,
            tokenizer,
            DataConfig(paths=[str(text_data)], format="text", train_on="all", max_length=64),
            OptimConfig(warmup_steps=0),
            RunConfig(
                output_dir=str(tmp_path), max_steps=10, batch_size=2, grad_accum=2, save_every=2,
                measure_activations=False,  # its forwards would count as calls
            ),
        )  # fmt: skip
    saved = torch.load(tmp_path / "checkpoints" / "step-00000004" / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert (
        json.loads((tmp_path / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["step"]
        == 4
    )


def test_config_typo_names_the_nearest_key(text_data: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [_lmstack(), "train", "pretrain", "--data.paths", str(text_data), "--run.max_step", "3"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "run.max_step" in done.stderr and "run.max_steps" in done.stderr


def test_two_process_data_parallel_matches_one_process(text_data: Path, tmp_path: Path) -> None:
    def cmd(out: Path, batch: int) -> list[str]:
        args = _pretrain_cmd(text_data, out, 6)
        args[args.index("--run.batch_size") + 1] = str(batch)
        return args

    single = subprocess.run(cmd(tmp_path / "one", 4), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run(torchrun + cmd(tmp_path / "two", 2), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    a = load_pretrained(tmp_path / "one" / "final").state_dict()
    b = load_pretrained(tmp_path / "two" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# -- FSDP2 ----------------------------------------------------------------------------------------

# The FSDP case, as source: the torchrun driver runs it, and the one-process reference executes the
# same text in the test process (which saves a Python start on these small machines).
_FSDP_CASE = """
import torch
from lmstack.core import CausalLM, ModelConfig
from lmstack.train import DataConfig
from lmstack.train._loop import OptimConfig, RunConfig, train_loop

def fsdp_case(tokenizer, data, out, mode, batch, precision="float32"):
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=48,
                      intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return train_loop(
        CausalLM(cfg), tokenizer, DataConfig(paths=[str(data)], format="text", train_on="all", max_length=64),
        OptimConfig(lr=1e-3, warmup_steps=2),
        RunConfig(output_dir=str(out), max_steps=6, batch_size=batch, grad_accum=2, save_every=3,
                  data_parallel=mode, device="cpu", tensorboard=False, precision=precision),
    )
"""

_FSDP_MAIN = """
import shutil, sys
from pathlib import Path
from lmstack.core import Tokenizer
from lmstack.train._dist import barrier, init_distributed

data, tok_dir, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
tokenizer = Tokenizer.from_pretrained(tok_dir)
fsdp_case(tokenizer, data, root / "fsdp", "fsdp", 2)
# Resume a copy of the run from its step-3 checkpoint, in the same process group.
if init_distributed("cpu").is_main:
    step3 = Path("checkpoints") / "step-00000003"
    shutil.copytree(root / "fsdp" / step3, root / "resumed" / step3)
barrier()
fsdp_case(tokenizer, data, root / "resumed", "fsdp", 2)
# FSDP2 mixed precision: bf16 weights gathered and computed with, fp32 reduction and master weights.
fsdp_case(tokenizer, data, root / "mixed", "fsdp", 2, "bfloat16-mp")
"""


@pytest.fixture(scope="module")
def fsdp_runs(tokenizer: Tokenizer, text_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchrun 2 x batch 2 with FSDP2 (``fsdp``) and a copy of it resumed from its step-3 checkpoint
    (``resumed``); one process x batch 4 as the reference (``single``). 6 steps of 2 micro-batches."""
    root = tmp_path_factory.mktemp("fsdp")
    tokenizer.save_pretrained(root / "tokenizer")
    driver = root / "driver.py"
    driver.write_text(_FSDP_CASE + _FSDP_MAIN)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    fsdp = subprocess.Popen(
        [*torchrun, str(driver), str(text_data), str(root / "tokenizer"), str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    namespace: dict[str, Any] = {}
    exec(compile(_FSDP_CASE, "fsdp_case", "exec"), namespace)
    namespace["fsdp_case"](tokenizer, text_data, root / "single", "ddp", 4)  # one process: unsharded
    _, stderr = fsdp.communicate(timeout=300)
    assert fsdp.returncode == 0, stderr[-3000:]
    return root


def test_fsdp_two_processes_match_one_process(fsdp_runs: Path) -> None:
    one, two = _losses(fsdp_runs / "single"), _losses(fsdp_runs / "fsdp")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # The final model is a plain Hugging Face directory with whole (gathered) weights.
    a = load_pretrained(fsdp_runs / "single" / "final").state_dict()
    b = load_pretrained(fsdp_runs / "fsdp" / "final").state_dict()
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # Checkpoints hold whole tensors in the unsharded layout: the same files as one process writes.
    ckpt_one, ckpt_two = (fsdp_runs / k / "checkpoints" / "step-00000003" for k in ("single", "fsdp"))
    w1, w2 = (torch.load(c / "model.pt", weights_only=True) for c in (ckpt_one, ckpt_two))
    assert list(w1) == list(w2)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6, msg=name)
    o1, o2 = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ckpt_one, ckpt_two))
    # The one-process run steps with torch's fused AdamW, the FSDP shards (DTensors) with the default
    # implementation: the same update, so everything but that flag is equal.
    assert [g.pop("fused") for g in o1["param_groups"]] == [True, True]
    assert [g.pop("fused") for g in o2["param_groups"]] == [None, None]
    assert o1["param_groups"] == o2["param_groups"]
    assert sorted(o1["state"]) == sorted(o2["state"])
    for index, s1 in o1["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s1[key], o2["state"][index][key], rtol=1e-4, atol=1e-9)


def test_fsdp_resume_continues_the_curve(fsdp_runs: Path) -> None:
    whole, resumed = _losses(fsdp_runs / "fsdp"), _losses(fsdp_runs / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step
    a = load_pretrained(fsdp_runs / "fsdp" / "final").state_dict()
    b = load_pretrained(fsdp_runs / "resumed" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_fsdp_mixed_precision_follows_the_fp32_curve_with_fp32_weights(fsdp_runs: Path) -> None:
    one, mixed = _losses(fsdp_runs / "single"), _losses(fsdp_runs / "mixed")
    assert sorted(mixed) == list(range(1, 7))
    # Step 1 has the same weights, computed in bf16: close to fp32 and not equal to it.
    assert mixed[1] == pytest.approx(one[1], rel=1e-2) and mixed[1] != one[1]
    for step in one:
        assert mixed[step] == pytest.approx(one[step], rel=3e-2), step
    weights = load_pretrained(fsdp_runs / "mixed" / "final").state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())
    # fp32 master weights: finer than bf16 can hold.
    finer = sum(int((w.to(torch.bfloat16).float() != w).sum()) for w in weights.values())
    assert finer > 0.99 * sum(w.numel() for w in weights.values())


def test_fsdp_refuses_frozen_parameters(tokenizer: Tokenizer, text_data: Path, tmp_path: Path) -> None:
    model = _tiny_model(tokenizer)
    model.model.embed_tokens.weight.requires_grad_(False)  # as a LoRA base is
    with pytest.raises(TrainError, match=r"data_parallel='fsdp'.*frozen.*'ddp'"):
        train_loop(
            model,
            tokenizer,
            DataConfig(paths=[str(text_data)], format="text", train_on="all", max_length=64),
            OptimConfig(),
            RunConfig(output_dir=str(tmp_path), max_steps=1, data_parallel="fsdp"),
        )
    assert not (tmp_path / "metrics.jsonl").exists()


def test_adamw_is_fused_where_torch_fuses_it_and_a_resume_keeps_the_runs_own_choice() -> None:
    from lmstack.train._loop import _fusable, _param_groups
    from lmstack.train._state import _own_implementation

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = _param_groups(model, 0.1)
    assert _fusable(groups)
    assert not _fusable([{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]}])
    assert not _fusable([{"params": [torch.nn.Parameter(torch.zeros(2).as_subclass(_Shard))]}])

    # The same update either way (fp32; the fused kernel orders its arithmetic differently).
    grads = [torch.randn_like(p) for p in model.parameters()]
    steps = {}
    for fused in (True, None):
        copy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        copy.load_state_dict(model.state_dict())
        opt = torch.optim.AdamW(_param_groups(copy, 0.1), lr=1e-2, fused=fused)
        for _ in range(3):
            for p, g in zip(copy.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
        steps[fused] = (copy, opt)
    for a, b in zip(steps[True][0].parameters(), steps[None][0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    # A fused run's saved state loaded by a run that does not fuse (an FSDP resume) leaves it unfused.
    saved = steps[True][1].state_dict()
    plain = steps[None][1]
    with _own_implementation(plain):
        plain.load_state_dict(saved)
    assert [g["fused"] for g in plain.param_groups] == [None, None]
    assert plain.state_dict()["state"][0]["exp_avg"].equal(saved["state"][0]["exp_avg"])


class _Shard(torch.Tensor):
    pass
