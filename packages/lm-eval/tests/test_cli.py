"""``lmstack eval`` on the command line: a run, shards and ``merge``, ``rescore``, ``compare``, bad input."""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.core._cli import main


def test_eval_shards_merge_rescore(
    model_dir: Path, task_files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    tasks = f"{task_files['mc']},{task_files['rolling']}"
    out = tmp_path / "run"
    common = ["eval", "--model", str(model_dir), "--tasks", tasks, "--output", str(out), "--limit", "6"]
    assert main([*common, "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| toy_mc | acc |" in printed and "results in" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"]["name"] == "tiny-llama" and doc["config"]["limit"] == 6
    assert doc["tasks"]["toy_mc"]["num_docs"] == 6 and doc["cache"]["hits"] == 0

    shards = tmp_path / "shards"
    shard_cmd = ["eval", "--model", str(model_dir), "--tasks", tasks, "--output", str(shards), "--limit", "6"]
    for i in range(2):
        assert main([*shard_cmd, "--shard", f"{i}/2"]) == 0
    assert "shard 1/2:" in capsys.readouterr().out
    merged = tmp_path / "merged.sqlite"
    caches = [str(p) for p in sorted(shards.glob("cache.shard*.sqlite"))]
    assert main(["eval", "merge", *caches, "--into", str(merged)]) == 0
    assert "answers added" in capsys.readouterr().out
    assert main([*shard_cmd, "--cache", str(merged)]) == 0
    final = json.loads((shards / "results.json").read_text())
    assert final["cache"]["misses"] == 0
    assert final["tasks"]["toy_mc"]["metrics"] == doc["tasks"]["toy_mc"]["metrics"]

    again = tmp_path / "again"
    rescore = [
        "eval",
        "rescore",
        "--cache",
        str(merged),
        "--tasks",
        tasks,
        "--limit",
        "6",
        "--output",
        str(again),
    ]
    assert main(rescore) == 0
    rescored = json.loads((again / "results.json").read_text())
    assert rescored["tasks"]["toy_ppl"]["metrics"] == doc["tasks"]["toy_ppl"]["metrics"]


def test_compare_runs(model_dir: Path, task_files: dict[str, Path], tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        run = ["eval", "--model", str(model_dir), "--tasks", str(task_files["mc"]), "--limit", "4"]
        assert main([*run, "--output", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "toy_mc" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(
    model_dir: Path, task_files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--tasks", "no_such_task", "--output", str(out)]) == 2
    assert "no_such_task" in capsys.readouterr().err
    assert main(["eval", "--tasks", str(task_files["mc"])]) == 2
    assert "needs --model and --tasks" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", str(task_files["mc"]), "--shard", "2/2"]) == 2
    assert "shard" in capsys.readouterr().err
    assert main(["eval", "merge", str(tmp_path / "nope.sqlite"), "--into", str(tmp_path / "m.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.sqlite").exists()
