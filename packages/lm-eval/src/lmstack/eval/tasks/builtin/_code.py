"""Code benchmarks scored by running the completions in lmstack-core's sandbox (pass@k).

* HumanEval: ``HumanEval.jsonl`` (or the released ``HumanEval.jsonl.gz``), rows ``task_id``, ``prompt``,
  ``canonical_solution``, ``test``, ``entry_point``; the model completes the function body and the
  program run is the prompt, the completion, the tests and ``check(entry_point)``.
* MBPP: ``mbpp.jsonl`` of the original release, rows ``task_id``, ``text``, ``code``, ``test_list``
  (``test_setup_code`` when present); the splits by task id as released (test 11-510, the 3-shot
  prompt examples 1-10, validation 511-600, train 601-974), prompted as lm-eval's ``mbpp``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from lmstack.eval.tasks._config import (
    CodeConfig,
    DatasetConfig,
    GenerationKwargs,
    MetricConfig,
    SplitConfig,
    TaskConfig,
)
from lmstack.eval.tasks._task import Task
from lmstack.eval.tasks.builtin._base import BuiltinTask, Doc, data_root, find_file, read_jsonl

__all__ = ["CODE_TASKS", "MBPP_SPLITS"]

DataDir = str | os.PathLike[str] | None

MBPP_SPLITS: dict[str, range] = {
    "test": range(11, 511),
    "prompt": range(1, 11),
    "validation": range(511, 601),
    "train": range(601, 975),
}
"""MBPP's splits as task-id ranges (the original paper's and Hugging Face's ``full`` configuration)."""


def _humaneval_row(row: Doc) -> Doc:
    return {key: str(row[key]) for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}


def humaneval(data_dir: DataDir) -> Task:
    """HumanEval, greedy pass@1, stopping where lm-eval's ``humaneval`` stops."""
    root = data_root("humaneval", data_dir, "HumanEval.jsonl or HumanEval.jsonl.gz")
    path = find_file("humaneval", root, ["HumanEval.jsonl", "HumanEval.jsonl.gz"])
    config = TaskConfig(
        name="humaneval",
        dataset=DatasetConfig(format="jsonl", data_files={"test": (path,)}),
        output_type="generate_until",
        doc_to_text="prompt",
        doc_to_target="{{test}}\ncheck({{entry_point}})",
        generation=GenerationKwargs(until=("\nclass", "\ndef", "\n#", "\nif", "\nprint"), max_gen_toks=1024),
        code=CodeConfig(program="{{prompt}}{{completion}}\n\n{{test}}\n\ncheck({{entry_point}})\n"),
        metrics=(MetricConfig("pass@1"),),
    )
    return BuiltinTask(config, lambda split, file: read_jsonl(file, _humaneval_row, "HumanEval"))


def _mbpp_row(split: str) -> Callable[[Doc], Doc | None]:
    ids = MBPP_SPLITS[split]

    def convert(row: Doc) -> Doc | None:
        if int(row["task_id"]) not in ids:
            return None
        tests = [str(test) for test in row["test_list"]]
        return {
            "task_id": int(row["task_id"]),
            "text": str(row["text"]),
            "code": str(row["code"]),
            "test_list": tests,
            "tests": "\n".join(tests),
            "test_setup_code": str(row.get("test_setup_code") or ""),
        }

    return convert


def mbpp(data_dir: DataDir) -> Task:
    """MBPP's test split, 3-shot from its prompt split, greedy pass@1 (lm-eval's ``mbpp`` prompt)."""
    root = data_root("mbpp", data_dir, "mbpp.jsonl (the original release)")
    path = find_file("mbpp", root, ["mbpp.jsonl"])
    config = TaskConfig(
        name="mbpp",
        dataset=DatasetConfig(format="jsonl", data_files={split: (path,) for split in MBPP_SPLITS}),
        output_type="generate_until",
        doc_to_text=(
            "You are an expert Python programmer, and here is your task: {{text}} "
            "Your code should pass these tests:\n\n{{tests}}\n[BEGIN]\n"
        ),
        # A few-shot example's answer is its solution; what the tests check is the program below.
        doc_to_target="{{code}}\n[DONE]",
        splits=SplitConfig(test="test", validation="validation", train="train", fewshot="prompt"),
        target_delimiter="",
        num_fewshot=3,
        fewshot_sampler="first_n",
        generation=GenerationKwargs(until=("[DONE]",), max_gen_toks=256),
        code=CodeConfig(program="{{test_setup_code}}\n{{completion}}\n\n{{tests}}\n"),
        metrics=(MetricConfig("pass@1"),),
    )
    return BuiltinTask(config, lambda split, file: read_jsonl(file, _mbpp_row(split), "MBPP"))


CODE_TASKS: dict[str, Callable[[DataDir], Task]] = {"humaneval": humaneval, "mbpp": mbpp}
"""The code tasks by name: each a function of ``data_dir``."""
