"""The RAG benchmarks' workloads: clustered synthetic embeddings, a generated Markdown corpus, timing helpers.

Vectors (:func:`clustered_vectors`): unit float32 vectors shaped like sentence embeddings. A mixture of
``NUM_CLUSTERS`` Gaussians: cluster centres are random unit directions, cluster weights are drawn from a
Dirichlet(1) (so clusters differ in size, as topics do), and each vector is ``centre + s * noise``,
normalized, where the noise has a power-law spectrum (variance of component i proportional to 1 / i,
rotated by one random orthogonal matrix) so that the vectors have a low intrinsic dimension (participation
ratio about 26 of 384), as real embeddings do, and ``s`` is drawn per cluster from [0.75, 1.25] (cosine to
the centre about 0.6-0.8).
Everything is seeded; blocks are generated one after another so that the largest temporary is one block.

Corpus (:func:`write_corpus`): Markdown files with headings, paragraphs, lists and fenced code, of seeded
random sentences over English words (from the embedder's vocabulary, Zipf-like frequencies: about one token
per word, as in real prose), so that chunking has structure to follow and no two chunks share their text.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
NUM_CLUSTERS = 1000
_BLOCK = 65_536  # vectors generated per step (the largest temporary is one block)


@dataclass(frozen=True)
class Mixture:
    """The generator's parameters: cluster centres, weights, spreads and the noise transform."""

    centres: np.ndarray  # (clusters, dim), unit rows
    weights: np.ndarray  # (clusters,), sums to 1
    spreads: np.ndarray  # (clusters,)
    transform: np.ndarray  # (dim, dim): noise spectrum times a random rotation


def mixture(seed: int = 0, dim: int = DIM, clusters: int = NUM_CLUSTERS) -> Mixture:
    """The Gaussian mixture the vectors are drawn from (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.ones(clusters))
    spreads = rng.uniform(0.75, 1.25, clusters).astype(np.float32)
    # Component i has variance proportional to 1/i; the scale makes the expected noise norm 1.
    spectrum = 1.0 / np.sqrt(np.arange(1, dim + 1))
    spectrum /= np.sqrt((spectrum**2).sum())
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    transform = (spectrum[:, None] * rotation).astype(np.float32)
    return Mixture(centres, weights, spreads, transform)


def clustered_vectors(n: int, seed: int, mix: Mixture) -> np.ndarray:
    """``n`` unit float32 vectors drawn from ``mix``; ``seed`` picks the draw (the mixture stays the same)."""
    rng = np.random.default_rng(seed)
    dim = mix.centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        labels = rng.choice(mix.centres.shape[0], size=stop - start, p=mix.weights)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) @ mix.transform
        block = mix.centres[labels] + mix.spreads[labels, None] * noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q``-th percentile of ``seconds``, in milliseconds."""
    return float(np.percentile(np.asarray(seconds), q) * 1e3)


