"""``lmstack rag`` on the command line: ingest, search, calibrate, eval and ask, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.core._cli import main
from lmstack.rag import Index

UNRELATED = [
    "How do I boil an egg?", "What is the capital of France?", "Who won the match yesterday?",
    "Can someone review my pull request?", "good morning everyone", "What time is lunch?",
    "How many legs does a spider have?", "Is it going to rain tomorrow?", "Who wrote Hamlet?",
    "Recommend a good novel", "How do I install numpy on Windows?", "thanks!",
]  # fmt: skip


def test_ingest_search_calibrate_eval_ask(tmp_path: Path, make_corpus, tiny_model_dir: Path, capsys) -> None:
    topics = make_corpus(tmp_path / "docs", 30, seed=5)
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"not a pdf")
    index = tmp_path / "index"

    assert main(["rag", "ingest", str(tmp_path / "docs"), "--index", str(index), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (
        "30 added" in printed and "1 skipped" in printed and "skipped docs/broken.pdf: corrupt PDF" in printed
    )
    assert main(["rag", "ingest", str(tmp_path / "docs"), "--index", str(index), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        len(report["unchanged"]) == 30
        and report["added"] == []
        and report["skipped"][0]["source"] == "docs/broken.pdf"
    )

    name = topics["doc012"][0]
    assert (
        main(
            ["rag", "search", f"When was {name} first recorded?", "--index", str(index), "-k", "2", "--json"]
        )
        == 0
    )
    found = json.loads(capsys.readouterr().out)
    with Index.open(index) as opened:
        expected = opened.search(f"When was {name} first recorded?", 2)
    assert [h["source"] for h in found["hits"]] == [h.source for h in expected]
    assert found["hits"][0]["source"] == "docs/doc012.md" and found["probability"] is None

    names = [n for n, _ in topics.values()]
    related = tmp_path / "related.txt"
    related.write_text("\n".join(f"What colour is {n}?" for n in names[:20]) + "\n")
    unrelated = tmp_path / "unrelated.txt"
    unrelated.write_text("\n".join(UNRELATED) + "\n")
    command = [
        "rag",
        "calibrate",
        "--index",
        str(index),
        "--related",
        str(related),
        "--unrelated",
        str(unrelated),
    ]
    assert main([*command, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "chosen: threshold" in printed and "cross-validated" in printed and "baseline" in printed
    with Index.open(index) as opened:
        assert opened.calibration is not None

    questions = tmp_path / "questions.jsonl"
    rows = [
        {"question": f"When was {n} first recorded?", "relevant": [f"{stem}.md"]}
        for stem, (n, _) in topics.items()
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    command = [
        "rag",
        "eval",
        "--index",
        str(index),
        "--questions",
        str(questions),
        "--unrelated",
        str(unrelated),
    ]
    assert main([*command, "--output", str(out), "--quiet"]) == 0
    scores = json.loads(out.read_text())
    assert scores["retrieval"]["hybrid"]["hit@5"] == 1.0
    assert scores["gate"]["n_related"] == 30 and scores["gate"]["n_unrelated"] == len(UNRELATED)
    assert "| hybrid |" in capsys.readouterr().out

    assert (
        main(
            [
                "rag",
                "ask",
                "Who wrote Hamlet?",
                "--index",
                str(index),
                "--model",
                str(tiny_model_dir),
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert answer["refused"] and answer["reason"] == "unrelated"
    command = ["rag", "ask", f"What colour is {name}?", "--index", str(index), "--model", str(tiny_model_dir)]
    assert main([*command, "--max-tokens", "4", "--stream"]) == 0


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["rag", "search", "anything", "--index", str(tmp_path / "missing")]) == 2
    assert "no index at" in capsys.readouterr().err
    assert main(["rag", "ingest", str(tmp_path / "nowhere"), "--index", str(tmp_path / "i"), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err
