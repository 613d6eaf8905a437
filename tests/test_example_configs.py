"""Every shipped training config loads into the recipe its own usage comment names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmstack.train import load_train_config
from lmstack.train.recipes import (
    DPOConfig,
    KTOConfig,
    LoRAConfig,
    ORPOConfig,
    PretrainConfig,
    RewardConfig,
    SFTConfig,
    SimPOConfig,
)

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
RECIPES: dict[str, type] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "lora": LoRAConfig,
    "qlora": LoRAConfig,
    "dpo": DPOConfig,
    "orpo": ORPOConfig,
    "simpo": SimPOConfig,
    "kto": KTOConfig,
    "rm": RewardConfig,
}


def _usages(path: Path) -> list[str]:
    """The recipes of the ``lmstack train RECIPE examples/configs/<this file>`` lines in its comments."""
    pattern = re.compile(rf"#\s+lmstack train (\w+) examples/configs/{re.escape(path.name)}\b")
    return pattern.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads_into_the_recipe_its_comment_names(path: Path) -> None:
    usages = _usages(path)
    assert usages, f"{path.name} has no '#   lmstack train RECIPE examples/configs/{path.name}' line"
    for recipe in usages:
        assert recipe in RECIPES, f"{path.name} names an unknown recipe {recipe!r}"
        config = load_train_config(RECIPES[recipe], path)  # unknown keys and bad values raise here
        data = config.data
        assert data.paths, f"{path.name}: no data paths"
        assert all(p.startswith("out/") for p in data.paths), "example data lives under out/ (generated)"


def test_default_model_config_is_the_documented_default() -> None:
    config = load_train_config(PretrainConfig, CONFIGS / "default_model.yaml")
    # The quickstart's time budget and the README's figures rest on these numbers.
    assert (config.arch.hidden_size, config.arch.num_hidden_layers, config.run.max_steps) == (256, 4, 450)
    assert config.data.format == "auto" and config.data.train_on == "all"
    assert [Path(p).name for p in config.data.paths] == ["pretrain.jsonl", "chats.jsonl"]