def time_each(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Run ``fn`` on one query at a time; returns the stacked results and each call's seconds."""
    results, seconds = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(fn(q))
        seconds.append(time.perf_counter() - start)
    return np.stack(results), seconds


def numpy_top10(matrix: np.ndarray, k: int = 10) -> Callable[[np.ndarray], np.ndarray]:
    """Brute force with numpy: ``matrix @ q``, ``argpartition`` for the top ``k``, then sorted."""

    def search(q: np.ndarray) -> np.ndarray:
        scores = matrix @ q
        top = np.argpartition(-scores, k - 1)[:k]
        return top[np.argsort(-scores[top], kind="stable")]

    return search


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of ``exact`` (the true top-k ids) that ``found`` holds."""
    k = exact.shape[1]
    return float(
        np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact, strict=True)])
    )


def tie_mismatches(
    found: np.ndarray, exact: np.ndarray, matrix: np.ndarray, queries: np.ndarray, tol: float = 1e-5
) -> list[int]:
    """Rows where ``found`` differs from ``exact`` by more than ties: an id outside the exact top-k whose
    score (recomputed in float64) is below the exact k-th score by more than ``tol``."""
    bad = []
    for row, (f, e) in enumerate(zip(found, exact, strict=True)):
        extra = sorted(set(f.tolist()) - set(e.tolist()))
        if not extra:
            continue
        q = queries[row].astype(np.float64)
        kth = float((matrix[e].astype(np.float64) @ q).min())
        if extra[0] < 0 or float((matrix[extra].astype(np.float64) @ q).min()) < kth - tol:
            bad.append(row)
    return bad


# -- the Markdown corpus ------------------------------------------------------------------------------------


def english_words(limit: int = 8000) -> list[str]:
    """Whole English words from the default embedder's WordPiece vocabulary (about one token each), in its
    order, which runs roughly from common to rare."""
    from lmstack.rag.embed import default_embedding_model_path

    lines = (default_embedding_model_path() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [w for w in lines if len(w) >= 2 and w.isascii() and w.isalpha() and w.islower()][:limit]


class _Text:
    """Sentences of words drawn with Zipf-like frequencies (weight 1 / (rank + 10))."""

    def __init__(self, rng: random.Random, words: list[str]) -> None:
        self.rng = rng
        self.words = words
        self.weights = list(itertools.accumulate(1.0 / (i + 10) for i in range(len(words))))

    def draw(self, n: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.weights, k=n)

    def sentence(self) -> str:
        text = " ".join(self.draw(self.rng.randint(6, 22)))
        return text[0].upper() + text[1:] + self.rng.choice(".....?!")

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(2, 6)))


def markdown_file(text: _Text, title: str, target_bytes: int) -> str:
    """One Markdown document of about ``target_bytes``: a title, sections, paragraphs, lists and code."""
    rng = text.rng
    parts = [f"# {title}\n", text.paragraph() + "\n"]
    size = sum(len(p) for p in parts)
    section = 0
    while size < target_bytes:
        section += 1
        block = [f"## {' '.join(text.draw(3)).title()} {section}\n"]
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.7:
                block.append(text.paragraph() + "\n")
            elif kind < 0.85:
                block.append("".join(f"- {text.sentence()}\n" for _ in range(rng.randint(2, 6))))
            else:
                lines = [f"{a} = {b}({rng.randint(0, 99)})" for a, b in (text.draw(2) for _ in range(4))]
                block.append("```python\n" + "\n".join(lines) + "\n```\n")
        joined = "\n".join(block)
        parts.append(joined)
        size += len(joined)
    return "\n".join(parts)


def write_corpus(root: Path, files: int, mean_bytes: int, seed: int = 0) -> int:
    """Write ``files`` Markdown files (sizes 0.25x-1.75x ``mean_bytes``) in sub-folders of ``root``.

    Returns:
        The corpus size in bytes.
    """
    rng = random.Random(seed)
    text = _Text(rng, english_words())
    total = 0
    for i in range(files):
        path = root / f"part{i % 20:02d}" / f"doc{i:05d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = int(mean_bytes * rng.uniform(0.25, 1.75))
        body = markdown_file(text, f"Document {i}: {' '.join(text.draw(3))}", size)
        path.write_text(body, encoding="utf-8")
        total += len(body.encode("utf-8"))
    return total


def edit_files(root: Path, share: float, seed: int = 1) -> list[Path]:
    """Change ``share`` of the corpus's files: one paragraph of each is replaced by new text.

    Returns:
        The changed files.
    """
    rng = random.Random(seed)
    text = _Text(rng, english_words())
    paths = sorted(root.rglob("*.md"))
    chosen = sorted(rng.sample(paths, max(1, round(share * len(paths)))))
    for path in chosen:
        paragraphs = path.read_text(encoding="utf-8").split("\n\n")
        plain = [i for i, p in enumerate(paragraphs) if p and p[0].isalpha()]
        paragraphs[rng.choice(plain)] = "Edited: " + text.paragraph()
        path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return chosen


class TimedEmbedder:
    """An embedder that passes every call to ``inner`` and records the texts, the seconds and the end time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.texts: list[str] = []
        self.seconds = 0.0
        self.last_end = 0.0

    @property
    def fingerprint(self) -> str:
        return str(self.inner.fingerprint)

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def tokenizer_counter(self) -> Callable[[str], int]:
        counter: Callable[[str], int] = self.inner.tokenizer_counter()
        return counter

    def reset(self) -> None:
        self.texts, self.seconds, self.last_end = [], 0.0, 0.0

    def embed(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        start = time.perf_counter()
        vectors: np.ndarray = self.inner.embed(texts, is_query=is_query)
        self.last_end = time.perf_counter()
        self.seconds += self.last_end - start
        if not is_query:
            self.texts.extend(texts)
        return vectors
