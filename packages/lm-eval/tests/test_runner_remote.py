"""The same model locally and behind ``lmstack serve`` (real uvicorn on loopback) scores the same; a server
that is down is a clear error after bounded retries, with the cache kept and no results half-written."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fastapi  # noqa: F401  (the test extra installs it)
import pytest
import uvicorn

from lmstack.eval import EvalError, evaluate
from lmstack.eval.runner import AnswerCache
from lmstack.infer import LLM, RemoteLLM
from lmstack.infer.server import ServerConfig, create_app


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[tuple[str, LLM]]:
    llm = LLM(model_dir)
    app = create_app(llm, ServerConfig(model_name="tiny"))
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", llm
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        llm.close()


@pytest.fixture
def long_tasks(tmp_path: Path, make_sentence, write_rows) -> list[Path]:
    """Multiple choice with contexts over 256 tokens, and rolling texts over the 300-token window."""
    sentence, write_jsonl = make_sentence, write_rows
    rng = random.Random(5)
    mc = [
        {
            "question": sentence(rng, 150, 220),
            "choices": [sentence(rng, 1, 3) for _ in range(3)],
            "label": i % 3,
        }
        for i in range(6)
    ]
    text = [{"text": sentence(rng, 150, 400)} for _ in range(4)]
    write_jsonl(tmp_path / "long_mc.jsonl", mc)
    write_jsonl(tmp_path / "long_text.jsonl", text)
    (tmp_path / "long_mc.yaml").write_text(
        "name: long_mc\ndataset: {format: jsonl, data_files: {test: long_mc.jsonl}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetrics: [acc, acc_norm]\n"
    )
    (tmp_path / "long_text.yaml").write_text(
        "name: long_text\ndataset: {format: jsonl, data_files: {test: long_text.jsonl}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_target: text\nmetrics: [word_perplexity, bits_per_byte]\n"
    )
    return [tmp_path / "long_mc.yaml", tmp_path / "long_text.yaml"]


def test_local_and_served_model_score_the_same(
    served: tuple[str, LLM], model_dir: Path, task_files: dict[str, Path], long_tasks: list[Path]
) -> None:
    url, local = served
    tasks = [*map(str, task_files.values()), *map(str, long_tasks)]
    prompt = local.tokenizer.encode(load_first_prompt(long_tasks[0]))
    assert len(prompt) > 256  # the long prompts really are long in the model's own tokens
    mine = evaluate(local, tasks, max_length=300, use_tqdm=False)
    with RemoteLLM(url, tokenizer=model_dir, max_concurrency=4) as remote:
        theirs = evaluate(remote, tasks, max_length=300, use_tqdm=False)
    assert theirs.model.kind == "remote" and theirs.model.name == "tiny"
    assert theirs.model.fingerprint != mine.model.fingerprint
    for name, task in mine.tasks.items():
        for metric, value in task.metrics.items():
            assert theirs.tasks[name].metrics[metric].value == pytest.approx(value.value, rel=1e-4), (
                name,
                metric,
            )
    for name in ("toy_mc", "long_mc"):
        for a, b in zip(mine.tasks[name].samples, theirs.tasks[name].samples, strict=True):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)
            assert a["metrics"] == b["metrics"]
    assert [s["answers"] for s in mine.tasks["toy_gen"].samples] == [
        s["answers"] for s in theirs.tasks["toy_gen"].samples
    ]


def load_first_prompt(task_file: Path) -> str:
    from lmstack.eval.tasks import load_task

    context = load_task(task_file).build_requests(limit=1)[0].context
    assert isinstance(context, str)
    return context


def test_server_down_is_a_clear_error_and_keeps_the_cache(
    tmp_path: Path, task_files: dict[str, Path]
) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    out = tmp_path / "run"
    remote = RemoteLLM(
        f"http://127.0.0.1:{port}", model="tiny", max_retries=2, backoff_base=0.01, backoff_max=0.02
    )
    with remote, pytest.raises(EvalError, match=r"failed: .*cache.*rerunning resumes") as info:
        evaluate(remote, [str(task_files["mc"])], output_dir=out, use_tqdm=False)
    assert str(out / "cache.sqlite") in str(info.value)
    assert (out / "cache.sqlite").is_file() and not (out / "results.json").exists()
    assert not (out / "samples").exists()
    with AnswerCache(out / "cache.sqlite") as cache:
        assert [m.name for m in cache.models()] == ["tiny"] and cache.count() == 0
