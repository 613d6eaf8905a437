"""Readers and formats: every file kind and dataset format, and bad input named by file and line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmstack.train import DataConfig, DataError
from lmstack.train.data import DataStats, _readers, iter_samples, resolve_data_files
from lmstack.train.data._formats import EmptyTurnError, detect_format, to_sample
from lmstack.train.data._readers import RawRecord, read_records

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]


def _samples(files: list[Path], **config: Any) -> tuple[list[Any], DataStats]:
    stats = DataStats()
    samples = list(iter_samples(files, DataConfig(**config), stats))
    return samples, stats


def test_alpaca_sharegpt_messages_and_text_in_auto_mode(write_jsonl: Callable[..., Path]) -> None:
    alpaca = write_jsonl(
        "alpaca.jsonl",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "You add."},
            {"instruction": "Say hi", "input": "", "output": "Hi", "history": [["Q1", "A1"]]},
        ],
    )
    sharegpt = write_jsonl(
        "sharegpt.jsonl",
        [
            {
                "system": "Be brief.",
                "tools": json.dumps([{"name": "search", "parameters": {}}]),
                "conversations": [
                    {"from": "human", "value": "Weather?"},
                    {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "weather"}}'},
                    {"from": "observation", "value": "Sunny"},
                    {"from": "gpt", "value": "It is sunny."},
                ],
            }
        ],
    )
    tool_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = write_jsonl(
        "messages.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Call f"},
                    {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "42"},
                    {"role": "assistant", "content": [{"type": "text", "text": "It is 42."}]},
                ],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            }
        ],
    )
    text = write_jsonl("text.jsonl", [{"text": "A document."}, {"text": "   "}])
    samples, stats = _samples([alpaca, sharegpt, messages, text])
    assert [s.messages for s in samples[:2]] == [
        [
            {"role": "system", "content": "You add."},
            {"role": "user", "content": "Add\n2 and 3"},
            {"role": "assistant", "content": "5"},
        ],
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi"},
        ],
    ]
    assert [m["role"] for m in samples[2].messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert samples[2].tools == [{"name": "search", "parameters": {}}]
    assert samples[3].messages[1]["tool_calls"] == [tool_call]  # kept for the chat template
    assert samples[3].tools is not None and samples[3].source.endswith("messages.jsonl")
    assert samples[4].text == "A document." and not samples[4].is_chat
    assert stats.formats == {"alpaca": 2, "sharegpt": 1, "messages": 1, "text": 1}
    assert stats.skipped_empty == 1 and stats.files == 4 and stats.records == 6


def test_json_array_streams_with_line_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_readers, "_CHUNK", 7)  # force many refills mid-element and mid-number
    records = [{"messages": CHAT, "n": 12345678901234}, {"text": "ü" * 30}, 3.25, [1, 2]]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    read = list(read_records(path))
    assert [r.record for r in read] == records
    lines = path.read_text(encoding="utf-8").splitlines()
    for raw in read:
        assert lines[raw.line - 1].strip().startswith(("{", "3.25", "["))
    assert read[0].line == 2


def test_json_array_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON.*cannot be skipped"):
        list(read_records(path, on_malformed="skip"))
    path.write_text('[{"text": "a"}\n{"text": "b"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:2: expected ',' or '\]'"):
        list(read_records(path))


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [r.record["text"] for r in read_records(path)] == ["a", "b"]


def test_malformed_jsonl_fails_naming_file_and_line(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl("d.jsonl", [{"text": "a"}, {"text": "b"}], extra_lines={1: '{"text": "broken'})
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON.*on_malformed=skip") as info:
        _samples([path])
    assert info.value.line == 2 and info.value.source == str(path)


def test_malformed_skip_mode_counts(write_jsonl: Callable[..., Path], tmp_path: Path) -> None:
    path = write_jsonl(
        "d.jsonl",
        [{"messages": CHAT}, {"messages": [{"role": "user", "content": "no reply"}]}, {"messages": CHAT}],
        extra_lines={1: "{not json", 2: "[1, 2"},
    )
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n{"text": "ok"}\n')
    samples, stats = _samples([path, tmp_path / "bin.jsonl"], on_malformed="skip")
    assert len(samples) == 3
    assert stats.skipped_malformed == 4  # two bad JSON lines, one without a final reply, one bad UTF-8
    assert stats.records == 7


def test_unknown_role_names_it_and_the_allowed_ones(write_jsonl: Callable[..., Path]) -> None:
    bad = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]
    path = write_jsonl("roles.jsonl", [{"messages": CHAT}, {"messages": bad}])
    with pytest.raises(
        DataError, match=r"roles\.jsonl:2: unknown role 'bot'.*allowed roles: system, user, assistant, tool"
    ):
        _samples([path])
    sharegpt = write_jsonl(
        "sg.jsonl", [{"conversations": [{"from": "human", "value": "x"}, {"from": "bard", "value": "y"}]}]
    )
    with pytest.raises(
        DataError, match=r"sg\.jsonl:1: unknown role 'bard'.*allowed ShareGPT roles: human, user, gpt"
    ):
        _samples([sharegpt])


def test_empty_assistant_turn_fails_or_is_skipped(write_jsonl: Callable[..., Path]) -> None:
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]
    path = write_jsonl(
        "e.jsonl", [{"messages": CHAT}, {"messages": empty}, {"instruction": "x", "output": ""}]
    )
    with pytest.raises(
        EmptyTurnError, match=r"e\.jsonl:2: assistant turn \(message 1\) is empty.*on_empty_assistant=skip"
    ):
        _samples([path], format="messages")
    samples, stats = _samples([path], format="messages", on_empty_assistant="skip", on_malformed="skip")
    assert len(samples) == 1 and stats.skipped_empty == 1 and stats.skipped_malformed == 1


def test_sft_needs_a_final_assistant_turn_and_fields(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl("t.jsonl", [{"messages": [*CHAT, {"role": "user", "content": "And?"}]}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: the conversation ends with a 'user' turn"):
        _samples([path])
    alpaca = write_jsonl(
        "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "response": "y"}]
    )
    with pytest.raises(DataError, match=r"a\.jsonl:2: missing field 'output'.*has: instruction, response"):
        _samples([alpaca], format="alpaca")
    unknown = write_jsonl("u.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: cannot tell the data format.*completion, prompt"):
        _samples([unknown])


def test_custom_fields(write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl("c.jsonl", [{"dialog": CHAT}, {"dialog": CHAT}])
    samples, _ = _samples([path], messages_field="dialog")
    assert len(samples) == 2 and samples[0].messages == CHAT
    body = write_jsonl("b.jsonl", [{"body": "x y"}])
    assert _samples([body], text_field="body")[0][0].text == "x y"


def test_txt_modes_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_text("First para\nline two\n\n\nSecond para\n\nThird\n", encoding="utf-8")
    paragraphs = list(read_records(path))
    assert [(r.line, r.record) for r in paragraphs] == [
        (1, "First para\nline two"),
        (5, "Second para"),
        (7, "Third"),
    ]
    assert [r.record for r in read_records(path, txt_mode="line")] == [
        "First para",
        "line two",
        "Second para",
        "Third",
    ]
    assert [r.record for r in read_records(path, txt_mode="file")] == [path.read_text(encoding="utf-8")]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write('{"text": "zipped"}\n')
    samples, _ = _samples([path, gz])
    assert [s.text for s in samples] == ["First para\nline two", "Second para", "Third", "zipped"]
    with pytest.raises(DataError, match=r"a \.txt file holds plain text"):
        _samples([path], format="alpaca")


def test_parquet_batches(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows: list[dict[str, Any]] = [
        {"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(2500)
    ]
    rows[1700]["output"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=1000)
    with pytest.raises(DataError, match=r"d\.parquet, row 1700: missing field 'output'"):
        _samples([tmp_path / "d.parquet"])
    samples, stats = _samples([tmp_path / "d.parquet"], on_malformed="skip")
    assert len(samples) == 2499 and stats.skipped_malformed == 1
    assert samples[-1].messages[-1]["content"] == "a2499" and samples[-1].line == 2499


def test_resolve_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.json", "sub/c.txt", "notes.md", ".hidden.jsonl"):
        (tmp_path / name).write_text("", encoding="utf-8")
    assert [p.name for p in resolve_data_files([tmp_path])] == ["a.json", "b.jsonl", "c.txt"]
    assert [p.name for p in resolve_data_files([str(tmp_path / "*.json*")])] == ["a.json", "b.jsonl"]
    with pytest.raises(DataError, match="no such data file"):
        resolve_data_files([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="unsupported data file type"):
        resolve_data_files([tmp_path / "notes.md"])
    with pytest.raises(DataError, match="matches no data files"):
        resolve_data_files([str(tmp_path / "*.parquet")])


def test_detect_and_convert_directly() -> None:
    assert detect_format({"conversations": [{"role": "user", "content": "x"}]}) == "messages"
    assert detect_format({"messages": [{"from": "human", "value": "x"}]}) == "sharegpt"
    sample = to_sample(RawRecord("x.jsonl", 4, {"conversations": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}),
                       "messages")  # fmt: skip
    assert sample.messages == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
