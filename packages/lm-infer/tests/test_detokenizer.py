"""IncrementalDetokenizer on a real byte-level BPE tokenizer: multi-byte text, stop strings and tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from lmstack.core import Tokenizer, train_bpe_tokenizer
from lmstack.infer._errors import InferError
from lmstack.infer._sampling_params import SamplingParams
from lmstack.infer.engine._detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world, café crème brûlée! naïve résumé, déjà vu.",
    "中文字符测试 你好 世界。日本語も少し。",
    "emoji 😀🎉🚀 party time 👍🏽 ok",
    "The quick brown fox jumps over the lazy dog. STOP here. END of text.",
    "Numbers 12345 and symbols #@! ### are fine.",
]

SAMPLES = [
    "Hello café! 中文 😀 and résumé.",
    "déjà vu 🚀🎉 你好世界 The quick fox",
    "STOP? no: ST OP, S-T-O-P. 世界 END",
    "👍🏽👍🏽 emoji family 中文字符 é",
    "plain ascii text only",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # vocab_size=300 leaves few merges, so most multi-byte characters span several tokens.
    return train_bpe_tokenizer(iter(CORPUS * 10), vocab_size=300)


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("A prompt with ü and 中 before the completion:")


def run(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    """Pushes ids until the completion ends; returns every emission (the last one from finish)."""
    pieces = []
    for token in ids:
        pieces.append(detok.push(token))
        if detok.done:
            return pieces
    pieces.append(detok.finish())
    return pieces


def reference_cut(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """The full text cut at the stop occurrence that ends first (ties: the one starting first)."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    if best is None:
        return text, None
    end, start, stop = best
    return text[: end if include else start], stop


def check_stream(pieces: list[str], final: str) -> None:
    """Every intermediate emission is a prefix of the final text, and none ends mid-character."""
    so_far = ""
    for piece in pieces:
        so_far += piece
        assert final.startswith(so_far), (so_far, final)
        assert "\ufffd" not in piece
    assert so_far == final


@pytest.mark.parametrize("sample", SAMPLES)
def test_stream_equals_full_decode(tokenizer: Tokenizer, prompt: list[int], sample: str) -> None:
    ids = tokenizer.encode(sample, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    pieces = run(detok, ids)
    check_stream(pieces, tokenizer.decode(ids))
    assert tokenizer.decode(ids) == sample
    assert detok.text == sample and not detok.stopped and detok.stop_reason is None and detok.done


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀中", add_special_tokens=False)
    assert len(ids) >= 4, "the test needs characters that span several tokens"
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    pieces = [detok.push(token) for token in ids]
    assert pieces[0] == ""  # the first byte(s) of the emoji alone are no character
    assert "".join(pieces) == "😀中"
    assert all(piece in ("", "😀", "中", "😀中") for piece in pieces)


def test_incomplete_bytes_are_flushed_by_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    streamed = "".join(detok.push(token) for token in ids)
    # Byte-level BPE glues the space to the emoji's first bytes: that token's text waits too.
    assert streamed in ("ok", "ok ")
    assert streamed + detok.finish() == tokenizer.decode(ids)
    assert detok.text.endswith("\ufffd")


def test_decoding_window_stays_small(tokenizer: Tokenizer, prompt: list[int]) -> None:
    class Spy:
        """Delegates to the tokenizer, recording how many ids each decode gets."""

        def __init__(self, inner: Tokenizer) -> None:
            self.inner = inner
            self.sizes: list[int] = []

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
            self.sizes.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    spy = Spy(tokenizer)
    ids = tokenizer.encode(" ".join(SAMPLES) * 8, add_special_tokens=False)
    assert len(ids) > 600
    detok = IncrementalDetokenizer(spy, prompt, SamplingParams())  # type: ignore[arg-type]
    check_stream(run(detok, ids), tokenizer.decode(ids))
    assert max(spy.sizes) <= 16  # the window, not the whole completion
    assert len(detok._ids) < 300  # ids before the window are dropped


STOP_CASES = [
    ("Hello café! 中文 😀 and résumé.", ["中文"]),
    ("Hello café! 中文 😀 and résumé.", ["é! 中"]),
    ("Hello café! 中文 😀 and résumé.", ["😀 and"]),
    ("Hello café! 中文 😀 and résumé.", ["zzz", "résumé."]),
    ("STOP? no: ST OP, S-T-O-P. 世界 END", ["ST OP", "STOP?"]),
    ("STOP? no: ST OP, S-T-O-P. 世界 END", [". 世", "END"]),
    ("STOP? no: ST OP, S-T-O-P. 世界 END", ["S-T-O-X", "END"]),  # a near miss first
    ("abcd efgh", ["bc", "abcd"]),  # "bc" ends first
    ("abcd efgh", ["abcd", "bcd"]),  # same end: the earlier start wins
    ("abcd efgh", ["cd", "bc"]),  # found in the same push: the one ending first wins, not list order
    ("abcd efgh", ["bcd", "abcd"]),
    ("Hello café! 中文 😀", ["文 😀", "中文"]),
    ("The quick brown fox", ["not there"]),
    ("The quick brown fox", ["fox and more"]),  # the text ends inside a possible stop string
]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(("sample", "stops"), STOP_CASES)
def test_stop_strings_cut_exactly(
    tokenizer: Tokenizer, prompt: list[int], sample: str, stops: list[str], include: bool
) -> None:
    ids = tokenizer.encode(sample, add_special_tokens=False)
    expected, reason = reference_cut(tokenizer.decode(ids), stops, include)
    detok = IncrementalDetokenizer(
        tokenizer, prompt, SamplingParams(stop=stops, include_stop_str_in_output=include)
    )
    pieces = run(detok, ids)
    check_stream(pieces, expected)
    assert detok.text == expected
    assert detok.stopped == (reason is not None) and detok.stop_reason == reason
    if reason is None:
        # Text that might have begun a stop string was held back until finish().
        tail = next((s for s in stops if sample.endswith(s[:3])), None)
        if tail is not None:
            assert pieces[-1].endswith(tail[:3])


def test_stop_strings_at_every_position(tokenizer: Tokenizer) -> None:
    # Every substring of a multi-byte sample as the stop string: spans of 1 to 6 tokens, starting
    # anywhere (including inside a token), never leaked, always cut at the reference position.
    sample = "Hi 中文, café 😀🚀 ok. 世界"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    spanning = 0
    for start in range(len(sample)):
        for length in (1, 2, 3, 5):
            stop = sample[start : start + length]
            if len(stop) < length:
                continue
            for include in (False, True):
                expected, reason = reference_cut(sample, [stop], include)
                detok = IncrementalDetokenizer(
                    tokenizer, [], SamplingParams(stop=[stop], include_stop_str_in_output=include)
                )
                pieces = run(detok, ids)
                check_stream(pieces, expected)
                assert detok.stop_reason == reason == stop
            spanning += len(tokenizer.encode(stop, add_special_tokens=False)) > 1
    assert spanning > 20  # many of these stop strings cross token boundaries


def test_text_after_stop_in_same_token_is_dropped(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("brown fox", add_special_tokens=False)
    token_texts = [tokenizer.decode([i]) for i in ids]
    multi = next(t for t in token_texts if len(t) >= 2)  # a token of several characters
    stop = multi[0]  # matches at its first character: the rest of that token must be dropped
    expected, _ = reference_cut("brown fox", [stop], False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
    assert "".join(run(detok, ids)) == expected
    assert not expected.endswith(multi)


def test_stop_token_ids_and_eos(tokenizer: Tokenizer, prompt: list[int]) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    text_ids = tokenizer.encode("café 中文", add_special_tokens=False)
    stop_id = text_ids[3]

    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop_token_ids=[stop_id]))
    assert "".join(run(detok, [*text_ids, 42])) == tokenizer.decode(text_ids[:3])
    assert detok.stopped and detok.stop_reason == stop_id and detok.num_tokens == 4

    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=False))
    assert "".join(run(detok, [*text_ids, eos, 42])) == "café 中文"  # eos text never emitted
    assert detok.stopped and detok.stop_reason is None

    # eos listed as a stop token id reports it.
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop_token_ids=[eos]))
    run(detok, [*text_ids, eos])
    assert detok.stopped and detok.stop_reason == eos

    # ignore_eos: an ordinary (special) token.
    for skip in (True, False):
        params = SamplingParams(ignore_eos=True, skip_special_tokens=skip)
        detok = IncrementalDetokenizer(tokenizer, prompt, params)
        ids = [*text_ids, eos, *text_ids]
        assert "".join(run(detok, ids)) == tokenizer.decode(ids, skip_special_tokens=skip)
        assert not detok.stopped

    # Explicit eos ids override the tokenizer's.
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(), eos_token_ids=[text_ids[1]])
    assert "".join(run(detok, text_ids)) == tokenizer.decode(text_ids[:1])


