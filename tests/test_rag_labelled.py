"""The labelled retrieval and rejection sets of examples/rag/: labelled.py and its hand-written data.

Both modules are imported by path, as tests/test_world.py does: neither is a library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "world"))
sys.path.insert(0, str(ROOT / "examples" / "rag"))
import labelled  # noqa: E402
import world  # noqa: E402

Set = dict[str, list[dict[str, Any]]]
WORD = re.compile(r"[a-z]+")
# Words that would make a message about this project (or its docs) rather than off-topic chat.
PROJECT_WORDS = {
    "lmstack", "nox", "quickstart", "huixiangdou", "internlm", "internlm2", "vllm", "faiss", "bm25",
    "lora", "qlora", "fsdp", "safetensors", "tokenizer", "checkpoint", "checkpoints", "rag",
    "sandbox", "lmdeploy", "opencompass", "lagent", "xtuner", "mmlu",
}  # fmt: skip


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _name_words(w: world.World) -> set[str]:
    return {part.lower() for e in w.entities for part in e.name.split()}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world-quickstart")
    world.generate(out, seed=0, **dataclasses.asdict(world.PRESETS["quickstart"]))
    return out


@pytest.fixture(scope="module")
def articles(world_dir: Path) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in world.read_jsonl(world_dir / "articles.jsonl")}


@pytest.fixture(scope="module")
def world_set(world_dir: Path) -> Set:
    return labelled.world_questions(world_dir, seed=0)


@pytest.fixture(scope="module")
def project_set() -> Set:
    return labelled.project_questions(ROOT)


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        kinds.setdefault(row["kind"], []).append(row)
    return kinds


# ---------------------------------------------------------------------------------------------
# Determinism and splits
# ---------------------------------------------------------------------------------------------


def test_world_set_is_deterministic(world_dir: Path, world_set: Set) -> None:
    assert labelled.world_questions(world_dir, seed=0) == world_set
    other = labelled.world_questions(world_dir, seed=1)
    assert other["related_test"] != world_set["related_test"]  # the seed moves the split and the choices
    ids = sorted(r["id"] for side in world_set.values() for r in side)
    assert sorted(r["id"] for side in other.values() for r in side) == ids


def test_cli_writes_the_same_bytes_twice(world_dir: Path, tmp_path: Path) -> None:
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert labelled.main(["--world", str(world_dir), "--out", str(out)]) == 0
        outputs.append(
            {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        )
    assert outputs[0] == outputs[1]
    files = set(outputs[0])
    for group in ("world", "project"):
        for split in labelled.SPLITS:
            assert {f"{group}/{split}.jsonl", f"{group}/{split}.txt"} <= files
    assert sum(f.startswith("world_docs/") for f in files) == 40


@pytest.mark.parametrize("which", ["world", "project"])
def test_splits_are_disjoint_halves_covering_every_row(which: str, world_set: Set, project_set: Set) -> None:
    splits = world_set if which == "world" else project_set
    assert sorted(splits) == sorted(labelled.SPLITS)
    for side in ("related", "unrelated"):
        calibrate, test = splits[f"{side}_calibrate"], splits[f"{side}_test"]
        ids = [r["id"] for r in calibrate + test]
        assert len(ids) == len(set(ids))
        for kind, rows in _by_kind(calibrate + test).items():
            in_calibrate = sum(r["kind"] == kind for r in calibrate)
            assert in_calibrate == len(rows) // 2, kind
    unrelated = splits["unrelated_calibrate"] + splits["unrelated_test"]
    lines = [line for line in (labelled.UNRELATED).read_text(encoding="utf-8").splitlines() if line.strip()]
    assert sorted(r["question"] for r in unrelated if r["kind"] == "offtopic") == sorted(lines)
    if which == "project":
        expected = [json.loads(line)["id"] for line in labelled.PROJECT_QUESTIONS.read_text().splitlines()]
        assert sorted(r["id"] for r in splits["related_calibrate"] + splits["related_test"]) == sorted(
            expected
        )


def test_offtopic_halves_are_the_same_in_both_sets(world_set: Set, project_set: Set) -> None:
    for split in ("unrelated_calibrate", "unrelated_test"):
        world_ids = [r["id"] for r in world_set[split] if r["kind"] == "offtopic"]
        assert world_ids == [r["id"] for r in project_set[split]]


def test_world_set_has_every_kind_counted_from_the_files(world_dir: Path, world_set: Set) -> None:
    related = _by_kind(world_set["related_calibrate"] + world_set["related_test"])
    unrelated = _by_kind(world_set["unrelated_calibrate"] + world_set["unrelated_test"])
    heldout = [r for r in world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]
    kinds = [a["kind"] for a in world.read_jsonl(world_dir / "articles.jsonl")]
    assert len(related["heldout"]) == len(heldout) == 55
    assert len(related["two_hop"]) == sum(k != "city" for k in kinds) == 30
    assert len(related["paraphrase"]) == len(kinds)  # every entity has asked facts in this world
    assert 0.75 * len(kinds) <= len(related["describe"]) <= len(kinds)
    assert len(unrelated["unknown_entity"]) == 100
    assert {r["kind"] for r in world_set["related_test"]} == {"heldout", "paraphrase", "describe", "two_hop"}


# ---------------------------------------------------------------------------------------------
# Relevance is right
# ---------------------------------------------------------------------------------------------


def test_relevant_articles_exist_and_state_the_answer(
    world_set: Set, articles: dict[str, dict[str, Any]], world_dir: Path, tmp_path: Path
) -> None:
    paths = labelled.write_world_documents(world_dir, tmp_path / labelled.WORLD_DOCS)
    written = {p.relative_to(tmp_path).as_posix() for p in paths}
    for row in world_set["related_calibrate"] + world_set["related_test"]:
        assert row["relevant"] and all(r in articles for r in row["relevant"]), row
        assert set(row["sources"]) <= written
        assert row["sources"] == [f"world_docs/{r}.md" for r in row["relevant"]]
        texts = [articles[r]["text"] for r in row["relevant"]]
        if row["kind"] in ("heldout", "paraphrase"):
            assert world.mentions(texts[0], row["answer"]), row
        elif row["kind"] == "two_hop":
            first, second = row["relevant"]
            assert articles[first]["title"] in row["question"]
            assert world.mentions(texts[0], articles[second]["title"])  # the hop: the first names the second
            assert world.mentions(texts[1], row["answer"])
        else:
            assert row["kind"] == "describe" and row["answer"] == articles[row["relevant"][0]]["title"]


def test_describe_questions_fit_exactly_one_entity(
    world_set: Set, articles: dict[str, dict[str, Any]]
) -> None:
    rows = [r for r in world_set["related_calibrate"] + world_set["related_test"] if r["kind"] == "describe"]
    assert rows
    for row in rows:
        target = articles[row["relevant"][0]]
        assert target["title"] not in row["question"]
        named = {f["value"] for f in target["facts"] if world.mentions(row["question"], f["value"])}
        assert named, row
        fits = [
            a["id"]
            for a in articles.values()
            if a["kind"] == target["kind"] and named <= {f["value"] for f in a["facts"]}
        ]
        assert fits == [target["id"]], row


def test_unknown_entities_are_not_in_the_world(world_set: Set, articles: dict[str, dict[str, Any]]) -> None:
    the_world = world.build_world(0, 40)
    words = _name_words(the_world)
    prefixes = {w[:4] for w in words}
    text = " ".join(a["text"] + " " + a["title"] for a in articles.values()).lower()
    rows = [
        r
        for r in world_set["unrelated_calibrate"] + world_set["unrelated_test"]
        if r["kind"] == "unknown_entity"
    ]
    templates = [
        world.template_pattern(t) for s in world.ATTRIBUTES for t in (*s.questions, *s.heldout_questions)
    ]
    assert len({r["name"] for r in rows}) == len(rows)
    for row in rows:
        assert row["name"] in row["question"]
        assert any(p.fullmatch(row["question"]) for p in templates), row  # the world's own wording
        for word in row["name"].lower().split():
            assert word not in words and word[:4] not in prefixes and word not in text, row


def test_world_documents_are_written_once_and_stale_ones_removed(
    world_dir: Path, articles: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "docs"
    out.mkdir()
    (out / "stale-entity.md").write_text("# Stale\n")
    (out / "notes.txt").write_text("kept: not a document of ours\n")
    paths = labelled.write_world_documents(world_dir, out)
    assert [p.stem for p in paths] == list(articles)
    for path in paths:
        article = articles[path.stem]
        assert path.read_text(encoding="utf-8") == f"# {article['title']}\n\n{article['text']}\n"
    assert not (out / "stale-entity.md").exists() and (out / "notes.txt").exists()
    os.utime(paths[0], (1_000_000, 1_000_000))
    labelled.write_world_documents(world_dir, out)
    assert paths[0].stat().st_mtime == 1_000_000  # unchanged content is not rewritten


def test_a_world_that_does_not_match_its_manifest_is_refused(world_dir: Path, tmp_path: Path) -> None:
    for name in ("articles.jsonl", "heldout.jsonl", "chats.jsonl"):
        (tmp_path / name).write_bytes((world_dir / name).read_bytes())
    manifest = json.loads((world_dir / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "seed": 1}))
    with pytest.raises(ValueError, match="does not match"):
        labelled.world_questions(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest"):
        labelled.world_questions(tmp_path)


# ---------------------------------------------------------------------------------------------
# The hand-written files
# ---------------------------------------------------------------------------------------------


def test_unrelated_lines_are_unique_and_about_nothing_indexed() -> None:
    lines = labelled.UNRELATED.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() == line and line for line in lines)
    assert len(lines) == len(set(lines)) and 350 <= len(lines) <= 450
    chinese = [line for line in lines if re.search(r"[\u4e00-\u9fff]", line)]
    assert 0.12 <= len(chinese) / len(lines) <= 0.2
    names = _name_words(world.build_world(0, 40)) | _name_words(world.build_world(0, 300))
    for line in lines:
        words = set(WORD.findall(line.lower()))
        assert not words & names, line
        assert not words & PROJECT_WORDS, line


def test_world_questions_drop_offtopic_lines_that_name_the_world(
    world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = world.build_world(0, 40).entities[0].name
    unrelated = tmp_path / "unrelated.txt"
    unrelated.write_text(f"hello\nhas anyone been to {name}?\n", encoding="utf-8")
    rows = labelled.read_unrelated(unrelated)
    assert [r["id"] for r in rows] == ["offtopic-0001", "offtopic-0002"]
    monkeypatch.setattr(labelled, "UNRELATED", unrelated)
    result = labelled.world_questions(world_dir)
    kept = [r["question"] for side in result.values() for r in side if r["kind"] == "offtopic"]
    assert kept == ["hello"]


def test_project_questions_are_answered_by_their_docs(project_set: Set) -> None:
    rows = [json.loads(line) for line in labelled.PROJECT_QUESTIONS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 80 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["question"] for r in rows}) == len(rows)
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", r["question"])) for r in rows) >= 5
    documents = {p.relative_to(ROOT).as_posix() for p in labelled.project_documents(ROOT)}
    assert {"README.md", "examples/world/README.md", "packages/lm-infer/README.md"} <= documents
    for row in rows:
        assert row["kind"] == "project" and row["relevant"] == sorted(set(row["relevant"]))
        assert len(row["evidence"]) == len(row["relevant"])
        for path, evidence in zip(row["relevant"], row["evidence"], strict=True):
            assert path in documents and (ROOT / path).is_file(), row
            assert _norm(evidence) in _norm((ROOT / path).read_text(encoding="utf-8")), (row["id"], path)
    for row in project_set["related_calibrate"] + project_set["related_test"]:
        assert row["sources"] == row["relevant"]


def test_txt_lists_hold_the_questions_of_the_jsonl(world_set: Set, tmp_path: Path) -> None:
    paths = labelled.write_set(world_set, tmp_path)
    for split in labelled.SPLITS:
        rows = [json.loads(line) for line in paths[f"{split}.jsonl"].read_text(encoding="utf-8").splitlines()]
        assert rows == world_set[split]
        assert paths[f"{split}.txt"].read_text(encoding="utf-8").splitlines() == [r["question"] for r in rows]
    with pytest.raises(ValueError, match="one non-empty line"):
        labelled.write_questions([{"id": "x", "question": "two\nlines"}], tmp_path / "bad.txt")
