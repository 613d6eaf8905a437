"""Labelled retrieval and rejection sets for lmstack-rag, over the bundled world and this project's docs.

Two sets, each split into a calibration half and a test half:

- **world**: questions about the articles of a generated world (`examples/world`), each with the
  article ids that answer it (`related`), and questions nothing in the world answers (`unrelated`):
  the off-topic chat of `unrelated.txt` and questions in the world's own wording about invented
  names that are not in the world;
- **project**: the questions of `project_questions.jsonl` about this repository's docs, each with the
  repo-relative paths of the docs that answer it, and the same off-topic chat.

Usage:
`python examples/rag/labelled.py --world out/quickstart/world --out out/rag/labels [--seed 0]`.

Relevance contract: a world row's `relevant` holds entity ids; `write_world_documents` writes one
Markdown file per article, `<id>.md`, so when the folder (`world_docs/`) is ingested from its parent
the source names are `world_docs/<id>.md`, which each row also carries in `sources`. A project row's
`relevant` (and `sources`) are repo-relative POSIX paths: ingest `project_documents(repo)` with the
repository as the root.

Only the Python standard library is used (this file runs without lmstack installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# `world` sits in examples/world: make it importable however this file is run or loaded.
if str(HERE.parent / "world") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "world"))
import world  # noqa: E402

UNRELATED = HERE / "unrelated.txt"
PROJECT_QUESTIONS = HERE / "project_questions.jsonl"
WORLD_DOCS = "world_docs"
"""The folder name `main` writes the world's documents to; world rows' `sources` start with it."""

SPLITS = ("related_calibrate", "related_test", "unrelated_calibrate", "unrelated_test")
"""The four lists `world_questions` and `project_questions` return."""

# Questions that describe an entity by some of its facts without naming it. Each is kept only when
# exactly one entity of the world has those values (checked against every entity of the kind).
DESCRIPTIONS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "city": (
        (("country", "river"), "Which city in {country} lies on the river {river}?"),
        (("river", "dish"), "Which town on the {river} is famous for its {dish}?"),
        (("country", "trade"), "Which city of {country} grew rich on the {trade} trade?"),
        (("dish", "trade"), "Which city known for {dish} deals mostly in {trade}?"),
        (("founded",), "Which city was founded in {founded}?"),
    ),
    "person": (
        (("profession", "birthplace"), "Who was the {profession} born in {birthplace}?"),
        (("instrument", "birth_year"), "Which person born in {birth_year} played the {instrument}?"),
        (("profession", "instrument"), "Name the {profession} who played the {instrument}."),
        (("birthplace", "favorite_color"), "Who from {birthplace} loved the color {favorite_color}?"),
    ),
    "creature": (
        (("habitat", "diet"), "What creature lives in {habitat} and eats {diet}?"),
        (("coat", "found_near"), "Which animal with a {coat} coat is often seen near {found_near}?"),
        (("diet", "lifespan"), "Which creature feeds on {diet} and lives about {lifespan} years?"),
    ),
    "invention": (
        (("purpose", "material"), "What device for {purpose} is made of {material}?"),
        (("invented_year", "material"), "Which {material} invention first appeared in {invented_year}?"),
        (("first_built_in", "purpose"), "Which invention for {purpose} was first built in {first_built_in}?"),
        (("inventor",), "What did {inventor} invent?"),
    ),
}

_WORD = re.compile(r"[a-z]+")


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"lmstack-rag-labels/{seed}/{stream}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_text(path: Path, text: str) -> None:
    """Write `text` unless the file already holds it (so unchanged files keep their mtime)."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def write_world_documents(world_dir: Path, out_dir: Path) -> list[Path]:
    """Write one Markdown file per article of `world_dir/articles.jsonl`: `out_dir/<id>.md`.

    Each file is `# Title`, a blank line and the article's text (with a final newline). Files
    whose content is unchanged are not rewritten; other `*.md` files in `out_dir` (a previous
    world's) are removed, so the folder holds exactly this world's articles.

    Returns:
        The paths written, in article order.
    """
    articles = _read_jsonl(Path(world_dir) / "articles.jsonl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for article in articles:
        path = out / f"{article['id']}.md"
        _write_text(path, f"# {article['title']}\n\n{article['text']}\n")
        paths.append(path)
    keep = {p.name for p in paths}
    for stale in sorted(out.glob("*.md")):
        if stale.name not in keep:
            stale.unlink()
    return paths


def project_documents(repo: Path) -> list[Path]:
    """The docs of the project set: README.md, every package's README and CHANGELOG, the world's README.

    Returns:
        Absolute paths, sorted by their repo-relative POSIX path (the source names relevance uses).
    """
    root = Path(repo).resolve()
    found = [root / "README.md", root / "examples" / "world" / "README.md"]
    found += root.glob("packages/*/README.md")
    found += root.glob("packages/*/CHANGELOG.md")
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


def read_unrelated(path: Path | None = None) -> list[dict[str, Any]]:
    """The off-topic messages of `path` (default: `unrelated.txt`), one row per non-blank line.

    A row's `id` is `offtopic-<line number>`.
    """
    rows = []
    for number, line in enumerate(Path(path or UNRELATED).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            rows.append({"id": f"offtopic-{number:04d}", "question": line.strip(), "kind": "offtopic"})
    return rows


def _split(
    rows: list[dict[str, Any]], seed: int, kind: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Halve one kind's rows: ordered by a seeded hash of each question, the first half calibrates.

    A hash order (not a shuffle) keeps rows on their side when others are added or removed.
    """

    def key(row: dict[str, Any]) -> tuple[str, str]:
        digest = hashlib.sha256(f"lmstack-rag-labels/{seed}/{kind}/{row['question']}".encode()).hexdigest()
        return digest, row["id"]

    ordered = sorted(rows, key=key)
    half = len(ordered) // 2
    return ordered[:half], ordered[half:]


def _assemble(
    related: dict[str, list[dict[str, Any]]], unrelated: dict[str, list[dict[str, Any]]], seed: int
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for side, groups in (("related", related), ("unrelated", unrelated)):
        for kind, rows in groups.items():
            calibrate, test = _split(rows, seed, kind)
            out[f"{side}_calibrate"] += calibrate
            out[f"{side}_test"] += test
    for rows in out.values():
        rows.sort(key=lambda r: r["id"])
    return out


def _name_words(names: Iterable[str]) -> set[str]:
    return {w.lower() for name in names for w in name.split()}


def _load_world(world_dir: Path) -> tuple[world.World, list[dict[str, Any]]]:
    """The world the files were written from, rebuilt with the manifest's seed and size, and its articles."""
    manifest = world.read_manifest(world_dir)
    if manifest is None:
        raise ValueError(
            f"{world_dir} has no readable manifest.json: write the world first "
            "(python examples/world/generate.py --out DIR)"
        )
    params = world.WorldParams(**manifest["params"])
    rebuilt = world.build_world(int(manifest["seed"]), params.num_entities)
    articles = _read_jsonl(Path(world_dir) / "articles.jsonl")
    expected = [(e.id, e.kind, [[f.attribute, f.value, f.ref] for f in e.facts]) for e in rebuilt.entities]
    found = [
        (a["id"], a["kind"], [[f["attribute"], f["value"], f["ref"]] for f in a["facts"]]) for a in articles
    ]
    if expected != found:
        raise ValueError(
            f"{world_dir}/articles.jsonl does not match the world its manifest names (seed "
            f"{manifest['seed']}, {params.num_entities} entities): regenerate it with "
            "examples/world/generate.py --force"
        )
    return rebuilt, articles


def _facts(article: dict[str, Any]) -> dict[str, str]:
    return {f["attribute"]: f["value"] for f in article["facts"]}


def _describe(articles: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """One question per entity that describes it by facts only it has, where some template allows it."""
    rows = []
    for article in articles:
        facts = _facts(article)
        peers = [_facts(a) for a in articles if a["kind"] == article["kind"]]
        templates = list(DESCRIPTIONS[article["kind"]])
        rng.shuffle(templates)
        for attributes, template in templates:
            values = [facts[a] for a in attributes]
            if sum(1 for p in peers if [p[a] for a in attributes] == values) == 1:
                rows.append(
                    {
                        "id": f"world/describe-{article['id']}",
                        "question": template.format(**facts),
                        "relevant": [article["id"]],
                        "answer": article["title"],
                        "kind": "describe",
                    }
                )
                break
    return rows


def _paraphrases(
    chats: list[dict[str, Any]], articles: list[dict[str, Any]], rng: random.Random
) -> list[dict[str, Any]]:
    """One chat question per entity, drawn from the single-question fact chats of chats.jsonl."""
    by_entity: dict[str, list[tuple[str, str]]] = {}
    for chat in chats:
        asks = chat["meta"]["asks"]
        if chat["meta"]["kind"] != "fact" or len(asks) != 1:
            continue
        question = next(m["content"] for m in chat["messages"] if m["role"] == "user")
        by_entity.setdefault(asks[0][0], []).append((question, asks[0][1]))
    rows = []
    for article in articles:
        options = sorted(set(by_entity.get(article["id"], [])))
        if not options:
            continue
        question, attribute = rng.choice(options)
        rows.append(
            {
                "id": f"world/paraphrase-{article['id']}",
                "question": question,
                "relevant": [article["id"]],
                "answer": _facts(article)[attribute],
                "kind": "paraphrase",
            }
        )
    return rows


def _unknown_entities(
    the_world: world.World, articles: list[dict[str, Any]], count: int, seed: int
) -> list[dict[str, Any]]:
    """Questions in the world's own templates about invented names that no article mentions."""
    rng = _rng(seed, f"unknown/{the_world.seed}")
    # The world's name machinery, under a stream of its own; it already avoids the world's names.
    maker = world._NameMaker(_rng(seed, f"unknown-names/{the_world.seed}"))
    taken = _name_words(e.name for e in the_world.entities)
    for word in sorted(taken):
        maker._take(word)
    prefixes = {w[: world._PREFIX] for w in taken}
    text = " ".join(a["text"].lower() for a in articles)
    shares = {"city": 25, "person": 35, "creature": 20, "invention": 20}
    rows: list[dict[str, Any]] = []
    while len(rows) < count:
        kind = rng.choices(world.KINDS, weights=[shares[k] for k in world.KINDS])[0]
        if kind == "person":
            name = f"{maker.word((2,))} {maker.word((2, 3))}"
        else:
            name = maker.word((2, 1), world.NAME_SUFFIXES[kind])
        words = _name_words([name])
        if words & taken or any(w[: world._PREFIX] in prefixes or w in text for w in words):
            continue  # too close to the world: the question must be about nothing in it
        entity = world.Entity(id=name.lower().replace(" ", "-"), name=name, kind=kind, facts=())
        spec = rng.choice([s for s in world.ATTRIBUTES if s.kind == kind])
        templates = [*spec.questions, *spec.heldout_questions]
        question = world._sentence(rng.choice(templates), entity)
        rows.append(
            {
                "id": f"world/unknown-{len(rows):04d}",
                "question": question,
                "kind": "unknown_entity",
                "name": name,
            }
        )
    return rows


def world_questions(
    world_dir: Path, *, seed: int = 0, docs_folder: str = WORLD_DOCS
) -> dict[str, list[dict[str, Any]]]:
    """The world set: questions about a generated world's articles and questions nothing in it answers.

    Related rows (`relevant`: entity ids, `sources`: `<docs_folder>/<id>.md`, `answer`):

    - `heldout`: every fact question of heldout.jsonl (the held-out wording);
    - `paraphrase`: one chat question per entity, from chats.jsonl (the chat wording);
    - `describe`: one question per entity that describes it by two facts (or one) without naming it,
      only where exactly one entity of the world has those values;
    - `two_hop`: `world.multi_hop_questions`; both articles are relevant.

    Unrelated rows: `offtopic`, the lines of unrelated.txt (any that names a word of the world's
    entity names is left out), and `unknown_entity`, questions in the world's own question templates
    about invented names (as many as the world has entities, at least 100) that share no name word
    and no first four letters with a world entity and occur in no article.

    Every kind is halved into calibrate and test by a seeded hash order.

    Args:
        world_dir: A folder written by examples/world/generate.py (manifest.json, articles.jsonl,
            heldout.jsonl, chats.jsonl).
        seed: Seeds the choices (which chat question, which description) and the split.
        docs_folder: The folder name that `sources` starts with.

    Returns:
        `related_calibrate`, `related_test`, `unrelated_calibrate`, `unrelated_test`: rows sorted by id.
    """
    world_dir = Path(world_dir)
    the_world, articles = _load_world(world_dir)
    heldout = [
        {
            "id": f"world/{row['id']}",
            "question": row["question"],
            "relevant": [row["entity"]],
            "answer": row["answer"],
            "kind": "heldout",
        }
        for row in _read_jsonl(world_dir / "heldout.jsonl")
        if row["kind"] == "fact"
    ]
    chats = _read_jsonl(world_dir / "chats.jsonl")
    two_hop = [
        {
            "id": f"world/two_hop-{row['hops'][0][0]}",
            "question": row["question"],
            "relevant": [row["hops"][0][0], row["hops"][1][0]],
            "answer": row["answer"],
            "kind": "two_hop",
        }
        for row in world.multi_hop_questions(the_world)
    ]
    related = {
        "heldout": heldout,
        "paraphrase": _paraphrases(chats, articles, _rng(seed, "paraphrase")),
        "describe": _describe(articles, _rng(seed, "describe")),
        "two_hop": two_hop,
    }
    for rows in related.values():
        for row in rows:
            row["sources"] = [f"{docs_folder}/{entity_id}.md" for entity_id in row["relevant"]]
    names = _name_words(e.name for e in the_world.entities)
    offtopic = [r for r in read_unrelated() if not names & set(_WORD.findall(r["question"].lower()))]
    count = max(100, len(the_world.entities))
    unrelated = {"offtopic": offtopic, "unknown_entity": _unknown_entities(the_world, articles, count, seed)}
    return _assemble(related, unrelated, seed)


def project_questions(repo: Path, *, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The project set: project_questions.jsonl (related) and unrelated.txt (off-topic), each halved.

    Args:
        repo: The repository root; every `relevant` path must exist under it.
        seed: Seeds the split (the off-topic halves are the same as the world set's with the same seed).

    Returns:
        `related_calibrate`, `related_test`, `unrelated_calibrate`, `unrelated_test`: rows sorted by id.

    Raises:
        ValueError: A relevant path is not among `project_documents(repo)`.
    """
    root = Path(repo).resolve()
    known = {p.relative_to(root).as_posix() for p in project_documents(root)}
    related = []
    for row in _read_jsonl(PROJECT_QUESTIONS):
        missing = [p for p in row["relevant"] if p not in known]
        if missing:
            raise ValueError(
                f"{PROJECT_QUESTIONS.name} {row['id']}: {missing} not among the project documents of {root}"
            )
        related.append({**row, "sources": list(row["relevant"])})
    return _assemble({"project": related}, {"offtopic": read_unrelated()}, seed)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_split(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows as JSON Lines (sorted keys, UTF-8), one row a line."""
    _write_text(Path(path), "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def write_questions(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the rows' questions one a line, for `lmstack rag calibrate --related FILE --unrelated FILE`."""
    for row in rows:
        if "\n" in row["question"] or not row["question"].strip():
            raise ValueError(f"{row['id']}: a question must be one non-empty line")
    _write_text(Path(path), "".join(r["question"] + "\n" for r in rows))


def write_set(splits: dict[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """Write each split as `<name>.jsonl` and `<name>.txt` into `out_dir`.

    Returns:
        The paths written, by file name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SPLITS:
        write_split(splits[name], out / f"{name}.jsonl")
        write_questions(splits[name], out / f"{name}.txt")
        paths[f"{name}.jsonl"] = out / f"{name}.jsonl"
        paths[f"{name}.txt"] = out / f"{name}.txt"
    return paths


def _counts(splits: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for name in SPLITS:
        kinds: dict[str, int] = {}
        for row in splits[name]:
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        lines.append(f"  {name:<20} {len(splits[name]):>5}  ({detail})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--world", type=Path, default=Path("out/quickstart/world"), help="a generated world folder"
    )
    parser.add_argument("--out", type=Path, default=Path("out/rag/labels"), help="output folder")
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository root (project set)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices and the splits")
    args = parser.parse_args(argv)
    docs = write_world_documents(args.world, args.out / WORLD_DOCS)
    world_set = world_questions(args.world, seed=args.seed)
    write_set(world_set, args.out / "world")
    project_set = project_questions(args.repo, seed=args.seed)
    write_set(project_set, args.out / "project")
    root = args.repo.resolve()
    listing = "".join(p.relative_to(root).as_posix() + "\n" for p in project_documents(root))
    _write_text(args.out / "project_documents.txt", listing)
    print(f"{len(docs)} world documents in {args.out / WORLD_DOCS}")
    print(f"world set in {args.out / 'world'}:\n{_counts(world_set)}")
    print(f"{listing.count(chr(10))} project documents listed in {args.out / 'project_documents.txt'}")
    print(f"project set in {args.out / 'project'}:\n{_counts(project_set)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