def test_stop_token_flushes_held_back_text(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    ids = tokenizer.encode("the end STO", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["STOP"]))
    streamed = "".join(detok.push(i) for i in ids)
    assert streamed == "the end "  # "STO" might still become "STOP"
    assert detok.push(eos) == "STO"
    assert detok.text == "the end STO" and detok.stop_reason is None


def test_skip_special_tokens(tokenizer: Tokenizer, prompt: list[int]) -> None:
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end is not None and im_end in tokenizer.all_special_ids
    a = tokenizer.encode("中文 ok", add_special_tokens=False)
    ids = [*a, im_end, *a]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(skip_special_tokens=skip))
        pieces = run(detok, ids)
        check_stream(pieces, tokenizer.decode(ids, skip_special_tokens=skip))
        assert ("<|im_end|>" in detok.text) is not skip


def test_min_tokens_defers_stops(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_id
    assert eos is not None
    ids = tokenizer.encode("ab ab ab", add_special_tokens=False)
    # Before min_tokens, neither the stop string nor eos counts.
    params = SamplingParams(stop=["ab"], min_tokens=2 * len(ids) + 2, max_tokens=None)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    pieces = run(detok, [*ids, eos, *ids])
    assert not detok.stopped
    check_stream(pieces, tokenizer.decode([*ids, eos, *ids], skip_special_tokens=True))
    # A stop string ending once min_tokens is reached counts.
    first = tokenizer.encode("ab", add_special_tokens=False)
    params = SamplingParams(stop=["ab"], min_tokens=len(ids) + 1 + len(first))
    detok = IncrementalDetokenizer(tokenizer, [], params)
    pieces = run(detok, [*ids, tokenizer.encode(" ", add_special_tokens=False)[0], *first, *ids])
    assert detok.stopped and detok.stop_reason == "ab"
    assert "".join(pieces) == "ab ab ab "


def test_push_after_end_raises(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop="a"))
    ids = tokenizer.encode("xa", add_special_tokens=False)
    run(detok, ids)
    assert detok.stopped and detok.finish() == ""
    with pytest.raises(InferError, match="after the completion ended"):
        detok.push(ids[0])
    finished = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    finished.push(ids[0])
    finished.finish()
    assert finished.finish() == ""
    with pytest.raises(InferError):
        finished.push(ids[0])
