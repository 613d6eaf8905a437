"""Task definitions: lmstack's own YAML and Python form, few-shot determinism, request hashes, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmstack.eval._errors import DatasetError, TaskConfigError, TemplateError
from lmstack.eval.tasks import (
    ChatConfig,
    DatasetConfig,
    GenerationKwargs,
    MetricConfig,
    SplitConfig,
    TaskConfig,
    load_task,
    load_task_config,
)
from lmstack.eval.tasks._data import read_data_file
from lmstack.eval.tasks._requests import prompt_hash

ROWS = [{"q": f"question {i}", "choices": ["yes", "no"], "label": i % 2} for i in range(12)]

OWN_YAML = """\
name: yesno
dataset:
  format: jsonl
  data_files:
    test: data/test.jsonl
splits:
  test: test
output_type: multiple_choice
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: label
doc_to_choice: choices
num_fewshot: 2
seed: 7
metrics: [acc, {name: acc_norm}]
"""


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "task.yaml").write_text(OWN_YAML)
    return tmp_path


def test_own_yaml_equals_python_config(task_dir, monkeypatch):
    monkeypatch.chdir("/")  # data_files resolve against the YAML's directory, not the cwd
    from_yaml = load_task_config(task_dir / "task.yaml")
    in_python = TaskConfig(
        name="yesno",
        dataset=DatasetConfig(format="jsonl", data_files={"test": task_dir / "data" / "test.jsonl"}),
        splits=SplitConfig(test="test"),
        output_type="multiple_choice",
        doc_to_text="Q: {{q}}\nA:",
        doc_to_target="label",
        doc_to_choice="choices",
        num_fewshot=2,
        seed=7,
        metrics=(MetricConfig("acc"), MetricConfig("acc_norm")),
    )
    assert from_yaml == in_python
    task = load_task(task_dir / "task.yaml")
    requests = task.build_requests(limit=3)
    assert len(requests) == 6 and [r.choice_index for r in requests[:2]] == [0, 1]
    assert requests[0].continuation == " yes" and requests[1].continuation == " no"
    assert requests[0].context.endswith("Q: question 0\nA:")
    assert task.target(3).gold == 1 and task.target(3).text == "no"


def test_fewshot_independent_of_batch_order_and_subset(task_dir):
    task = load_task(task_dir / "task.yaml")
    everything = {(r.doc_id, r.choice_index): r for r in task.build_requests()}
    subset = task.build_requests(doc_ids=[9, 3, 5])
    assert [r.doc_id for r in subset] == [9, 9, 3, 3, 5, 5]
    for request in subset:
        assert everything[(request.doc_id, request.choice_index)] == request
    # A fresh Task (a fresh process or rank) draws the same examples; each doc excludes itself.
    again = load_task(task_dir / "task.yaml")
    for doc_id in range(len(ROWS)):
        examples = again.fewshot_examples(doc_id)
        assert examples == task.fewshot_examples(doc_id) and ROWS[doc_id] not in examples
    # Seeded per document: not every document gets the same examples, and the task seed matters.
    assert len({json.dumps(task.fewshot_examples(i)) for i in range(len(ROWS))}) > 1
    reseeded = load_task(task.config.replace(seed=8))
    assert any(reseeded.fewshot_examples(i) != task.fewshot_examples(i) for i in range(len(ROWS)))


def test_request_hash_is_sha256_of_what_is_sent(task_dir):
    task = load_task(task_dir / "task.yaml")
    request = task.build_requests(limit=1)[0]
    canonical = json.dumps(
        {"context": request.context, "continuation": " yes", "generation": None, "kind": "loglikelihood"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert request.request_hash == hashlib.sha256(canonical.encode()).hexdigest()
    # Another task sending the same thing shares the hash; the prompt hash follows every request.
    renamed = load_task(task.config.replace(name="other"))
    assert renamed.build_requests(limit=1)[0].request_hash == request.request_hash
    assert task.prompt_hash() == prompt_hash(task.build_requests())
    assert task.prompt_hash() != load_task(task.config.replace(target_delimiter="  ")).prompt_hash()


def test_generation_and_chat(task_dir):
    config = load_task_config(task_dir / "task.yaml").replace(
        output_type="generate_until",
        doc_to_choice=None,
        doc_to_target="{{ choices[label] }}",
        generation=GenerationKwargs(until=("\n",), max_gen_toks=8),
        chat=ChatConfig(system_prompt="Be brief."),
    )
    task = load_task(config)
    request = task.build_requests(limit=1)[0]
    assert request.kind == "generate_until" and request.generation.until == ("\n",)
    roles = [m["role"] for m in request.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert request.messages()[0]["content"] == "Be brief."
    assert task.target(1).text == "no"
    params = request.generation.to_sampling_params()
    assert params.temperature == 0.0 and params.max_tokens == 8 and params.stop == ["\n"]
    # Default generation: greedy until the few-shot delimiter (as lm-eval).
    assert config.replace(generation=None).generation == GenerationKwargs(until=("\n\n",))


def test_csv_types_and_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('q,label,score\n"a, b",1,0.5\nc,0,\n')
    assert read_data_file(path, "csv") == [
        {"q": "a, b", "label": 1, "score": 0.5},
        {"q": "c", "label": 0, "score": None},
    ]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fmt", "name", "text", "line"),
    [
        ("jsonl", "d.jsonl", '{"q": 1}\n\n{"q": 2,\n', 3),
        ("jsonl", "d.jsonl", '{"q": 1}\n[1, 2]\n', 2),
        ("json", "d.json", '[\n  {"q": 1},\n  {"q": 2},\n  "oops"\n]', 4),
        ("json", "d.json", '[\n  {"q": 1},\n  {"q": 2\n]', 4),
        ("csv", "d.csv", "q,label\na,1\nb,2,3\n", 3),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, fmt, name, text, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError) as info:
        read_data_file(path, fmt)
    assert info.value.line == line and info.value.path == path
    assert f"{path}:{line}" in str(info.value)


def test_missing_file_and_split(task_dir):
    config = load_task_config(task_dir / "task.yaml")
    missing = config.replace(
        dataset=DatasetConfig(format="jsonl", data_files={"test": task_dir / "nope.jsonl"})
    )
    with pytest.raises(DatasetError, match=r"nope\.jsonl does not exist"):
        load_task(missing).build_requests()
    with pytest.raises(DatasetError, match="no split 'validation'"):
        load_task(config.replace(splits=SplitConfig(validation="validation"))).build_requests()


def test_template_missing_field_names_field_template_and_doc(task_dir):
    task = load_task(load_task_config(task_dir / "task.yaml").replace(doc_to_text="Q: {{ question }}"))
    with pytest.raises(TemplateError) as info:
        task.build_requests(doc_ids=[4])
    err = info.value
    assert err.field == "question" and err.template == "Q: {{ question }}"
    assert "'question'" in str(err) and "question 4" in str(err) and "doc 4" in str(err)


def test_too_few_fewshot_examples(task_dir):
    task = load_task(load_task_config(task_dir / "task.yaml").replace(num_fewshot=12))
    with pytest.raises(TaskConfigError, match="num_fewshot=12 needs 13"):
        task.build_requests(limit=1)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (OWN_YAML + "shuffle: true\n", "shuffle"),
        (OWN_YAML.replace("  format: jsonl", "  format: jsonl\n  split: x"), "dataset.split"),
        (OWN_YAML + "chat: {system: hi}\n", "chat.system"),
        (OWN_YAML.replace("num_fewshot: 2", "num_fewshot: two"), "num_fewshot"),
        (OWN_YAML.replace("output_type: multiple_choice", "output_type: ranking"), "output_type"),
        (OWN_YAML.replace("doc_to_choice: choices\n", ""), "doc_to_choice"),
    ],
)
def test_own_format_bad_keys(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TaskConfigError) as info:
        load_task_config(path)
    assert info.value.key == key and info.value.source == path
    assert repr(key) in str(info.value) and str(path) in str(info.value)


LM_EVAL_YAML = """\
task: toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_target: label
doc_to_choice: choices
"""


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("include: _default.yaml\n", "include"),
        ("process_docs: !function utils.process_docs\n", "process_docs"),
        ("filter_list:\n  - name: strict\n", "filter_list"),
        (
            "dataset_kwargs:\n  data_files: {test: a.jsonl}\n  trust_remote_code: true\n",
            "dataset_kwargs.trust_remote_code",
        ),
        ("fewshot_config:\n  sampler: first_n\n  doc_to_text: x\n", "fewshot_config.doc_to_text"),
        ("fewshot_config:\n  sampler: balanced\n", "fewshot_config.sampler"),
        ("generation_kwargs:\n  until: [x]\n  beams: 4\n", "generation_kwargs.beams"),
        ("metric_list:\n  - metric: !function m.f\n", "metric_list[0].metric"),
    ],
)
def test_lm_eval_unsupported_keys_name_key_and_file(tmp_path, extra, key):
    path = tmp_path / "lm.yaml"
    body = LM_EVAL_YAML
    if extra.startswith("dataset_kwargs"):
        body = body.replace("dataset_kwargs:\n  data_files:\n    test: data/test.jsonl\n", "")
    path.write_text(body + extra)
    with pytest.raises(TaskConfigError) as info:
        load_task_config(path)
    assert info.value.key == key and info.value.source == path
    assert str(path) in str(info.value)


def test_lm_eval_yaml_relative_data_files(task_dir, monkeypatch):
    (task_dir / "lm.yaml").write_text(LM_EVAL_YAML + "metric_list:\n  - metric: acc\n")
    monkeypatch.chdir("/")
    config = load_task_config(task_dir / "lm.yaml")
    assert config.dataset.data_files == {"test": (task_dir / "data" / "test.jsonl",)}
    assert config.fewshot_sampler == "random" and config.seed == 1234
    assert len(load_task(config).build_requests()) == 2 * len(ROWS)


def test_unknown_metric_and_neither_format(tmp_path, task_dir):
    config = load_task_config(task_dir / "task.yaml")
    config.check_metrics({"acc", "acc_norm"})
    with pytest.raises(TaskConfigError, match="unknown metric 'acc_norm'"):
        config.check_metrics({"acc"})
    path = tmp_path / "x.yaml"
    path.write_text("foo: 1\n")
    with pytest.raises(TaskConfigError, match="neither `name`"):
        load_task_config(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(TaskConfigError, match="not valid YAML"):
        load_task_config(path)
