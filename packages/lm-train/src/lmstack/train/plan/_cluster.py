"""The machines a layout is planned for: devices, how many per node, and the links between them.

``--cluster`` takes a short spec or a YAML file:

* ``8xH100``: one node of 8 H100s; ``4x8xH100``: 4 nodes of 8; ``64xH100``: as many nodes of the
  device's usual node size (8) as that takes; ``H100``: one device; ``cpu:4``: 4 CPU processes on
  one machine.
* a YAML file (``.yaml``/``.yml``) whose keys are :class:`Cluster`'s fields, starting from
  ``device`` (a preset name) and ``nodes``/``gpus_per_node``, or from ``base`` (a spec as above)::

      base: 4x8xH100
      inter_node_gbps: 200        # a slower network than the preset's
      compute_efficiency: 0.45

Bandwidths are in gigabits per second per device and direction (a NIC's rating: 400 for NDR
InfiniBand; NVLink 4 is 450 GB/s = 3600 Gb/s). The efficiency factors say how much of the peak the
cost model may count on: ``compute_efficiency`` of the dense bf16 (or fp32) matmul peak,
``comm_efficiency`` of the link bandwidth, ``overlap`` of FSDP and data-parallel communication hidden
behind compute, and ``usable_memory`` of each device's memory (the rest is the CUDA context, NCCL's
buffers and the caching allocator's fragmentation).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmstack.train.plan._errors import PlanError

__all__ = ["DEVICE_PRESETS", "Cluster", "DeviceSpec", "load_cluster", "parse_cluster"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    """One kind of device and the node it usually comes in.

    Attributes:
        name: The preset's name.
        memory_gib: Device memory in GiB.
        peak_tflops: Dense bf16 matmul peak, in TFLOPS.
        fp32_tflops: Dense fp32 matmul peak (no TF32), in TFLOPS.
        gpus_per_node: Devices per node of the usual server.
        intra_node_gbps: Bandwidth between devices of a node, Gb/s per device and direction.
        inter_node_gbps: Network bandwidth between nodes, Gb/s per device and direction.
    """

    name: str
    memory_gib: float
    peak_tflops: float
    fp32_tflops: float
    gpus_per_node: int
    intra_node_gbps: float
    inter_node_gbps: float


#: Devices by name. Peaks are the vendors' dense (no sparsity) figures; GiB as ``torch`` reports the
#: memory; H100/H200 nodes with NVLink 4 (450 GB/s a direction) and 400 Gb/s NDR per GPU, A100 nodes
#: with NVLink 3 (300 GB/s) and 200 Gb/s HDR per GPU. ``cpu`` is one process of a CPU machine (a
#: few cores' AVX2 FMA throughput, shared-memory "links"), for the runs the tests measure.
DEVICE_PRESETS: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec("H100-80G", 79.6, 989.0, 67.0, 8, 3600.0, 400.0),
        DeviceSpec("H200", 140.4, 989.0, 67.0, 8, 3600.0, 400.0),
        DeviceSpec("A100-80G", 80.0, 312.0, 19.5, 8, 2400.0, 200.0),
        DeviceSpec("A100-40G", 40.0, 312.0, 19.5, 8, 2400.0, 200.0),
        DeviceSpec("cpu", 16.0, 0.2, 0.2, 64, 40.0, 10.0),
    )
}

_ALIASES = {
    "h100": "H100-80G",
    "h100-80g": "H100-80G",
    "h100-80gb": "H100-80G",
    "h200": "H200",
    "h200-141g": "H200",
    "a100": "A100-80G",
    "a100-80g": "A100-80G",
    "a100-80gb": "A100-80G",
    "a100-40g": "A100-40G",
    "a100-40gb": "A100-40G",
    "cpu": "cpu",
}


def _device(name: str) -> DeviceSpec:
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise PlanError(
            f"unknown device {name!r}; use one of {', '.join(DEVICE_PRESETS)} "
            "(or a YAML cluster file with memory_gib, peak_tflops and the bandwidths)."
        )
    return DEVICE_PRESETS[key]


@dataclass(frozen=True)
class Cluster:
    """Devices and links a layout runs on.

    Attributes:
        nodes: Nodes.
        gpus_per_node: Devices (processes) per node.
        device: The device's name (for display).
        memory_gib: Memory per device, GiB.
        peak_tflops: Dense bf16 matmul peak per device, TFLOPS.
        fp32_tflops: Dense fp32 matmul peak per device, TFLOPS.
        intra_node_gbps: Device-to-device bandwidth inside a node, Gb/s per device and direction.
        inter_node_gbps: Network bandwidth between nodes, Gb/s per device and direction.
        compute_efficiency: Share of the matmul peak the model's kernels reach (MFU without
            communication or pipeline bubbles).
        comm_efficiency: Share of a link's bandwidth a collective reaches.
        overlap: Share of FSDP's all-gathers/reduce-scatters and the data-parallel all-reduce hidden
            behind compute (at most the step's compute time is available to hide them).
        usable_memory: Share of ``memory_gib`` a layout may plan to use.
    """

    nodes: int
    gpus_per_node: int
    device: str
    memory_gib: float
    peak_tflops: float
    fp32_tflops: float
    intra_node_gbps: float
    inter_node_gbps: float
    compute_efficiency: float = 0.5
    comm_efficiency: float = 0.8
    overlap: float = 0.8
    usable_memory: float = 0.92

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"cluster {name} must be a positive integer, got {value!r}.")
        for name in ("memory_gib", "peak_tflops", "fp32_tflops", "intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise PlanError(f"cluster {name} must be a positive number, got {value!r}.")
        for name in ("compute_efficiency", "comm_efficiency", "usable_memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise PlanError(f"cluster {name} must be a fraction in (0, 1], got {value!r}.")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)):
            raise PlanError(f"cluster overlap must be a fraction in [0, 1], got {self.overlap!r}.")
        if not 0 <= self.overlap <= 1:
            raise PlanError(f"cluster overlap must be a fraction in [0, 1], got {self.overlap!r}.")

    @property
    def world_size(self) -> int:
        """Devices in all."""
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        """Bytes per device a layout may use."""
        return self.memory_gib * 2**30 * self.usable_memory

    def bandwidth(self, group_span: int) -> float:
        """Bytes/s per device a collective reaches over a group whose ranks span ``group_span`` ranks.

        A group whose consecutive-rank extent fits in a node talks over the node's links; one that
        crosses nodes is bound by the network (each device has its own NIC).
        """
        gbps = self.intra_node_gbps if group_span <= self.gpus_per_node else self.inter_node_gbps
        return gbps * 1e9 / 8 * self.comm_efficiency

    def describe(self) -> str:
        """``4 nodes x 8 H100-80G (79.6 GiB, 989 TFLOPS bf16; links 3600/400 Gb/s)``."""
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node}"
        return (
            f"{nodes} {self.device} ({self.memory_gib:g} GiB, {self.peak_tflops:g} TFLOPS bf16; "
            f"{self.intra_node_gbps:g} Gb/s in a node, {self.inter_node_gbps:g} Gb/s between nodes; "
            f"efficiency: compute {self.compute_efficiency:g}, links {self.comm_efficiency:g}, "
            f"overlap {self.overlap:g})"
        )


def _from_device(device: DeviceSpec, nodes: int, per_node: int) -> Cluster:
    return Cluster(
        nodes=nodes,
        gpus_per_node=per_node,
        device=device.name,
        memory_gib=device.memory_gib,
        peak_tflops=device.peak_tflops,
        fp32_tflops=device.fp32_tflops,
        intra_node_gbps=device.intra_node_gbps,
        inter_node_gbps=device.inter_node_gbps,
    )


_SPEC = re.compile(r"^(?:(\d+)\s*[x*]\s*)?(?:(\d+)\s*[x*]\s*)?([A-Za-z][\w.-]*)$")


def parse_cluster(spec: str) -> Cluster:
    """A cluster from a short spec: ``8xH100``, ``4x8xH100``, ``64xA100-80G``, ``H200``, ``cpu:4``.

    ``NxDEVICE`` with N above the device's node size (8 for GPUs) means N/8 nodes of 8.

    Raises:
        PlanError: The spec does not parse, names an unknown device, or N does not fill whole nodes.
    """
    text = spec.strip()
    cpu = re.fullmatch(r"cpu\s*:\s*(\d+)", text, flags=re.IGNORECASE)
    if cpu:
        count = int(cpu.group(1))
        if count < 1:
            raise PlanError(f"--cluster {spec!r}: the process count must be at least 1.")
        return _from_device(DEVICE_PRESETS["cpu"], 1, count)
    match = _SPEC.fullmatch(text)
    if match is None:
        raise PlanError(
            f"--cluster {spec!r} is not a cluster spec; write DEVICES x DEVICE (8xH100), "
            "NODES x PER_NODE x DEVICE (4x8xH100), cpu:N, or a YAML file."
        )
    first, second, name = match.groups()
    device = _device(name)
    if first is not None and second is not None:
        nodes, per_node = int(first), int(second)
    else:
        count = int(first) if first is not None else 1
        if count <= device.gpus_per_node:
            nodes, per_node = 1, count
        elif count % device.gpus_per_node:
            raise PlanError(
                f"--cluster {spec!r}: {count} {device.name} devices do not fill nodes of "
                f"{device.gpus_per_node}; write NODESxPER_NODExDEVICE (e.g. 3x4x{name})."
            )
        else:
            nodes, per_node = count // device.gpus_per_node, device.gpus_per_node
    if nodes < 1 or per_node < 1:
        raise PlanError(f"--cluster {spec!r}: node and device counts must be at least 1.")
    return _from_device(device, nodes, per_node)


_FIELDS = {f.name for f in dataclasses.fields(Cluster)}


def load_cluster(spec: str) -> Cluster:
    """``--cluster``: a short spec (:func:`parse_cluster`) or a YAML file of :class:`Cluster` fields.

    A YAML file starts from ``base`` (a short spec) or ``device`` (a preset, with ``nodes`` and
    ``gpus_per_node``, default 1 node of the device's node size); every other key overrides a field.

    Raises:
        PlanError: An unreadable file, an unknown key, or a value out of range.
    """
    path = Path(spec)
    if not (spec.lower().endswith((".yaml", ".yml")) or path.is_file()):
        return parse_cluster(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read the cluster file {spec!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PlanError(f"{spec}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{spec}: a cluster file holds a mapping of fields, got {type(data).__name__}.")
    data = dict(data)
    unknown = sorted(set(data) - _FIELDS - {"base"})
    if unknown:
        raise PlanError(
            f"{spec}: unknown cluster field(s) {', '.join(unknown)}; "
            f"the fields are base, {', '.join(sorted(_FIELDS))}."
        )
    base_spec = data.pop("base", None)
    values: dict[str, Any]
    if base_spec is not None:  # a "device" key then only renames the device
        values = dataclasses.asdict(parse_cluster(str(base_spec)))
    elif "device" in data:
        device = _device(str(data.pop("device")))
        values = dataclasses.asdict(_from_device(device, 1, device.gpus_per_node))
    else:
        missing = {"memory_gib", "peak_tflops", "intra_node_gbps", "inter_node_gbps"} - set(data)
        if missing:
            raise PlanError(
                f"{spec}: give base (e.g. 8xH100), device (a preset), or every device field "
                f"(missing: {', '.join(sorted(missing))})."
            )
        # fp32 peak unknown: assume the matmuls run at the given peak either way.
        values = {"nodes": 1, "gpus_per_node": 8, "device": "custom", "fp32_tflops": data["peak_tflops"]}
    values.update(data)
    try:
        return Cluster(**values)
    except TypeError as exc:
        raise PlanError(f"{spec}: {exc}") from exc
