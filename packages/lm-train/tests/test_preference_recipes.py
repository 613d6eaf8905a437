"""The preference recipes end to end: DPO, ORPO, SimPO, KTO and reward models on a tiny model.

Checks against independent references: the first DPO step's loss is log 2 (policy == reference), the
cached reference log-probs equal transformers' log-probs of the same token ids, gradient accumulation
equals one big batch, LoRA with the adapters off as the reference equals the precomputed table, and a
run killed with SIGKILL resumes on the same loss curve.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _preference_rows import polite_pairs

from lmstack.core import CausalLM, ModelConfig, Tokenizer, load_pretrained, save_pretrained
from lmstack.train import DataConfig, TrainConfigError, TrainError, TrainResult
from lmstack.train._loop import OptimConfig, RunConfig
from lmstack.train.recipes import (
    DPOConfig,
    DPOSettings,
    KTOConfig,
    ORPOConfig,
    RewardConfig,
    SFTConfig,
    SimPOConfig,
    dpo,
    kto,
    orpo,
    rm,
    sft,
    simpo,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preference")
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    save_pretrained(CausalLM(config), root / "model", tokenizer=tokenizer)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in polite_pairs(64)))
    unpaired = root / "kto.jsonl"
    rows = []
    for r in polite_pairs(48, seed=1):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    unpaired.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": root / "model", "pairs": pairs, "kto": unpaired, "root": root}


def _config(cls: type, setup: dict[str, Path], out: Path, **kw: Any) -> Any:
    steps = kw.pop("steps", 6)
    batch = kw.pop("batch", 2)
    accum = kw.pop("accum", 1)
    lr = kw.pop("lr", 3e-3)
    data_kw = kw.pop("data", {})
    data_kw.setdefault("format", "kto" if cls is KTOConfig else "preference")
    data = DataConfig(
        paths=[str(setup["kto" if cls is KTOConfig else "pairs"])],
        max_length=128,
        cache_dir=str(setup["root"] / "cache"),
        **data_kw,
    )
    return cls(
        model=str(setup["model"]),
        data=data,
        optim=OptimConfig(lr=lr, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0),
        run=RunConfig(
            output_dir=str(out),
            max_steps=steps,
            batch_size=batch,
            grad_accum=accum,
            save_every=0,
            device="cpu",
            tensorboard=False,
            log_every=1,
        ),
        **kw,
    )


def _records(run: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out


# -- DPO ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("dpo") / "run"
    return dpo(_config(DPOConfig, setup, out, steps=8))


def test_dpo_starts_at_log_2_and_learns(dpo_run: TrainResult) -> None:
    """At step 1 the policy is the reference, so every pair's DPO loss is -log sigmoid(0) = log 2."""
    assert dpo_run.output_dir is not None
    records = _records(dpo_run.output_dir)
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[1]["margins"] == pytest.approx(0.0, abs=1e-5)
    assert records[1]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/rejected", "accuracy", "logps/chosen", "logps/rejected", "pairs", "padding_ratio"):
        assert key in records[1], key
    assert records[8]["loss"] < records[1]["loss"] - 0.05
    assert records[8]["margins"] > 0
    assert dpo_run.objective == "dpo"
    assert dpo_run.metrics["accuracy"] is not None
    assert "last step" in dpo_run.summary()
    assert (dpo_run.model_dir / "config.json").is_file()


def test_reference_table_matches_transformers(
    dpo_run: TrainResult, setup: dict[str, Path], tokenizer: Tokenizer
) -> None:
    """The cached reference log-probs equal transformers' log-probs of the same ids (fp32: 1e-4 absolute
    on sums of ~20 token log-probs of ~-6 each, i.e. summation order only)."""
    from transformers import AutoModelForCausalLM

    from lmstack.train.data import build_preference_dataset

    tables = list((setup["root"] / "cache" / "reference").glob("*.npy"))
    assert len(tables) == 1
    table = np.load(tables[0])
    data = DataConfig(
        paths=[str(setup["pairs"])],
        format="preference",
        max_length=128,
        cache_dir=str(setup["root"] / "cache"),
    )
    dataset = build_preference_dataset(data, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(setup["model"], torch_dtype=torch.float32).eval()
    checked = 0
    for k in range(0, dataset.num_units, 7):
        unit = dataset.unit(k)
        for column, sequence in enumerate(unit.sequences):
            ids = torch.tensor(sequence.input_ids, dtype=torch.long)[None]
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            mask = torch.from_numpy(sequence.loss_mask[1:])
            expected = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][mask].sum().item()
            assert table[unit.index, column] == pytest.approx(expected, abs=1e-4), (k, column)
            checked += 1
    assert checked >= 18


