"""Standard benchmarks from local files: a few rows in each released format, prompts checked by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from lmstack.eval import DatasetError, TaskConfigError
from lmstack.eval.metrics import GenerationResult, extract_answer, get_metric
from lmstack.eval.tasks.builtin import find_task, hellaswag_preprocess


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _mc(task: Any, doc_id: int) -> tuple[str, list[str]]:
    requests = [r for r in task.build_requests(doc_ids=[doc_id])]
    assert len({r.context for r in requests}) == 1
    return requests[0].context, [r.continuation for r in requests]


def test_mmlu_reads_headerless_csvs_per_subject(tmp_path: Path) -> None:
    _write(
        tmp_path / "test" / "abstract_algebra_test.csv",
        'Find 2+2 in Z_3. ,0,1,2,3,B\n"Is it, really?",yes,no,maybe,never,A\n',
    )
    _write(tmp_path / "test" / "anatomy_test.csv", "What is the femur?,a bone,a muscle,an organ,a nerve,A\n")
    _write(tmp_path / "dev" / "abstract_algebra_dev.csv", "What is 1+1?,0,1,2,3,C\nWhat is 0+0?,0,1,2,3,A\n")
    _write(tmp_path / "dev" / "anatomy_dev.csv", "Where is the heart?,chest,leg,arm,head,A\n")
    task = find_task("mmlu", data_dir=tmp_path)
    assert len(task.docs) == 3
    context, continuations = _mc(task, 0)
    assert context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find 2+2 in Z_3.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
    )
    assert continuations == [" A", " B", " C", " D"]
    assert task.target(0).gold == 1
    assert task.target(1).gold == 0
    # Few-shot examples are the first of the document's own subject's dev file.
    shots = task.build_requests(doc_ids=[2], num_fewshot=1)[0].context
    assert shots == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Where is the heart?\nA. chest\nB. leg\nC. arm\nD. head\nAnswer: A\n\n"
        "What is the femur?\nA. a bone\nB. a muscle\nC. an organ\nD. a nerve\nAnswer:"
    )
    two = task.build_requests(doc_ids=[1], num_fewshot=2)[0].context
    assert "What is 1+1?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: C\n\nWhat is 0+0?" in two
    with pytest.raises(TaskConfigError, match="anatomy"):
        task.build_requests(doc_ids=[2], num_fewshot=2)


def test_mmlu_bad_rows_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape("test/<subject>_test.csv")):
        find_task("mmlu", data_dir=tmp_path)
    _write(tmp_path / "test" / "law_test.csv", "q1,a,b,c,d,A\nq2,a,b,c,E\n")
    with pytest.raises(DatasetError, match=r"law_test.csv:2: 5 fields, expected 6") as err:
        _ = find_task("mmlu", data_dir=tmp_path).docs
    assert err.value.line == 2
    _write(tmp_path / "test" / "law_test.csv", "q1,a,b,c,d,E\n")
    with pytest.raises(DatasetError, match=r"law_test.csv:1: answer 'E'"):
        _ = find_task("mmlu", data_dir=tmp_path).docs
    _write(tmp_path / "test" / "law_test.csv", "q1,a,b,c,d,A\n")
    with pytest.raises(DatasetError, match=re.escape("dev/<subject>_dev.csv")):
        find_task("mmlu", data_dir=tmp_path).build_requests(num_fewshot=1)


def test_ceval_reads_the_validation_csvs_with_their_header(tmp_path: Path) -> None:
    header = "id,question,A,B,C,D,answer,explanation\n"
    _write(
        tmp_path / "val" / "computer_network_val.csv",
        header + "0,哪个是协议？,TCP,CPU,RAM,GPU,A,\n1,1+1=?,1,2,3,4,B,因为\n",  # noqa: RUF001
    )
    _write(tmp_path / "dev" / "computer_network_dev.csv", header + "0,示例？,是,否,对,错,C,解释\n")  # noqa: RUF001
    task = find_task("ceval", data_dir=tmp_path)
    context, continuations = _mc(task, 0)
    assert context == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"  # noqa: RUF001
        "哪个是协议？\nA. TCP\nB. CPU\nC. RAM\nD. GPU\n答案："  # noqa: RUF001
    )
    assert continuations == [" A", " B", " C", " D"]
    assert [task.target(i).gold for i in (0, 1)] == [0, 1]
    # Cells stay text: "2" is an option, not a number.
    assert task.build_requests(doc_ids=[1])[0].context.endswith("1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")  # noqa: RUF001
    shot = task.build_requests(doc_ids=[1], num_fewshot=1)[0].context
    assert "示例？\nA. 是\nB. 否\nC. 对\nD. 错\n答案： C\n\n1+1=?" in shot  # noqa: RUF001
    assert [m.name for m in task.config.metrics] == ["acc", "acc_norm"]
    _write(tmp_path / "val" / "law_val.csv", "id,question,A,B,C\n")
    with pytest.raises(DatasetError, match=r"law_val.csv:1: the header lacks D, answer"):
        _ = find_task("ceval", data_dir=tmp_path).docs


def test_gsm8k_prompts_and_scores_the_number_after_hashes(tmp_path: Path) -> None:
    test_rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "What is 1000 + 234?", "answer": "It is 1,234.\n#### 1,234"},
    ]
    train_rows = [{"question": f"Q{i}?", "answer": f"step\n#### {i}"} for i in range(6)]
    _jsonl(tmp_path / "test.jsonl", test_rows)
    task = find_task("gsm8k", data_dir=tmp_path)
    zero = task.build_requests(num_fewshot=0)
    assert zero[0].context == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    assert zero[0].generation.until == ("Question:", "</s>", "<|im_end|>")
    with pytest.raises(DatasetError, match=re.escape("train.jsonl")):
        task.build_requests()  # 5-shot by default: the train split is needed
    _jsonl(tmp_path / "train.jsonl", train_rows)
    task = find_task("gsm8k", data_dir=tmp_path)
    context = task.build_requests(doc_ids=[0])[0].context
    assert context.count("Question: Q") == 5 and context.endswith(
        "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    )
    assert "Answer: step\n#### " in context
    # lm-eval's strict-match: the number after "####", then commas, "$" and a final "." ignored.
    (metric_config,) = task.config.metrics
    options = dict(metric_config.options)
    extract = options.pop("extract")
    metric = get_metric(metric_config.name)
    target = task.target(1).text

    def score(reply: str) -> float:
        answer = extract_answer(reply, **extract).answer
        return metric.item(GenerationResult(answer, [target]), **options)

    assert score(" 1000 + 234 = 1234.\n#### 1,234\n\nQuestion: more") == 1.0
    assert score(" The answer is 1234.") == 0.0  # no "####": strict-match finds nothing
    assert score(" #### 1235") == 0.0


def test_hellaswag_applies_lm_evals_preprocessing(tmp_path: Path) -> None:
    row = {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": (
            "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
            "clothes smiles."
        ),
        "ctx_b": "then",
        "ctx": "ignored",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person [title] wearing "
            "winter clothes snow as the we girls sled.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        "label": 3,
        "split": "val",
    }
    _jsonl(tmp_path / "hellaswag_val.jsonl", [row])
    task = find_task("hellaswag", data_dir=tmp_path)
    context, continuations = _mc(task, 0)
    assert context == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
        "wearing winter clothes smiles. Then"
    )
    assert continuations[1] == (
        " , a person board a ski lift, while two men supporting the head of the person. wearing winter "
        "clothes snow as the we girls sled."
    )
    assert continuations[3] == " , the man continues removing the snow on his car."
    assert task.target(0).gold == 3
    assert hellaswag_preprocess(" Wash [header] hands [title] Dry them. ") == "Wash hands. Dry them."


def test_arc_reads_the_ai2_release(tmp_path: Path) -> None:
    rows = [
        {
            "id": "Mercury_1",
            "question": {
                "stem": "Which gas do plants take in?",
                "choices": [
                    {"text": "oxygen", "label": "A"},
                    {"text": "carbon dioxide", "label": "B"},
                    {"text": "helium", "label": "C"},
                ],
            },
            "answerKey": "B",
        },
        {
            "id": "NY_2",
            "question": {
                "stem": "2 + 2?",
                "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": "2"}],
            },
            "answerKey": "2",
        },
    ]
    _jsonl(tmp_path / "ARC-V1-Feb2018-2" / "ARC-Easy" / "ARC-Easy-Test.jsonl", rows)
    task = find_task("arc_easy", data_dir=tmp_path)
    context, continuations = _mc(task, 0)
    assert context == "Question: Which gas do plants take in?\nAnswer:"
    assert continuations == [" oxygen", " carbon dioxide", " helium"]
    assert [task.target(i).gold for i in (0, 1)] == [1, 1]
    with pytest.raises(DatasetError, match=re.escape("ARC-Challenge-Test.jsonl")):
        find_task("arc_challenge", data_dir=tmp_path)
    broken = dict(rows[0], answerKey="D")
    _jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [rows[1], broken])
    with pytest.raises(DatasetError, match=r"ARC-Challenge-Test.jsonl:2: not a ARC row") as err:
        _ = find_task("arc_challenge", data_dir=tmp_path).docs
    assert err.value.line == 2
