"""``LLM.loglikelihood_rolling`` against transformers and lm-evaluation-harness, on a real tiny model.

The references are computed here, independently of lmstack's window code: a whole text's
log-softmax sum in one transformers forward, and a plain loop that scores every token from the
window lm-evaluation-harness would put it in.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmstack.infer import LLM, InvalidRequestError, LLMProtocol
from lmstack.infer._inputs import rolling_windows

REL = 1e-4  # the precision lmstack-eval promises against lm-evaluation-harness
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "seven", "wizards", "hex"]


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    model = LLM(model_dir)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()


def token_logprobs(hf_model: Any, seen: list[int]) -> torch.Tensor:
    """log p(seen[i + 1] | seen[: i + 1]) for every i, from one transformers forward (float64)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([seen])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seen[1:])[:, None])[:, 0]


def reference_rolling(hf_model: Any, tokens: list[int], prefix: int, max_length: int) -> float:
    """Each token scored from the window lm-evaluation-harness puts it in, one window at a time."""
    total = 0.0
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        # The model sees at most max_length tokens: the window's last input token is tokens[end - 2].
        seen = [prefix, *tokens[:end]] if start == 0 else tokens[end - max_length - 1 : end]
        total += float(token_logprobs(hf_model, seen)[-(end - start) :].sum())
    return total


def test_llm_satisfies_the_protocol(llm: LLM) -> None:
    assert isinstance(llm, LLMProtocol)


def test_short_texts_equal_one_full_context_forward(llm: LLM, hf_model: Any) -> None:
    tok = llm.tokenizer
    texts = ["the quick brown fox.", words(40, seed=1), "zebras", words(80, seed=2)]
    got = llm.loglikelihood_rolling(texts)
    assert tok.bos_token_id is not None
    for text, value in zip(texts, got, strict=True):
        ids = tok.encode(text)  # the tokenizer's own special tokens, as lm-eval's HF model encodes
        assert len(ids) < llm.max_model_len
        want = float(token_logprobs(hf_model, [tok.bos_token_id, *ids]).sum())
        assert value == pytest.approx(want, rel=REL), text


@pytest.mark.parametrize("max_length", [2, 5, 16, 49])
def test_long_text_in_windows_equals_a_plain_window_loop(llm: LLM, hf_model: Any, max_length: int) -> None:
    tok = llm.tokenizer
    ids = tok.encode(words(30, seed=3), add_special_tokens=False)[:50]
    assert len(ids) == 50
    assert tok.bos_token_id is not None
    want = reference_rolling(hf_model, ids, tok.bos_token_id, max_length)
    [got] = llm.loglikelihood_rolling([ids], max_length=max_length)
    assert got == pytest.approx(want, rel=REL)
    if max_length < 49:  # windows really change the number: context is lost at each boundary
        assert abs(got - float(token_logprobs(hf_model, [tok.bos_token_id, *ids]).sum())) > 1e-2


def test_text_longer_than_the_context_by_default(llm: LLM, hf_model: Any) -> None:
    tok = llm.tokenizer
    ids = tok.encode(words(400, seed=4), add_special_tokens=False)[:600]
    assert len(ids) > 2 * llm.max_model_len
    assert tok.bos_token_id is not None
    want = reference_rolling(hf_model, ids, tok.bos_token_id, llm.max_model_len)
    [default] = llm.loglikelihood_rolling([ids])
    [explicit] = llm.loglikelihood_rolling([ids], max_length=llm.max_model_len)
    assert default == explicit == pytest.approx(want, rel=REL)


def test_text_and_token_ids_agree(llm: LLM) -> None:
    text = words(20, seed=5)
    ids = llm.tokenizer.encode(text)
    assert llm.loglikelihood_rolling([text], max_length=8) == llm.loglikelihood_rolling([ids], max_length=8)


