"""Standard benchmarks from local files in their released formats, prompted as lm-evaluation-harness does.

* MMLU: one headerless CSV per subject and split (``test/<subject>_test.csv``, ``dev/<subject>_dev.csv``;
  question, A, B, C, D, answer letter), as the original release; one task over every subject, whose
  few-shot examples are the first of the document's own subject's ``dev`` file.
* C-Eval: CSVs with a header (``id,question,A,B,C,D,answer[,explanation]``) per subject: ``val`` is
  evaluated (``test`` has no answers), few-shot examples come from ``dev``, as lm-eval's ``ceval-valid``.
* GSM8K: ``test.jsonl`` / ``train.jsonl`` rows ``{"question", "answer"}`` whose answer ends ``#### N``;
  exact match on the number after ``####`` (lm-eval's ``strict-match``).
* HellaSwag: ``hellaswag_val.jsonl`` / ``hellaswag_train.jsonl`` of the original release, with lm-eval's
  preprocessing (``activity_label: ctx_a Ctx_b``, `` [title]`` -> ``. ``, other brackets removed).
* ARC: the AI2 release's ``ARC-{Easy,Challenge}-{Test,Train,Dev}.jsonl`` (``question.stem``,
  ``question.choices`` labels and texts, ``answerKey``).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from lmstack.eval._errors import DatasetError, TaskConfigError
from lmstack.eval.tasks._config import (
    DatasetConfig,
    GenerationKwargs,
    MetricConfig,
    SplitConfig,
    TaskConfig,
)
from lmstack.eval.tasks._task import Task
from lmstack.eval.tasks.builtin._base import BuiltinTask, Doc, data_root, find_file, read_jsonl
from lmstack.eval.tasks.builtin._ceval_subjects import CEVAL_SUBJECTS

__all__ = ["FORMAT_TASKS", "SubjectTask", "hellaswag_preprocess"]

DataDir = str | os.PathLike[str] | None
LETTERS = ("A", "B", "C", "D")
_ACC = (MetricConfig("acc"),)
_ACC_NORM = (MetricConfig("acc"), MetricConfig("acc_norm"))


class SubjectTask(BuiltinTask):
    """A task over many subjects whose few-shot examples are the first ones of the document's own subject."""

    def fewshot_examples(self, doc_id: int, num_fewshot: int | None = None) -> list[Doc]:
        """The first ``num_fewshot`` examples of the few-shot split with this document's subject."""
        n = self.config.num_fewshot if num_fewshot is None else num_fewshot
        if n <= 0:
            return []
        subject = self.docs[doc_id]["subject"]
        pool = [doc for doc in self.fewshot_docs if doc["subject"] == subject]
        if len(pool) < n:
            raise TaskConfigError(
                f"task {self.name}: num_fewshot={n} but subject {subject!r} has {len(pool)} examples in "
                f"split {self.config.splits.fewshot_split!r}"
            )
        return pool[:n]


# ---------------------------------------------------------------------------------------------- CSV


def _read_csv(
    path: Path, header: Sequence[str] | None, required: Sequence[str]
) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV file, every cell a string; ``header`` names the columns of a headerless file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read data file {path}: {err}", path=path) from err
    names = list(header) if header is not None else None
    rows: list[tuple[int, dict[str, str]]] = []
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        for cells in reader:
            line = reader.line_num
            if not cells:
                continue
            if names is None:
                names = cells
                _check_header(path, line, names, required)
            elif len(cells) != len(names):
                raise DatasetError(
                    f"{path}:{line}: {len(cells)} fields, expected {len(names)} ({', '.join(names)})",
                    path=path,
                    line=line,
                )
            else:
                rows.append((line, dict(zip(names, cells, strict=True))))
    except csv.Error as err:
        line = reader.line_num
        raise DatasetError(f"{path}:{line}: malformed CSV row: {err}", path=path, line=line) from err
    return rows


def _check_header(path: Path, line: int, names: Sequence[str], required: Sequence[str]) -> None:
    missing = [name for name in required if name not in names]
    if missing:
        raise DatasetError(
            f"{path}:{line}: the header lacks {', '.join(missing)} (expected {', '.join(required)})",
            path=path,
            line=line,
        )


def _letter_index(path: Path, line: int, letter: str) -> int:
    if letter.strip() not in LETTERS:
        raise DatasetError(
            f"{path}:{line}: answer {letter!r} is not one of {', '.join(LETTERS)}", path=path, line=line
        )
    return LETTERS.index(letter.strip())


