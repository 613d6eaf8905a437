"""The trained default model and held-out text of the bundled world, shared by the quality benchmarks."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "world"))
import world  # noqa: E402  (examples/world is a folder of scripts, not a package)


def default_model(tmp: Path, env_prefix: str = "AWQ_BENCH") -> tuple[Path, Path, str]:
    """``(model dir, world dir, where they came from)``: ``$<prefix>_MODEL``/``_WORLD``, an earlier
    quickstart run in ``out/quickstart``, or the default model trained here by the quickstart's code."""
    model = os.environ.get(f"{env_prefix}_MODEL")
    if model:
        return Path(model), Path(os.environ[f"{env_prefix}_WORLD"]), f"{env_prefix}_MODEL"
    done = REPO / "out" / "quickstart"
    if (done / "pretrain" / "final" / "config.json").is_file() and (
        done / "world" / "articles.jsonl"
    ).is_file():
        return done / "pretrain" / "final", done / "world", "out/quickstart (an earlier quickstart run)"
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "examples" / "quickstart.py")
    assert spec is not None and spec.loader is not None
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    return Path(quickstart.build_default_model(tmp, resume=False)), tmp / "world", "trained here"


def heldout_texts(world_dir: Path, wordings: int = 2, stream: str = "awq-bench-heldout") -> list[str]:
    """Fresh wordings of the world's articles: in the model's vocabulary and style, never trained on.

    ``world.write_article`` with a stream of its own picks other templates, sentence orders and fillers
    than the articles (and pretraining copies) the model read; none comes out verbatim.
    """
    manifest = world.read_manifest(world_dir) or {}
    the_world = world.build_world(manifest.get("seed", 0), manifest.get("params", {}).get("num_entities", 40))
    rng = random.Random(stream)
    return [
        f"{e.name}\n\n{world.write_article(e, rng).text}" for _ in range(wordings) for e in the_world.entities
    ]
