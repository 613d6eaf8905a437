"""BM25 over chunks: bm25s scores, our tokenizer, stable integer ids, query statistics for the gate."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
from tqdm.auto import tqdm

from .._errors import RAGConfigError, StoreError
from ._tokenize import TOKENIZER_VERSION, bm25_tokenize

__all__ = ["BM25Index", "QueryStats"]

logger = logging.getLogger(__name__)
# bm25s pins its logger at DEBUG on import, which makes an application's WARNING-level logging print its
# debug lines; hand the level back to the application's configuration.
if logging.getLogger("bm25s").level == logging.DEBUG:
    logging.getLogger("bm25s").setLevel(logging.NOTSET)

_FORMAT = 1
_META = "bm25.json"
_IDS = "ids.npy"
_DF = "df.npy"
_SCORER = "bm25s"
_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


def _idf(df: np.ndarray, n_docs: int, method: str) -> np.ndarray:
    # The idf each bm25s method scores with (Kamphuis et al., ECIR 2020), recomputed here because
    # bm25s folds it into its score matrix and keeps no copy.
    df = df.astype(np.float64)
    n = float(n_docs)
    if method == "lucene":
        return np.log1p((n - df + 0.5) / (df + 0.5))
    if method == "robertson":
        return np.log(np.maximum((n - df + 0.5) / (df + 0.5), 1.0))
    if method == "atire":
        return np.log(n / df)
    if method == "bm25l":
        return np.log((n + 1.0) / (df + 0.5))
    return np.log((n + 1.0) / df)  # bm25+


def _tf_bound(method: str, k1: float) -> float:
    # The supremum of a method's term-frequency factor: Lucene and Robertson drop the (k1 + 1) numerator.
    if method in ("lucene", "robertson"):
        return 1.0
    if method == "bm25+":
        return k1 + 1.0 + 0.5  # bm25s' default delta
    return k1 + 1.0


@dataclass(frozen=True)
class QueryStats:
    """What a query's terms look like against an index's vocabulary (features for the relevance gate).

    Attributes:
        num_terms: Query terms after tokenization and stopwords (repeats counted, as BM25 scores them).
        known_fraction: Share of those terms that occur in the collection (0 for no terms).
        idf_coverage: Sum of the idf of the known terms over the sum of the idf of all terms, an unknown
            term counted with the idf of a term seen in one document (0 for no terms).
        max_score_bound: An upper bound of any document's BM25 score for this query: the sum over known
            terms of idf times the method's largest term-frequency factor (1 for ``lucene`` and
            ``robertson``, ``k1 + 1`` for ``atire`` and ``bm25l``). Divide a score by it for [0, 1].
        terms: The query terms, in order.
        idfs: The idf of each term (unknown terms at the one-document idf), aligned with ``terms``.
    """

    num_terms: int
    known_fraction: float
    idf_coverage: float
    max_score_bound: float
    terms: tuple[str, ...] = ()
    idfs: tuple[float, ...] = ()


class BM25Index:
    """A BM25 index over texts with stable integer ids, scored by the bm25s library.

    Build it with :meth:`build`, query it with :meth:`search`, persist it with :meth:`save` and
    :meth:`load`. Texts are tokenized with :func:`bm25_tokenize` (CJK-aware, stopwords out).
    """

    def __init__(
        self,
        ids: np.ndarray,
        df: np.ndarray,
        scorer: bm25s.BM25 | None,
        *,
        k1: float,
        b: float,
        method: str,
    ) -> None:
        self._ids = ids
        self._df = df
        self._scorer = scorer
        self._vocab: dict[str, int] = dict(scorer.vocab_dict) if scorer is not None else {}
        self._position = {int(i): p for p, i in enumerate(ids.tolist())}
        self.k1 = k1
        self.b = b
        self.method = method

    @classmethod
    def build(
        cls,
        ids: Sequence[int],
        texts: Sequence[str],
        *,
        k1: float = 1.2,
        b: float = 0.75,
        method: str = "lucene",
        progress: bool = False,
    ) -> BM25Index:
        """Index texts under the given ids.

        Args:
            ids: One distinct integer id per text; :meth:`search` returns them.
            texts: The texts, aligned with ``ids``.
            k1: BM25 term-frequency saturation.
            b: BM25 length normalisation, in [0, 1].
            method: The bm25s scoring variant: ``lucene`` (default), ``robertson``, ``atire``, ``bm25l``
                or ``bm25+``.
            progress: Show a progress bar while tokenizing.

        Returns:
            The index; empty ``ids`` give an empty index whose searches return ``[]``.

        Raises:
            RAGConfigError: Mismatched lengths, repeated ids, or a bad parameter.
        """
        if len(ids) != len(texts):
            raise RAGConfigError(
                f"BM25Index.build got {len(ids)} ids for {len(texts)} texts; pass one id a text"
            )
        if method not in _METHODS:
            raise RAGConfigError(
                f"unknown BM25 method {method!r}; use one of {', '.join(_METHODS)}", field="method"
            )
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise RAGConfigError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        id_array = np.asarray([int(i) for i in ids], dtype=np.int64)
        if len(np.unique(id_array)) != len(id_array):
            raise RAGConfigError("BM25Index.build got repeated ids; each text needs its own id")
        tokens = [bm25_tokenize(t) for t in tqdm(texts, desc="BM25 tokenize", disable=not progress)]
        if not any(tokens):
            return cls(id_array, np.zeros(0, dtype=np.int64), None, k1=k1, b=b, method=method)
        scorer = bm25s.BM25(k1=k1, b=b, method=method)
        scorer.index(tokens, create_empty_token=False, show_progress=progress)
        counts: Counter[str] = Counter()
        for doc in tokens:
            counts.update(set(doc))
        df = np.zeros(len(scorer.vocab_dict), dtype=np.int64)
        for token, column in scorer.vocab_dict.items():
            df[column] = counts[token]
        logger.debug("BM25 index: %d texts, %d terms", len(tokens), len(df))
        return cls(id_array, df, scorer, k1=k1, b=b, method=method)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> tuple[int, ...]:
        """The indexed ids, in build order."""
        return tuple(int(i) for i in self._ids)

    def _query_columns(self, query: str) -> list[int]:
        return [self._vocab[t] for t in bm25_tokenize(query) if t in self._vocab]

    def search(
        self, query: str, k: int, *, allowed_ids: Collection[int] | None = None
    ) -> list[tuple[int, float]]:
        """The best ``k`` texts for a query.

        Args:
            query: The query text.
            k: How many results at most.
            allowed_ids: When given, only these ids can be returned (a metadata filter's survivors).

        Returns:
            ``(id, score)`` pairs, best first (equal scores in build order), only scores above 0.
        """
        columns = self._query_columns(query)
        if k <= 0 or not columns or self._scorer is None:
            return []
        scores = np.asarray(self._scorer.get_scores_from_ids(columns), dtype=np.float64)
        if allowed_ids is not None:
            keep = np.zeros(len(scores), dtype=bool)
            positions = [self._position[int(i)] for i in allowed_ids if int(i) in self._position]
            keep[positions] = True
            scores = np.where(keep, scores, 0.0)
        found = np.flatnonzero(scores > 0)
        if len(found) > k:
            # Partition first, then sort only the survivors; the threshold keeps ties at the cut.
            cut = np.partition(scores[found], len(found) - k)[len(found) - k]
            found = found[scores[found] >= cut]
        order = found[np.lexsort((found, -scores[found]))][:k]
        return [(int(self._ids[p]), float(scores[p])) for p in order]

    def query_stats(self, query: str) -> QueryStats:
        """How a query's terms relate to the collection's vocabulary (see :class:`QueryStats`).

        Args:
            query: The query text.

        Returns:
            The statistics; all zeros for a query without terms or an empty index.
        """
        terms = bm25_tokenize(query)
        if not terms:
            return QueryStats(0, 0.0, 0.0, 0.0)
        n_docs = max(len(self._ids), 1)
        unknown_idf = float(_idf(np.ones(1), n_docs, self.method)[0])
        known = [t in self._vocab for t in terms]
        known_df = np.asarray(
            [self._df[self._vocab[t]] for t, kn in zip(terms, known, strict=True) if kn], dtype=np.int64
        )
        known_idf = iter(_idf(known_df, n_docs, self.method).tolist())
        idfs = tuple(next(known_idf) if kn else unknown_idf for kn in known)
        known_sum = sum(i for i, kn in zip(idfs, known, strict=True) if kn)
        total = sum(idfs)
        known_fraction = sum(known) / len(terms)
        # All idfs are 0 only when every term is in every document (or the method clips): fall back to counts.
        coverage = known_sum / total if total > 0 else known_fraction
        return QueryStats(
            num_terms=len(terms),
            known_fraction=known_fraction,
            idf_coverage=coverage,
            max_score_bound=known_sum * _tf_bound(self.method, self.k1),
            terms=tuple(terms),
            idfs=idfs,
        )

    def save(self, path: Path) -> None:
        """Write the index into a directory (created if missing; files in it are replaced).

        Args:
            path: The directory.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "tokenizer": TOKENIZER_VERSION,
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "bm25s": bm25s.__version__,
            "empty": self._scorer is None,
        }
        np.save(path / _IDS, self._ids)
        np.save(path / _DF, self._df)
        if self._scorer is not None:
            self._scorer.save(str(path / _SCORER), show_progress=False)
        # Written last: its presence marks a complete index.
        (path / _META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> BM25Index:
        """Read an index written by :meth:`save`.

        Args:
            path: The directory.

        Returns:
            The index.

        Raises:
            StoreError: The directory is missing, incomplete, or from another format or tokenizer version.
        """
        path = Path(path)
        try:
            meta = json.loads((path / _META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: no readable BM25 index ({exc}); rebuild the index") from exc
        if meta.get("format") != _FORMAT or meta.get("tokenizer") != TOKENIZER_VERSION:
            raise StoreError(
                f"{path}: BM25 index format {meta.get('format')}/tokenizer {meta.get('tokenizer')}, "
                f"this version reads {_FORMAT}/{TOKENIZER_VERSION}; rebuild the index"
            )
        try:
            ids = np.load(path / _IDS)
            df = np.load(path / _DF)
            scorer = None if meta["empty"] else bm25s.BM25.load(str(path / _SCORER), show_progress=False)
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{path}: BM25 index is damaged ({exc}); rebuild the index") from exc
        return cls(ids, df, scorer, k1=float(meta["k1"]), b=float(meta["b"]), method=str(meta["method"]))

    def __repr__(self) -> str:
        return f"BM25Index({len(self)} texts, {len(self._vocab)} terms, method={self.method!r})"
