"""A run SIGKILLed mid-way and restarted recomputes nothing that was cached, and ends with the same results.

The child process evaluates with batches of 8 and, on its fourth batch, computes the answers and then
blocks before returning them: the parent waits until the cache holds the first three batches (some but
not all answers), SIGKILLs it there, and restarts the run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lmstack.eval import evaluate
from lmstack.infer import LLM

CHILD = """
import sys, threading
from lmstack.eval import evaluate
from lmstack.infer import LLM

model_dir, task, out = sys.argv[1:]
llm = LLM(model_dir)
score = llm.loglikelihood
batches = 0

def gated(pairs, **kwargs):
    global batches
    batches += 1
    answers = score(pairs, **kwargs)
    if batches == 4:
        threading.Event().wait()  # computed but not returned: killed here
    return answers

llm.loglikelihood = gated
evaluate(llm, [task], output_dir=out, batch_size=8, use_tqdm=False)
"""


def _cached(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for(condition, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, f"the child exited early: {child.communicate()}"
        assert time.monotonic() < deadline, "the child never reached the state to kill it in"
        time.sleep(0.02)


def test_sigkilled_run_resumes_without_recomputing(
    model_dir: Path, task_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cache = out / "cache.sqlite"
    task = str(task_files["mc"])
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model_dir), task, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _wait_for(lambda: _cached(cache) >= 24, child)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    assert child.returncode == -signal.SIGKILL
    cached = _cached(cache)
    assert cached == 24  # three committed batches; the fourth was computed but never committed
    assert not (out / "results.json").exists()

    llm = LLM(model_dir)
    try:
        resumed = evaluate(llm, [task], output_dir=out, batch_size=8, use_tqdm=False)
        fresh = evaluate(llm, [task], cache=None, use_tqdm=False)
    finally:
        llm.close()
    assert resumed.cache.hits == cached  # nothing already cached was computed again
    assert resumed.cache.misses == 24 * 4 - cached
    assert {m: v.value for m, v in resumed.tasks["toy_mc"].metrics.items()} == {
        m: v.value for m, v in fresh.tasks["toy_mc"].metrics.items()
    }
    assert (out / "results.json").is_file()
