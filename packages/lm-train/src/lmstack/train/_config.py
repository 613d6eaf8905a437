"""Training recipes' YAML configs: read one with command-line overrides, write one back.

:func:`load_train_config` reads a YAML file into a recipe's config dataclass and applies overrides
written as on a command line (the rules are in :mod:`lmstack.train._coerce`)::

    cfg = load_train_config(SFTConfig, "sft.yaml", ["--data.paths", "a.jsonl", "b.jsonl", "--optim.lr=3e-4"])

:func:`save_config` writes a config as YAML that :func:`load_train_config` reads back into an equal
config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmstack.core import LMStackError, atomic_write_file
from lmstack.train._coerce import build_config, to_plain
from lmstack.train.data._errors import TrainConfigError

__all__ = ["config_to_dict", "load_train_config", "save_config"]

T = TypeVar("T")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrainConfigError(f"cannot read the config file {str(path)!r}: {exc}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TrainConfigError(f"{path}{where}: invalid YAML: {problem}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise TrainConfigError(
            f"{path}: a config file must hold a mapping of keys, got {type(loaded).__name__}"
        )
    return loaded


def load_train_config(
    cls: type[T],
    yaml_path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Builds a recipe's config dataclass from a YAML file and command-line style overrides.

    Args:
        cls: The config dataclass (its fields may be nested dataclasses).
        yaml_path: A YAML file of (nested) keys, or None for the defaults.
        overrides: Arguments such as ``["--data.paths", "x.jsonl", "--optim.lr=3e-4"]``; they win
            over the file.

    Returns:
        The config.

    Raises:
        TrainConfigError: An unknown key (the nearest valid key is named), a value that does not fit
            its field's type or choices, a missing required key, or an unreadable file.

    Example:
        >>> from lmstack.train import DataConfig
        >>> cfg = load_train_config(DataConfig, None, ["--max_length", "512", "--format=alpaca"])
        >>> cfg.max_length, cfg.format
        (512, 'alpaca')
    """
    if yaml_path is None:
        return build_config(cls, {}, overrides)
    path = Path(yaml_path)
    return build_config(cls, _read_yaml(path), overrides, where=f" in {path}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Turns a config dataclass into plain YAML/JSON-ready data (paths become strings, tuples lists).

    Args:
        cfg: A config dataclass instance.

    Returns:
        A nested dict that :func:`load_train_config` turns back into an equal config.

    Raises:
        TrainConfigError: ``cfg`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TrainConfigError(f"config_to_dict() needs a dataclass instance, got {type(cfg).__name__}")
    out = to_plain(cfg)
    assert isinstance(out, dict)
    return out


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Writes a config as YAML (atomically: the file is complete or untouched).

    Args:
        cfg: A config dataclass instance.
        path: The YAML file to write; parent directories are created.

    Raises:
        TrainConfigError: ``cfg`` is not a dataclass instance, or the file cannot be written.
    """
    data = config_to_dict(cfg)
    target = Path(path)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        atomic_write_file(target, text)
    except (OSError, LMStackError) as exc:
        raise TrainConfigError(f"cannot write the config to {str(target)!r}: {exc}") from exc
