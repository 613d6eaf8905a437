"""Prompts and requests built from lm-evaluation-harness task YAML match what lm_eval itself builds.

lm_eval reads the same YAML (as a dict) over the same local files through Hugging Face ``datasets``,
offline. lm_eval draws every document's few-shot examples from one shared generator; to compare the
prompts built from them, its sampler is re-seeded per document with lmstack's per-document seed, so
both draw the same examples and any difference is in how the prompt is put together.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from lm_eval.api import task as lm_eval_task
from pyarrow import parquet as pq

from lmstack.eval.tasks import ChatConfig, load_task
from lmstack.eval.tasks._task import fewshot_seed

QA = [
    {"question": "What is 2+2?", "choices": ["3", "4", "5"], "label": 1, "answer": "4"},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "label": 0, "answer": "Paris"},
    {"question": "Colour of the sky?", "choices": ["green", "blue", "red"], "label": 1, "answer": "blue"},
    {"question": "3*3?", "choices": ["9", "6", "3"], "label": 0, "answer": "9"},
    {"question": "Opposite of hot?", "choices": ["warm", "cold", "wet"], "label": 1, "answer": "cold"},
    {"question": "Largest planet?", "choices": ["Mars", "Venus", "Jupiter"], "label": 2, "answer": "Jupiter"},
    {"question": "Frozen water?", "choices": ["ice", "steam", "fog"], "label": 0, "answer": "ice"},
]


def _write(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def _lm_eval_task(config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = json.loads(json.dumps(config))
    kwargs = config["dataset_kwargs"]
    kwargs["data_files"] = {split: str(tmp_path / name) for split, name in kwargs["data_files"].items()}
    kwargs["cache_dir"] = str(tmp_path / "hf-cache")
    return lm_eval_task.ConfigurableTask(config=config)


def _lm_eval_requests(task: Any, doc_id: int, doc: dict[str, Any], **kwargs: Any) -> list[tuple[Any, ...]]:
    num_fewshot = task.config.num_fewshot or 0
    if hasattr(task, "sampler"):
        task.sampler.set_rnd(fewshot_seed(1234, doc_id))
    ctx = task.fewshot_context(doc, num_fewshot, **kwargs)
    instances = task.construct_requests(
        doc=doc, ctx=ctx, metadata=(task.config.task, doc_id, 1), apply_chat_template=bool(kwargs)
    )
    instances = instances if isinstance(instances, list) else [instances]
    return [instance.arguments for instance in instances]


def _ours(request: Any) -> tuple[Any, ...]:
    context = request.context if isinstance(request.context, str) else request.messages()
    if request.kind == "loglikelihood":
        return (context, request.continuation)
    if request.kind == "generate_until":
        return (context, request.generation)
    return (context,)


def _compare(
    config: dict[str, Any], files: dict[str, tuple[str, list[dict[str, Any]]]], tmp_path, monkeypatch, **kw
):
    for name, (fmt, rows) in files.items():
        _write(tmp_path / name, rows, fmt)
    task_file = tmp_path / "task.yaml"
    task_file.write_text(yaml.safe_dump(config))
    ours = load_task(task_file)
    reference = _lm_eval_task(config, tmp_path, monkeypatch)
    chat = kw.pop("chat", False)
    docs = list(reference.eval_docs)
    assert len(docs) == len(ours.docs)
    requests = ours.build_requests(chat=chat)
    for doc_id, doc in enumerate(docs):
        expected = _lm_eval_requests(reference, doc_id, doc, **kw)
        got = [_ours(r) for r in requests if r.doc_id == doc_id]
        if ours.config.output_type == "generate_until":
            assert [g[0] for g in got] == [e[0] for e in expected]
            assert list(got[0][1].until) == expected[0][1]["until"]
            assert got[0][1].max_gen_toks == expected[0][1]["max_gen_toks"]
        else:
            assert got == [tuple(e) for e in expected], f"doc {doc_id}"
    return ours, reference


def _mc_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "task": "toy_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "test.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize("num_fewshot", [0, 3])
def test_multiple_choice_same_split_fewshot(tmp_path, monkeypatch, num_fewshot):
    # fewshot_split named: without it lm_eval would offer a document as its own example (lmstack never does).
    config = _mc_config(
        num_fewshot=num_fewshot, fewshot_split="test", description="Answer the questions.\n\n"
    )
    ours, _ = _compare(config, {"test.jsonl": ("jsonl", QA)}, tmp_path, monkeypatch)
    for doc_id in range(len(QA)):
        assert QA[doc_id] not in ours.fewshot_examples(doc_id)


def test_multiple_choice_fewshot_split_json_array(tmp_path, monkeypatch):
    config = _mc_config(
        dataset_kwargs={"data_files": {"test": "test.json", "dev": "dev.json"}},
        fewshot_split="dev",
        num_fewshot=2,
        doc_to_text="{{question}}",
        target_delimiter=" => ",
        fewshot_delimiter="\n###\n",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
    )
    files = {"test.json": ("json", QA[:4]), "dev.json": ("json", QA[4:])}
    _compare(config, files, tmp_path, monkeypatch)


def test_csv_first_n_string_target(tmp_path, monkeypatch):
    rows = [
        {
            "question": r["question"],
            "A": r["choices"][0],
            "B": r["choices"][1],
            "answer": "AB"[r["label"] % 2],
        }
        for r in QA
    ]
    config = _mc_config(
        dataset_path="csv",
        dataset_kwargs={"data_files": {"test": "test.csv", "train": "train.csv"}},
        training_split="train",
        fewshot_config={"sampler": "first_n"},
        num_fewshot=2,
        doc_to_text="{{question.strip()}}\nA. {{A}}\nB. {{B}}\nAnswer:",
        doc_to_choice=["A", "B"],
        doc_to_target="answer",
        description="The following are questions about {{question.split(' ')[0]}}.\n\n",
    )
    ours, _ = _compare(
        config, {"test.csv": ("csv", rows[:4]), "train.csv": ("csv", rows[4:])}, tmp_path, monkeypatch
    )
    assert ours.target(0).gold == ["A", "B"].index(rows[0]["answer"])


def test_generate_until_parquet(tmp_path, monkeypatch):
    config = {
        "task": "toy_gen",
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"validation": "val.parquet"}},
        "validation_split": "validation",
        "output_type": "generate_until",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 2,
        "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 32, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "ignore_case": True, "ignore_punctuation": True}],
    }
    ours, _ = _compare(config, {"val.parquet": ("parquet", QA)}, tmp_path, monkeypatch)
    assert ours.config.metrics[0].options == {"ignore_case": True, "ignore_punctuation": True}
    assert ours.target(1).text == "Paris"


def test_loglikelihood_rolling(tmp_path, monkeypatch):
    rows = [{"text": "The quick brown fox."}, {"text": "Jumps over\nthe lazy dog."}]
    config = {
        "task": "toy_ppl",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "t.jsonl"}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
    }
    _compare(config, {"t.jsonl": ("jsonl", rows)}, tmp_path, monkeypatch)


@pytest.mark.parametrize("multiturn", [True, False])
def test_chat_template_mode(tmp_path, monkeypatch, multiturn):
    config = _mc_config(num_fewshot=2, fewshot_split="test", description="Answer briefly.")
    system = "You are a careful assistant."
    _compare(
        config,
        {"test.jsonl": ("jsonl", QA)},
        tmp_path,
        monkeypatch,
        chat=ChatConfig(system_prompt=system, fewshot_as_multiturn=multiturn),
        system_instruction=system,
        apply_chat_template=True,
        fewshot_as_multiturn=multiturn,
        chat_template=lambda messages, add_generation_prompt=True: messages,
    )
