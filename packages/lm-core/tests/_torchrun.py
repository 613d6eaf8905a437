"""Run a script under ``torchrun`` on CPU (gloo) from a test, failing with the ranks' stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(script: Path | str, nproc: int, *args: str, timeout: float = 600) -> str:
    """Run ``script`` on ``nproc`` local processes; returns stdout, raises AssertionError on failure.

    One torch thread per rank (the machines that run CI have two cores).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        str(script), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {Path(script).name} x{nproc} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    return proc.stdout
