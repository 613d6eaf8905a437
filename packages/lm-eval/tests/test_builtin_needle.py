"""Needle in a haystack: documents of exact token lengths with the needle at sentence boundaries."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from lmstack.core.tokenizer import train_bpe_tokenizer
from lmstack.eval import TaskConfigError
from lmstack.eval.metrics import GenerationResult, get_metric
from lmstack.eval.tasks.builtin import (
    DEFAULT_NEEDLES,
    Needle,
    NeedleGrid,
    needle_grid,
    needle_task,
    read_haystack,
)

REPO = Path(__file__).resolve().parents[3]


class CharTokenizer:
    """One token per character: token counts are character counts, an independent reference."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    script = REPO / "examples" / "world" / "generate.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--preset", "quickstart"], check=True)
    return out


HAYSTACK = [
    "Alpha is first. Beta is second.\nGamma is third. Delta is fourth.",
    "Epsilon is fifth. Zeta is last.",
]


def test_lengths_and_depths_are_counted_in_the_tokenizers_tokens() -> None:
    needle = Needle("The code is 42.", "What is the code?", "42")
    task = needle_task(CharTokenizer(), HAYSTACK, lengths=[40, 120], depths=[0.0, 0.5, 1.0], needles=[needle])
    docs = task.docs
    assert [(d["length"], d["depth"]) for d in docs] == [(n, d) for n in (40, 120) for d in (0.0, 0.5, 1.0)]
    haystack = "\n\n".join(HAYSTACK)
    haystack = "\n\n".join([haystack] * 2)  # 120 characters need the haystack twice
    for doc in docs:
        text = doc["document"]
        assert len(text) == doc["length"]  # one token per character
        start = text.index(" " + needle.fact)
        before, after = text[:start], text[start + len(needle.fact) + 1 :]
        size = doc["length"] - len(needle.fact) - 1
        assert before + after == haystack[:size]  # the haystack, in order, cut to fit
        assert doc["needle_depth"] == len(before) / size
        if doc["depth"] == 1.0:
            assert after == ""
        else:
            # The last sentence boundary at or before the asked depth.
            target = math.floor(doc["depth"] * size)
            assert before == "" or before.endswith((".", "\n"))
            assert len(before) <= target
            assert not any(c in ".\n" for c in haystack[len(before) : target])
    request = task.build_requests(doc_ids=[1])[0]
    assert request.messages() == [
        {
            "role": "user",
            "content": f"Answer the question using only the context.\n\nContext:\n{docs[1]['document']}\n\n"
            "Question: What is the code?",
        }
    ]
    assert task.target(1).text == "42"


def test_a_real_bpe_tokenizer_over_the_world_articles(world_dir: Path) -> None:
    texts = read_haystack(world_dir)
    assert len(texts) == 40 and all(texts)
    tokenizer = train_bpe_tokenizer(iter(texts), vocab_size=400)
    lengths, depths = [64, 256, 1024], [0.0, 0.25, 0.5, 0.75, 1.0]
    task = needle_task(tokenizer, texts, lengths=lengths, depths=depths)
    (needle,) = DEFAULT_NEEDLES
    for doc in task.docs:
        ids = tokenizer.encode(doc["document"], add_special_tokens=False)
        # Re-encoding the decoded text may merge across the cut at the very end: a token or two at most.
        assert abs(len(ids) - doc["length"]) <= 2
        assert doc["document"].count(needle.fact) == 1
        assert doc["needle_depth"] <= doc["depth"]
    # Deep cells of long documents land close to the asked depth (a sentence is short next to 1024).
    deep = [d for d in task.docs if d["length"] == 1024]
    assert all(d["depth"] - d["needle_depth"] < 0.05 for d in deep)


def test_grid_from_per_document_scores() -> None:
    needles = [
        Needle("The code is 42.", "What is the code?", "42"),
        Needle("The key is blue.", "What is the key?", "blue"),
    ]
    task = needle_task(CharTokenizer(), HAYSTACK, lengths=[40, 80], depths=[0.0, 1.0], needles=needles)
    metric = get_metric("contains")
    replies = {
        doc_id: ("It is 42." if doc["answer"] == "42" or doc["length"] == 40 else "I do not know.")
        for doc_id, doc in enumerate(task.docs)
    }
    scores = {i: metric.item(GenerationResult(replies[i], [task.target(i).text])) for i in replies}
    grid = task.grid(scores)
    assert isinstance(grid, NeedleGrid)
    assert grid.lengths == (40, 80) and grid.depths == (0.0, 1.0)
    # Length 40: only the "42" needle is named; length 80: the same. Each cell averages two needles.
    assert grid.scores == [[0.5, 0.5], [0.5, 0.5]]
    assert grid.counts == [[2, 2], [2, 2]]
    assert grid.rows() == [["depth", 40, 80], [0.0, 0.5, 0.5], [1.0, 0.5, 0.5]]
    partial = needle_grid(task, {0: 1.0})
    assert partial.scores[0][0] == 1.0 and math.isnan(partial.scores[1][1])
    assert grid.mean() == 0.5


def test_bad_grids_are_errors() -> None:
    with pytest.raises(TaskConfigError, match="depths"):
        needle_task(CharTokenizer(), HAYSTACK, lengths=[40], depths=[1.5])
    with pytest.raises(TaskConfigError, match="cannot hold the needle"):
        needle_task(CharTokenizer(), HAYSTACK, lengths=[10], depths=[0.5])
    with pytest.raises(TaskConfigError, match="empty"):
        needle_task(CharTokenizer(), [" "], lengths=[100], depths=[0.5])
