"""torchrun case: build the mesh of the dims in argv and write each rank's coordinates."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from lmstack.core.parallel import ParallelDims
from lmstack.core.parallel._mesh import DIM_NAMES

dims = ParallelDims(**json.loads(sys.argv[1]))
out = Path(sys.argv[2])
dist.init_process_group("gloo")
pm = dims.build_mesh("cpu")
names = (*DIM_NAMES, "dp", "dp_shard_sp", "dp_sp")
record = {name: [pm.local_rank(name), pm[name].size()] for name in names}
record["dp_rank"] = pm.dp_rank
record["dp_size"] = pm.dp_size
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
dist.destroy_process_group()
