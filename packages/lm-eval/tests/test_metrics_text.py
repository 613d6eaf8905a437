"""Exact match and its normalisers, answer extraction, and math answer equivalence.

References: lm-evaluation-harness's `exact_match_hf_evaluate` and its `regex` filter (the GSM8K
strict and flexible patterns), and a hand-written truth table for math equivalence.
"""

from __future__ import annotations

from typing import Any

import pytest
from lm_eval.api import metrics as lm_metrics
from lm_eval.filters import extraction as lm_extraction

from lmstack.eval.metrics import (
    Extraction,
    GenerationResult,
    MetricError,
    exact_match,
    extract_answer,
    get_metric,
    math_equal,
)
from lmstack.eval.metrics._math import parse_math
from lmstack.eval.metrics._text import normalize_text

PAIRS = [
    ("The answer is 42.", "the answer is 42"),
    ("Paris", "paris"),
    ("  Paris", "Paris"),
    ("1,234", "1234"),
    ("$1,234.", "1234"),
    ("#### 72", "Natalia sold 48 clips.\n#### 72"),
    ("Hello, World!", "hello world"),
    ("abc123", "abc"),
    ("Σίσυφος.", "σίσυφος"),
    ("3 apples", "three apples"),
    ("", ""),
]

OPTIONS: list[dict[str, Any]] = [
    {},
    {"ignore_case": True},
    {"ignore_punctuation": True},
    {"ignore_numbers": True},
    {"ignore_case": True, "ignore_punctuation": True, "ignore_numbers": True},
    {"ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]},  # GSM8K's
    {"regexes_to_ignore": ["^\\s+"], "ignore_punctuation": True},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_exact_match_matches_lm_eval(options: dict[str, Any]) -> None:
    for prediction, reference in PAIRS:
        expected = lm_metrics.exact_match_hf_evaluate(
            predictions=[prediction], references=[reference], **options
        )["exact_match"]
        got = get_metric("exact_match").item(GenerationResult(prediction, [reference]), **options)
        assert got == expected, (prediction, reference, options)


def test_exact_match_takes_the_best_reference_and_a_single_regex() -> None:
    result = GenerationResult("Paris.", ["London", "paris"])
    assert exact_match(result) == 0.0
    assert exact_match(result, ignore_case=True, ignore_punctuation=True) == 1.0
    assert exact_match(GenerationResult("$5", ["5"]), regexes_to_ignore="\\$") == 1.0
    assert normalize_text("A-B 12!", ignore_punctuation=True, ignore_numbers=True) == "AB "


def test_generation_result_validates_references() -> None:
    with pytest.raises(MetricError, match="not a single string"):
        GenerationResult("a", "a")  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="at least one reference"):
        GenerationResult("a", [])


REPLIES = [
    "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72",
    "She pays $1,250.50 in total, so #### 1,250.50",
    "The total is -3 degrees.",
    "No numbers here at all.",
    "#### 12 but then #### 13",
    "It costs $18.",
    "",
    "5 apples and 7 pears make 12 fruit.",
]


@pytest.mark.parametrize(
    ("pattern", "select"),
    [("#### (\\-?[0-9\\.\\,]+)", 0), ("(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)],
    ids=["gsm8k-strict", "gsm8k-flexible"],
)
def test_regex_extraction_matches_lm_eval_filter(pattern: str, select: int) -> None:
    lm_filter = lm_extraction.RegexFilter(regex_pattern=pattern, group_select=select)
    expected = lm_filter.apply([REPLIES], [{}])[0]
    for reply, want in zip(REPLIES, expected, strict=True):
        got = extract_answer(reply, ["regex"], pattern=pattern, select=select)
        assert got.answer == want, reply
        assert got.ok == (want != "[invalid]")


@pytest.mark.parametrize(
    ("text", "strategies", "expected"),
    [
        ("48 + 24 = 72 clips, costing $1,250.", ["last_number"], Extraction("1250", True, "last_number")),
        ("The change is -0.5 now.", ["last_number"], Extraction("-0.5", True, "last_number")),
        ("About 2/3 of them.", ["last_number"], Extraction("2/3", True, "last_number")),
        ("None at all.", ["last_number"], Extraction("[invalid]", False, None)),
        ("On 2024-03-01 we had 5-3 = 2 left", ["last_number"], Extraction("2", True, "last_number")),
        ("It fell to -4.5", ["last_number"], Extraction("-4.5", True, "last_number")),
        ("I think (C) is right.", ["choice_letter"], Extraction("C", True, "choice_letter")),
        ("A good guess: the answer is B.", ["choice_letter"], Extraction("B", True, "choice_letter")),
        ("B. Because it rains.", ["choice_letter"], Extraction("B", True, "choice_letter")),
        ("Definitely D", ["choice_letter"], Extraction("D", True, "choice_letter")),
        ("The answer is a cat, so B", ["choice_letter"], Extraction("B", True, "choice_letter")),
        ("I cannot tell.", ["choice_letter"], Extraction("[invalid]", False, None)),
        ("So the answer is 18. Done.", ["answer_is"], Extraction("18", True, "answer_is")),
        ("The answer is: **Paris**", ["answer_is"], Extraction("Paris", True, "answer_is")),
        ("the answer is 3.5\nmore text", ["answer_is"], Extraction("3.5", True, "answer_is")),
        ("The answer is 4. Wait, the answer is 5.", ["answer_is"], Extraction("5", True, "answer_is")),
        (
            "The answer is $\\boxed{\\frac{1}{2}}$.",
            ["answer_is"],
            Extraction("\\frac{1}{2}", True, "answer_is"),
        ),
        ("We get \\boxed{x^{2}+1} finally", ["boxed"], Extraction("x^{2}+1", True, "boxed")),
        ("Unclosed \\boxed{12", ["boxed"], Extraction("[invalid]", False, None)),
        # The chain falls back to the next strategy, then to the fallback value.
        ("I get 7 then 9", ["answer_is", "last_number"], Extraction("9", True, "last_number")),
        ("nothing", ["answer_is", "boxed", "last_number"], Extraction("[invalid]", False, None)),
    ],
)
def test_extraction_strategies(text: str, strategies: list[str], expected: Extraction) -> None:
    assert extract_answer(text, strategies) == expected


def test_extraction_options_and_errors() -> None:
    assert extract_answer("no", ["last_number"], fallback="") == Extraction("", False, None)
    assert extract_answer("I pick E, not F", ["choice_letter"], letters="EF").answer == "E"
    found = extract_answer(
        "x=1, y=2", ["regex"], pattern=r"(?P<var>[a-z])=(?P<val>\d)", group="val", select=-1
    )
    assert found == Extraction("2", True, "regex")
    assert extract_answer("Answer: 3", "regex", pattern=r"Answer: (\d)").answer == "3"
    with pytest.raises(MetricError, match="unknown extraction strategy 'first_word'"):
        extract_answer("x", ["first_word"])
    with pytest.raises(MetricError, match="needs a pattern"):
        extract_answer("x", ["regex"])
    with pytest.raises(MetricError, match="no group 2"):
        extract_answer("a1", ["regex"], pattern=r"a(\d)", group=2)


EQUAL = [
    ("1,234", "1234"),
    ("1,234,567.5", "1234567.5"),
    ("18 dollars", "18"),
    ("$1,234.50", "1234.5"),
    ("5 cm", "5"),
    ("5cm", "5"),
    ("50\\%", "50"),
    ("90^\\circ", "90"),
    ("0.5", "\\frac{1}{2}"),
    ("0.5", "1/2"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\frac12", ".5"),
    ("0.1 + 0.2", "0.3"),
    ("-3", "- 3"),
    ("2^{10}", "1024"),
    ("3 \\cdot 4", "12"),
    ("x = 5", "5"),
    ("\\boxed{7}", "7"),
    ("$\\frac{\\sqrt{3}}{2}$", "0.8660254"),
    ("\\sqrt{2}/2", "1/\\sqrt{2}"),
    ("\\sqrt{16}", "4"),
    ("2\\pi", "6.283185307"),
    ("(1, 2)", "(1,2)"),
    ("1e3", "1000"),
    ("Paris", "paris."),
    ("\\text{yes}", "yes"),
]
NOT_EQUAL = [
    ("0.33", "1/3"),
    ("3", "4"),
    ("1,2", "12"),
    ("(1, 2)", "(2, 1)"),
    ("2x", "2"),
    ("10^{1000000}", "1"),
    ("1/0", "0"),
    ("Paris", "London"),
    ("5", "five"),
    ("", ""),
]
SYMBOLIC_EQUAL = [("2(x+1)", "2x+2"), ("x^2", "x \\cdot x"), ("\\frac{x}{2}", "0.5x"), ("a+b", "b+a")]
SYMBOLIC_NOT_EQUAL = [("x+y", "x+z"), ("x^2", "2x")]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_math_equal(a: str, b: str) -> None:
    assert math_equal(a, b)
    assert math_equal(b, a)


@pytest.mark.parametrize(("a", "b"), NOT_EQUAL)
def test_math_not_equal(a: str, b: str) -> None:
    assert not math_equal(a, b)
    assert not math_equal(b, a)


@pytest.mark.parametrize(("a", "b"), SYMBOLIC_EQUAL)
def test_math_symbolic_equal(a: str, b: str) -> None:
    pytest.importorskip("sympy")
    assert math_equal(a, b)


@pytest.mark.parametrize(("a", "b"), SYMBOLIC_NOT_EQUAL)
def test_math_symbolic_not_equal(a: str, b: str) -> None:
    pytest.importorskip("sympy")
    assert not math_equal(a, b)


def test_math_never_evaluates_code() -> None:
    # Each would do something (or hang) under eval; the walker rejects it as not math.
    hostile = ("__import__('os').system('true')", "(lambda: 1)()", "[1]*10**9", "open('x')", "9**9**9**9")
    for text in (*hostile, "x + ((2^200)^200)^200", "x" * 1000):
        assert parse_math(text) is None, text


def test_math_equiv_metric_takes_the_best_reference() -> None:
    metric = get_metric("math_equiv")
    items = [
        metric.item(GenerationResult("\\frac{1}{4}", ["0.25"])),
        metric.item(GenerationResult("7", ["six", "6"])),
        metric.item(GenerationResult("3.14159", ["\\pi"]), rel_tol=1e-3),
    ]
    assert items == [1.0, 0.0, 1.0]
    assert metric.score(items).value == pytest.approx(2 / 3)
