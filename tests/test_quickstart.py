"""The quickstart's evaluation helpers (examples/quickstart.py, steps 4-5), without training a model.

The whole quickstart runs in `nox -s quickstart`; these check the pieces it builds for lmstack-eval:
the chat-wording task's data and the needle grid's lengths. The script is imported by path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from lmstack.eval import load_task

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _load_quickstart() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quickstart = _load_quickstart()
world = quickstart.world  # the generator the quickstart imported from examples/world


def _fake_llm(max_model_len: int, prompt_tokens: int) -> SimpleNamespace:
    """What needle_lengths reads of an LLM: its context and the length of a rendered chat."""
    return SimpleNamespace(max_model_len=max_model_len, render_chat=lambda conversation: [0] * prompt_tokens)


@pytest.mark.parametrize(
    ("max_model_len", "prompt_tokens", "expected"),
    [
        # (2048 - 144 - 32 reply - 16 margin) // 64 * 64 = 1856
        (2048, 144, [128, 256, 512, 1024, 1856]),
        # a long context is capped at NEEDLE_LONGEST (2048) to bound the step's time
        (32768, 144, [128, 256, 512, 1024, 1856]),
        # (512 - 100 - 48) // 64 * 64 = 320
        (512, 100, [128, 256, 320]),
        # exactly a power of two at the top: no length twice
        (1024 + 48 + 64, 64, [128, 256, 512, 1024]),
    ],
)
def test_needle_lengths_double_up_to_the_context(
    max_model_len: int, prompt_tokens: int, expected: list[int]
) -> None:
    lengths = quickstart.needle_lengths(_fake_llm(max_model_len, prompt_tokens))
    assert lengths == expected
    assert lengths[-1] + prompt_tokens + quickstart.NEEDLE_REPLY_TOKENS <= max_model_len


def test_needle_is_not_in_the_world(tmp_path: Path) -> None:
    world_dir = tmp_path / "world"
    params = world.PRESETS["quickstart"]
    world.generate(world_dir, seed=0, **vars(params))
    text = (world_dir / "articles.jsonl").read_text(encoding="utf-8")
    for word in ("Brannock", "Orvell"):
        assert word not in text
    assert quickstart.NEEDLE.answer in quickstart.NEEDLE.fact


def test_chat_wording_task_asks_the_heldout_facts_as_the_chats_ask(tmp_path: Path) -> None:
    world_dir, eval_dir = tmp_path / "world", tmp_path / "eval"
    params = world.PRESETS["quickstart"]
    world.generate(world_dir, seed=0, **vars(params))
    facts = [r for r in world.read_jsonl(world_dir / "heldout.jsonl") if r["kind"] == "fact"]

    task = load_task(quickstart.chat_wording_task(world_dir, eval_dir))
    requests = task.build_requests()
    targets = task.targets()

    assert len(requests) == len(targets) == len(facts)
    for request, target, fact in zip(requests, targets, facts, strict=True):
        spec = world.ATTRIBUTE[fact["attribute"]]
        question = request.messages()[-1]["content"]
        assert request.kind == "generate_until" and request.is_chat
        # The first chat template of the attribute, about the held-out entity; never the held-out wording.
        assert world.template_pattern(spec.questions[0]).fullmatch(question), question
        assert question != fact["question"]
        assert target.text == fact["answer"]