def _subject_files(root: Path, folder: str) -> tuple[Path, ...]:
    """``<subject>_<folder>.csv`` files in ``root/<folder>/`` (or in ``root`` itself), by subject."""
    where = root / folder if (root / folder).is_dir() else root
    return tuple(sorted(where.glob(f"*_{folder}.csv")))


def _subject(path: Path) -> str:
    return path.name.rsplit("_", 1)[0]


def _subject_task(
    name: str,
    data_dir: DataDir,
    *,
    eval_folder: str,
    read: Callable[[Path], list[Doc]],
    doc_to_text: str,
    doc_to_target: str,
    description: str,
    metrics: tuple[MetricConfig, ...],
) -> Task:
    wants = f"{eval_folder}/<subject>_{eval_folder}.csv and dev/<subject>_dev.csv"
    root = data_root(name, data_dir, wants)
    evaluated = _subject_files(root, eval_folder)
    if not evaluated:
        raise DatasetError(
            f"task {name!r}: {root} has no {eval_folder}/<subject>_{eval_folder}.csv", path=root
        )
    config = TaskConfig(
        name=name,
        dataset=DatasetConfig(
            format="csv", data_files={eval_folder: evaluated, "dev": _subject_files(root, "dev")}
        ),
        output_type="multiple_choice",
        doc_to_text=doc_to_text,
        doc_to_target=doc_to_target,
        doc_to_choice=LETTERS,
        splits=SplitConfig(test=eval_folder, fewshot="dev"),
        description=description,
        fewshot_sampler="first_n",
        metrics=metrics,
    )
    return SubjectTask(
        config, lambda split, path: read(path), expected={"dev": f"{root}/dev/<subject>_dev.csv"}
    )


def _mmlu_rows(path: Path) -> list[Doc]:
    subject = _subject(path)
    columns = ("question", "A", "B", "C", "D", "answer")
    return [
        {
            "question": row["question"],
            "choices": [row[letter] for letter in LETTERS],
            "answer": _letter_index(path, line, row["answer"]),
            "subject": subject,
            "subject_name": subject.replace("_", " "),
        }
        for line, row in _read_csv(path, columns, columns)
    ]


def mmlu(data_dir: DataDir) -> Task:
    """MMLU from the original release's CSVs (``data/`` of ``data.tar``): every subject in one task."""
    return _subject_task(
        "mmlu",
        data_dir,
        eval_folder="test",
        read=_mmlu_rows,
        doc_to_text=(
            "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
            "D. {{choices[3]}}\nAnswer:"
        ),
        doc_to_target="answer",
        description="The following are multiple choice questions (with answers) about {{subject_name}}.\n\n",
        metrics=_ACC,
    )


def _ceval_rows(path: Path) -> list[Doc]:
    subject = _subject(path)
    docs = []
    for line, row in _read_csv(path, None, ("question", "A", "B", "C", "D", "answer")):
        docs.append(
            {
                **row,
                "label": _letter_index(path, line, row["answer"]),
                "subject": subject,
                "subject_zh": CEVAL_SUBJECTS.get(subject, subject.replace("_", " ")),
            }
        )
    return docs


def ceval(data_dir: DataDir) -> Task:
    """C-Eval's validation split (``val/<subject>_val.csv``), lm-eval's ``ceval-valid`` prompt."""
    return _subject_task(
        "ceval",
        data_dir,
        eval_folder="val",
        read=_ceval_rows,
        doc_to_text="{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",  # noqa: RUF001
        doc_to_target="label",
        description="以下是中国关于{{subject_zh}}的单项选择题，请选出其中的正确答案。\n\n",  # noqa: RUF001
        metrics=_ACC_NORM,
    )


# ------------------------------------------------------------------------------------------- JSONL


def _jsonl_task(config: TaskConfig, convert: Callable[[Doc], Doc | None], what: str) -> Task:
    return BuiltinTask(config, lambda split, path: read_jsonl(path, convert, what))


def _gsm8k_row(row: Doc) -> Doc:
    return {"question": str(row["question"]), "answer": str(row["answer"])}


GSM8K_STRICT_MATCH = MetricConfig(
    "exact_match",
    {
        "extract": {"strategies": ["regex"], "pattern": r"#### (\-?[0-9\.\,]+)", "fallback": "[invalid]"},
        "ignore_case": True,
        "ignore_punctuation": False,
        "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
    },
)
"""lm-eval's gsm8k metric with its ``strict-match`` filter: the number after ``####``, normalised."""


