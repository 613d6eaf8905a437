"""LLM.prompt_logprobs, which echo scoring uses: equal to a dense forward, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmstack.core import load_pretrained
from lmstack.infer import LLM, InvalidRequestError


def test_prompt_logprobs_equal_a_dense_forward(reference: LLM, model_dir: Path) -> None:
    ids = reference.tokenizer.encode("seven jovial wizards quietly hex a lazy dog")
    got = reference.prompt_logprobs(ids, top_k=3)
    model = load_pretrained(model_dir).eval()
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        entry = got[i]
        assert entry[ids[i]] == pytest.approx(float(logprobs[i - 1, ids[i]]), abs=1e-4)
        values, indices = logprobs[i - 1].topk(3)
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            assert entry[index] == pytest.approx(value, abs=1e-4)
        assert len(entry) in (3, 4)  # the top 3, plus the token itself when it is not among them
    assert reference.prompt_logprobs(ids[:1]) == [None]


@pytest.mark.parametrize(
    ("ids", "top_k", "words"),
    [([], 0, "empty"), ([1, 2], 21, "top_k"), ([1, 10**6], 0, "vocabulary"), ([1] * 300, 0, "256")],
)
def test_prompt_logprobs_refuses_bad_input(reference: LLM, ids: list[int], top_k: int, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        reference.prompt_logprobs(ids, top_k)
