"""SamplingParams: validation messages, normalisation, vocabulary checks."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lmstack.core import LMStackError
from lmstack.infer._errors import InvalidRequestError
from lmstack.infer._sampling_params import SamplingParams

INVALID: list[tuple[str, Any, str]] = [
    ("n", 0, "[1, 128]"),
    ("n", 129, "[1, 128]"),
    ("n", 1.0, "[1, 128]"),
    ("n", True, "[1, 128]"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", -3, ">= 1"),
    ("max_tokens", 2.5, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", math.nan, "a finite number >= 0"),
    ("temperature", math.inf, "a finite number >= 0"),
    ("temperature", "1", "a finite number >= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("top_p", -0.2, "(0, 1]"),
    ("top_k", -2, "-1, 0"),
    ("top_k", 2.0, "-1, 0"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.01, "[0, 1]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("frequency_penalty", 3, "[-2, 2]"),
    ("frequency_penalty", -2.5, "[-2, 2]"),
    ("seed", 1.5, "None or an int"),
    ("seed", "7", "None or an int"),
    ("stop", 5, "a string or a list"),
    ("stop", ["ok", ""], "stop[1] must be a non-empty string, got ''"),
    ("stop", "", "non-empty string"),
    ("stop", ["ok", 3], "stop[1] must be a non-empty string, got 3"),
    ("stop_token_ids", 5, "list of ints"),
    ("stop_token_ids", [1, -1], "stop_token_ids[1] must be an int >= 0, got -1"),
    ("stop_token_ids", [1, "2"], "stop_token_ids[1] must be an int >= 0, got '2'"),
    ("ignore_eos", 1, "a bool"),
    ("logprobs", -1, "[0, 20]"),
    ("logprobs", 21, "[0, 20]"),
    ("skip_special_tokens", "yes", "a bool"),
    ("include_stop_str_in_output", None, "a bool"),
]


@pytest.mark.parametrize(("field", "value", "expected"), INVALID)
def test_invalid_value_names_field_value_and_range(field: str, value: Any, expected: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field), message
    # The field at fault, as the message names it (a list's element with its index).
    assert info.value.param == message.split(" ", 1)[0]
    assert info.value.param.split("[")[0] == field
    assert expected in message
    if not isinstance(value, list):  # a list's offending element is named instead (see `expected`)
        assert message.endswith(f"got {value!r}"), message
    # Part of the stack's error hierarchy, and a ValueError for generic callers.
    assert isinstance(info.value, LMStackError)
    assert isinstance(info.value, ValueError)


def test_top_p_message_matches_documented_example() -> None:
    with pytest.raises(InvalidRequestError, match=r"^top_p must be in \(0, 1\], got 1\.5$"):
        SamplingParams(top_p=1.5)


def test_min_tokens_cannot_exceed_max_tokens() -> None:
    with pytest.raises(InvalidRequestError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=500).min_tokens == 500
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5


def test_defaults_are_vllm_defaults() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens) == (1, 16, 0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output


def test_boundary_values_are_accepted() -> None:
    p = SamplingParams(
        n=128,
        max_tokens=1,
        temperature=0,
        top_p=1,
        top_k=0,
        min_p=1,
        repetition_penalty=0.01,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=-5,
        logprobs=20,
    )
    # ints given for float fields are stored as floats
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert isinstance(p.presence_penalty, float) and p.presence_penalty == -2.0
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(seed=2**70).seed == 2**70


def test_stop_is_normalised_to_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(stop=("x", "y")).stop == ["x", "y"]  # type: ignore[arg-type]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]  # type: ignore[arg-type]
    # The caller's list is copied, not aliased.
    stops = ["a"]
    params = SamplingParams(stop=stops)
    stops.append("b")
    assert params.stop == ["a"]


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams(temperature=1e-6, top_k=2).greedy


def test_validate_for_vocab() -> None:
    SamplingParams(stop_token_ids=[0, 99]).validate_for_vocab(100)
    SamplingParams().validate_for_vocab(1)
    with pytest.raises(
        InvalidRequestError, match=r"stop_token_ids\[1\] must be a token id in \[0, 100\), got 100"
    ) as info:
        SamplingParams(stop_token_ids=[5, 100]).validate_for_vocab(100)
    assert info.value.param == "stop_token_ids[1]"
