"""Guided decoding in the engine: every constrained output is valid, unconstrained ones are unchanged.

The model is the conftest's random-weight tiny llama (the hard case: nothing in its weights knows JSON).
Validity is checked independently of the grammar library: ``json.loads`` + ``jsonschema`` for JSON,
Python's ``re.fullmatch`` for regexes, membership for choices.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import torch

from lmstack.infer import LLM, InvalidRequestError, SamplingParams
from lmstack.infer.engine._sampler import Sampler, SamplingTensors

# A nested schema with enums, arrays, required and optional fields, integers, numbers and booleans.
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0},
        "weight": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "verified": {"type": "boolean"}},
            "required": ["city", "verified"],
        },
        "nickname": {"type": "string"},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
}
REGEX = r"[0-9]{3}-[A-Z]{2,4}( [a-z]+)?"
CHOICES = ["yes", "no", "maybe so", "it depends"]
PROMPTS = ["the quick brown fox", "seven wizards", "a lazy dog jumps", "hex", "zebras quietly"]


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    engine = LLM(model_dir, max_num_seqs=64)
    yield engine
    engine.close()


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(n)]


def _mixed(llm: LLM, guided: SamplingParams, n: int = 100) -> tuple[list[str], list[list[int]]]:
    """``n`` constrained requests (half greedy, half seeded sampling) sharing batches with free ones.

    Returns the constrained texts and the free requests' token ids.
    """
    prompts = _prompts(n)
    params = []
    for i in range(n):
        sampled = i % 2 == 1
        params.append(
            SamplingParams(
                **{**_fields(guided), "temperature": 1.0 if sampled else 0.0, "seed": i if sampled else None}
            )
        )
    free = SamplingParams(max_tokens=12, temperature=0)
    outs = llm.generate(prompts + prompts[:8], params + [free] * 8)
    for out in outs:
        assert out.error is None, out.error
    texts = [out.outputs[0].text for out in outs[:n]]
    return texts, [out.outputs[0].token_ids for out in outs[n:]]


def _fields(params: SamplingParams) -> dict[str, object]:
    names = (
        "max_tokens",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_json_fit",
    )
    return {name: getattr(params, name) for name in names}


@pytest.fixture(scope="module")
def free_reference(llm: LLM) -> list[list[int]]:
    """The free requests' greedy tokens when no constrained request is in the batch."""
    outs = llm.generate(_prompts(8), SamplingParams(max_tokens=12, temperature=0))
    return [out.outputs[0].token_ids for out in outs]


def test_nested_schema_100_requests_all_valid(llm: LLM, free_reference: list[list[int]]) -> None:
    texts, free = _mixed(llm, SamplingParams(max_tokens=160, guided_json=NESTED, guided_json_fit=True))
    for text in texts:
        jsonschema.validate(json.loads(text), NESTED)
    assert free == free_reference  # unconstrained greedy outputs unchanged, token for token


def test_json_object_100_requests_all_valid(llm: LLM, free_reference: list[list[int]]) -> None:
    texts, free = _mixed(
        llm, SamplingParams(max_tokens=96, guided_json={"type": "object"}, guided_json_fit=True)
    )
    for text in texts:
        assert isinstance(json.loads(text), dict)
    assert free == free_reference


def test_without_fit_json_is_valid_wherever_it_ends(llm: LLM) -> None:
    # Without guided_json_fit the schema is compiled as given: an output either completed (finish
    # "stop", valid) or was cut by max_tokens (finish "length"); never an ended-but-invalid one.
    params = [SamplingParams(max_tokens=48, guided_json=NESTED, temperature=1.0, seed=i) for i in range(24)]
    outs = llm.generate(_prompts(24), params)
    for out in outs:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), NESTED)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 48


def test_regex_100_requests_all_match(llm: LLM, free_reference: list[list[int]]) -> None:
    texts, free = _mixed(llm, SamplingParams(max_tokens=40, guided_regex=REGEX))
    for text in texts:
        assert re.fullmatch(REGEX, text), text
    assert free == free_reference


def test_choice_100_requests_all_members(llm: LLM, free_reference: list[list[int]]) -> None:
    texts, free = _mixed(llm, SamplingParams(max_tokens=16, guided_choice=CHOICES))
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1  # sampling reaches more than one choice: the mask does not pin one
    assert free == free_reference


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "(" item ("," item)* ")"\nitem ::= [a-z]{1,6}',  # GBNF
        'start: "(" item ("," item)* ")"\nitem: /[a-z]{1,6}/',  # Lark
    ],
)
def test_grammar_gbnf_and_lark(llm: LLM, grammar: str) -> None:
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=5, n=4, guided_grammar=grammar)
    (out,) = llm.generate(["x"], params)
    for c in out.outputs:
        assert re.fullmatch(r"\([a-z]{1,6}(,[a-z]{1,6})*\)", c.text), c.text
        assert c.finish_reason == "stop"


