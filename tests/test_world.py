"""The bundled world (examples/world/): deterministic files whose questions, answers and splits hold.

The generator is no library: it is imported by path from examples/world/.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

WORLD_DIR = Path(__file__).resolve().parents[1] / "examples" / "world"
sys.path.insert(0, str(WORLD_DIR))
import world  # noqa: E402


def _load_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("world_generate_cli", WORLD_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()

Rows = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world-default")
    start = time.perf_counter()
    world.generate(out)
    seconds = time.perf_counter() - start
    assert seconds < 10, f"generation took {seconds:.1f} s"
    return out


@pytest.fixture(scope="module")
def rows(default_dir: Path) -> Rows:
    return {name: world.read_jsonl(default_dir / name) for name in world.FILES}


@pytest.fixture(scope="module")
def the_world() -> world.World:
    return world.build_world(0, world.WorldParams().num_entities)


@pytest.fixture(scope="module")
def heldout_pairs(the_world: world.World) -> set[tuple[str, str]]:
    return set(world.split_pairs(the_world, world.WorldParams().heldout_share)[1])


def _user_messages(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def _context_parts(user_message: str) -> tuple[str, str]:
    """(context, question) of a context chat's user message."""
    head, question = user_message.rsplit("\n\nQuestion: ", 1)
    return head.split("\n\nContext:\n", 1)[1], question


# ---------------------------------------------------------------------------------------------
# Determinism, manifest, sizes
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(default_dir: Path, tmp_path: Path) -> None:
    world.generate(tmp_path)
    for name in (*world.FILES, world.MANIFEST):
        assert (tmp_path / name).read_bytes() == (default_dir / name).read_bytes(), name


def test_another_seed_gives_other_files(default_dir: Path, tmp_path: Path) -> None:
    world.generate(tmp_path, seed=1)
    for name in world.FILES:
        assert (tmp_path / name).read_bytes() != (default_dir / name).read_bytes(), name
    assert world.build_world(1, 300).entities != world.build_world(0, 300).entities


