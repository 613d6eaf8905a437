"""lm-eval task YAML: ``include`` (MMLU's template + per-subject files), ``repeats``, and group files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from lmstack.eval import TaskConfigError
from lmstack.eval.runner import resolve_tasks
from lmstack.eval.runner._tasks import resolve_run
from lmstack.eval.tasks import (
    CodeConfig,
    GroupConfig,
    GroupMetric,
    load_task,
    load_task_config,
    load_task_file,
)
from lmstack.eval.tasks._yaml import from_lm_eval_dict

# MMLU's _default_template_yaml, with local data instead of the hub dataset.
TEMPLATE = """\
dataset_path: json
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n\\
  D. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
SUBJECT = """\
"dataset_kwargs":
  "data_files": {{"test": "data/{name}_test.jsonl", "dev": "data/{name}_dev.jsonl"}}
"description": "The following are multiple choice questions (with answers) about {name}.\\n\\n"
"tag": "mmlu_toy_tasks"
"include": "_default_template_yaml"
"task": "mmlu_toy_{name}"
"task_alias": "{name}"
"""
SIZES = {"algebra": 5, "botany": 9}


@pytest.fixture
def mmlu_dir(tmp_path: Path, make_sentence, write_rows) -> Path:
    rng = random.Random(3)
    for name, size in SIZES.items():
        for split, count in (("test", size), ("dev", 5)):
            rows = [
                {
                    "question": make_sentence(rng),
                    "choices": [make_sentence(rng, 1, 3) for _ in range(4)],
                    "answer": rng.randrange(4),
                }
                for _ in range(count)
            ]
            write_rows(tmp_path / "data" / f"{name}_{split}.jsonl", rows)
        (tmp_path / f"mmlu_toy_{name}.yaml").write_text(SUBJECT.format(name=name))
    (tmp_path / "_default_template_yaml").write_text(TEMPLATE)
    return tmp_path


