"""The runner: deduplication, batch-size invariance, the cache (hits, misses, rescoring), shards and merge."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from lmstack.eval import EvalResult, evaluate, rescore
from lmstack.eval.runner import AnswerCache, CacheError, Shard, build_calls, merge_caches, parse_shard
from lmstack.eval.tasks import load_task
from lmstack.infer import LLM


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    model = LLM(model_dir)
    yield model
    model.close()


def _values(result: EvalResult) -> dict[str, dict[str, float]]:
    return {name: {m: v.value for m, v in task.metrics.items()} for name, task in result.tasks.items()}


def _per_sample(result: EvalResult, task: str) -> list[list[float]]:
    return [s["loglikelihoods"] for s in result.tasks[task].samples]


def test_scores_identical_at_batch_sizes_1_7_32(llm: LLM, task_files: dict[str, Path]) -> None:
    tasks = [str(p) for p in task_files.values()]
    runs = [evaluate(llm, tasks, batch_size=bs, use_tqdm=False) for bs in (1, 7, 32)]
    first = runs[0]
    assert set(first.tasks) == {"toy_mc", "toy_gen", "toy_ppl"}
    assert 0 < first.score("toy_mc", "acc") < 1  # not all ties: the model prefers some choices
    for run in runs[1:]:
        assert _values(run) == _values(first)
        for a, b in zip(_per_sample(run, "toy_mc"), _per_sample(first, "toy_mc"), strict=True):
            assert a == pytest.approx(b, abs=1e-5)
        gen = [s["answers"] for s in run.tasks["toy_gen"].samples]
        assert gen == [s["answers"] for s in first.tasks["toy_gen"].samples]


def test_requests_are_deduplicated(tmp_path: Path, task_files: dict[str, Path]) -> None:
    task = load_task(task_files["mc"])
    requests = task.build_requests() * 2  # every request twice
    keys, calls = build_calls(requests)
    assert len(keys) == len(requests) and len(calls) == len(requests) // 2


def test_cache_resume_rescore_and_outputs(llm: LLM, tmp_path: Path, task_files: dict[str, Path]) -> None:
    out = tmp_path / "run"
    tasks = [str(task_files["mc"]), str(task_files["rolling"])]
    first = evaluate(llm, tasks, output_dir=out, batch_size=5, use_tqdm=False)
    total = first.cache.misses
    assert first.cache.hits == 0 and total == 24 * 4 + 10
    again = evaluate(llm, tasks, output_dir=out, use_tqdm=False)
    assert (again.cache.hits, again.cache.misses) == (total, 0)
    assert _values(again) == _values(first)
    # Rescoring reads the cache alone.
    scored = rescore(tasks, out / "cache.sqlite", output_dir=tmp_path / "rescored")
    assert _values(scored) == _values(first) and scored.model == first.model
    # The outputs.
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"] == {"name": "LLM", "fingerprint": first.model.fingerprint, "kind": "local"}
    assert doc["cache"] == {"hits": total, "misses": 0}
    mc = doc["tasks"]["toy_mc"]
    assert mc["num_docs"] == 24 and mc["output_type"] == "multiple_choice" and mc["num_fewshot"] == 0
    assert mc["prompt_hash"] == load_task(task_files["mc"]).prompt_hash()
    assert set(mc["metrics"]["acc"]) == {"value", "stderr", "n", "higher_is_better"}
    assert mc["metrics"]["acc"]["value"] == first.score("toy_mc", "acc")
    assert doc["tasks"]["toy_ppl"]["metrics"]["word_perplexity"]["higher_is_better"] is False
    samples = [json.loads(line) for line in (out / "samples" / "toy_mc.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and samples[3]["doc_id"] == 3
    assert samples[3]["metrics"]["acc"] in (0.0, 1.0) and len(samples[3]["loglikelihoods"]) == 4
    assert "| toy_mc | acc |" in (out / "results.md").read_text()


def test_model_path_fingerprint_is_content(
    model_dir: Path, tmp_path: Path, task_files: dict[str, Path]
) -> None:
    import shutil

    from lmstack.eval.runner import fingerprint_dir

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert fingerprint_dir(copy) == fingerprint_dir(model_dir)  # a copy shares the cache
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight bit: same size, same header
    weights.write_bytes(bytes(data))
    assert fingerprint_dir(copy) != fingerprint_dir(model_dir)


def test_shards_merge_and_final_run_computes_nothing(
    llm: LLM, tmp_path: Path, task_files: dict[str, Path]
) -> None:
    tasks = [str(p) for p in task_files.values()]
    out = tmp_path / "run"
    counts = []
    for i in range(3):
        shard = evaluate(llm, tasks, output_dir=out, shard=f"{i}/3", use_tqdm=False)
        assert shard.tasks == {} and not (out / "results.json").exists()
        counts.append(shard.cache.misses)
    assert all(counts) and sum(counts) == shard.config["num_calls"]
    caches = sorted(out.glob("cache.shard*of3.sqlite"))
    assert len(caches) == 3
    merged = tmp_path / "merged.sqlite"
    assert merge_caches(caches, merged) == sum(counts)
    final = evaluate(llm, tasks, output_dir=out, cache=merged, use_tqdm=False)
    assert final.cache.misses == 0 and final.cache.hits == sum(counts)
    assert _values(final) == _values(evaluate(llm, tasks, use_tqdm=False))


def test_merge_refuses_conflicting_answers(tmp_path: Path) -> None:
    a, b, into = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "into.sqlite"
    with AnswerCache(a) as cache:
        cache.put(
            "fp", [("k1", {"r": 1}, {"loglikelihood": -1.0}), ("k2", {"r": 2}, {"loglikelihood": -2.0})]
        )
    with AnswerCache(b) as cache:
        cache.put("fp", [("k1", {"r": 1}, {"loglikelihood": -1.5})])
    with pytest.raises(CacheError, match="different answers for request k1"):
        merge_caches([a, b], into)
    assert not into.exists()  # nothing half-written
    with pytest.raises(CacheError, match="does not exist"):
        merge_caches([a, tmp_path / "missing.sqlite"], into)
    assert merge_caches([a, a], into) == 2  # the same answer twice is fine


def test_shard_split_is_a_partition() -> None:
    keys = [f"{i:064x}" for i in range(0, 10**6, 7919)]
    shards = [Shard(i, 4).select(keys) for i in range(4)]
    assert sorted(k for s in shards for k in s) == sorted(keys)
    assert parse_shard("1/4") == Shard(1, 4)
    for bad in ("4/4", "1-4", "-1/4"):
        with pytest.raises(Exception, match="shard"):
            parse_shard(bad)


def test_cache_is_sqlite_wal(tmp_path: Path) -> None:
    AnswerCache(tmp_path / "c.sqlite").close()
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_new_answers_version_recomputes(
    llm: LLM, tmp_path: Path, task_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answers cached before lmstack changed how it computes them are never served again.
    from lmstack.eval.runner import _calls

    out = tmp_path / "run"
    first = evaluate(llm, str(task_files["mc"]), output_dir=out, use_tqdm=False)
    monkeypatch.setattr(_calls, "ANSWERS_VERSION", _calls.ANSWERS_VERSION + 1)
    bumped = evaluate(llm, str(task_files["mc"]), output_dir=out, use_tqdm=False)
    assert (bumped.cache.hits, bumped.cache.misses) == (0, first.cache.misses)
    assert _values(bumped) == _values(first)
