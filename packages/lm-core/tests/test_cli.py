"""The `lmstack` command line: verbs from entry points, --version, errors, `inspect` and `convert`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lmstack.core
from lmstack.core._cli import main

PLUGIN_SOURCE = """
from lmstack.core import ConfigError


def register(subparsers):
    parser = subparsers.add_parser("hello", help="say hello from a plugin")
    parser.add_argument("name")
    parser.set_defaults(func=run)


def run(args):
    print(f"hello {args.name}")
    return 3


def register_fail(subparsers):
    parser = subparsers.add_parser("fail", help="raise an lmstack error")
    parser.set_defaults(func=fail)


def fail(args):
    raise ConfigError("the config is\\nbroken; fix it")
"""

BROKEN_SOURCE = """
def register_crash(subparsers):
    raise RuntimeError("plugin bug")
"""

UNIMPORTABLE_SOURCE = """
raise ImportError("needs a dependency that is not installed")
"""


def _write_plugin(
    root: Path, dist: str, version: str, modules: dict[str, str], commands: dict[str, str]
) -> None:
    """A minimal installed distribution: modules plus a dist-info whose entry points add lmstack verbs."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = ["[lmstack.commands]", *(f"{verb} = {target}" for verb, target in commands.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """A folder on sys.path holding the `lmstack-hello` plugin distribution (verbs `hello`, `fail`)."""
    root = tmp_path / "site"
    root.mkdir()
    _write_plugin(
        root,
        "lmstack-hello",
        "0.4.2",
        {"lmstack_hello_plugin": PLUGIN_SOURCE},
        {"hello": "lmstack_hello_plugin:register", "fail": "lmstack_hello_plugin:register_fail"},
    )
    monkeypatch.syspath_prepend(str(root))
    yield root
    for module in [name for name in sys.modules if name.startswith("lmstack_") and name.endswith("_plugin")]:
        del sys.modules[module]


def _run_console(args: list[str], *, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    script = Path(sys.executable).with_name("lmstack")
    assert script.is_file(), f"the lmstack console script is not installed beside {sys.executable}"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


# -- the command-line frame ---------------------------------------------------------------------


def test_help_lists_core_verbs_as_module_and_console_script() -> None:
    as_module = subprocess.run(
        [sys.executable, "-m", "lmstack.core", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    as_script = _run_console(["--help"])
    for result in (as_module, as_script):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: lmstack ")
        assert "inspect" in result.stdout
        assert "convert" in result.stdout
        assert result.stderr == ""


def test_version_lists_installed_lmstack_distributions(
    plugin_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"lmstack-core {lmstack.core.__version__}" in lines
    assert "lmstack-hello 0.4.2" in lines
    assert lines == sorted(lines)
    assert all(line.startswith("lmstack-") and len(line.split()) == 2 for line in lines)


def test_plugin_verb_appears_in_help_and_runs(plugin_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "hello" in help_text
    assert "say hello from a plugin" in help_text
    assert "inspect" in help_text

    assert main(["hello", "world"]) == 3
    assert capsys.readouterr().out == "hello world\n"


def test_plugin_verb_runs_through_the_console_script(plugin_path: Path) -> None:
    result = _run_console(["hello", "from-a-process"], pythonpath=plugin_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "hello from-a-process\n"


def test_broken_plugins_are_reported_and_the_rest_still_work(
    plugin_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_plugin(
        plugin_path,
        "lmstack-broken",
        "0.0.1",
        {"lmstack_broken_plugin": BROKEN_SOURCE, "lmstack_unimportable_plugin": UNIMPORTABLE_SOURCE},
        {
            "crash": "lmstack_broken_plugin:register_crash",
            "missing": "lmstack_broken_plugin:no_such_function",
            "unimportable": "lmstack_unimportable_plugin:register",
        },
    )
    with caplog.at_level(logging.WARNING, logger="lmstack.core._cli"):
        assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for verb in ("inspect", "convert", "hello"):
        assert verb in help_text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for verb, reason in [
        ("crash", "plugin bug"),
        ("missing", "no_such_function"),
        ("unimportable", "dependency"),
    ]:
        assert any(f"'{verb}'" in message and reason in message for message in warnings), warnings

    assert main(["hello", "again"]) == 3
    assert capsys.readouterr().out == "hello again\n"


def test_lmstack_errors_are_one_line_and_exit_2(
    plugin_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fail"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: the config is broken; fix it\n"
    assert captured.out == ""

    assert main(["-v", "fail"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "ConfigError" in err
    assert err.endswith("error: the config is broken; fix it\n")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert main(["no-such-verb"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["inspect"]) == 2
    assert "path" in capsys.readouterr().err


# -- lmstack inspect and lmstack convert (they use load_config / load_pretrained / save_pretrained) --


def _tiny_llama_checkpoint(path: Path, *, max_shard_size: str) -> torch.nn.Module:
    """A random tiny Llama written by transformers (the reference writer), with a tokenizer beside it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size=max_shard_size)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(93)}}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return model


