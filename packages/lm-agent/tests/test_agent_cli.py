"""``lmstack agent search`` and ``chat``: help, a search over a local folder, --json, --serve, a chat.

The model is a ScriptedLLM handed to the verbs' run functions; search backends, pages and the web app
are real servers on loopback.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from graph_script import FINAL, QUESTION, scripted_llm, write_corpus
from scripted import ScriptedLLM

import lmstack.agent.web
from lmstack.agent._cli import register_agent, run_chat, run_search
from lmstack.agent._errors import AgentError
from lmstack.core._cli import main as lmstack_main
from lmstack.infer import ToolCall


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmstack")
    register_agent(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["agent", *argv])


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv, "--help")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_verbs_explain_themselves(capsys: pytest.CaptureFixture[str]) -> None:
    assert "search" in help_text(capsys) and "chat" in help_text(capsys)
    out = help_text(capsys, "search")
    for option in ("--llm URL_OR_PATH", "--search BACKEND", "local:FOLDER", "--serve", "--port", "--json"):
        assert option in out, option
    out = help_text(capsys, "chat")
    for option in ("--tools NAMES", "calculator", "web_search", "fetch_page", "--agent", "--search"):
        assert option in out, option


def test_lmstack_lists_the_agent_verb(capsys: pytest.CaptureFixture[str]) -> None:
    # the entry point `agent = "lmstack.agent._cli:register_agent"` in group lmstack.commands
    assert lmstack_main(["agent", "search", "--help"]) == 0
    assert "--search BACKEND" in capsys.readouterr().out
    assert lmstack_main(["agent", "search", "q"]) == 2  # --llm and --search are required
    assert "--llm" in capsys.readouterr().err


def test_search_over_a_local_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_corpus(tmp_path / "docs")
    args = parse("search", QUESTION, "--llm", "http://127.0.0.1:9/v1", "--search", f"local:{folder}")
    assert run_search(args, llm=scripted_llm()) == 0
    captured = capsys.readouterr()
    progress = captured.err.splitlines()
    assert progress[0].startswith("local search: 3 documents at http://127.0.0.1:")
    base = progress[0].split(" at ", 1)[1]
    assert f"question: {QUESTION}" in progress
    assert "+ kadadell_river: On which river is the city of Kadadell?" in progress
    assert "+ velm_sea: Into which sea does the Velm flow? (after kadadell_river)" in progress
    assert progress.index("= kadadell_river: Kadadell lies on the river Velm [[1]].") < progress.index(
        "> velm_sea: searching"
    )
    assert progress[-1].startswith("done in ")
    assert captured.out == (
        f"\nAnswer:\n{FINAL.replace('[[', '[').replace(']]', ']')}\n"
        f"\nReferences:\n[1] Kadadell <{base}/pages/kadadell>\n[2] Velm <{base}/pages/velm>\n"
    )
    # every cited page was read during the search
    for page in ("kadadell", "velm"):
        assert any(f"read {base}/pages/{page} (" in line for line in progress), page


def test_search_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_corpus(tmp_path / "docs")
    args = parse("search", QUESTION, "--llm", "http://x/v1", "--search", f"local:{folder}", "--json")
    assert run_search(args, llm=scripted_llm()) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert events[-2]["type"] == "final_answer" and len(events[-2]["references"]) == 2


def test_search_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="give the question"):
        run_search(parse("search", "--llm", "http://x/v1", "--search", "local:."), llm=scripted_llm())
    with pytest.raises(AgentError, match="SearxNG URL"):
        run_search(
            parse("search", "q", "--llm", "http://x/v1", "--search", "ftp://nowhere"), llm=scripted_llm()
        )
    with pytest.raises(AgentError, match="neither an http"):
        run_search(parse("search", "q", "--llm", str(tmp_path / "missing"), "--search", "local:."))


def test_serve_runs_the_web_app_with_the_same_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_corpus(tmp_path / "docs")
    seen: dict[str, Any] = {}

    def serve_once(app: Any, *, host: str, port: int, on_ready: Any) -> None:
        # instead of serving until Ctrl-C: serve in the background, run one search through the page's API
        seen["host"], seen["port"] = host, port
        with lmstack.agent.web.running(app) as url:
            on_ready(url)
            with httpx.stream("GET", f"{url}/api/search", params={"q": QUESTION}, timeout=60) as reply:
                seen["events"] = [
                    json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")
                ]

    monkeypatch.setattr(lmstack.agent.web, "serve", serve_once)
    args = parse(
        "search", QUESTION, "--llm", "http://x/v1", "--search", f"local:{folder}", "--serve", "--port", "0"
    )
    assert run_search(args, llm=scripted_llm()) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 0)
    out = capsys.readouterr().out
    assert "the search page is at http://127.0.0.1:" in out and "/?q=Into%20which%20sea" in out
    assert seen["events"][-2]["answer"] == FINAL.replace("[[", "[").replace("]]", "]")


def calculator_script(messages: list[dict[str, Any]], options: dict[str, Any]) -> Any:
    if messages[-1]["role"] == "tool":
        return f"The answer is {messages[-1]['content']}."
    return [ToolCall("call_1", "calculator", json.dumps({"expression": "17 * 23"}))]


def test_chat_calls_tools_keeps_memory_and_resets(capsys: pytest.CaptureFixture[str]) -> None:
    llm = ScriptedLLM(calculator_script)
    stdin = io.StringIO("what is 17 times 23?\n\nand again?\n/reset\nthird\n/exit\nnever read\n")
    assert run_chat(parse("chat", "--llm", "http://x/v1", "--tools", "calculator"), llm=llm, stdin=stdin) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["The answer is 391."] * 3  # 17 * 23 = 391, by the calculator tool
    assert '-> calculator({"expression": "17 * 23"})' in captured.err and "<- 391" in captured.err
    users = [[m["content"] for m in call.messages if m["role"] == "user"] for call in llm.calls]
    assert len(llm.calls) == 6  # two model calls per message: the tool call, then the answer
    assert users[2] == ["what is 17 times 23?", "and again?"]  # the conversation is remembered
    assert users[4] == ["third"]  # ... until /reset
    assert [t["function"]["name"] for t in llm.calls[0].options["tools"]] == ["calculator"]


def test_chat_tool_errors() -> None:
    with pytest.raises(AgentError, match="unknown tool 'shell'"):
        run_chat(
            parse("chat", "--llm", "http://x/v1", "--tools", "calculator,shell"),
            llm=scripted_llm(),
            stdin=io.StringIO(""),
        )
    with pytest.raises(AgentError, match="needs --search"):
        run_chat(
            parse("chat", "--llm", "http://x/v1", "--tools", "web_search"),
            llm=scripted_llm(),
            stdin=io.StringIO(""),
        )
