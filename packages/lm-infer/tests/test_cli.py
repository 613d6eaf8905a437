"""`lmstack generate` through the installed console script: output, greedy parity with LLM, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.infer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=5)


def _lmstack(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("lmstack")
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, encoding="utf-8", timeout=120, check=False
    )


def _records(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model_dir)


def test_help_lists_generate() -> None:
    result = _lmstack("--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+generate\s", result.stdout, re.MULTILINE), result.stdout


def test_generate_json_prints_one_greedy_line_per_prompt_matching_llm(model_dir: Path, llm: LLM) -> None:
    prompts = ["the quick", "a lazy dog jumps"]
    args = [arg for p in prompts for arg in ("--prompt", p)]
    # No --temperature: the command's default is greedy.
    records = _records(_lmstack("generate", str(model_dir), *args, "--max-tokens", "5", "--json"))
    expected = llm.generate(prompts, GREEDY)
    assert [r["prompt"] for r in records] == prompts  # one line per prompt, in order
    for record, out in zip(records, expected, strict=True):
        [completion] = record["completions"]
        assert completion["token_ids"] == out.outputs[0].token_ids
        assert len(completion["token_ids"]) == 5
        assert completion["text"] == out.outputs[0].text
        assert completion["finish_reason"] == "length"


def test_chat_uses_the_chat_template(model_dir: Path, llm: LLM) -> None:
    args = ["--chat", "--prompt", "hello", "--max-tokens", "5", "--json"]
    [record] = _records(_lmstack("generate", str(model_dir), *args))
    [expected] = llm.chat([{"role": "user", "content": "hello"}], GREEDY)
    assert record["completions"][0]["token_ids"] == expected.outputs[0].token_ids
    # The chat template wraps the prompt, so it is not a plain completion of "hello".
    assert expected.prompt_token_ids != llm.tokenizer.encode("hello")


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_dir_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    _assert_one_line_error(_lmstack("generate", str(missing), "--prompt", "hi"), str(missing))


def test_no_prompt_is_a_usage_error(model_dir: Path) -> None:
    _assert_one_line_error(_lmstack("generate", str(model_dir)), "--prompt")


def test_unreadable_prompts_file_is_a_one_line_error(model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "prompts.txt"
    _assert_one_line_error(_lmstack("generate", str(model_dir), "--prompts-file", str(missing)), str(missing))