def test_score_preferences_before_and_after(
    dpo_run: TrainResult, setup: dict[str, Path], tmp_path: Path
) -> None:
    """score_preferences equals the reference table (itself checked against transformers) for the
    starting model; after DPO, fresh pairs of the same kind are preferred more often than before."""
    from lmstack.train import score_preferences

    data = DataConfig(paths=[str(setup["pairs"])], format="preference", max_length=128)
    before = score_preferences(setup["model"], data)
    table = np.load(next((setup["root"] / "cache" / "reference").glob("*.npy")))
    np.testing.assert_allclose(before.chosen, table[before.index, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(before.rejected, table[before.index, 1], rtol=1e-5, atol=1e-5)
    assert len(before) == 64 and (before.chosen_tokens > 0).all()
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(json.dumps(r) + "\n" for r in polite_pairs(40, seed=9)))
    fresh_data = replace(data, paths=[str(fresh)], pack=False)
    start = score_preferences(setup["model"], fresh_data)
    after = score_preferences(dpo_run.model_dir, fresh_data)
    assert after.accuracy()[0] > start.accuracy()[0]
    accuracy, stderr = after.accuracy(reference=start)
    assert accuracy > 0.5 + 2 * stderr  # DPO's implicit reward ranks fresh pairs well above chance
    with pytest.raises(TrainError, match="other pairs"):
        after.accuracy(reference=before)


def test_reference_cache_is_reused(
    dpo_run: TrainResult, setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run on the same data and model reads the table instead of scoring again."""
    import lmstack.train._reference as reference

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reference pass ran again")

    monkeypatch.setattr(reference, "_compute_table", refuse)
    again = dpo(_config(DPOConfig, setup, tmp_path / "again", steps=3))
    assert dpo_run.output_dir is not None
    first = _records(dpo_run.output_dir)
    for step, record in _records(tmp_path / "again").items():
        assert record["loss"] == pytest.approx(first[step]["loss"], rel=1e-6), step
    assert again.steps == 3


def test_dpo_gradient_accumulation_equals_a_big_batch(setup: dict[str, Path], tmp_path: Path) -> None:
    """4 bins a step == 2 micro-batches of 2 bins: the loss is normalised by the step's pairs."""
    big = dpo(_config(DPOConfig, setup, tmp_path / "big", steps=3, batch=4))
    small = dpo(_config(DPOConfig, setup, tmp_path / "small", steps=3, batch=2, accum=2))
    for a, b in zip(big.losses, small.losses, strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    ra, rb = _records(tmp_path / "big"), _records(tmp_path / "small")
    for step in ra:
        for key in ("rewards/chosen", "margins", "accuracy", "pairs"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-4, abs=1e-6), (step, key)
    a_state = load_pretrained(big.model_dir).state_dict()
    b_state = load_pretrained(small.model_dir).state_dict()
    # Adam moves a weight by about lr (3e-3) whatever its gradient's size, so summation-order noise in a
    # near-zero gradient entry can show at ~1e-6 absolute; 1e-5 is 0.3% of one step.
    for name in a_state:
        torch.testing.assert_close(a_state[name], b_state[name], rtol=1e-4, atol=1e-5, msg=name)


def test_ipo_and_padded_batches(setup: dict[str, Path], tmp_path: Path) -> None:
    """IPO on padded (unpacked) pairs: at step 1 the loss is (0 - 1/(2β))² exactly."""
    cfg = _config(
        DPOConfig,
        setup,
        tmp_path / "ipo",
        steps=2,
        data={"pack": False},
        dpo=DPOSettings(beta=0.5, loss="ipo"),
    )
    result = dpo(cfg)
    assert result.losses[0] == pytest.approx(1.0, abs=1e-5)  # (1 / (2 * 0.5))²
    assert _records(tmp_path / "ipo")[1]["padding_ratio"] > 0.2


def test_lora_with_the_adapters_off_equals_the_precomputed_reference(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """LoRA's B starts at 0, so the base with the adapters off is the starting policy: scoring it live
    each step gives the losses of the precomputed table (fp32, summation order: 1e-5 relative)."""
    live = dpo(
        _config(
            DPOConfig,
            setup,
            tmp_path / "live",
            steps=4,
            adapter="lora",
            dpo=DPOSettings(reference="adapter_off"),
        )
    )
    table = dpo(_config(DPOConfig, setup, tmp_path / "table", steps=4, adapter="lora"))
    assert live.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    for a, b in zip(live.losses, table.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert live.losses[-1] < live.losses[0]
    assert (live.model_dir / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "live" / "reference").exists()


def test_qlora_dpo_scores_the_quantized_base_as_its_reference(setup: dict[str, Path], tmp_path: Path) -> None:
    """QLoRA's reference is the 4-bit base, scored once into the table or live with the adapters off:
    both start at log 2 (the policy is that base at step 1) and give the same losses; the run learns."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    runs = {
        mode: dpo(
            _config(
                DPOConfig, setup, tmp_path / mode, steps=4, adapter="qlora", dpo=DPOSettings(reference=mode)
            )
        )
        for mode in ("precomputed", "adapter_off")
    }
    table, live = runs["precomputed"], runs["adapter_off"]
    assert table.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    for a, b in zip(live.losses, table.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert table.losses[-1] < table.losses[0]
    assert (table.model_dir / "adapter" / "adapter_config.json").is_file()


# -- the other methods ------------------------------------------------------------------------------


def test_orpo_simpo_kto_learn(setup: dict[str, Path], tmp_path: Path) -> None:
    orpo_run = orpo(_config(ORPOConfig, setup, tmp_path / "orpo", steps=6))
    simpo_run = simpo(_config(SimPOConfig, setup, tmp_path / "simpo", steps=6))
    kto_run = kto(_config(KTOConfig, setup, tmp_path / "kto", steps=6))
    for run in (orpo_run, simpo_run, kto_run):
        assert all(math.isfinite(x) for x in run.losses), run.objective
        assert run.losses[-1] < run.losses[0], (run.objective, run.losses)
    assert set(_records(tmp_path / "orpo")[1]) >= {"nll_loss", "log_odds_ratio", "accuracy", "chosen_tokens"}
    k1 = _records(tmp_path / "kto")[1]
    # KTO at step 1: policy == reference and z0 = 0, so each example's loss is w (1 - sigmoid(0)) = 0.5.
    assert k1["loss"] == pytest.approx(0.5, abs=1e-6)
    assert k1["kl"] == pytest.approx(0.0, abs=1e-6)
    assert k1["desirable"] + k1["undesirable"] == k1["samples"]


def test_reward_model_learns_and_scores(setup: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from lmstack.train import RewardScorer

    result = rm(_config(RewardConfig, setup, tmp_path / "rm", steps=12))
    assert result.losses[0] == pytest.approx(math.log(2), abs=0.2)  # a fresh head: rewards near 0
    assert result.losses[-1] < result.losses[0]
    _, info = AutoModelForSequenceClassification.from_pretrained(result.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    scorer = RewardScorer.from_pretrained(result.model_dir)
    rows = polite_pairs(24, seed=5)  # fresh pairs
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert wins >= 20, (wins, chosen[:4], rejected[:4])


def test_reward_model_with_lora(setup: dict[str, Path], tmp_path: Path) -> None:
    """LoRA adapters on the body and a whole new head; final/ is the merged classifier, which scores as
    the adapted model did (fp32 merge: 1e-4)."""
    from transformers import AutoModelForSequenceClassification

    from lmstack.train import RewardScorer, load_reward_model

    result = rm(_config(RewardConfig, setup, tmp_path / "rm", steps=12, adapter="lora"))
    assert result.losses[-1] < result.losses[0]
    _, info = AutoModelForSequenceClassification.from_pretrained(result.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = load_pretrained(setup["model"]).state_dict()
    merged = load_reward_model(result.model_dir).state_dict()
    changed = [n for n in base if n in merged and not torch.equal(base[n], merged[n])]
    assert any("q_proj" in n for n in changed) and not any("norm" in n for n in changed)
    rows = polite_pairs(24, seed=5)
    scorer = RewardScorer.from_pretrained(result.model_dir)
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 18


# -- errors ----------------------------------------------------------------------------------------


def test_clear_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="adapter_off needs adapter"):
        dpo(_config(DPOConfig, setup, tmp_path / "a", dpo=DPOSettings(reference="adapter_off")))
    with pytest.raises(TrainConfigError, match="label_smoothing applies to loss: sigmoid"):
        DPOSettings(loss="hinge", label_smoothing=0.1)
    with pytest.raises(TrainConfigError, match="unpaired rows"):
        dpo(_config(DPOConfig, setup, tmp_path / "b", data={"format": "kto"}))
    with pytest.raises(TrainConfigError, match="preference data"):
        cfg = _config(DPOConfig, setup, tmp_path / "c")
        sft(SFTConfig(model=cfg.model, data=cfg.data, optim=cfg.optim, run=cfg.run))
    with pytest.raises(TrainConfigError, match="merge: true needs adapter"):
        dpo(_config(DPOConfig, setup, tmp_path / "d", merge=True))


# -- exact resume after SIGKILL, through the CLI --------------------------------------------------


def _cli(setup: dict[str, Path], out: Path) -> list[str]:
    return [
        "train", "dpo", "--model", str(setup["model"]), "--data.paths", str(setup["pairs"]),
        "--data.max_length", "128", "--data.cache_dir", str(out.parent / "cache"),
        "--run.output_dir", str(out),
        "--run.max_steps", "10", "--run.save_every", "3", "--run.batch_size", "2", "--run.device", "cpu",
        "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--dpo.beta", "0.2",
    ]  # fmt: skip


def test_sigkill_and_resume_reproduces_the_dpo_curve(
    setup: dict[str, Path], tmp_path: Path, stop_after_script: str
) -> None:
    lmstack = str(Path(sys.executable).with_name("lmstack"))
    whole = subprocess.run([lmstack, *_cli(setup, tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "Training finished" in whole.stdout and "rewards/chosen" in whole.stdout
    reference = {s: r["loss"] for s, r in _records(tmp_path / "whole").items()}
    assert sorted(reference) == list(range(1, 11))

    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", stop_after_script, "7", *_cli(setup, run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), proc.stderr.read()[-2000:] if proc.stderr else status
    proc.kill()  # SIGKILL: no cleanup, no final save
    proc.wait()
    assert not (run / "final").exists()
    resumed = subprocess.run([lmstack, *_cli(setup, run)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 6" in resumed.stdout
    got = {s: r["loss"] for s, r in _records(run).items()}
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    a = load_pretrained(tmp_path / "whole" / "final").state_dict()
    b = load_pretrained(run / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_dpo_matches_one_process(setup: dict[str, Path], tmp_path: Path, mode: str) -> None:
    """torchrun 2 x 1 bin == 1 x 2 bins, replicated (DDP) or sharded (FSDP2): the reference pass is
    split over the ranks (each scores half the bins, the table is summed; under FSDP every rank runs
    the same number of forwards), and the loss is normalised by the pairs of both ranks."""
    lmstack = str(Path(sys.executable).with_name("lmstack"))

    def cmd(out: Path, batch: int) -> list[str]:
        args = _cli(setup, out)
        args[args.index("--run.max_steps") + 1] = "4"
        args[args.index("--run.batch_size") + 1] = str(batch)
        args[args.index("--data.cache_dir") + 1] = str(out / "cache")  # each run computes its own table
        return args

    single = subprocess.run([lmstack, *cmd(tmp_path / "one", 2)], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "lmstack.core", *cmd(tmp_path / "two", 1), "--run.data_parallel", mode],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_table = np.load(next((tmp_path / "one" / "cache" / "reference").glob("*.npy")))
    two_table = np.load(next((tmp_path / "two" / "cache" / "reference").glob("*.npy")))
    np.testing.assert_allclose(two_table, one_table, rtol=1e-5, atol=1e-5)
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "margins", "accuracy"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert b[step]["pairs"] == a[step]["pairs"]