def test_output_ends_where_the_grammar_ends(llm: LLM) -> None:
    # The grammar allows exactly three digits: the request stops after them (finish "stop", not length),
    # and the end-of-sequence token was never allowed before.
    (out,) = llm.generate(["x"], SamplingParams(max_tokens=30, temperature=0, guided_regex="[0-9]{3}"))
    c = out.outputs[0]
    assert re.fullmatch("[0-9]{3}", c.text) and c.finish_reason == "stop"
    assert len(c.token_ids) <= 3


def test_seeded_constrained_sample_does_not_depend_on_batch(llm: LLM) -> None:
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11, guided_regex=REGEX)
    (alone,) = llm.generate(["seven wizards"], params)
    neighbours = [SamplingParams(max_tokens=9), params, SamplingParams(max_tokens=9, guided_choice=CHOICES)]
    together = llm.generate(["a", "seven wizards", "b"], neighbours)
    assert together[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_compiled_once_per_distinct_constraint_off_the_caller_thread(llm: LLM) -> None:
    cache = llm.engine.guided
    regex = "[a-c]{2}[0-9]"
    names: list[str] = []
    original = cache._compile

    def spy(key: tuple[str, str, int | None]) -> object:
        names.append(threading.current_thread().name)
        return original(key)

    cache._compile = spy  # type: ignore[method-assign]
    try:
        hits = cache.hits
        outs = llm.generate(["x"] * 6, SamplingParams(max_tokens=8, guided_regex=regex))
    finally:
        del cache._compile
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in outs)
    assert len(names) == 1 and names[0].startswith("lmstack-grammar")
    assert cache.hits - hits >= 5  # generate() checks each request's constraint, then the engine admits it


def test_bad_constraint_fails_alone_and_never_stalls_others(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.compile_guided(SamplingParams(guided_regex="(unclosed"))
    assert info.value.param == "guided_regex" and "unclosed" in str(info.value)
    # Queued next to free requests: the engine refuses it at the door (cached failure) ...
    with pytest.raises(InvalidRequestError):
        llm.engine.add_request("x", SamplingParams(guided_regex="(unclosed"))
    # ... and one that fails while compiling in the background ends with an error, the others finish.
    engine = llm.engine
    bad = engine.add_request("x", SamplingParams(guided_grammar="start: undefined_rule"))
    good = [engine.add_request(p, SamplingParams(max_tokens=5, temperature=0)) for p in ("a", "b")]
    done = {}
    with llm._locked():
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    assert done[bad].error is not None and "guided_grammar" in done[bad].error
    assert all(done[g].error is None and len(done[g].outputs[0].token_ids) == 5 for g in good)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"guided_json": {"type": "objectx"}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", ""]}, "guided_choice[1]"),
        ({"guided_grammar": ""}, "guided_grammar"),
        ({"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_guided_params_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_sampler_mask_matches_a_masked_reference() -> None:
    torch.manual_seed(0)
    vocab = 37
    logits = torch.randn(4, vocab)
    mask = torch.rand(2, vocab) > 0.6
    mask[:, 5] = True  # at least one allowed token per guided row
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=3),
              SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1)]  # fmt: skip
    gens = [None, None, None, torch.Generator().manual_seed(1)]
    tensors = SamplingTensors.build(params, [[1]] * 4, [[]] * 4, gens, vocab, "cpu", allowed=([1, 3], mask))
    out = Sampler()(logits, tensors)
    reference = logits.clone()
    reference[1] = reference[1].masked_fill(~mask[0], float("-inf"))
    reference[3] = reference[3].masked_fill(~mask[1], float("-inf"))
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    assert out.token_ids[1] == reference[1].argmax()
    assert bool(mask[1, out.token_ids[3]])  # a sampled guided row only ever takes an allowed token
    expected = reference[1].log_softmax(-1)[out.token_ids[1]]
    assert torch.allclose(out.logprobs[1], expected)
    assert out.top_logprobs is not None
    assert bool(mask[0, out.top_logprobs[1][1]].all())  # alternatives come from the allowed set too