def gsm8k(data_dir: DataDir) -> Task:
    """GSM8K (``test.jsonl``; few-shot examples from ``train.jsonl``), 5-shot as lm-eval's ``gsm8k``."""
    root = data_root("gsm8k", data_dir, "test.jsonl (and train.jsonl for few-shot examples)")
    test = find_file("gsm8k", root, ["test.jsonl"], below=False)
    config = TaskConfig(
        name="gsm8k",
        # train.jsonl is only read when few-shot examples are drawn; a missing one is named then.
        dataset=DatasetConfig(format="jsonl", data_files={"test": (test,), "train": (root / "train.jsonl",)}),
        output_type="generate_until",
        doc_to_text="Question: {{question}}\nAnswer:",
        doc_to_target="{{answer}}",
        splits=SplitConfig(test="test", train="train"),
        num_fewshot=5,
        generation=GenerationKwargs(until=("Question:", "</s>", "<|im_end|>"), max_gen_toks=256),
        metrics=(GSM8K_STRICT_MATCH,),
    )
    return _jsonl_task(config, _gsm8k_row, "GSM8K")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, `` [title]`` -> ``. ``, other ``[...]`` dropped, single spaces."""
    text = text.strip()
    # The brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_row(row: Doc) -> Doc:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(row["activity_label"] + ": " + context),
        "choices": [hellaswag_preprocess(ending) for ending in row["endings"]],
        "label": int(row["label"]),
    }


def hellaswag(data_dir: DataDir) -> Task:
    """HellaSwag's validation split (``hellaswag_val.jsonl``), as lm-eval's ``hellaswag``."""
    root = data_root("hellaswag", data_dir, "hellaswag_val.jsonl (and hellaswag_train.jsonl for few-shot)")
    val = find_file("hellaswag", root, ["hellaswag_val.jsonl"])
    config = TaskConfig(
        name="hellaswag",
        dataset=DatasetConfig(
            format="jsonl",
            data_files={"validation": (val,), "train": (val.parent / "hellaswag_train.jsonl",)},
        ),
        output_type="multiple_choice",
        doc_to_text="query",
        doc_to_target="label",
        doc_to_choice="choices",
        splits=SplitConfig(validation="validation", train="train"),
        metrics=_ACC_NORM,
    )
    return _jsonl_task(config, _hellaswag_row, "HellaSwag")


def _arc_row(row: Doc) -> Doc:
    question = row["question"]
    labels = [choice["label"] for choice in question["choices"]]
    return {
        "id": row.get("id"),
        "question": question["stem"],
        "choices": [choice["text"] for choice in question["choices"]],
        "labels": labels,
        "answerKey": row["answerKey"],
        "gold": labels.index(row["answerKey"]),
    }


def _arc(level: str) -> Callable[[DataDir], Task]:
    name = f"arc_{level.lower()}"

    def build(data_dir: DataDir) -> Task:
        prefix = f"ARC-{level}"
        root = data_root(name, data_dir, f"{prefix}-Test.jsonl (AI2's ARC release)")
        test = find_file(name, root, [f"{prefix}-Test.jsonl"])
        files = {"test": (test,)}
        for split, part in (("train", "Train"), ("validation", "Dev")):
            files[split] = (test.parent / f"{prefix}-{part}.jsonl",)
        config = TaskConfig(
            name=name,
            dataset=DatasetConfig(format="jsonl", data_files=files),
            output_type="multiple_choice",
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_target="gold",
            doc_to_choice="choices",
            splits=SplitConfig(test="test", validation="validation", train="train"),
            metrics=_ACC_NORM,
        )
        return _jsonl_task(config, _arc_row, "ARC")

    build.__doc__ = f"ARC-{level} from AI2's release (``ARC-{level}-Test.jsonl``), as lm-eval's ``{name}``."
    return build


FORMAT_TASKS: dict[str, Callable[[DataDir], Task]] = {
    "mmlu": mmlu,
    "ceval": ceval,
    "gsm8k": gsm8k,
    "hellaswag": hellaswag,
    "arc_easy": _arc("Easy"),
    "arc_challenge": _arc("Challenge"),
}
"""The standard formats' tasks by name: each a function of ``data_dir``."""