def test_inspect_counts_parameters_from_sharded_headers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = _tiny_llama_checkpoint(tmp_path / "llama", max_shard_size="20KB")
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()

    assert main(["inspect", str(tmp_path / "llama"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "llama"
    assert report["num_hidden_layers"] == 2
    assert report["hidden_size"] == 32
    assert report["num_attention_heads"] == 4
    assert report["num_key_value_heads"] == 2
    assert report["vocab_size"] == 96
    assert report["rope_scaling"] is None
    assert report["parameters"] == sum(p.numel() for p in reference.parameters())
    assert report["parameters_by_dtype"] == {"float32": report["parameters"]}
    assert report["safetensors_files"] > 1


def test_inspect_internlm2_with_dynamic_rope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # InternLM2.5's spelling: packed wqkv, rope_scaling {"type": "dynamic"} beside rope_theta.
    vocab, hidden, inter, layers, heads, kv = 80, 32, 48, 2, 4, 2
    head_dim = hidden // heads
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 50000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    ckpt = tmp_path / "internlm2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(config))
    shapes = {
        "model.tok_embeddings.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
    }
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes |= {
            f"{prefix}.attention.wqkv.weight": ((heads + 2 * kv) * head_dim, hidden),
            f"{prefix}.attention.wo.weight": (hidden, heads * head_dim),
            f"{prefix}.feed_forward.w1.weight": (inter, hidden),
            f"{prefix}.feed_forward.w3.weight": (inter, hidden),
            f"{prefix}.feed_forward.w2.weight": (hidden, inter),
            f"{prefix}.attention_norm.weight": (hidden,),
            f"{prefix}.ffn_norm.weight": (hidden,),
        }
    save_file(
        {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes.items()},
        ckpt / "model.safetensors",
    )
    expected = sum(torch.Size(shape).numel() for shape in shapes.values())

    assert main(["inspect", str(ckpt / "config.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "internlm2"
    assert report["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0}
    assert report["parameters"] == expected
    assert report["parameters_by_dtype"] == {"bfloat16": expected}

    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "internlm2" in text
    assert "dynamic (factor 2)" in text
    assert f"{expected:,}" in text


def test_inspect_without_weights_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tiny_llama_checkpoint(tmp_path / "llama", max_shard_size="5GB")
    (tmp_path / "llama" / "model.safetensors").unlink()
    capsys.readouterr()  # transformers' progress bars
    assert main(["inspect", str(tmp_path / "llama")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1


def test_convert_to_bfloat16_keeps_weights_and_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "src", tmp_path / "dst"
    reference = _tiny_llama_checkpoint(src, max_shard_size="5GB")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7, "do_sample": True}
    (src / "generation_config.json").write_text(json.dumps(generation))

    assert main(["convert", str(src), str(dst), "--dtype", "bfloat16", "--max-shard-size", "20KB"]) == 0
    assert str(dst) in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert (dst / "model.safetensors.index.json").is_file()

    assert main(["inspect", str(dst), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    parameters = sum(p.numel() for p in reference.parameters())
    assert report["parameters_by_dtype"] == {"bfloat16": parameters}

    # What lmstack writes, transformers loads: the same weights, rounded to bfloat16.
    reloaded = AutoModelForCausalLM.from_pretrained(dst).state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded[name].to(torch.bfloat16), tensor.to(torch.bfloat16)), name


def test_convert_refuses_to_overwrite_its_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ckpt").mkdir()
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / ".." / "ckpt")]) == 2
    assert "DST must differ from SRC" in capsys.readouterr().err
