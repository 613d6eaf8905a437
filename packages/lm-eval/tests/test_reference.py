"""TransformersLLM, the transformers reference model: it answers as lmstack's engine does on the same
checkpoint (log-likelihoods to 1e-4, identical greedy texts), and is fingerprinted by its directory."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from lmstack.eval import EvalError, TransformersLLM, evaluate
from lmstack.eval.runner._fingerprint import fingerprint_dir, model_info
from lmstack.infer import LLM, InvalidRequestError, SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> TransformersLLM:
    return TransformersLLM(model_dir, batch_size=3)  # small batches: padding is exercised


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    llm = LLM(model_dir, dtype="float32")
    yield llm
    llm.close()


def test_evaluate_matches_the_engine(
    reference: TransformersLLM, engine: LLM, task_files: dict[str, Path]
) -> None:
    tasks = [str(p) for p in task_files.values()]
    theirs = evaluate(reference, tasks, cache=None, use_tqdm=False)
    ours = evaluate(engine, tasks, cache=None, use_tqdm=False)
    assert theirs.model.kind == "reference"
    assert set(theirs.tasks) == set(ours.tasks) == {"toy_mc", "toy_gen", "toy_ppl"}

    mc_theirs, mc_ours = theirs.tasks["toy_mc"].samples, ours.tasks["toy_mc"].samples
    assert len(mc_theirs) == len(mc_ours) == 24
    for a, b in zip(mc_theirs, mc_ours, strict=True):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    for metric in ("acc", "acc_norm"):
        assert theirs.score("toy_mc", metric) == ours.score("toy_mc", metric)

    texts = [s["answers"][0]["texts"] for s in theirs.tasks["toy_gen"].samples]
    assert texts == [s["answers"][0]["texts"] for s in ours.tasks["toy_gen"].samples]
    assert any(t[0] for t in texts)  # not vacuous: the replies have text
    assert theirs.score("toy_gen", "exact_match") == ours.score("toy_gen", "exact_match")

    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs.score("toy_ppl", metric) == pytest.approx(ours.score("toy_ppl", metric), rel=1e-5)


def test_rolling_windows_and_scoring_match(reference: TransformersLLM, engine: LLM) -> None:
    text = "the quick brown fox jumps over a lazy dog. " * 6
    # A window of 7 tokens cuts the text into many windows, each conditioned on the tokens before it.
    for max_length in (7, None):
        got = reference.loglikelihood_rolling([text, "fox", []], max_length=max_length)
        want = engine.loglikelihood_rolling([text, "fox", []], max_length=max_length)
        assert got == pytest.approx(want, abs=1e-4)
    assert got[2] == 0.0
    pairs = [("the quick ", "brown fox"), ("", "dog"), ([5, 6, 7], [8, 9])]
    got_pairs = reference.loglikelihood(pairs)  # type: ignore[arg-type]
    want_pairs = engine.loglikelihood(pairs)  # type: ignore[arg-type]
    assert [g for _, g in got_pairs] == [g for _, g in want_pairs]
    assert [s for s, _ in got_pairs] == pytest.approx([s for s, _ in want_pairs], abs=1e-4)
    with pytest.raises(InvalidRequestError, match="max_length"):
        reference.loglikelihood_rolling([text], max_length=1)


def test_generate_and_chat_honour_stops_and_max_tokens(reference: TransformersLLM, engine: LLM) -> None:
    prompts = ["the quick brown", "a lazy dog jumps over the", "seven wizards"]
    for params in (
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0, max_tokens=20, stop=["o", " the"]),
        SamplingParams(temperature=0, max_tokens=20, stop=["e"], include_stop_str_in_output=True),
    ):
        got, want = reference.generate(prompts, params), engine.generate(prompts, params)
        assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in got] == [
            (o.outputs[0].text, o.outputs[0].finish_reason) for o in want
        ]
        assert [o.outputs[0].stop_reason for o in got] == [o.outputs[0].stop_reason for o in want]
    conversation = [{"role": "user", "content": "the quick brown fox"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    assert reference.chat(conversation, params)[0].outputs[0].text == (
        engine.chat(conversation, params)[0].outputs[0].text
    )

    async def first(prompt: object) -> str:
        outputs = [out async for out in reference.stream(prompt, params)]  # type: ignore[arg-type]
        assert len(outputs) == 1 and outputs[0].finished
        return outputs[0].outputs[0].text

    assert asyncio.run(first(conversation)) == reference.chat(conversation, params)[0].outputs[0].text
    assert asyncio.run(first("the quick")) == engine.generate("the quick", params)[0].outputs[0].text


def test_only_greedy_decoding(reference: TransformersLLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"greedily only.*temperature=0\.7"):
        reference.generate("the", SamplingParams(temperature=0.7))
    with pytest.raises(InvalidRequestError, match="n=2"):
        reference.generate("the", SamplingParams(temperature=0, n=2))
    # No grammar masks in the reference: a constraint is refused, never silently ignored.
    with pytest.raises(InvalidRequestError, match="guided_regex"):
        reference.generate("the", SamplingParams(temperature=0, guided_regex="[0-9]+"))
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError) as info:
        reference.chat(chat, SamplingParams(temperature=0), response_format={"type": "json_object"})
    assert info.value.param == "response_format"
    with pytest.raises(InvalidRequestError) as info:
        reference.chat(chat, SamplingParams(temperature=0), tools=[{"type": "function"}])
    assert info.value.param == "tools"


def test_fingerprint_from_the_directory(reference: TransformersLLM, engine: LLM, model_dir: Path) -> None:
    info = model_info(reference)
    assert info.kind == "reference"
    assert info.name == model_dir.name
    assert info.fingerprint == fingerprint_dir(model_dir, extra="transformers:float32")
    # Never shares cached answers with the engine on the same checkpoint.
    assert info.fingerprint != model_info(engine, path=model_dir).fingerprint
    assert model_info(reference, fingerprint="mine").fingerprint == "mine"


def test_missing_transformers_is_a_clear_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EvalError, match="pip install transformers"):
        TransformersLLM(model_dir)
