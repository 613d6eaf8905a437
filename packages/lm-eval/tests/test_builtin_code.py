"""HumanEval and MBPP from their released jsonl: prompts, and programs run in lmstack-core's sandbox."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from lmstack.core.sandbox import run_python
from lmstack.eval.tasks.builtin import find_task

HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def double(xs: list) -> list:\n    """Each element twice as big."""\n',
        "canonical_solution": "    return [2 * x for x in xs]\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
        "entry_point": "double",
    },
]

MBPP = [
    {
        "task_id": task_id,
        "text": f"Write a function to add {task_id} to a number.",
        "code": f"def add_{task_id}(x):\n    return x + {task_id}",
        "test_list": [
            f"assert add_{task_id}(0) == {task_id}",
            f"assert add_{task_id}(1) == {task_id + 1}",
            f"assert add_{task_id}(-{task_id}) == 0",
        ],
        "test_setup_code": "",
        "challenge_test_list": [],
    }
    for task_id in (1, 2, 3, 4, 11, 12)
]
MBPP[-1] = {**MBPP[-1], "test_setup_code": "OFFSET = 12", "code": "def add_12(x):\n    return x + OFFSET"}


def _passes(program: str) -> bool:
    return run_python(program, timeout_s=10).ok


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_humaneval_prompt_stops_and_program(tmp_path: Path) -> None:
    (tmp_path / "HumanEval.jsonl.gz").write_bytes(gzip.compress(_jsonl(HUMANEVAL).encode()))
    task = find_task("humaneval", data_dir=tmp_path)
    requests = task.build_requests()
    assert [r.context for r in requests] == [row["prompt"] for row in HUMANEVAL]
    assert requests[0].generation.until == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert [m.name for m in task.config.metrics] == ["pass@1"]
    assert task.target(0).text == HUMANEVAL[0]["test"] + "\ncheck(add)"
    for doc_id, row in enumerate(HUMANEVAL):
        program = task.program(doc_id, row["canonical_solution"])
        assert (
            program
            == row["prompt"]
            + row["canonical_solution"]
            + "\n\n"
            + row["test"]
            + "\n\ncheck("
            + row["entry_point"]
            + ")\n"
        )
        assert _passes(program)
    assert not _passes(task.program(0, "    return a - b\n"))
    assert not _passes(task.program(1, "    return xs\n"))


def test_mbpp_splits_prompt_and_program(tmp_path: Path) -> None:
    (tmp_path / "mbpp.jsonl").write_text(_jsonl(MBPP))
    task = find_task("mbpp", data_dir=tmp_path)
    assert [doc["task_id"] for doc in task.docs] == [11, 12]
    context = task.build_requests(doc_ids=[0])[0].context
    shot = (
        "You are an expert Python programmer, and here is your task: Write a function to add 1 to a number. "
        "Your code should pass these tests:\n\n"
        "assert add_1(0) == 1\nassert add_1(1) == 2\nassert add_1(-1) == 0\n"
        "[BEGIN]\ndef add_1(x):\n    return x + 1\n[DONE]\n\n"
    )
    assert context.startswith(shot)
    assert context.count("[BEGIN]") == 4  # three shots (task ids 1-3, the prompt split) and the question
    assert context.endswith(
        "Write a function to add 11 to a number. Your code should pass these tests:\n\n"
        "assert add_11(0) == 11\nassert add_11(1) == 12\nassert add_11(-11) == 0\n[BEGIN]\n"
    )
    assert task.build_requests(doc_ids=[0])[0].generation.until == ("[DONE]",)
    for doc_id, row in enumerate(MBPP[-2:]):
        assert _passes(task.program(doc_id, row["code"]))
    assert not _passes(task.program(0, "def add_11(x):\n    return x"))
    assert not _passes(task.program(1, "def add_12(x):\n    return x + 1"))
