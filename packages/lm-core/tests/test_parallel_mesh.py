"""ParallelDims: validation against the world size, and the named mesh torchrun ranks land on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _torchrun import torchrun

from lmstack.core import ConfigError
from lmstack.core.parallel import ParallelDims

CASES = Path(__file__).parent / "parallel_cases"


def test_dp_shard_takes_the_rest_of_the_world() -> None:
    assert ParallelDims(tp=2).resolve(8) == ParallelDims(dp_replicate=1, dp_shard=4, tp=2, sp=1, pp=1)
    assert ParallelDims(dp_replicate=2, tp=2, pp=2).resolve(16).dp_shard == 2
    assert ParallelDims().resolve(1).world_size == 1
    assert ParallelDims(dp_replicate=2, dp_shard=3).resolve(6).dp == 6


@pytest.mark.parametrize(
    ("dims", "world", "message"),
    [
        (ParallelDims(tp=3), 8, "does not divide the world size 8"),
        (ParallelDims(dp_shard=2, tp=2), 8, "needs 4 processes but the world size is 8"),
        (ParallelDims(tp=0), 2, "parallel.tp must be a positive integer"),
        (ParallelDims(dp_shard=-2), 2, "parallel.dp_shard must be a positive integer or -1"),
        (ParallelDims(sp=True), 2, "parallel.sp must be an integer"),  # type: ignore[arg-type]
    ],
)
def test_bad_dims_are_refused_with_the_fix(dims: ParallelDims, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dims.resolve(world)


def test_single_process_has_sizes_but_no_mesh() -> None:
    pm = ParallelDims().build_mesh("cpu")
    assert pm.mesh is None and pm.dp_rank == 0 and pm.dp_size == 1 and pm.size("dp_sp") == 1
    with pytest.raises(ConfigError, match="no device mesh"):
        pm["tp"]


def test_four_ranks_land_on_the_expected_coordinates(tmp_path: Path) -> None:
    """dp_shard=2 x tp=2: tp is innermost, so ranks 0,1 share a tp group and 0,2 a dp group."""
    torchrun(CASES / "mesh_case.py", 4, json.dumps({"dp_shard": 2, "tp": 2}), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, record in enumerate(ranks):
        assert record["tp"] == [r % 2, 2]
        assert record["dp_shard"] == [r // 2, 2]
        assert record["pp"] == [0, 1] and record["sp"] == [0, 1] and record["dp_replicate"] == [0, 1]
        assert record["dp"] == [r // 2, 2] and record["dp_shard_sp"] == [r // 2, 2]
        assert record["dp_sp"] == [r // 2, 2]
        assert (record["dp_rank"], record["dp_size"]) == (r // 2, 2)
