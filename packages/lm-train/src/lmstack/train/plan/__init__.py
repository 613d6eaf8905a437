"""The layout planner: memory per device and step time of data, tensor, sequence and pipeline layouts.

``lmstack plan --model CONFIG --seq-len N --global-batch B --cluster SPEC`` enumerates every layout
(``dp_replicate x dp_shard x tp x sp x pp``, micro-batch size, activation checkpointing, interleaved
pipeline stages) the model and cluster allow, predicts each one's peak memory per device and step time
with the cost model of :mod:`lmstack.train.plan._cost`, drops those that do not fit, and prints the
fastest few with their breakdown.

* :func:`plan`: the search (:class:`PlanResult`); :func:`estimate`: one layout's prediction.
* :class:`Layout`, :class:`Workload`, :class:`Cluster` (:func:`load_cluster`, :func:`parse_cluster`,
  :data:`DEVICE_PRESETS` of :class:`DeviceSpec`): the inputs; :class:`Estimate`,
  :class:`MemoryBreakdown`, :class:`TimeBreakdown`: the prediction.
* :func:`model_preset`, :func:`resolve_model`, :data:`MODEL_PRESETS`: model shapes, from a
  ``config.json`` or by the name of a published model.

The search's and the cost model's internals (the candidate layouts, parameter counts, the string
literal types of :class:`Workload`'s and :func:`plan`'s options) stay in ``_search`` and ``_cost``.
"""

from lmstack.train.plan._cluster import DEVICE_PRESETS, Cluster, DeviceSpec, load_cluster, parse_cluster
from lmstack.train.plan._cost import Estimate, Layout, MemoryBreakdown, TimeBreakdown, Workload, estimate
from lmstack.train.plan._errors import PlanError
from lmstack.train.plan._models import MODEL_PRESETS, model_preset, resolve_model
from lmstack.train.plan._search import PlanResult, plan

__all__ = [
    "DEVICE_PRESETS",
    "MODEL_PRESETS",
    "Cluster",
    "DeviceSpec",
    "Estimate",
    "Layout",
    "MemoryBreakdown",
    "PlanError",
    "PlanResult",
    "TimeBreakdown",
    "Workload",
    "estimate",
    "load_cluster",
    "model_preset",
    "parse_cluster",
    "plan",
    "resolve_model",
]
