"""Code tasks: ``code:`` in task YAML, ``Task.program`` rendering, and bad ``code`` sections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.eval._errors import TaskConfigError, TemplateError
from lmstack.eval.tasks import CodeConfig, DatasetConfig, MetricConfig, TaskConfig, load_task

PROBLEMS = [
    {
        "prompt": "def add(a, b):\n",
        "test": "def check(f):\n    assert f(2, 3) == 5\n",
        "entry_point": "add",
    },
    {
        "prompt": "def neg(a):\n",
        "test": "def check(f):\n    assert f(4) == -4\n",
        "entry_point": "neg",
    },
]
HUMANEVAL_PROGRAM = "{{prompt}}{{completion}}\n\n{{test}}\ncheck({{entry_point}})"

CODE_YAML = """\
name: tiny_humaneval
dataset:
  format: jsonl
  data_files: {test: problems.jsonl}
output_type: generate_until
doc_to_text: prompt
doc_to_target: entry_point
code:
  program: "{{prompt}}{{completion}}\\n\\n{{test}}\\ncheck({{entry_point}})"
  timeout_s: 5
  memory_mb: 256
metrics: [pass@1, pass@2]
"""


@pytest.fixture
def code_task_file(tmp_path: Path) -> Path:
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    path = tmp_path / "task.yaml"
    path.write_text(CODE_YAML)
    return path


def test_code_section_reads_and_program_renders(code_task_file: Path) -> None:
    task = load_task(code_task_file)
    code = task.config.code
    assert code == CodeConfig(program=HUMANEVAL_PROGRAM, timeout_s=5.0, memory_mb=256)
    assert task.config.code_samples == 2  # the largest pass@k
    program = task.program(1, "    return -a\n")
    assert program == "def neg(a):\n    return -a\n\n\ndef check(f):\n    assert f(4) == -4\n\ncheck(neg)"
    namespace: dict[str, object] = {}
    exec(compile(program, "<program>", "exec"), namespace)  # the rendered program is valid Python


def test_code_samples_explicit_wins(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(json.dumps(PROBLEMS[0]) + "\n")
    config = TaskConfig(
        name="t",
        dataset=DatasetConfig(format="jsonl", data_files={"test": tmp_path / "p.jsonl"}),
        output_type="generate_until",
        doc_to_text="prompt",
        doc_to_target="entry_point",
        code=CodeConfig(program="{{completion}}", samples=5),
        metrics=(MetricConfig("pass@1"),),
    )
    assert config.code_samples == 5


def test_program_names_a_missing_field(code_task_file: Path) -> None:
    text = code_task_file.read_text().replace("check({{entry_point}})", "check({{entry}})")
    code_task_file.write_text(text)
    with pytest.raises(TemplateError, match="entry") as info:
        load_task(code_task_file).program(0, "    return a + b\n")
    assert info.value.field == "entry"
    assert info.value.doc_id == 0


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("  memory_mb: 256\n", "  memory_mb: 256\n  network: true\n"), "code.network"),
        (("  timeout_s: 5\n", "  timeout_s: -1\n"), "code.timeout_s"),
        (("output_type: generate_until", "output_type: multiple_choice\ndoc_to_choice: [a, b]"), "code"),
        (
            ('  program: "{{prompt}}{{completion}}\\n\\n{{test}}\\ncheck({{entry_point}})"\n', ""),
            "code.program",
        ),
    ],
)
def test_bad_code_section_names_the_key(code_task_file: Path, edit: tuple[str, str], key: str) -> None:
    text = code_task_file.read_text()
    assert edit[0] in text
    code_task_file.write_text(text.replace(*edit))
    with pytest.raises(TaskConfigError) as info:
        load_task(code_task_file)
    assert info.value.key == key


def test_program_without_code_section(code_task_file: Path) -> None:
    text = code_task_file.read_text()
    code_task_file.write_text(text[: text.index("code:")] + "metrics: [exact_match]\n")
    with pytest.raises(TaskConfigError, match="no `code` section"):
        load_task(code_task_file).program(0, "")


def test_pass_at_k_runs_completions_in_the_sandbox(code_task_file: Path, tmp_path: Path) -> None:
    """Scoring alone, from a cache filled by hand: a correct completion passes, a wrong one, one that
    loops forever and one that opens a socket fail."""
    from lmstack.eval import rescore
    from lmstack.eval.runner import AnswerCache, ModelInfo, build_calls

    code_task_file.write_text(code_task_file.read_text().replace("timeout_s: 5", "timeout_s: 2"))
    task = load_task(code_task_file)
    keys, calls = build_calls(task.build_requests(), samples=task.config.code_samples)
    completions = {
        0: ["    return a + b\n", "    while True:\n        pass\n"],
        1: [
            "    import socket\n    socket.create_connection(('1.1.1.1', 53), 1)\n    return -a\n",
            "    return -a\n",
        ],
    }
    cache = tmp_path / "cache.sqlite"
    with AnswerCache(cache) as answers:
        answers.add_model(ModelInfo("hand", "fp-hand", "custom"))
        answers.put(
            "fp-hand",
            [(k, calls[k].record(), {"texts": completions[calls[k].request.doc_id]}) for k in keys],
        )
    result = rescore(str(code_task_file), cache)
    samples = result.tasks["tiny_humaneval"].samples
    assert [s["passed"] for s in samples] == [[True, False], [False, True]]
    assert result.score("tiny_humaneval", "pass@1") == pytest.approx(0.5)
    assert result.score("tiny_humaneval", "pass@2") == pytest.approx(1.0)
