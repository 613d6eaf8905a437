"""How often a model prefers the chosen completion of held-out pairs: the check after a preference run.

:func:`score_preferences` computes every pair's summed completion log-probs under a model, through the
same data pipeline as training (chat template, completion-only targets, packed pairs, overflow
handling), and :class:`PreferenceScores` turns them into accuracies with their standard errors:

* by summed log-prob (``log π(chosen) > log π(rejected)``);
* per token (length-normalised, as SimPO and ORPO reward);
* by DPO's implicit reward against a reference's scores (``β Δ`` of the log-ratios, which is what DPO
  optimises; β does not change its sign, so it is left out).

Example:
    >>> heldout = DataConfig(paths=["heldout.jsonl"], format="preference")
    >>> after = score_preferences("out/runs/dpo-world/final", heldout)  # doctest: +SKIP
    >>> before = score_preferences("out/quickstart/pretrain/final", heldout)  # doctest: +SKIP
    >>> after.accuracy(), after.accuracy(reference=before)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

from lmstack.core import CausalLM, Tokenizer, load_pretrained
from lmstack.train._objectives import segment_layout, sequence_logps
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import TrainError
from lmstack.train.data._preference_packing import build_preference_dataset

__all__ = ["PreferenceScores", "score_preferences"]


@dataclass
class PreferenceScores:
    """Summed completion log-probs of pairs under one model, in the order of the data files.

    Attributes:
        chosen: ``[P]`` log-probs of the chosen completions.
        rejected: ``[P]`` log-probs of the rejected completions.
        chosen_tokens: ``[P]`` completion tokens of the chosen completions.
        rejected_tokens: ``[P]`` completion tokens of the rejected completions.
        index: ``[P]`` each pair's index among the pairs read (pairs dropped by overflow handling are
            missing).
    """

    chosen: NDArray[np.float64]
    rejected: NDArray[np.float64]
    chosen_tokens: NDArray[np.int64]
    rejected_tokens: NDArray[np.int64]
    index: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def accuracy(
        self, *, per_token: bool = False, reference: PreferenceScores | None = None
    ) -> tuple[float, float]:
        """The share of pairs whose chosen completion wins, and its standard error ``sqrt(p (1 - p) / n)``.

        Args:
            per_token: Compare per-token averages instead of sums.
            reference: Compare log-ratios against these scores of a reference model (DPO's implicit
                reward); the pairs must be the same.

        Returns:
            ``(accuracy, standard error)``; a tie counts as a loss.

        Raises:
            TrainError: ``reference`` holds other pairs.
        """
        chosen, rejected = self.chosen, self.rejected
        if per_token:
            chosen, rejected = chosen / self.chosen_tokens, rejected / self.rejected_tokens
        if reference is not None:
            if not np.array_equal(reference.index, self.index):
                raise TrainError(
                    "the reference scores are of other pairs; score the same data with both models"
                )
            chosen, rejected = chosen - reference.chosen, rejected - reference.rejected
        wins = chosen > rejected
        n = int(wins.shape[0])
        if n == 0:
            return math.nan, math.nan
        p = float(wins.mean())
        return p, math.sqrt(p * (1 - p) / n)


@torch.no_grad()
def score_preferences(
    model: CausalLM | str | os.PathLike[str],
    data: DataConfig,
    *,
    tokenizer: Tokenizer | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    show_progress: bool | None = None,
) -> PreferenceScores:
    """Every pair's summed completion log-probs under ``model``, through the training data pipeline.

    Args:
        model: A causal LM, or a Hugging Face directory to load one from (fp32).
        data: The pairs (``format: preference`` or one of its layouts); ``max_length`` and overflow
            handling apply as in training; the order is the files' (``shuffle`` is ignored).
        tokenizer: The model's tokenizer (default: the directory's).
        batch_size: Bins (or padded pairs) per forward.
        device: Where to compute (default: the model's device, or CPU for a directory).
        show_progress: A progress bar (None: on a terminal).

    Returns:
        The :class:`PreferenceScores`.

    Raises:
        TrainError: No tokenizer for an in-memory model, or unpaired (KTO) data.
    """
    if not isinstance(model, CausalLM):
        directory = model
        model = load_pretrained(directory, dtype="float32")
        tokenizer = tokenizer or Tokenizer.from_pretrained(directory)
    if tokenizer is None:
        raise TrainError("score_preferences() needs the tokenizer of an in-memory model")
    if data.format == "kto":
        raise TrainError("score_preferences() scores pairs; data.format: kto holds unpaired rows")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    # Packed bins or padded pairs: both index by position and collate their own items.
    dataset: Any = build_preference_dataset(
        replace(data, shuffle=False), tokenizer, show_progress=show_progress
    )
    total = len(dataset.data)
    values = np.full((total, 2), np.nan)
    counts = np.zeros((total, 2), dtype=np.int64)
    was_training = model.training
    model.to(target).eval()
    try:
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc="Scoring pairs", unit="batch", disable=not show_progress or None):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = dataset.collate(items).to(target)
            layout = segment_layout(batch)
            assert layout.second is not None
            logps, tokens = sequence_logps(model, batch, layout)
            units = layout.unit_index.cpu().numpy()
            for column, segments in enumerate((layout.first, layout.second)):
                values[units, column] = logps[segments].double().cpu().numpy()
                counts[units, column] = tokens[segments].cpu().numpy()
    finally:
        model.train(was_training)
    kept = np.flatnonzero(~np.isnan(values[:, 0]))
    return PreferenceScores(
        chosen=values[kept, 0],
        rejected=values[kept, 1],
        chosen_tokens=counts[kept, 0],
        rejected_tokens=counts[kept, 1],
        index=kept.astype(np.int64),
    )
