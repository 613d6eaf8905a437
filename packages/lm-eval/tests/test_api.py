"""``evaluate``'s bad input: each a clear error naming what is wrong, raised before the model runs, with
nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.eval import EvalError, TaskConfigError, UnknownTaskError, evaluate


class _NeverCalled:
    """An LLM-protocol object whose every model call fails the test: bad input must stop before them."""

    tokenizer = None

    def _fail(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the model was called")

    generate = chat = stream = loglikelihood = loglikelihood_rolling = _fail


def _run(tasks: list[str], out: Path) -> None:
    evaluate(_NeverCalled(), tasks, output_dir=out, fingerprint="never", use_tqdm=False)


def test_unknown_task_name(tmp_path: Path, task_files: dict[str, Path]) -> None:
    with pytest.raises(UnknownTaskError, match="no_such_task"):
        _run([str(task_files["mc"]), "no_such_task"], tmp_path / "out")
    with pytest.raises(UnknownTaskError, match=r"missing\.yaml does not exist"):
        _run([str(tmp_path / "missing.yaml")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "match", "key"),
    [
        (("{metric: acc, ", "{metric: accuracy, "), "unknown metric 'accuracy'", "metrics"),
        (("ignore_case: true", "ignore_cases: true"), "no option 'ignore_cases'", "metrics"),
        (("test_split: test\n", "test_split: test\nprocess_docs: x\n"), "process_docs", "process_docs"),
    ],
)
def test_bad_task_file(tmp_path: Path, task_files: dict[str, Path], edit, match: str, key: str) -> None:
    path = task_files["gen"] if "ignore_case" in edit[0] else task_files["mc"]
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(*edit, 1))
    with pytest.raises(TaskConfigError, match=match) as info:
        _run([str(path)], tmp_path / "out")
    assert info.value.key == key and str(path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_metric_that_cannot_score_the_output_type(tmp_path: Path, task_files: dict[str, Path]) -> None:
    path = task_files["mc"]
    path.write_text(path.read_text().replace("{metric: acc_norm,", "{metric: exact_match,"))
    with pytest.raises(TaskConfigError, match="'exact_match' cannot score multiple_choice"):
        _run([str(path)], tmp_path / "out")


def test_duplicate_task_and_unfingerprintable_model(tmp_path: Path, task_files: dict[str, Path]) -> None:
    with pytest.raises(TaskConfigError, match="given twice"):
        _run([str(task_files["mc"]), str(task_files["mc"])], tmp_path / "out")
    with pytest.raises(EvalError, match="pass fingerprint="):
        evaluate(_NeverCalled(), [str(task_files["mc"])], use_tqdm=False)
    with pytest.raises(EvalError, match="neither an http"):
        evaluate(str(tmp_path), [str(task_files["mc"])])


def test_task_objects_and_comma_lists(tmp_path: Path, task_files: dict[str, Path]) -> None:
    from lmstack.eval.runner import resolve_tasks

    tasks = resolve_tasks(f"{task_files['mc']},{task_files['gen']}")
    assert [t.name for t in tasks] == ["toy_mc", "toy_gen"]
    assert resolve_tasks([tasks[0]])[0] is tasks[0]
