"""The evaluation benchmark's task and model, and the two harnesses that run it.

A seeded multiple-choice task in lm-evaluation-harness's YAML format over a local jsonl file: every
question opens with the same instruction paragraph (the shared context that prefix caching is about),
then its own question; four answer choices of several words each (so lm-evaluation-harness cannot
share one forward between the choices, as it does for one-token choices). The model is the benchmarks'
random llama (``_bench_model.py``) over a BPE tokenizer trained on the task's text.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _bench_model import bench_llama

NUM_QUESTIONS = 1000
TASK = "bench_mc"
INSTRUCTION = (
    "The following are multiple choice questions about the invented world of the lmstack chronicles: its "
    "cities, its rivers, the people who founded them and the creatures that live near them. Read each "
    "question carefully, think about what the chronicles say, and answer with the one choice that is "
    "true. Only one of the four choices is correct."
)
TEMPLATE = INSTRUCTION + "\n\nQuestion: {{question}}\nAnswer:"
SYLLABLES = (
    "ka", "ri", "lo", "men", "tu", "sa", "vel", "dor", "an", "is", "pe", "qua", "zo", "lin", "mar", "fe",
    "gul", "tho", "bri", "est", "on", "ya",
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One harness's run: wall and process CPU seconds, scores, and per-document choice log-likelihoods."""

    seconds: float
    cpu_seconds: float
    acc: float
    acc_norm: float
    loglikelihoods: list[list[float]]


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def _phrase(rng: random.Random, words: list[str], low: int, high: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def build_task(directory: Path, seed: int = 0, n: int = NUM_QUESTIONS) -> Path:
    """Write ``test.jsonl`` and the lm-eval task YAML (absolute data path) into ``directory``.

    Returns:
        The task YAML's path.
    """
    rng = random.Random(seed)
    words = _words(rng, 400)
    rows = [
        {
            "question": f"Which {_phrase(rng, words, 1, 2)} did {_phrase(rng, words, 4, 14)}?",
            "choices": [_phrase(rng, words, 2, 6) for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {
        "task": TASK,
        "dataset_path": "json",
        # Absolute: lm-eval resolves data files against the working directory, lmstack against the YAML's.
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": TEMPLATE,
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    path = directory / f"{TASK}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False, width=10_000))
    return path


def corpus(task_yaml: Path) -> list[str]:
    """The texts the tokenizer is trained on: every prompt with its choices (instruction included)."""
    rows = [json.loads(line) for line in (task_yaml.parent / "test.jsonl").read_text().splitlines()]
    return [f"{INSTRUCTION}\n\nQuestion: {r['question']}\nAnswer: {' '.join(r['choices'])}" for r in rows]


def build_model(task_yaml: Path, path: Path) -> Path:
    """Save the benchmarks' random llama, weights scaled up so that choices have clear margins."""
    from lmstack.core import save_pretrained

    model, tokenizer = bench_llama(corpus(task_yaml), seed=0)
    model.reset_parameters(std=0.1)  # default-init logits are near uniform: every choice a near tie
    save_pretrained(model, path, tokenizer=tokenizer)
    return path


def run_lm_eval(model_dir: Path, task_yaml: Path, batch_size: int) -> Run:
    """lm-evaluation-harness ``simple_evaluate`` with ``--model hf`` (fp32, CPU), timed end to end."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    wall, cpu = time.perf_counter(), time.process_time()
    out: Any = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_yaml.parent), include_defaults=False),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    lls = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
    scores = out["results"][TASK]
    return Run(wall, cpu, scores["acc,none"], scores["acc_norm,none"], lls)


def run_lmstack(model_dir: Path, task_yaml: Path) -> Run:
    """``lmstack.eval.evaluate`` on ``LLM(model_dir)``, no cache file, timed end to end (load included)."""
    from lmstack.eval import evaluate
    from lmstack.infer import LLM

    wall, cpu = time.perf_counter(), time.process_time()
    llm = LLM(model_dir, dtype="float32")
    try:
        result = evaluate(llm, str(task_yaml), cache=None, use_tqdm=False)
    finally:
        llm.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    lls = [list(s["loglikelihoods"]) for s in result.tasks[TASK].samples]
    return Run(wall, cpu, result.score(TASK, "acc"), result.score(TASK, "acc_norm"), lls)