def test_include_reads_as_lm_eval_merges_it(mmlu_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    for name, size in SIZES.items():
        path = mmlu_dir / f"mmlu_toy_{name}.yaml"
        config = load_task_config(path)
        # lm-eval's own loader merges the include; the same mapping read flat is the same task.
        assert config == from_lm_eval_dict(load_yaml(path, resolve_func=False), source=path)
        assert config.name == f"mmlu_toy_{name}" and config.fewshot_sampler == "first_n"
        assert config.description.endswith(f"about {name}.\n\n")
        assert config.dataset.data_files["test"] == (mmlu_dir / "data" / f"{name}_test.jsonl",)
        task = load_task(config)
        assert len(task.build_requests(num_fewshot=2)) == 4 * size
        first_dev = task.fewshot_docs[0]["question"].strip()  # first_n: the dev split's first row
        assert task.context(0, num_fewshot=1).startswith(config.description + first_dev)


def test_include_list_order_nesting_relative_data_and_cycles(tmp_path: Path, write_rows) -> None:
    base = tmp_path / "templates"
    write_rows(base / "rows.jsonl", [{"q": "a", "label": 0, "choices": ["x", "y"]}])
    (base / "_data.yaml").write_text(
        "dataset_path: json\ndataset_kwargs: {data_files: {test: rows.jsonl}}\ndescription: data\n"
    )
    (base / "_mc.yaml").write_text(
        "include: _data.yaml\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\ntest_split: test\ndescription: mc\n"
    )
    (tmp_path / "_desc.yaml").write_text("description: last\n")
    task = tmp_path / "task.yaml"
    task.write_text("include: [templates/_mc.yaml, _desc.yaml]\ntask: nested\n")
    config = load_task_config(task)
    assert config == from_lm_eval_dict(load_yaml(task, resolve_func=False), source=task, base_dir=base)
    assert config.description == "last"  # a later include wins, the including file above all
    assert config.dataset.data_files == {"test": (base / "rows.jsonl",)}  # relative to _data.yaml

    (tmp_path / "a.yaml").write_text("include: b.yaml\ntask: a\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(TaskConfigError, match="include cycle") as info:
        load_task_config(tmp_path / "a.yaml")
    assert info.value.key == "include"
    (tmp_path / "c.yaml").write_text("include: missing.yaml\ntask: c\n")
    with pytest.raises(TaskConfigError, match=r"missing\.yaml") as info:
        load_task_config(tmp_path / "c.yaml")
    assert info.value.key == "include" and info.value.source == tmp_path / "c.yaml"


GEN = """\
task: gen
dataset_path: json
dataset_kwargs: {data_files: {test: rows.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: a
"""


def test_repeats(tmp_path: Path, write_rows) -> None:
    write_rows(tmp_path / "rows.jsonl", [{"q": "x", "a": "y", "label": 0, "choices": ["y"]}])
    path = tmp_path / "gen.yaml"
    path.write_text(GEN + "repeats: 4\n")
    config = load_task_config(path)
    assert config.repeats == 4 and config.code_samples == 4
    assert load_task_config(tmp_path / "gen.yaml").replace(repeats=1).code_samples == 1
    for bad, match in (("repeats: 0", "repeats"), ("repeats: two", "repeats")):
        path.write_text(GEN + bad + "\n")
        with pytest.raises(TaskConfigError, match=match) as info:
            load_task_config(path)
        assert info.value.key == "repeats"
    mc = GEN.replace("generate_until", "multiple_choice") + "doc_to_choice: choices\nrepeats: 3\n"
    path.write_text(mc.replace("doc_to_target: a", "doc_to_target: label"))
    with pytest.raises(TaskConfigError, match="only applies to generate_until"):
        load_task_config(path)
    with pytest.raises(TaskConfigError, match=r"code\.samples"):
        config.replace(code=CodeConfig(program="{{completion}}", samples=2))
    assert config.replace(code=CodeConfig(program="{{completion}}", samples=4)).code_samples == 4


def _group_file(path: Path, name: str, members: list[str], weight_by_size: bool) -> Path:
    listed = "".join(f"  - {m}\n" for m in members)
    path.write_text(
        f"group: {name}\ntask:\n{listed}aggregate_metric_list:\n"
        f"  - metric: acc\n    aggregation: mean\n    weight_by_size: {str(weight_by_size).lower()}\n"
        "metadata:\n  version: 2\n"
    )
    return path


def test_group_file_by_tag_file_and_nested(mmlu_dir: Path) -> None:
    micro = _group_file(mmlu_dir / "_mmlu_toy.yaml", "mmlu_toy", ["mmlu_toy_tasks"], True)
    group = load_task_file(micro)
    assert isinstance(group, GroupConfig) and group.aggregate == (GroupMetric("acc", True),)
    assert sorted(m.name for m in group.members) == ["mmlu_toy_algebra", "mmlu_toy_botany"]  # type: ignore[union-attr]
    # A nested group naming one task by name, one by file, and the first group by name.
    outer = _group_file(
        mmlu_dir / "outer.yaml", "outer", ["mmlu_toy_algebra", "mmlu_toy_botany.yaml", "mmlu_toy"], False
    )
    tasks, groups = resolve_run(str(outer))
    assert [t.name for t in tasks] == ["mmlu_toy_algebra", "mmlu_toy_botany"]  # each task once
    assert [(g.name, g.members) for g in groups] == [
        ("mmlu_toy", ("mmlu_toy_algebra", "mmlu_toy_botany")),
        ("outer", ("mmlu_toy_algebra", "mmlu_toy_botany", "mmlu_toy")),
    ]
    assert resolve_tasks([str(micro)])[0].name == "mmlu_toy_algebra"
    with pytest.raises(TaskConfigError, match="defines the group"):
        load_task_config(micro)


def test_group_file_errors(mmlu_dir: Path) -> None:
    loop = _group_file(mmlu_dir / "loop.yaml", "loop", ["loop"], True)
    with pytest.raises(TaskConfigError, match="contains itself"):
        load_task_file(loop)
    loop.write_text(
        "group: g\ntask: [mmlu_toy_algebra]\naggregate_metric_list:\n  - {metric: acc, aggregation: median}\n"
    )
    with pytest.raises(TaskConfigError, match="only mean") as info:
        load_task_file(loop)
    assert info.value.key == "aggregate_metric_list[0].aggregation"
    loop.write_text("group: g\ntask: [mmlu_toy_algebra]\ngroup_weights: 1\n")
    with pytest.raises(TaskConfigError, match="unknown group key") as info:
        load_task_file(loop)
    assert info.value.key == "group_weights"
    loop.write_text("group: g\ntask: [mmlu_toy_algebra, mmlu_toy_algebra]\n")
    with pytest.raises(TaskConfigError, match="twice"):
        load_task_file(loop)
