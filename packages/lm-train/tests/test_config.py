"""Typed dataclass configs: YAML, command-line overrides, type coercion and helpful errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lmstack.core import ConfigError, LMStackError
from lmstack.train import DataConfig, TrainConfigError, config_to_dict, load_train_config, save_config


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "linear"] = "cosine"
    warmup_steps: int = 0


@dataclass
class LoraConfig:
    r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj"])


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None
    output_dir: Path = Path("runs/x")
    resume_from: str | None = None
    seed: int = 0


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  paths: [a.jsonl]\n  max_length: 512\n  format: sharegpt\n"
        "optim:\n  lr: 3e-4\n  betas: [0.8, 0.9]\noutput_dir: out/run1\n",
        encoding="utf-8",
    )
    cfg = load_train_config(
        RunConfig,
        path,
        ["--data.paths", "x.jsonl", "y.parquet", "--optim.lr=1e-5", "--data.pack", "false",
         "--data.max-length", "1024", "--lora.r", "16", "--resume_from", "none", "--data.shuffle"],
    )  # fmt: skip
    assert cfg.data.paths == ["x.jsonl", "y.parquet"]
    assert cfg.data.format == "sharegpt"  # from the file
    assert cfg.data.max_length == 1024 and cfg.data.pack is False and cfg.data.shuffle is True
    assert cfg.optim.lr == pytest.approx(1e-5) and cfg.optim.betas == [0.8, 0.9]  # YAML's "3e-4" is a str
    assert cfg.output_dir == Path("out/run1")
    assert cfg.lora == LoraConfig(r=16)  # an Optional section created by an override
    assert cfg.resume_from is None


def test_defaults_and_list_spellings() -> None:
    overrides = ["--data.paths=a.jsonl,b.jsonl", "--lora.targets", "[q_proj, v_proj]"]
    cfg = load_train_config(RunConfig, None, overrides)
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"]
    assert cfg.lora is not None and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.optim == OptimConfig()
    assert load_train_config(DataConfig).max_length == 2048


def test_unknown_key_names_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(
        TrainConfigError, match=r"unknown key 'optim\.lrr' .*did you mean 'optim\.lr'"
    ) as info:
        load_train_config(RunConfig, None, ["--optim.lrr", "3e-4"])
    assert info.value.field == "optim.lrr"
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  max_lenght: 10\n", encoding="utf-8")
    with pytest.raises(
        TrainConfigError, match=r"unknown key 'data\.max_lenght' in .*bad\.yaml.*'data\.max_length'"
    ):
        load_train_config(RunConfig, path)
    # The right leaf under the wrong section is found too.
    with pytest.raises(TrainConfigError, match=r"did you mean 'data\.max_length'"):
        load_train_config(RunConfig, None, ["--max_length", "3"])


def test_wrong_types_are_clear(tmp_path: Path) -> None:
    with pytest.raises(
        TrainConfigError, match=r"key 'optim\.lr' on the command line: expected a number, got 'fast'"
    ):
        load_train_config(RunConfig, None, ["--optim.lr", "fast"])
    with pytest.raises(TrainConfigError, match=r"'data\.max_length'.*expected an integer, got '1\.5'"):
        load_train_config(RunConfig, None, ["--data.max_length", "1.5"])
    with pytest.raises(TrainConfigError, match=r"'data\.pack'.*expected true or false"):
        load_train_config(RunConfig, None, ["--data.pack", "maybe"])
    path = tmp_path / "t.yaml"
    path.write_text("seed: [1, 2]\n", encoding="utf-8")
    with pytest.raises(TrainConfigError, match=r"key 'seed' in .*t\.yaml: expected an integer"):
        load_train_config(RunConfig, path)
    with pytest.raises(TrainConfigError, match="takes one value"):
        load_train_config(RunConfig, None, ["--seed", "1", "2"])
    with pytest.raises(TrainConfigError, match="needs a value"):
        load_train_config(RunConfig, None, ["--seed"])
    with pytest.raises(TrainConfigError, match="expected an override"):
        load_train_config(RunConfig, None, ["seed", "1"])


def test_literal_choices_are_validated() -> None:
    with pytest.raises(
        TrainConfigError, match=r"one of 'auto', 'alpaca'.*got 'alpacca' \(did you mean 'alpaca'\?\)"
    ):
        load_train_config(RunConfig, None, ["--data.format", "alpacca"])
    with pytest.raises(TrainConfigError, match="one of 'truncate', 'drop', 'split'"):
        load_train_config(DataConfig, None, ["--on_overflow", "wrap"])
    assert load_train_config(RunConfig, None, ["--optim.schedule", "linear"]).optim.schedule == "linear"


def test_post_init_validation_and_error_types() -> None:
    with pytest.raises(TrainConfigError, match="max_length must be at least 2") as info:
        load_train_config(DataConfig, None, ["--max_length", "1"])
    assert isinstance(info.value, ConfigError) and isinstance(info.value, LMStackError)
    assert isinstance(info.value, ValueError)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  paths: [a\n  max_length: 3\n", encoding="utf-8")
    with pytest.raises(TrainConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_train_config(RunConfig, path)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    overrides = ["--data.paths", "a.jsonl", "--lora.r", "4", "--optim.lr", "2e-4"]
    cfg = load_train_config(RunConfig, None, overrides)
    save_config(cfg, tmp_path / "saved" / "config.yaml")
    plain = config_to_dict(cfg)
    assert plain["output_dir"] == "runs/x" and plain["lora"] == {"r": 4, "targets": ["q_proj"]}
    assert load_train_config(RunConfig, tmp_path / "saved" / "config.yaml") == cfg
    assert not [p for p in (tmp_path / "saved").iterdir() if p.name != "config.yaml"]  # no temp files left
