"""A tensor-parallel run across two "hosts": network namespaces joined by a veth link, one torchrun each.

The test builds the namespaces and the link itself (root and iproute2 needed, as on the CI machines),
starts ``torchrun --nnodes 2`` in each namespace with the rendezvous on the first one's address, so every
byte between the ranks crosses the virtual link (gloo bound to the veth interface), and tears it all
down. The run must equal one process step for step, as the same layout does on one host.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lmstack.core import Tokenizer, load_pretrained


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _can_make_namespaces() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces linked by a veth pair (10.77.x.1 and .2); yields (ns_a, ns_b, addr_a)."""
    reason = _can_make_namespaces()
    if reason is not None:
        pytest.fail(f"the two-host test {reason}; CI runs it as root")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"lms-a-{tag}", f"lms-b-{tag}"
    subnet = f"10.77.{random.Random(tag).randint(1, 250)}"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", ns_a)
        _ip("link", "set", f"vb{tag}", "netns", ns_b)
        for ns, dev, host in ((ns_a, f"va{tag}", 1), (ns_b, f"vb{tag}", 2)):
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, f"{subnet}.1"
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _losses(run: Path) -> dict[int, float]:
    return {
        json.loads(line)["step"]: json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
    }


def test_tensor_parallel_across_two_network_namespaces_matches_one_process(
    two_hosts: tuple[str, str, str], tokenizer: Tokenizer, layout_driver: ModuleType, tmp_path: Path
) -> None:
    ns_a, ns_b, master = two_hosts
    data = tmp_path / "docs.jsonl"
    layout_driver.write_docs(data)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    cases = json.dumps([{"name": "tp2_hosts", "parallel": {"tp": 2}, "batch_size": 4}])
    procs = []
    for node, ns in enumerate((ns_a, ns_b)):
        dev = ("va" if node == 0 else "vb") + ns[-6:]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": dev}
        cmd = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
            "--master-addr", master, "--master-port", "29531",
            str(layout_driver.__file__), str(data), str(tmp_path / "tokenizer"), str(tmp_path), cases,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        )
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
    layout_driver.run_case(tokenizer, data, tmp_path / "single", None, 4)
    one, hosts = _losses(tmp_path / "single"), _losses(tmp_path / "tp2_hosts")
    assert sorted(hosts) == [1, 2, 3, 4]
    for step in one:
        assert hosts[step] == pytest.approx(one[step], rel=2e-5), step
    a = load_pretrained(tmp_path / "single" / "final").state_dict()
    b = load_pretrained(tmp_path / "tp2_hosts" / "final").state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
    result = json.loads((tmp_path / "tp2_hosts" / "result.json").read_text())
    assert result["world"] == 2 and result["mode"] == "mesh"