def test_independent_of_batching_and_of_the_other_texts(llm: LLM) -> None:
    texts: list[Any] = [words(n, seed=10 + n) for n in (3, 17, 60, 1, 33, 90)]
    texts.insert(2, llm.tokenizer.encode(words(25, seed=9), add_special_tokens=False))
    together = llm.loglikelihood_rolling(texts, max_length=16)
    alone = [llm.loglikelihood_rolling([t], max_length=16)[0] for t in texts]
    one_window_per_forward = llm.loglikelihood_rolling(texts, max_length=16, max_batch_tokens=1)
    all_in_one_forward = llm.loglikelihood_rolling(texts, max_length=16, max_batch_tokens=10**6)
    reordered = llm.loglikelihood_rolling(texts[::-1], max_length=16)[::-1]
    for other in (alone, one_window_per_forward, all_in_one_forward, reordered):
        # Only float rounding differs: a packed matmul's row may round differently with other rows.
        assert other == pytest.approx(together, rel=1e-6)
    # Duplicates score the same, wherever they sit in the batch.
    doubled = llm.loglikelihood_rolling([texts[3], *texts, texts[3]], max_length=16)
    assert doubled[0] == doubled[4] == doubled[-1]


def test_empty_inputs(llm: LLM, hf_model: Any) -> None:
    tok = llm.tokenizer
    assert llm.loglikelihood_rolling([]) == []
    assert llm.loglikelihood_rolling([[]]) == [0.0]  # no tokens, no windows: 0.0, as lm-eval sums them
    # An empty text still gets the tokenizer's bos (lm-eval's HF model encodes it so), scored after bos.
    assert tok.encode("") == [tok.bos_token_id]
    [empty] = llm.loglikelihood_rolling([""])
    assert empty == pytest.approx(float(token_logprobs(hf_model, [tok.bos_token_id] * 2).sum()), rel=REL)


def test_text_that_already_starts_with_bos_gets_no_second_one(llm: LLM) -> None:
    tok = llm.tokenizer
    assert tok.bos_token is not None
    text = words(12, seed=6)
    with_bos = llm.loglikelihood_rolling([tok.bos_token + text], max_length=8)
    assert with_bos == llm.loglikelihood_rolling([tok.encode(text)], max_length=8)


@pytest.mark.parametrize(
    ("texts", "kwargs", "message"),
    [
        (["the fox"], {"max_length": 1}, "max_length must be at least 2"),
        (["the fox"], {"max_length": 0}, "max_length must be at least 2"),
        (["the fox"], {"max_length": 257}, "longest window this model can score is 256"),
        (["the fox"], {"max_length": True}, "max_length must be an int"),
        (["the fox"], {"max_length": 8.0}, "max_length must be an int"),
        ("the fox", {}, "wrap a single one in a list"),
        ([5, 6, 7], {}, "must be a str or a list of int token ids, got int"),
        ([[5, 10**6]], {}, r"token ids \[1000000\] outside the vocabulary"),
        ([[5, 6.5]], {}, "int token ids"),
        ([None], {}, "got NoneType"),
    ],
)
def test_bad_requests_are_refused(llm: LLM, texts: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        llm.loglikelihood_rolling(texts, **kwargs)


def test_windows_are_lm_evaluation_harness_windows() -> None:
    import lm_eval.utils as lm_utils

    tokens = list(range(100, 161))
    for n in (0, 1, 2, 15, 16, 17, 32, 33, 61):
        for max_length in (1, 2, 3, 7, 16, 60, 61, 100):
            want = [
                lm_utils.make_disjoint_window(window)
                for window in lm_utils.get_rolling_token_windows(tokens[:n], 7, max_length, context_len=1)
            ]
            assert rolling_windows(tokens[:n], 7, max_length) == [(list(a), list(b)) for a, b in want]


def test_equals_lm_evaluation_harness_hf_model(llm: LLM, model_dir: Path) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = ["", "the quick brown fox.", words(60, seed=7), llm.tokenizer.bos_token + words(9, seed=8)]
    reference = HFLM(pretrained=str(model_dir), max_length=16, batch_size=3, device="cpu", dtype="float32")
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0) for text in texts
    ]
    want = reference.loglikelihood_rolling(requests, disable_tqdm=True)
    assert llm.loglikelihood_rolling(texts, max_length=16) == pytest.approx(want, rel=REL)
