"""`lmstack chat` driven through the console script with piped stdin, local and against `lmstack serve`.

Each printed reply is checked against ``LLM.chat`` on the conversation the CLI should have sent
(greedy), so a history that is not sent, not cleared by ``/reset`` or sent without the system prompt
shows up as a different reply.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import serve_app

from lmstack.infer import LLM, SamplingParams
from lmstack.infer._chat_cli import ChatSession

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
FLAGS = ("--temperature", "0", "--max-tokens", str(MAX_TOKENS))
KEY = "sk-chat"
U1, U2 = "the quick brown fox", "seven jovial zebras"


def _script() -> str:
    return str(Path(sys.executable).with_name("lmstack"))


def _chat(
    target: str, *args: str, stdin: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_script(), "chat", target, *args], input=stdin, capture_output=True, text=True, encoding="utf-8",
        timeout=120, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


def _reply(llm: LLM, messages: list[dict[str, str]], max_tokens: int = MAX_TOKENS) -> str:
    [out] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return out.outputs[0].text


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    llm = LLM(model_dir)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def expected(llm: LLM) -> dict[str, str]:
    """The greedy replies the conversations below must produce."""
    r1 = _reply(llm, [_user(U1)])
    replies = {
        "r1": r1,
        "r2_after_r1": _reply(llm, [_user(U1), _assistant(r1), _user(U2)]),
        "r2_alone": _reply(llm, [_user(U2)]),
        "sys_r1": _reply(llm, [{"role": "system", "content": "be brief"}, _user(U1)]),
    }
    # The checks below can only fail if history and system prompt change the reply.
    assert replies["r2_after_r1"] != replies["r2_alone"]
    assert replies["sys_r1"] != r1
    return replies


def _wait_idle(llm: LLM, timeout: float = 10.0) -> None:
    """Wait until the engine runs no request and every KV block is free."""
    engine = llm.engine
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() or engine.num_free_blocks != engine.num_blocks:
        assert time.monotonic() < deadline, "the interrupted request still runs, or holds KV blocks"
        time.sleep(0.01)


def _assert_replies(result: subprocess.CompletedProcess[str], *replies: str) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{r}\n" for r in replies), (result.stdout, result.stderr)


# -- local model directory -------------------------------------------------------------------------------
def test_local_second_turn_is_sent_with_the_first(model_dir: Path, expected: dict[str, str]) -> None:
    result = _chat(str(model_dir), *FLAGS, stdin=f"{U1}\n{U2}\n")
    _assert_replies(result, expected["r1"], expected["r2_after_r1"])


def test_local_reset_clears_history_and_system_sets_the_prompt(
    model_dir: Path, expected: dict[str, str]
) -> None:
    stdin = f"{U1}\n/reset\n{U2}\n/system be brief\n/reset\n{U1}\n/help\n/exit\n{U2}\n"
    result = _chat(str(model_dir), *FLAGS, stdin=stdin)
    assert result.returncode == 0, result.stderr
    replies, help_text = result.stdout.split("commands:\n")
    assert replies == f"{expected['r1']}\n{expected['r2_alone']}\n{expected['sys_r1']}\n"
    assert "/reset" in help_text and "/system TEXT" in help_text  # and nothing after /exit
    assert "[history cleared]" in result.stderr and "[system prompt set]" in result.stderr


def test_system_option_is_the_first_message(model_dir: Path, expected: dict[str, str]) -> None:
    _assert_replies(
        _chat(str(model_dir), *FLAGS, "--system", "be brief", stdin=f"{U1}\n"), expected["sys_r1"]
    )


def test_a_prompt_over_the_context_is_an_error_and_the_session_goes_on(
    model_dir: Path, expected: dict[str, str]
) -> None:
    result = _chat(str(model_dir), *FLAGS, stdin=f"{'the ' * 300}\n{U1}\n")
    # The failed turn is dropped: the next one is answered as a first turn.
    _assert_replies(result, expected["r1"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "context" in errors[0], result.stderr


def test_a_missing_model_directory_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = _chat(str(missing), stdin="hello\n")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr


def test_ctrl_c_during_a_reply_aborts_it_and_drops_the_turn(
    llm: LLM, expected: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    step = llm.engine.step
    steps = 0

    def counted_step() -> Any:
        nonlocal steps
        steps += 1
        return step()

    monkeypatch.setattr(llm.engine, "step", counted_step)

    class Interrupting(io.StringIO):
        """Stdout on which Ctrl-C arrives right after the reply's first text."""

        def write(self, text: str) -> int:
            super().write(text)
            if text.strip():
                raise KeyboardInterrupt
            return len(text)

    err = io.StringIO()
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                          out=Interrupting(), err=err)  # fmt: skip
    assert session.turn(U1) is None
    assert "[interrupted" in err.getvalue() and session.history == []
    _wait_idle(llm)  # the abort (queued, not waited on) frees the request and its KV blocks
    assert steps < 100  # aborted, not run to its 200 tokens
    session.sampling_params = GREEDY
    session.out = io.StringIO()
    assert session.turn(U1) == expected["r1"]
    assert session.history == [_user(U1), _assistant(expected["r1"])]


