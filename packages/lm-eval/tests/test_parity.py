"""Parity with lm-evaluation-harness: the same model, data and task YAML through ``lm_eval`` (``--model hf``)
and through :func:`lmstack.eval.evaluate` on lmstack's own engine.

Multiple choice: acc and acc_norm within 0.1 points and per-sample log-likelihoods equal to 1e-4;
generation: identical exact match (and identical replies); rolling log-likelihood: word perplexity
equal to 1e-4 relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval
import pytest
import transformers  # noqa: F401  (the test extra installs it)
from lm_eval.tasks import TaskManager

from lmstack.eval import evaluate
from lmstack.infer import LLM


def _absolute(task_files: dict[str, Path]) -> None:
    # lm-eval resolves data_files against the working directory, lmstack against the YAML's: make them
    # absolute so both read the same files wherever the test runs.
    for path in task_files.values():
        text = path.read_text()
        for name in ("mc.jsonl", "gen.jsonl", "text.jsonl"):
            text = text.replace(f"{{test: {name}}}", f"{{test: {path.parent / name}}}")
        path.write_text(text)


def _lm_eval(model_dir: Path, task_files: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["toy_mc", "toy_gen", "toy_ppl"],
        task_manager=manager,
        batch_size=4,
        device="cpu",
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=1234,
    )


def test_parity_with_lm_evaluation_harness(
    model_dir: Path, task_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    _absolute(task_files)
    reference = _lm_eval(model_dir, task_files, tmp_path)
    llm = LLM(model_dir, dtype="float32")
    try:
        ours = evaluate(llm, [str(p) for p in task_files.values()], use_tqdm=False)
    finally:
        llm.close()
    want = reference["results"]

    # Multiple choice: the per-sample log-likelihoods, then acc and acc_norm.
    theirs = sorted(reference["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    assert len(theirs) == len(ours.tasks["toy_mc"].samples) == 24
    for sample, mine in zip(theirs, ours.tasks["toy_mc"].samples, strict=True):
        assert sample["doc_id"] == mine["doc_id"]
        lls = [float(resp[0][0]) for resp in sample["resps"]]
        assert mine["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    for metric in ("acc", "acc_norm"):
        assert ours.score("toy_mc", metric) == pytest.approx(want["toy_mc"][f"{metric},none"], abs=1e-3)
    assert 0 < ours.score("toy_mc", "acc") < 1  # the model's choices are not all ties

    # Generation: the same replies, so the same exact match.
    theirs = sorted(reference["samples"]["toy_gen"], key=lambda s: s["doc_id"])
    replies = [s["filtered_resps"][0] for s in theirs]
    assert [s["answers"][0]["texts"][0] for s in ours.tasks["toy_gen"].samples] == replies
    assert ours.score("toy_gen", "exact_match") == want["toy_gen"]["exact_match,none"]

    # Rolling log-likelihood.
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours.score("toy_ppl", metric) == pytest.approx(want["toy_ppl"][f"{metric},none"], rel=1e-4)
