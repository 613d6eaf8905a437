"""The libraries work with only their declared dependencies.

`nox -s tests` installs every library without extras, so nothing that a `[test]` extra brings
(transformers pulls in numpy, for one) can hide a missing requirement here, as it could in a
library's own session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lmstack.core import CausalLM, ModelConfig, load_pretrained, save_pretrained


def _lmstack(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("lmstack")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300, check=False)


def test_core_checkpoint_round_trip_and_cli(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = CausalLM(config)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    inspected = _lmstack("inspect", str(tmp_path / "ckpt"), "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["parameters"] == sum(p.numel() for p in model.parameters())

    converted = _lmstack("convert", str(tmp_path / "ckpt"), str(tmp_path / "half"), "--dtype", "float16")
    assert converted.returncode == 0, converted.stderr
    halved = load_pretrained(tmp_path / "half")
    for name, tensor in halved.state_dict().items():
        assert tensor.dtype == torch.float16, name
        assert torch.equal(tensor, expected[name].to(torch.float16)), name


def test_every_layer_imports_with_its_declared_dependencies() -> None:
    code = "import lmstack.core, lmstack.train, lmstack.infer, lmstack.eval, lmstack.agent, lmstack.rag"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