# -- against `lmstack serve` ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_url(llm: LLM) -> Iterator[str]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from lmstack.infer.server import ServerConfig, create_app

    app = create_app(llm, ServerConfig(model_name="tiny", api_keys=[KEY]))
    with serve_app(app) as url:
        yield url


def test_remote_history_reset_and_system(server_url: str, expected: dict[str, str]) -> None:
    stdin = f"{U1}\n{U2}\n/reset\n{U2}\n/system be brief\n/reset\n{U1}\n"
    # The key from the environment, as the OpenAI clients take it.
    result = _chat(server_url, *FLAGS, "--model", "tiny", stdin=stdin, env={"OPENAI_API_KEY": KEY})
    _assert_replies(result, expected["r1"], expected["r2_after_r1"], expected["r2_alone"], expected["sys_r1"])


def test_remote_wrong_key_and_server_down_are_errors_and_the_session_goes_on(server_url: str) -> None:
    result = _chat(server_url, *FLAGS, "--api-key", "sk-wrong", stdin=f"{U1}\n{U2}\n")
    assert result.returncode == 0 and result.stdout == ""
    assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 2, result.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _chat(f"http://127.0.0.1:{port}", *FLAGS, "--max-retries", "0", stdin=f"{U1}\n/help\n")
    assert result.returncode == 0 and result.stdout.startswith("commands:"), result.stdout  # went on
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"127.0.0.1:{port}" in error, result.stderr


def test_remote_sigint_stops_the_reply_and_the_server_frees_it(server_url: str, llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=200)
    [long] = llm.chat([_user(U2)], params, use_tqdm=False)
    assert long.outputs[0].finish_reason == "length"  # no early EOS: the reply runs until interrupted
    step = engine.step
    steps = 0

    def slow_step() -> Any:  # keeps the reply streaming while the CLI is interrupted
        nonlocal steps
        steps += 1
        time.sleep(0.02)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    proc = subprocess.Popen(
        [_script(), "chat", server_url, "--api-key", KEY, "--temperature", "0", "--max-tokens", "200"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{U2}\n".encode())
        proc.stdin.flush()
        assert os.read(proc.stdout.fileno(), 1 << 16)  # the reply has started streaming
        proc.send_signal(signal.SIGINT)
        _wait_idle(llm)  # the server sees the client leave and aborts the request
        assert steps < 150
        engine.step = step  # type: ignore[method-assign]
        stdout, stderr = proc.communicate(f"{U1}\n".encode(), timeout=60)
    finally:
        engine.step = step  # type: ignore[method-assign]
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert b"[interrupted" in stderr
    # The interrupted turn is not in the history: the next reply is a first turn's.
    assert stdout.decode().endswith(f"\n{_reply(llm, [_user(U1)], max_tokens=200)}\n"), stdout
