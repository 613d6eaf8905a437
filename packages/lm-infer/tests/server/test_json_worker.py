"""The child-process JSON decoder for large request bodies: same values as ``json.loads``, or a fallback."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmstack.infer.server import _json_worker
from lmstack.infer.server._json_worker import JSONWorker


@pytest.fixture
def worker() -> Iterator[JSONWorker]:
    w = JSONWorker()
    yield w
    w.close()


def _body(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def test_values_equal_json_loads(worker: JSONWorker) -> None:
    rng = random.Random(0)
    ids = [rng.randrange(50_000) for _ in range(20_000)]
    cases = [
        {"model": "m", "prompt": ids, "max_tokens": 4},
        {"prompt": [ids[:300], ids[300:900], [1, 2, 3]], "logit_bias": {"17": -100}},  # a batch of id lists
        {"prompt": "héllo wörld " * 30_000, "temperature": 0.5, "stop": ["\n", "a"]},
        {"messages": [{"role": "user", "content": "x" * 1000}], "n": 2, "stream": True, "seed": None},
        # Not arrays: bools among ints, floats, ints past int64, a mixed list.
        {"a": [True] + [1] * 400, "b": [1.5] * 400, "c": [2**70] + [1] * 400, "d": [1, "2"] * 300},
    ]
    for case in cases:
        raw = _body(case)
        got = worker.loads(raw)
        assert got == json.loads(raw)
        assert json.dumps(got) == json.dumps(json.loads(raw))  # same types too (True stays True, 1.0 a float)


def test_what_it_cannot_decode_falls_back(worker: JSONWorker) -> None:
    """The server then decodes it itself and words the error (or checks the escapes)."""
    for raw in (
        b"{not json",
        b"[1, 2, 3]",
        b"\xff\xfe{}",
        b'{"a": "\\ud800"}',
        b'{"a": "\\u00e9"}',
        b"[" * 100_000,
    ):
        assert worker.loads(raw) is None, raw[:20]
    assert worker.loads(_body({"ok": [1] * 300})) == {"ok": [1] * 300}  # still serving


def test_a_dead_child_is_restarted(worker: JSONWorker) -> None:
    assert worker.loads(_body({"a": 1})) == {"a": 1}
    proc = worker._proc
    assert proc is not None
    proc.kill()
    proc.wait()
    assert worker.loads(_body({"a": 2})) == {"a": 2}
    assert worker._proc is not None and worker._proc.pid != proc.pid


def test_many_threads_share_one_child(worker: JSONWorker) -> None:
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = worker.loads(_body({"i": i, "ids": list(range(i, i + 1000))}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: {"i": i, "ids": list(range(i, i + 1000))} for i in range(8)}


def test_the_child_imports_only_the_standard_library() -> None:
    """Run as the server runs it (``python -I file``): neither torch nor lmstack is loaded."""
    script = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lmstack', 'numpy')))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, str(Path(_json_worker.__file__))],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


def test_requests_validate_the_same_through_the_child(worker: JSONWorker) -> None:
    """Token-id lists the child checked skip the per-item check; every other prompt is checked as before."""
    from lmstack.infer.server._errors import APIError
    from lmstack.infer.server._http import parse
    from lmstack.infer.server._protocol import CompletionRequest

    good = [
        {"model": "m", "prompt": list(range(3, 4000)), "max_tokens": 2},
        {"model": "m", "prompt": [list(range(3, 600)), list(range(5, 900))], "echo": True},
        {"model": "m", "prompt": ["text " * 2000, "more"], "max_tokens": 1},
    ]
    for body in good:
        raw = _body(body)
        via_child = worker.loads(raw)
        assert via_child is not None
        assert (
            parse(CompletionRequest, via_child).model_dump()
            == parse(CompletionRequest, json.loads(raw)).model_dump()
        )
    bad = [
        {"model": "m", "prompt": [True, *range(3, 600)]},  # a bool is not a token id
        {"model": "m", "prompt": [list(range(3, 600)), [1.5] * 300]},  # nor is a float
        {"model": "m", "prompt": [list(range(3, 600)), []]},  # an empty prompt in a batch
    ]
    for body in bad:
        raw = _body(body)
        errors = []
        for value in (worker.loads(raw), json.loads(raw)):
            with pytest.raises(APIError) as caught:
                parse(CompletionRequest, value)
            errors.append((caught.value.status, caught.value.message, caught.value.param))
        assert errors[0] == errors[1] and errors[0][0] == 400, errors