def test_manifest_records_every_file(default_dir: Path, rows: Rows) -> None:
    manifest = json.loads((default_dir / world.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["format_version"] == world.FORMAT_VERSION
    assert manifest["seed"] == 0
    assert manifest["params"] == json.loads(json.dumps(world.WorldParams().__dict__))
    assert sorted(manifest["files"]) == sorted(world.FILES)
    for name, info in manifest["files"].items():
        path = default_dir / name
        assert info["sha256"] == world.sha256(path), name
        assert info["bytes"] == path.stat().st_size, name
        assert info["rows"] == len(rows[name]), name


def test_rows_have_stable_unique_ids_and_canonical_json(default_dir: Path, rows: Rows) -> None:
    for name in world.FILES:
        ids = [row["id"] for row in rows[name]]
        assert len(ids) == len(set(ids)) > 0, name
        lines = (default_dir / name).read_text(encoding="utf-8").splitlines()
        assert lines == [world.dumps(row) for row in rows[name]], name


def test_sizes_are_within_their_ranges(default_dir: Path, rows: Rows, the_world: world.World) -> None:
    total = sum((default_dir / name).stat().st_size for name in world.FILES)
    assert 2e6 <= total <= 6e6, f"{total / 1e6:.2f} MB"
    assert 200 <= len(the_world.entities) <= 500
    assert {e.kind for e in the_world.entities} == set(world.KINDS)
    low, high = world.ARTICLE_WORDS
    for article in rows["articles.jsonl"]:
        assert low <= len(article["text"].split()) <= high, article["id"]
        assert 4 <= len(article["facts"]) <= 6, article["id"]
    share = len(rows["heldout.jsonl"]) - world.WorldParams().heldout_arithmetic
    assert 0.12 <= share / len(the_world.pairs()) <= 0.18
    contexts = rows["context_chats.jsonl"]
    refusals = sum(not row["meta"]["answerable"] for row in contexts)
    assert abs(refusals / len(contexts) - world.WorldParams().refusal_share) < 0.01


# ---------------------------------------------------------------------------------------------
# The world itself
# ---------------------------------------------------------------------------------------------


def test_names_are_unique_and_not_prefixes_of_each_other(the_world: world.World) -> None:
    ids = [e.id for e in the_world.entities]
    assert len(ids) == len(set(ids))
    words = sorted(w.lower() for e in the_world.entities for w in e.name.split())
    assert len(words) == len(set(words))
    for a, b in itertools.pairwise(words):  # sorted: a prefix sorts right before its extensions
        assert not b.startswith(a), (a, b)
    reserved = {w.lower() for spec in world.ATTRIBUTES for v in spec.values for w in v.split()}
    assert not reserved & set(words)


def test_relations_point_at_entities_of_the_right_kind(the_world: world.World) -> None:
    for entity in the_world.entities:
        for fact in entity.facts:
            spec = world.ATTRIBUTE[fact.attribute]
            assert spec.kind == entity.kind
            if spec.ref_kind is None:
                assert fact.ref is None
                assert fact.value in the_world.value_set(fact.attribute)
            else:
                target = the_world.entity(fact.ref or "")
                assert (target.kind, target.name) == (spec.ref_kind, fact.value)
    for question in world.multi_hop_questions(the_world):
        (first, attribute), (second, second_attribute) = question["hops"]
        assert the_world.entity(first).fact(attribute).ref == second
        assert the_world.entity(second).fact(second_attribute).value == question["answer"]


def test_every_fact_is_stated_in_its_article(rows: Rows, the_world: world.World) -> None:
    articles = {a["id"]: a for a in rows["articles.jsonl"]}
    assert list(articles) == [e.id for e in the_world.entities]
    for entity in the_world.entities:
        article = articles[entity.id]
        assert article["title"] == entity.name
        assert article["facts"] == [
            {"attribute": f.attribute, "value": f.value, "ref": f.ref} for f in entity.facts
        ]
        sentences = re.split(r"(?<=\.)\s+", article["text"])
        for fact in entity.facts:
            stating = [s for s in sentences if world.mentions(s, fact.value) and entity.name in s]
            assert len(stating) >= 2, (entity.id, fact.attribute)  # stated twice, in two wordings


def test_pretraining_holds_every_article_in_several_wordings(rows: Rows) -> None:
    copies = world.WorldParams().article_copies
    documents: dict[str, list[str]] = {}
    for row in rows["pretrain.jsonl"]:
        documents.setdefault(row["source"], []).append(row["text"])
    assert len(documents.pop("arithmetic")) == world.WorldParams().arithmetic_docs
    assert len(documents) == len(rows["articles.jsonl"])
    for article in rows["articles.jsonl"]:
        texts = documents[f"article:{article['id']}"]
        assert len(texts) == copies and len(set(texts)) == copies, article["id"]
        assert f"{article['title']}\n\n{article['text']}" in texts
        for text in texts:
            for fact in article["facts"]:
                assert world.mentions(text, fact["value"]), (article["id"], fact)


def test_bad_parameters_are_refused() -> None:
    bads = (
        {"num_entities": 39},
        {"heldout_share": 0.6},
        {"refusal_share": -0.1},
        {"context_chats": -1},
        {"unknown_preferences": -1},
        {"unknown_preferences": 2.5},
    )
    for bad in bads:
        with pytest.raises(ValueError, match=next(iter(bad))):
            world.build_files(0, world.WorldParams(**bad)) if "num_entities" in bad else world.WorldParams(
                **bad
            )


# ---------------------------------------------------------------------------------------------
# Held-out questions and what the training files ask
# ---------------------------------------------------------------------------------------------


def test_heldout_answers_are_facts_stated_in_the_articles(
    rows: Rows, heldout_pairs: set[tuple[str, str]]
) -> None:
    articles = {a["id"]: a for a in rows["articles.jsonl"]}
    facts = [row for row in rows["heldout.jsonl"] if row["kind"] == "fact"]
    assert {(row["entity"], row["attribute"]) for row in facts} == heldout_pairs
    for row in facts:
        article = articles[row["entity"]]
        assert {"attribute": row["attribute"], "value": row["answer"]} in [
            {"attribute": f["attribute"], "value": f["value"]} for f in article["facts"]
        ]
        sentences = re.split(r"(?<=\.)\s+", article["text"])
        assert any(world.mentions(s, row["answer"]) and article["title"] in s for s in sentences), row["id"]


def test_choices_hold_the_answer_once_at_label(rows: Rows, the_world: world.World) -> None:
    for row in rows["heldout.jsonl"]:
        choices = row["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, row["id"]
        assert choices.count(row["answer"]) == 1 and choices[row["label"]] == row["answer"], row["id"]
        if row["kind"] == "fact":
            assert set(choices) <= set(the_world.value_set(row["attribute"])), row["id"]


def test_statements_are_the_answer_sentences_of_each_choice(rows: Rows, the_world: world.World) -> None:
    chat_answers = {
        m["content"] for chat in rows["chats.jsonl"] for m in chat["messages"] if m["role"] == "assistant"
    }
    for row in rows["heldout.jsonl"]:
        assert len(row["statements"]) == 4, row["id"]
        for choice, sentences in zip(row["choices"], row["statements"], strict=True):
            assert sentences and all(world.mentions(s, choice) for s in sentences), row["id"]
        if row["kind"] == "fact":
            spec = world.ATTRIBUTE[row["attribute"]]
            entity = the_world.entity(row["entity"])
            # The right choice's sentences are exactly the fact's statements, as chats answer them.
            truth = {world.state(entity, row["attribute"], t) for t in range(len(spec.statements))}
            assert set(row["statements"][row["label"]]) == truth, row["id"]
        else:  # the form arithmetic chats answer in, e.g. "17 + 25 = 42."
            assert row["statements"][row["label"]] == [f"{row['question'][8:-1]} = {row['answer']}."]
    arithmetic_answers = [a for a in chat_answers if world.ARITHMETIC_EXPRESSION.search(a)]
    assert all(re.fullmatch(r"\d+ [-+*] \d+ = \d+\.", a) for a in arithmetic_answers)


def test_quickstart_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    assert cli.main(["--out", str(out), "--preset", "quickstart"]) == 0
    preset = world.PRESETS["quickstart"]
    assert world.is_current(out, 0, preset)
    heldout = world.read_jsonl(out / "heldout.jsonl")
    facts = [row for row in heldout if row["kind"] == "fact"]
    small = world.build_world(0, preset.num_entities)
    held = world.split_pairs(small, preset.heldout_share)[1]
    assert {(row["entity"], row["attribute"]) for row in facts} == set(held)
    assert 0.25 * len(small.pairs()) <= len(held) <= 0.35 * len(small.pairs())
    assert cli.main(["--out", str(out), "--preset", "quickstart", "--entities", "50"]) == 0
    assert world.is_current(out, 0, dataclasses.replace(preset, num_entities=50))


def test_heldout_questions_use_only_heldout_templates(rows: Rows) -> None:
    for row in rows["heldout.jsonl"]:
        if row["kind"] == "fact":
            spec = world.ATTRIBUTE[row["attribute"]]
            assert any(world.template_pattern(t).fullmatch(row["question"]) for t in spec.heldout_questions)


def _asked_questions(rows: Rows) -> list[str]:
    """Every question a training file asks: chat and preference user turns, context-chat questions."""
    questions = [q for row in rows["chats.jsonl"] for q in _user_messages(row["messages"])]
    questions += [q for row in rows["preferences.jsonl"] for q in _user_messages(row["prompt"])]
    questions += [
        _context_parts(_user_messages(row["messages"])[0])[1] for row in rows["context_chats.jsonl"]
    ]
    return questions


def test_training_files_never_use_a_heldout_template(rows: Rows) -> None:
    patterns = [world.template_pattern(t) for spec in world.ATTRIBUTES for t in spec.heldout_questions]
    questions = _asked_questions(rows)
    assert len(questions) > 8000
    for question in questions:
        assert not any(p.fullmatch(question) for p in patterns), question


def test_training_files_never_ask_a_heldout_pair(
    rows: Rows, the_world: world.World, heldout_pairs: set[tuple[str, str]]
) -> None:
    asked = {tuple(pair) for row in rows["chats.jsonl"] for pair in row["meta"]["asks"]}
    preferences = rows["preferences.jsonl"]
    # Only fact and known pairs name an entity: arithmetic and unknown-name pairs ask about none.
    assert all(
        (row["meta"]["entity"] is None) == (row["meta"]["kind"] not in ("fact", "known"))
        for row in preferences
    )
    asked |= {
        (row["meta"]["entity"], row["meta"]["attribute"]) for row in preferences if row["meta"]["entity"]
    }
    asked |= {(row["meta"]["entity"], row["meta"]["attribute"]) for row in rows["context_chats.jsonl"]}
    assert asked & heldout_pairs == set()
    # The same, read from the text: no rendering of a held-out pair's chat questions is asked.
    questions = set(_asked_questions(rows))
    for entity_id, attribute in sorted(heldout_pairs):
        entity = the_world.entity(entity_id)
        for template in range(len(world.ATTRIBUTE[attribute].questions)):
            assert world.ask(entity, attribute, template) not in questions, (entity_id, attribute)


def test_chats_answer_with_the_fact(rows: Rows, the_world: world.World) -> None:
    for row in rows["chats.jsonl"]:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and roles.count("user") == roles.count("assistant") >= 1
        if row["meta"]["kind"] != "fact":
            continue
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(answers) == len(row["meta"]["asks"])
        for (entity_id, attribute), answer in zip(row["meta"]["asks"], answers, strict=True):
            entity = the_world.entity(entity_id)
            assert world.mentions(answer, entity.fact(attribute).value) and entity.name in answer, row["id"]


# ---------------------------------------------------------------------------------------------
# Context chats and preferences
# ---------------------------------------------------------------------------------------------


def test_context_chats_answer_from_the_context_or_refuse(rows: Rows, the_world: world.World) -> None:
    for row in rows["context_chats.jsonl"]:
        meta = row["meta"]
        entity = the_world.entity(meta["entity"])
        value = entity.fact(meta["attribute"]).value
        user = _user_messages(row["messages"])
        assert len(user) == 1 and user[0].startswith(world.CONTEXT_INSTRUCTION)
        context, question = _context_parts(user[0])
        assert question in {world.ask(entity, meta["attribute"], t) for t in range(3)}
        reply = row["messages"][-1]
        assert reply["role"] == "assistant"
        if meta["answerable"]:
            assert meta["answer"] == value
            assert world.mentions(context, value), row["id"]
            assert world.mentions(reply["content"], value) and reply["content"] != world.REFUSAL
        else:
            assert meta["answer"] is None and reply["content"] == world.REFUSAL
            assert not world.mentions(context, value), row["id"]
            if meta["entity"] not in meta["documents"]:
                assert not world.mentions(context, entity.name), row["id"]


def test_preferences_prefer_the_fact(rows: Rows, the_world: world.World) -> None:
    params = world.WorldParams()
    kinds = [row["meta"]["kind"] for row in rows["preferences.jsonl"]]
    facts = len(the_world.pairs()) - (len(rows["heldout.jsonl"]) - params.heldout_arithmetic)
    assert kinds.count("fact") == facts and kinds.count("arithmetic") == params.arithmetic_preferences
    # Unknown-name pairs, then known-name pairs, come last, after the shuffled fact and arithmetic pairs.
    tail = params.unknown_preferences + params.known_preferences
    assert (
        kinds[-tail:]
        == ["unknown"] * params.unknown_preferences + ["known"] * params.known_preferences
        == [k for k in kinds if k not in ("fact", "arithmetic")]
    )
    for row in rows["preferences.jsonl"]:
        assert row["chosen"] != row["rejected"], row["id"]
        assert row["prompt"][-1]["role"] == "user"
        if row["meta"]["kind"] == "fact":
            entity = the_world.entity(row["meta"]["entity"])
            value = entity.fact(row["meta"]["attribute"]).value
            assert world.mentions(row["chosen"], value), row["id"]
            assert not world.mentions(row["rejected"], value), row["id"]
        elif row["meta"]["kind"] == "unknown":
            name, spec = row["meta"]["name"], world.ATTRIBUTE[row["meta"]["attribute"]]
            assert spec.kind in ("person", "city") and row["meta"]["entity"] is None
            question = row["prompt"][-1]["content"]
            assert world.mentions(question, name), row["id"]
            assert any(world.template_pattern(t).fullmatch(question) for t in spec.questions), row["id"]
            assert row["chosen"] in {t.format(name=name) for t in world.UNKNOWN_ANSWERS[spec.kind]}, row["id"]
            # Rejected: a confident statement of the attribute about the name, with a value it may take.
            statements = [t for t in spec.statements if world.template_pattern(t).fullmatch(row["rejected"])]
            assert statements and world.mentions(row["rejected"], name), row["id"]
            assert any(world.mentions(row["rejected"], v) for v in the_world.value_set(spec.name)), row["id"]
        elif row["meta"]["kind"] == "known":
            # An asked fact of a real person or place: its statement against the unknown pairs' denial.
            entity, spec = the_world.entity(row["meta"]["entity"]), world.ATTRIBUTE[row["meta"]["attribute"]]
            question = row["prompt"][-1]["content"]
            assert spec.kind in world.UNKNOWN_ANSWERS and entity.kind == spec.kind, row["id"]
            assert question in {world.ask(entity, spec.name, t) for t in range(len(spec.questions))}, row[
                "id"
            ]
            assert any(world.template_pattern(t).fullmatch(row["chosen"]) for t in spec.statements), row["id"]
            assert world.mentions(row["chosen"], entity.fact(spec.name).value), row["id"]
            assert entity.name in row["chosen"], row["id"]
            denials = {t.format(name=entity.name) for t in world.UNKNOWN_ANSWERS[spec.kind]}
            assert row["rejected"] in denials, row["id"]


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (keys too), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_unknown_names_are_not_in_the_world_or_any_other_file(rows: Rows, the_world: world.World) -> None:
    unknown = [row for row in rows["preferences.jsonl"] if row["meta"]["kind"] == "unknown"]
    names = [row["meta"]["name"] for row in unknown]
    assert len(names) == len(set(names)) == world.WorldParams().unknown_preferences
    assert {kind for kind, _ in world.unknown_names(the_world, 3)} <= {"person", "city"}
    assert sorted({row["meta"]["attribute"] for row in unknown}) == sorted(
        s.name for s in world.ATTRIBUTES if s.kind in ("person", "city")
    )
    entity_words = {w.lower() for e in the_world.entities for w in e.name.split()}
    reserved = {w.lower() for spec in world.ATTRIBUTES for v in spec.values for w in v.split()}
    for name in names:
        words = name.lower().split()
        assert name not in {e.name for e in the_world.entities} and not entity_words & set(words), name
        assert not reserved & set(words), name
        for word in words:  # as distinct from the world's names as they are from each other
            assert not any(word.startswith(w) or w.startswith(word) for w in entity_words), name
            assert word[:4] not in {w[:4] for w in entity_words}, name
    # Every text of every other file, and of the other preference pairs: no invented name word appears.
    # (The rows' strings, not their JSON: an escaped newline would glue an "n" to the next word.)
    texts = [
        text
        for name, file_rows in rows.items()
        if name != "preferences.jsonl"
        for row in file_rows
        for text in _strings(row)
    ]
    texts += [
        text
        for row in rows["preferences.jsonl"]
        if row["meta"]["kind"] != "unknown"
        for text in _strings(row)
    ]
    seen = {w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)}
    assert len(seen) > 500  # the world's vocabulary (842 words at the defaults): the texts were read
    for name in names:
        assert not {w.lower() for w in name.split()} & seen, name
    # Each name is asked about in one pair only.
    for row in unknown:
        others = [r for r in unknown if r is not row and world.mentions(json.dumps(r), row["meta"]["name"])]
        assert not others, row["id"]


def _pairs_by_kind(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Preference rows grouped by kind, in file order, without their ids (which number the whole file)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["meta"]["kind"], []).append({k: v for k, v in row.items() if k != "id"})
    return out


@pytest.mark.parametrize("field", ["unknown_preferences", "known_preferences"])
def test_unknown_and_known_pairs_have_streams_of_their_own(field: str) -> None:
    """Changing how many pairs of one kind there are changes no other file and no pair of another kind;
    more pairs of the kind extend its rows, never redraw them."""
    params = world.PRESETS["quickstart"]
    kind = field.split("_")[0]
    without = world.build_files(0, dataclasses.replace(params, **{field: 0}))
    more = world.build_files(0, dataclasses.replace(params, **{field: getattr(params, field) + 7}))
    files = world.build_files(0, params)
    for name in world.FILES:
        if name != "preferences.jsonl":
            assert files[name] == without[name] == more[name], name
    old, new, longer = (_pairs_by_kind(f["preferences.jsonl"]) for f in (without, files, more))
    assert kind not in old and set(new) == set(longer) == {*old, kind}
    for other in old:
        assert old[other] == new[other] == longer[other], other
    assert len(new[kind]) == getattr(params, field) and longer[kind][: len(new[kind])] == new[kind]
    rows = files["preferences.jsonl"]
    assert [row["id"] for row in rows] == [f"preference-{i:05d}" for i in range(len(rows))]


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------


def _training_texts(rows: Rows) -> list[str]:
    texts = [row["text"] for row in rows["pretrain.jsonl"]]
    texts += [m["content"] for row in rows["chats.jsonl"] for m in row["messages"]]
    texts += [m["content"] for row in rows["preferences.jsonl"] for m in row["prompt"]]
    texts += [row["chosen"] for row in rows["preferences.jsonl"]]
    return texts


def test_arithmetic_is_correct(rows: Rows) -> None:
    lines = [m for text in _training_texts(rows) for m in world.ARITHMETIC_LINE.findall(text)]
    assert len(lines) > 5000
    for a, op, b, result in lines:
        assert eval(f"{a} {op} {b}") == int(result), (a, op, b, result)  # evaluated independently
    for row in rows["preferences.jsonl"]:
        for a, op, b, result in world.ARITHMETIC_LINE.findall(row["rejected"]):
            assert eval(f"{a} {op} {b}") != int(result)
    arithmetic = [row for row in rows["heldout.jsonl"] if row["kind"] == "arithmetic"]
    assert len(arithmetic) == world.WorldParams().heldout_arithmetic
    for row in arithmetic:
        ((a, op, b),) = world.ARITHMETIC_EXPRESSION.findall(row["question"])
        assert eval(f"{a} {op} {b}") == int(row["answer"]), row["id"]


def test_heldout_arithmetic_is_never_trained_on(rows: Rows) -> None:
    trained = {m for text in _training_texts(rows) for m in world.ARITHMETIC_EXPRESSION.findall(text)}
    held = {m for row in rows["heldout.jsonl"] for m in world.ARITHMETIC_EXPRESSION.findall(row["question"])}
    assert len(held) == world.WorldParams().heldout_arithmetic
    assert trained & held == set()


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_skips_a_matching_world_and_force_regenerates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "world"
    argv = ["--out", str(out), "--entities", "40"]
    assert cli.main(argv) == 0
    assert "written" in capsys.readouterr().out
    assert world.is_current(out, 0, world.WorldParams(num_entities=40))
    stamped = [out / name for name in (*world.FILES, world.MANIFEST)]
    for path in stamped:
        os.utime(path, ns=(0, 0))

    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert all(path.stat().st_mtime_ns == 0 for path in stamped)

    assert cli.main([*argv, "--force"]) == 0
    assert "written" in capsys.readouterr().out
    assert all(path.stat().st_mtime_ns != 0 for path in stamped)


def test_cli_regenerates_when_seed_params_or_files_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "world"
    assert cli.main(["--out", str(out), "--entities", "40"]) == 0
    for argv in (["--seed", "1", "--entities", "40"], ["--seed", "1", "--entities", "41"]):
        capsys.readouterr()
        assert cli.main(["--out", str(out), *argv]) == 0
        assert "written" in capsys.readouterr().out, argv
    (out / "chats.jsonl").write_text("{}\n", encoding="utf-8")  # a damaged file no longer matches
    assert cli.main(["--out", str(out), "--seed", "1", "--entities", "41"]) == 0
    assert "written" in capsys.readouterr().out
    assert world.is_current(out, 1, world.WorldParams(num_entities=41))
    assert cli.main(["--out", str(out), "--entities", "5"]) == 2


def test_cli_runs_as_a_script(tmp_path: Path) -> None:
    out = tmp_path / "world"
    command = [sys.executable, str(WORLD_DIR / "generate.py"), "--out", str(out), "--entities", "40"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "heldout.jsonl" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted((*world.FILES, world.MANIFEST))
