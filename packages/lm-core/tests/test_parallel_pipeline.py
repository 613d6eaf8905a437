"""Pipeline parallelism (lmstack.core.parallel._pipeline) against the single-process model.

The distributed cases run under torchrun on CPU (gloo), one launch per world size
(``parallel_cases/pipeline_cases.py``); each rank saves its loss, the gradients of the parameters its
stages own, those parameters after an AdamW step, and the next step's loss and gradients. The
reference is the whole model on the whole batch in this process, with the reference attention
(one causal SDPA per packed sample) and a plain cross-entropy over every shifted position.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmstack.core import ConfigError, LMStackError, PackedAttention
from lmstack.core.parallel._pipeline import (
    PipelineStageModule,
    loss_rows,
    pipeline_lm_loss,
    stage_layer_ranges,
    stages_of_rank,
)

HERE = Path(__file__).parent
CASES_DIR = HERE / "parallel_cases"
sys.path.insert(0, str(HERE))
from _torchrun import torchrun  # noqa: E402


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, CASES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pc = _load("pipeline_common")
cases = _load("pipeline_cases")

# The stages each rank holds and their decoder layers (7 layers; rank r holds stages r, r + pp, ...).
EXPECTED_LAYOUT = {
    "pp2_1f1b": [([0], [[0, 1, 2, 3]]), ([1], [[4, 5, 6]])],
    "pp2_interleaved": [([0, 2], [[0, 1], [4, 5]]), ([1, 3], [[2, 3], [6]])],
    "pp1": [([0], [list(range(7))])] * 2,  # two pipelines of one stage each
    "pp4_gpipe": [([0], [[0]]), ([1], [[1, 2, 3]]), ([2], [[4, 5]]), ([3], [[6]])],
    "pp4_1f1b": [([0], [[0, 1]]), ([1], [[2, 3]]), ([2], [[4, 5]]), ([3], [[6]])],
}
WORLD_OF = {name: world for world, named in cases.CASES.items() for name in named}


# ------------------------------------------------------------------------------------------------
# the single-process reference
# ------------------------------------------------------------------------------------------------


def _reference_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's loss tokens, every position's logits computed."""
    pos = batch["positions"]
    logits = model(batch["input_ids"], pos, PackedAttention.from_positions(pos, impl="sdpa"))
    target = batch["labels"][:, 1:]
    summed = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return summed / (target != -100).sum()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    model = pc.build_model()
    opt = pc.optimizer(model.parameters())
    out: dict[str, Any] = {}
    loss = _reference_loss(model, pc.packed_batch(**pc.BATCH_1))
    loss.backward()
    out["loss1"] = loss.detach()
    out["grads1"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["params1"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _reference_loss(model, pc.packed_batch(**pc.BATCH_2))
    loss.backward()
    out["loss2"] = loss.detach()
    out["grads2"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``runs(world)`` -> the directory of that world size's results (one torchrun launch each)."""
    done: dict[int, Path] = {}

    def get(world: int) -> Path:
        if world not in done:
            out = tmp_path_factory.mktemp(f"pipeline{world}")
            torchrun(CASES_DIR / "pipeline_cases.py", world, str(out), timeout=300)
            done[world] = out
        return done[world]

    return get


# ------------------------------------------------------------------------------------------------
# distributed: loss and every gradient equal the whole model's
# ------------------------------------------------------------------------------------------------


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str) -> None:
    """Equal up to ``rel`` of the tensor's largest magnitude (fp32 rounding of a reordered sum)."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", list(EXPECTED_LAYOUT))
def test_pipeline_step_equals_single_process(case: str, runs: Any, reference: dict[str, Any]) -> None:
    world = WORLD_OF[case]
    ranks = [torch.load(runs(world) / f"{case}.{r}.pt") for r in range(world)]
    assert [(r["stages"], r["layers"]) for r in ranks] == EXPECTED_LAYOUT[case]
    # Every parameter of the model is owned by exactly one rank of a pipeline, under its own name.
    pp = len({s for r in ranks for s in r["stages"]}) // len(ranks[0]["stages"])
    owned = [name for r in ranks[:pp] for name in r["names"]]
    assert sorted(owned) == sorted(reference["grads1"])
    for r in ranks:
        # The loss is the whole batch's (broadcast from the last stage to every rank). The same sums
        # as the reference in another order and microbatch shapes: fp32 rounding only.
        torch.testing.assert_close(r["loss1"], reference["loss1"], rtol=2e-6, atol=0)
        assert set(r["grads1"]) == set(r["names"])  # every owned parameter received a gradient
        for name, grad in r["grads1"].items():
            # Microbatch gradients add up to the whole batch's: a reordered fp32 sum, ~1e-6 of the largest.
            _close(grad, reference["grads1"][name], 1e-5, name)
        for name, value in r["params1"].items():
            # Adam moves each weight by about lr * g / (|g| + eps): a gradient's fp32 rounding (~2e-9 at
            # worst here) over |g| + eps >= 1e-5 changes a weight by ~lr * 2e-4 = 2e-6; 1e-5 leaves room.
            torch.testing.assert_close(value, reference["params1"][name], rtol=0, atol=1e-5, msg=name)
        # The next step (a new batch length, so a rebuilt schedule) from those weights.
        torch.testing.assert_close(r["loss2"], reference["loss2"], rtol=1e-5, atol=0)
        for name, grad in r["grads2"].items():
            _close(grad, reference["grads2"][name], 1e-4, name)  # weights already 1e-5 apart


def test_pipeline_refusals(runs: Any) -> None:
    found = torch.load(runs(2) / "errors.0.pt")
    assert found["tied"].startswith("ConfigError") and "tie_word_embeddings" in found["tied"]
    assert found["split"].startswith("ConfigError") and "[3, 3]" in found["split"]
    assert found["too_many"].startswith("ConfigError") and "8 stages" in found["too_many"]
    assert found["gpipe_multi"].startswith("ConfigError") and "interleaved" in found["gpipe_multi"]
    assert found["few_micro"].startswith("ConfigError") and "n_microbatches >= pp" in found["few_micro"]
    assert found["rows"].startswith("ConfigError") and "6 rows into 4" in found["rows"]


# ------------------------------------------------------------------------------------------------
# single process: the split itself
# ------------------------------------------------------------------------------------------------


def test_stage_layer_ranges() -> None:
    assert stage_layer_ranges(7, 2) == [range(0, 4), range(4, 7)]
    assert stage_layer_ranges(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]
    assert stage_layer_ranges(5, 5) == [range(i, i + 1) for i in range(5)]
    assert stage_layer_ranges(7, 3, [1, 5, 1]) == [range(0, 1), range(1, 6), range(6, 7)]
    for bad in ([2, 2, 2], [0, 4, 3], [4, 3]):
        with pytest.raises(ConfigError):
            stage_layer_ranges(7, 3, bad)
    with pytest.raises(ConfigError, match="only 2 decoder layers"):
        stage_layer_ranges(2, 3)
    assert stages_of_rank(1, 4, 3) == [1, 5, 9]


def _all_stages(model: Any, split: list[int] | None = None, n: int = 3) -> list[PipelineStageModule]:
    ranges = stage_layer_ranges(len(model.model.layers), n, split)
    return [PipelineStageModule(model, s, ranges) for s in range(n)]


def test_stages_keep_the_model_names_and_share_its_parameters() -> None:
    model = pc.build_model()
    stages = _all_stages(model, [2, 1, 4])
    whole = dict(model.named_parameters())
    seen: set[str] = set()
    for stage in stages:
        names = set(stage.state_dict())
        assert not names & seen  # no parameter on two stages
        seen |= names
        for name, p in stage.named_parameters():
            assert p is whole[name]  # shared, not copied
    assert seen == set(model.state_dict())
    first, middle, last = stages
    assert "model.embed_tokens.weight" in first.state_dict() and "lm_head.weight" not in first.state_dict()
    assert {n.split(".")[2] for n in middle.state_dict()} == {"2"}
    assert "model.norm.weight" in last.state_dict() and "model.embed_tokens.weight" not in last.state_dict()
    assert [layer.self_attn.layer_idx for layer in last.decoder_layers()] == [3, 4, 5, 6]
    with pytest.raises(LMStackError, match="layer 0 belongs to another"):
        last.model.layers[0](torch.zeros(1, 2, 48))


def test_refuses_tied_embeddings_across_stages() -> None:
    model = pc.build_model(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        _all_stages(model)
    (single,) = _all_stages(model, n=1)  # one stage holds both ends: nothing to share across ranks
    assert single.lm_head is model.lm_head


@pytest.mark.parametrize(("masked", "checkpointing"), [(0.0, False), (0.75, True)])
def test_chained_stages_equal_the_model(
    masked: float, checkpointing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = pc.build_model()
    batch = pc.packed_batch(rows=4, tokens=37, seed=11, masked=masked)
    ids, pos, labels = batch["input_ids"], batch["positions"], batch["labels"]
    stages = _all_stages(model, [3, 2, 2])
    for stage in stages:
        stage.enable_activation_checkpointing(checkpointing)
    calls = {"rows": 0}
    attend_rows = PackedAttention.attend_rows

    def counted(self: PackedAttention, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["rows"] += 1
        return attend_rows(self, *args, **kwargs)

    monkeypatch.setattr(PackedAttention, "attend_rows", counted)

    def chain(with_labels: bool) -> torch.Tensor:
        h = ids
        for stage in stages:
            h = stage(h, positions=pos, labels=labels if with_labels else None)
        return h

    # Without labels the last stage gives every position's logits; with them the loss rows' only.
    full = model(ids, pos, PackedAttention.from_positions(pos, impl="sdpa"))
    with torch.no_grad():
        # The same layers in the same order; the backends differ (varlen kernel vs per-sample SDPA).
        torch.testing.assert_close(chain(False), full.detach(), rtol=1e-5, atol=1e-5)
    rows = loss_rows(labels)
    assert rows.numel() == int((labels[:, 1:] != -100).sum())
    n = float(rows.numel())
    loss = pipeline_lm_loss(chain(True), labels, num_loss_tokens=n)
    loss.backward()
    # Few loss tokens: the last layer ran on the loss rows alone (again in backward when
    # checkpointed); more than half the tokens: on every token.
    assert 2 * rows.numel() > ids.numel() if masked == 0 else 2 * rows.numel() < ids.numel()
    assert calls["rows"] == (0 if masked == 0 else 2 if checkpointing else 1)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    expected = _reference_loss(model, batch)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        assert p.grad is not None
        _close(grads[name], p.grad, 1e-5, name)


def test_loss_of_rows_and_of_every_position_agree() -> None:
    torch.manual_seed(0)
    labels = pc.packed_batch(rows=3, tokens=11, seed=5)["labels"]
    logits = torch.randn(3, 11, 97, requires_grad=True)
    rows = loss_rows(labels)
    picked = logits.reshape(-1, 97)[rows]
    a = pipeline_lm_loss(logits, labels, num_loss_tokens=7.0)
    b = pipeline_lm_loss(picked, labels, num_loss_tokens=7.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    # A microbatch without a loss row contributes zero, and a gradient of zeros.
    empty = pipeline_lm_loss(logits[2:].reshape(-1, 97)[:0], labels[2:], num_loss_tokens=7.0)
    assert float(empty.detach()) == 0.0
    (empty + a).backward()
    assert logits.grad is not None and float(logits.grad[2].abs().sum()) == 0.0
