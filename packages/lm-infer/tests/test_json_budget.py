"""JSON schemas bounded to a token budget: walks over llguidance's grammar of the bounded schema, random
and adversarial, always end within the budget and validate (jsonschema) against the original schema."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from lmstack.core import Tokenizer
from lmstack.infer.engine._json_budget import (
    JSON_COMPILE_OPTIONS,
    SchemaNotBoundable,
    bound_schema,
    fit_schema,
)

NESTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "m": {
            "type": "object",
            "properties": {"w": {"type": "number"}, "ok": {"type": "boolean"}},
            "required": ["ok"],
        },
    },
    "required": ["id", "kind", "tags"],
}
FREE_OBJECT: dict[str, Any] = {"type": "object"}
ANY_OF: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
        {"type": "null"},
    ]
}
# A pydantic-style schema: $defs and $ref, allOf, nullable fields, formats, a discriminated oneOf.
PYDANTIC: dict[str, Any] = {
    "$defs": {
        "Point": {
            "type": "object",
            "properties": {"x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
            "required": ["x"],
        },
        "Cat": {
            "type": "object",
            "properties": {"pet": {"const": "cat"}, "lives": {"type": "integer"}},
            "required": ["pet"],
        },
        "Dog": {"type": "object", "properties": {"pet": {"const": "dog"}}, "required": ["pet"]},
    },
    "type": "object",
    "properties": {
        "at": {"allOf": [{"$ref": "#/$defs/Point"}], "description": "where"},
        "when": {"type": "string", "format": "date-time"},
        "who": {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
        "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
        "big": {"type": "integer", "minimum": 10**12},
    },
    "required": ["at", "pet", "big"],
}
WALKS = {"uniform": 12, "longest": 2, "stubborn": 3, "wide": 2}


@pytest.fixture(scope="module")
def lltok(model_dir: Path) -> llguidance.LLTokenizer:
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.eos_token_id is not None
    return llguidance.LLTokenizer(
        tok.backend_tokenizer.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id
    )


@pytest.fixture(scope="module")
def token_bytes(lltok: llguidance.LLTokenizer) -> list[bytes]:
    return [lltok.decode_bytes([token]) for token in range(lltok.vocab_size)]


def _choose(policy: str, allowed: list[int], eos: int, token_bytes: list[bytes], rng: random.Random) -> int:
    if policy == "uniform":
        return rng.choice(allowed)
    others = [token for token in allowed if token != eos]
    if not others:
        return eos
    if policy == "longest":
        longest = max(len(token_bytes[token]) for token in others)
        return rng.choice([token for token in others if len(token_bytes[token]) == longest])
    # stubborn: never close a string, array or object while anything else is allowed
    for closers in ((b"}", b"]", b'"'), (b"}", b"]")):
        keep = [token for token in others if not any(c in token_bytes[token] for c in closers)]
        if keep:
            others = keep
            break
    if policy == "wide":  # and then the widest bytes: 4-byte UTF-8 characters, digits 9
        widest = max(max(token_bytes[token]) for token in others)
        others = [token for token in others if max(token_bytes[token]) == widest]
    return rng.choice(others)


def _walk(
    grammar: str,
    lltok: llguidance.LLTokenizer,
    token_bytes: list[bytes],
    policy: str,
    seed: int,
    limit: int,
) -> tuple[bytes, int, bool]:
    """Samples tokens over the grammar's mask until the matcher stops or EOS is chosen (or `limit`).

    Returns the text, the number of tokens (EOS included) and whether the walk ended by itself."""
    rng = random.Random(seed)
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    mask = allocate_token_bitmask(1, lltok.vocab_size)
    eos = lltok.eos_token
    tokens: list[int] = []
    count = 0
    while count < limit:
        if matcher.is_stopped():
            return lltok.decode_bytes(tokens), count, True
        fill_next_token_bitmask(matcher, mask)
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: lltok.vocab_size]
        allowed = np.flatnonzero(bits).tolist()
        assert allowed, "the grammar allows no token"
        assert (eos in allowed) == matcher.is_accepting()
        token = _choose(policy, allowed, eos, token_bytes, rng)
        count += 1
        if token == eos:
            return lltok.decode_bytes(tokens), count, True
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    return lltok.decode_bytes(tokens), count, matcher.is_stopped()


def _check_walks(
    original: dict[str, Any], budget: int, lltok: llguidance.LLTokenizer, token_bytes: list[bytes]
) -> list[Any]:
    fitted = fit_schema(original, budget)
    assert fitted.worst_case_bytes < budget
    grammar = llguidance.LLMatcher.grammar_from_json_schema(fitted.schema, overrides=JSON_COMPILE_OPTIONS)
    validator = jsonschema.validators.validator_for(original)(original)
    values = []
    for policy, walks in WALKS.items():
        for seed in range(walks):
            text, count, ended = _walk(grammar, lltok, token_bytes, policy, seed, budget + 1)
            assert ended and count <= budget, (policy, seed, count, text)
            assert len(text) <= fitted.worst_case_bytes, (policy, seed, text)
            value = json.loads(text)
            validator.validate(value)
            values.append(value)
    return values


@pytest.mark.parametrize("budget", [64, 128, 256])
@pytest.mark.parametrize("schema", [NESTED, FREE_OBJECT, ANY_OF], ids=["nested", "object", "anyOf"])
def test_walks_end_within_budget_and_validate(
    schema: dict[str, Any], budget: int, lltok: llguidance.LLTokenizer, token_bytes: list[bytes]
) -> None:
    _check_walks(schema, budget, lltok, token_bytes)


@pytest.mark.parametrize("budget", [128, 256])
def test_refs_allof_formats_oneof_and_narrow_numbers(
    budget: int, lltok: llguidance.LLTokenizer, token_bytes: list[bytes]
) -> None:
    values = _check_walks(PYDANTIC, budget, lltok, token_bytes)
    assert all(0 < value["at"]["x"] < 1 and value["big"] >= 10**12 for value in values)
    assert {value["pet"]["pet"] for value in values} == {"cat", "dog"}


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": [1.5, "é\n", None]}], "minItems": 1},
        {"type": "number", "minimum": -3.25},
        {"type": ["string", "integer", "null"], "minLength": 2},
        {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]},
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$"}}, "required": ["a"]},
        {},
    ],
    ids=["prefixItems", "number", "type-list", "map", "required-extra", "pattern", "anything"],
)
def test_other_keywords(
    schema: dict[str, Any], lltok: llguidance.LLTokenizer, token_bytes: list[bytes]
) -> None:
    _check_walks(schema, 100, lltok, token_bytes)


def test_the_unbounded_grammar_runs_past_the_budget(
    lltok: llguidance.LLTokenizer, token_bytes: list[bytes]
) -> None:
    # Why bounding exists, and proof that the stubborn walker does push: over the original grammar it
    # does not finish a free-form object within 256 tokens.
    grammar = llguidance.LLMatcher.grammar_from_json_schema(FREE_OBJECT, overrides=JSON_COMPILE_OPTIONS)
    _, count, ended = _walk(grammar, lltok, token_bytes, "stubborn", 0, 256)
    assert not ended and count == 256


def test_a_code_point_costs_at_most_four_bytes(lltok: llguidance.LLTokenizer) -> None:
    fitted = fit_schema({"type": "string"}, 64)
    chars = fitted.string_chars
    assert fitted.worst_case_bytes == 2 + 4 * chars <= 64 - 2
    grammar = llguidance.LLMatcher.grammar_from_json_schema(fitted.schema, overrides=JSON_COMPILE_OPTIONS)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        tokens = lltok.tokenize_bytes(text.encode())
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()

    widest = '"' + "\N{GRINNING FACE}" * chars + '"'  # 4 UTF-8 bytes each: the worst case is reached
    assert accepts(widest) and len(widest.encode()) == fitted.worst_case_bytes
    assert not accepts('"' + "\N{GRINNING FACE}" * (chars + 1) + '"')
    assert accepts('"' + "\\n" * chars + '"')
    # \u escapes (6 bytes, or 12 for a surrogate pair) are off under JSON_COMPILE_OPTIONS
    assert not accepts('"\\u0001"') and not accepts('"\\ud83d\\ude00"') and not accepts('"\\u0041"')


def test_budget_below_the_minimum_gives_none() -> None:
    # The shortest bounded form of NESTED is {"id":9,"kind":"cat","tags":[],"m":{"w":-9,"ok":false}}
    # (54 bytes, the EOS and the 2% spare on top), so 57 tokens fit and 40 do not.
    assert bound_schema(NESTED, 40) is None
    with pytest.raises(SchemaNotBoundable, match="over the budget"):
        fit_schema(NESTED, 40)
    assert fit_schema(NESTED, 57).worst_case_bytes <= 55
    assert bound_schema({"type": "string", "minLength": 100}, 200) is None


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"n": {"properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
        {"type": "array", "items": {"$ref": "#"}},
        {"type": "object", "not": {"required": ["a"]}},
        {"type": "array", "uniqueItems": True},
        {"type": "object", "patternProperties": {"^a": {"type": "string"}}},
        {"$ref": "https://example.com/schema.json"},
        {"type": "string", "format": "color"},
        {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 5}]},  # not provably disjoint
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "maxProperties": 0},
    ],
    ids=["recursive", "recursive-root", "not", "uniqueItems", "patternProperties", "remote-ref", "format",
         "oneOf-overlap", "unsatisfiable"],
)  # fmt: skip
def test_unboundable_schemas_give_none(schema: dict[str, Any]) -> None:
    assert bound_schema(schema, 512) is None


def test_the_input_schema_is_not_mutated() -> None:
    for schema in (NESTED, FREE_OBJECT, ANY_OF, PYDANTIC):
        before = copy.deepcopy(schema)
        bounded = bound_schema(schema, 300)
        assert bounded is not None
        assert schema == before
        bounded_text = json.dumps(bounded)
        assert bound_schema(schema, 300) == json.loads(bounded_text)  # deterministic, and plain JSON


def test_tighter_caps_of_the_schema_are_kept() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 3, "minLength": 1},
            "b": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5}, "maxItems": 2},
            "c": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5},
            "d": {"type": "string"},
        },
        "required": ["a", "b", "c"],
    }
    bounded = fit_schema(schema, 512)
    props = bounded.schema["properties"]
    assert props["a"] == {"type": "string", "minLength": 1, "maxLength": 3}
    assert props["b"]["maxItems"] == 2 and props["b"]["items"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 5,
    }
    assert props["c"] == {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.5}
    # The one unbounded string takes the slack: 512 less the spare (11), the fixed part and its quotes.
    fixed = len('{"a":"","b":[],"c":-1.0,"d":""}') + 4 * 3 + len("5,5")
    assert props["d"]["maxLength"] == bounded.string_chars == (512 - 11 - fixed) // 4
    assert bounded.schema["additionalProperties"] is False


def test_caps_grow_with_the_budget() -> None:
    fits = [fit_schema(NESTED, budget) for budget in (128, 256, 512)]
    for small, large in itertools.pairwise(fits):
        assert large.string_chars >= small.string_chars and large.array_items >= small.array_items
        assert large.worst_case_bytes > small.worst_case_bytes
    assert fits[0].string_chars >= 2 and fits[0].array_items >= 2
