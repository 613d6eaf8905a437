"""Sequence parallelism: every rank of the ``sp`` group holds a slice of every sequence of the batch.

A batch of ``B`` rows x ``T`` tokens is cut along the token dim into ``sp`` slices
(:func:`shard_sequence`); each rank runs embeddings, norms, RoPE (at the tokens' global positions,
sharded alongside the ids) and the feed-forward on its own ``T / sp`` tokens, and only attention
communicates. Attention sees the ``B * T`` tokens as one flat sequence split into samples by the
global ``cu_seqlens`` of :class:`~lmstack.core.PackedAttention`; samples may cross slice boundaries.
Two backends implement :class:`~lmstack.core.AttentionBackend` over such slices:

* :class:`UlyssesAttention` (DeepSpeed-Ulysses): one all-to-all turns "my tokens, all heads" into
  "all tokens, my heads", core's :class:`~lmstack.core.PackedAttention` runs on the full sequence,
  and a second all-to-all turns the result back. Each rank sends ``O(B·T·H·D / sp)`` a layer, so
  the total volume does not grow with the degree. Heads the degree does not divide are split
  unevenly (see :class:`UlyssesAttention`); beyond the head count, ranks sit idle in attention.
* :class:`~lmstack.core.parallel.RingAttention` (in ``_ring``): queries stay put and key/value slices
  travel around the ring; for sequences too long for any rank to hold whole.

Layouts (``layout=``): ``contiguous`` gives rank ``r`` tokens ``[r·T/sp, (r+1)·T/sp)`` of every row;
``zigzag`` cuts each row into ``2·sp`` chunks and gives rank ``r`` chunks ``r`` and ``2·sp - 1 - r``.
Under causal attention a query at position ``t`` sees ``t + 1`` keys, so with ``contiguous`` the last
rank's queries see far more keys than the first's. For one causal sequence rank ``r`` does
``(2r + 1) / sp²`` of the work, a ``2·sp - 1`` to 1 imbalance that ring attention pays at every
step, since the slowest rank sets the pace. Zigzag pairs an early chunk with a late one: with chunks
of ``c`` tokens rank ``r`` sees ``r·c² + c(c+1)/2`` query-key pairs in chunk ``r`` and
``(2·sp - 1 - r)·c² + c(c+1)/2`` in chunk ``2·sp - 1 - r``, ``(2·sp - 1)·c² + c(c+1)`` in all, the
same on every rank (the tests count it). With many short packed samples the work is balanced by the
packing rather than the layout; both layouts give the same results.

Every collective is ``torch.distributed``'s (``all_to_all_single``, ``batch_isend_irecv``) on the
group the caller passes: a process group, a 1-D :class:`~torch.distributed.device_mesh.DeviceMesh`
(``parallel_mesh["sp"]``), or None for the default group (or a single process without one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch
from torch import Tensor

from lmstack.core._errors import ConfigError, LMStackError
from lmstack.core.model._attention import PackedAttention, PackedImpl

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "SequenceGroup",
    "SequenceLayout",
    "UlyssesAttention",
    "gather_sequence",
    "next_token_targets",
    "sequence_chunks",
    "sequence_token_index",
    "shard_sequence",
    "unshard_sequence",
]

logger = logging.getLogger(__name__)

SequenceLayout: TypeAlias = Literal["contiguous", "zigzag"]
"""How a row's tokens are dealt to the sequence-parallel ranks (see the module docstring)."""

GroupLike: TypeAlias = "ProcessGroup | DeviceMesh | None"


# -- slicing -------------------------------------------------------------------------------------------
def _check_layout(layout: str) -> None:
    if layout not in ("contiguous", "zigzag"):
        raise ConfigError(f"unknown sequence layout {layout!r}; use 'contiguous' or 'zigzag'.")


def sequence_chunks(
    seq_len: int, sp_rank: int, sp: int, *, layout: SequenceLayout = "contiguous"
) -> list[tuple[int, int]]:
    """The token ranges ``[start, end)`` of a row that rank ``sp_rank`` holds, in its local order.

    Args:
        seq_len: Tokens per row of the full batch (``T``).
        sp_rank: This rank's coordinate in the sequence-parallel group.
        sp: The sequence-parallel degree.
        layout: ``contiguous`` (one range) or ``zigzag`` (ranges ``r`` and ``2·sp - 1 - r`` of ``2·sp``).

    Raises:
        ConfigError: ``seq_len`` is not a multiple of ``sp`` (``2·sp`` for zigzag), the rank is out of
            range, or the layout is unknown.
    """
    _check_layout(layout)
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ConfigError(f"the sequence-parallel degree must be a positive integer, got {sp!r}.")
    if not 0 <= sp_rank < sp:
        raise ConfigError(f"sequence-parallel rank {sp_rank} is out of range for degree {sp}.")
    parts = sp if layout == "contiguous" else 2 * sp
    if seq_len % parts:
        raise ConfigError(
            f"a row of {seq_len} tokens cannot be cut into {parts} equal chunks for sequence parallelism "
            f"(sp={sp}, layout={layout}); pack or pad rows to a multiple of {parts} tokens."
        )
    c = seq_len // parts
    if layout == "contiguous":
        return [(sp_rank * c, (sp_rank + 1) * c)]
    late = 2 * sp - 1 - sp_rank
    return [(sp_rank * c, (sp_rank + 1) * c), (late * c, (late + 1) * c)]


def shard_sequence(
    t: Tensor, sp_rank: int, sp: int, *, dim: int = 1, layout: SequenceLayout = "contiguous"
) -> Tensor:
    """This rank's slice of ``t`` along the token dim ``dim``.

    Shard every per-token tensor of a batch the same way: ``input_ids``, ``positions`` (global
    per-sample positions, so RoPE needs no change), next-token targets made on the full rows (see
    :func:`next_token_targets`), loss masks.

    Args:
        t: A tensor whose dim ``dim`` is the token dim of the full batch (``[B, T, ...]`` for ``dim=1``).
        sp_rank: This rank's coordinate in the sequence-parallel group.
        sp: The sequence-parallel degree.
        dim: The token dim.
        layout: See :data:`SequenceLayout`.

    Returns:
        ``t`` with ``T / sp`` tokens along ``dim`` (a view for ``contiguous``, a copy for ``zigzag``).

    Raises:
        ConfigError: See :func:`sequence_chunks`.
    """
    chunks = sequence_chunks(t.shape[dim], sp_rank, sp, layout=layout)
    pieces = [t.narrow(dim, a, b - a) for a, b in chunks]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard_sequence(
    shards: Sequence[Tensor], *, dim: int = 1, layout: SequenceLayout = "contiguous"
) -> Tensor:
    """The full tensor from every rank's slice (given in sequence-parallel rank order).

    The inverse of :func:`shard_sequence`.

    Raises:
        ConfigError: No shards, or shards of different lengths along ``dim``.
    """
    sp = len(shards)
    if sp == 0:
        raise ConfigError("unshard_sequence needs at least one shard.")
    local = shards[0].shape[dim]
    if any(s.shape[dim] != local for s in shards):
        raise ConfigError(f"the shards differ in length along dim {dim}: {[s.shape[dim] for s in shards]}.")
    seq_len = local * sp
    placed: list[tuple[int, Tensor]] = []
    for rank, shard in enumerate(shards):
        offset = 0
        for a, b in sequence_chunks(seq_len, rank, sp, layout=layout):
            placed.append((a, shard.narrow(dim, offset, b - a)))
            offset += b - a
    placed.sort(key=lambda item: item[0])
    return torch.cat([piece for _, piece in placed], dim=dim)


def gather_sequence(
    t: Tensor, group: GroupLike = None, *, dim: int = 1, layout: SequenceLayout = "contiguous"
) -> Tensor:
    """The full tensor on every rank of the group from each rank's slice (all-gather; no gradient).

    For evaluation and debugging: training never needs the full sequence on one rank.
    """
    import torch.distributed as dist

    g = SequenceGroup.of(group)
    if g.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(g.size)]
    dist.all_gather(parts, t.contiguous(), group=g.group)
    return unshard_sequence(parts, dim=dim, layout=layout)


def sequence_token_index(
    batch: int,
    seq_len: int,
    sp_rank: int,
    sp: int,
    *,
    layout: SequenceLayout = "contiguous",
    device: torch.device | str | None = None,
) -> Tensor:
    """The global flat token index (``row · T + column``) of each of this rank's local tokens.

    Local tokens are taken in the order of the flattened local slice ``[B, T / sp]``, which is how
    the attention backends flatten them; the result indexes into the ``B · T`` tokens that
    ``cu_seqlens`` splits into samples.

    Returns:
        ``[B · T / sp]`` int64.
    """
    cols = torch.cat([torch.arange(a, b) for a, b in sequence_chunks(seq_len, sp_rank, sp, layout=layout)])
    index = (torch.arange(batch)[:, None] * seq_len + cols[None, :]).reshape(-1)
    return index.to(device) if device is not None else index


def next_token_targets(
    labels: Tensor, *, cu_seqlens: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Shift labels so that position ``i`` holds the target it predicts, before the batch is sharded.

    Sequence-parallel ranks hold slices of a row, so the next token of a slice's last position lives
    on another rank: make the targets on the full rows, then :func:`shard_sequence` them with the ids.

    Args:
        labels: ``[B, T]`` unshifted labels (the token ids for language modelling; ``ignore_index``
            where no loss is wanted).
        cu_seqlens: Optional global boundaries of the packed samples over the flattened ``B · T``
            tokens: the last token of every sample then predicts nothing (``ignore_index``), and a
            sample that continues on the next row keeps its target across the row end. Without
            them, rows are shifted independently (the last column predicts nothing).
        ignore_index: The label of positions that carry no loss.

    Returns:
        ``[B, T]`` targets: ``targets[..., i] = labels[..., i + 1]`` within a sample.
    """
    if labels.dim() != 2:
        raise ConfigError(f"labels must be [batch, tokens], got shape {tuple(labels.shape)}.")
    if cu_seqlens is None:
        out = torch.full_like(labels, ignore_index)
        out[:, :-1] = labels[:, 1:]
        return out
    flat = labels.reshape(-1)
    cu = cu_seqlens.to(device="cpu", dtype=torch.int64)
    if int(cu[-1]) != flat.numel() or int(cu[0]) != 0:
        raise ConfigError(f"cu_seqlens covers {int(cu[-1])} tokens but the labels hold {flat.numel()}.")
    out = torch.full_like(flat, ignore_index)
    out[:-1] = flat[1:]
    out[(cu[1:] - 1).to(flat.device)] = ignore_index
    return out.reshape(labels.shape)


# -- groups --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceGroup:
    """The sequence-parallel group of this process: its process group, rank in it and size.

    Attributes:
        group: The process group (None: the default group, or no process group at all).
        rank: This process's rank in the group.
        size: The sequence-parallel degree.
    """

    group: ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, group: GroupLike) -> SequenceGroup:
        """Resolve a process group, a 1-D device mesh (``parallel_mesh["sp"]``) or None.

        None means the default process group, or a group of one when there is none (a single
        process: the backends then attend locally).

        Raises:
            ConfigError: A mesh with more than one dim.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise ConfigError(
                    f"sequence parallelism needs a 1-D device mesh (e.g. parallel_mesh['sp']), got a "
                    f"{group.ndim}-D mesh with dims {group.mesh_dim_names}."
                )
            group = group.get_group()
        if group is None and not dist.is_initialized():
            return cls(None, 0, 1)
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


def _host_bounds(cu_seqlens: Tensor, host_cu_seqlens: Tensor | None) -> Tensor:
    """``cu_seqlens`` as CPU int64, checked (one device sync when only device boundaries are given)."""
    host = (host_cu_seqlens if host_cu_seqlens is not None else cu_seqlens).to("cpu", torch.int64)
    if host.dim() != 1 or host.numel() < 2 or int(host[0]) != 0 or bool((host[1:] <= host[:-1]).any()):
        raise LMStackError(
            "cu_seqlens must be a 1-D strictly increasing tensor [0, len0, len0+len1, ...] over the "
            "flattened tokens of the full (unsharded) batch."
        )
    return host


def _backend_setup(
    cu_seqlens: Tensor, group: GroupLike, layout: str, host_cu_seqlens: Tensor | None
) -> tuple[SequenceGroup, Tensor]:
    """The constructor checks both sequence-parallel backends share (Ulysses and ring).

    Returns:
        The resolved group and the global ``cu_seqlens`` as checked CPU int64.

    Raises:
        ConfigError: An unknown layout, or a device mesh with more than one dim.
        LMStackError: ``cu_seqlens`` is not a strictly increasing ``[0, ...]`` vector.
    """
    _check_layout(layout)
    resolved = SequenceGroup.of(group)
    return resolved, _host_bounds(cu_seqlens, host_cu_seqlens)


def _check_tokens(total: int, batch: int, local: int, sp: int) -> None:
    if batch * local * sp != total:
        raise LMStackError(
            f"cu_seqlens covers {total} tokens but {sp} sequence-parallel ranks holding [{batch}, {local}] "
            f"tokens each make {batch * local * sp}; pass the global cu_seqlens of the full batch and "
            f"the local slice of q, k and v."
        )


# -- all-to-all ----------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None
    ) -> Tensor:
        import torch.distributed as dist

        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


@dataclass(frozen=True)
class _HeadPlan:
    """How heads are dealt to the ranks for one ``(Hq, Hkv)``; see :class:`UlyssesAttention`."""

    q_counts: list[int]  # query heads of each rank
    kv_counts: list[int]  # key/value heads each rank receives
    send_index: Tensor  # rows of cat([q, k, v] heads) in send order: rank 0's q, k, v, rank 1's ...
    expand: Tensor | None  # local kv head of each local q head, when the grouping is not uniform


def _head_plan(hq: int, hkv: int, rank: int, sp: int, device: torch.device | None = None) -> _HeadPlan:
    group = hq // hkv
    base, extra = divmod(hq, sp)
    q_counts = [base + (1 if r < extra else 0) for r in range(sp)]
    starts = [sum(q_counts[:r]) for r in range(sp)]
    kv_ranges: list[tuple[int, int]] = []
    send: list[int] = []
    for r in range(sp):
        a, b = starts[r], starts[r] + q_counts[r]
        lo, hi = (a // group, (b - 1) // group + 1) if b > a else (0, 0)
        kv_ranges.append((lo, hi))
        send += list(range(a, b))
        send += [hq + h for h in range(lo, hi)]
        send += [hq + hkv + h for h in range(lo, hi)]
    a, n = starts[rank], q_counts[rank]
    lo = kv_ranges[rank][0]
    owner = [(a + j) // group - lo for j in range(n)]  # local kv head of each local q head
    counts = [owner.count(h) for h in range(kv_ranges[rank][1] - lo)]
    # PackedAttention's grouped-query path needs every kv head to serve the same number of
    # consecutive q heads; otherwise repeat kv heads locally (after the all-to-all, so the wire
    # carries each kv head once per rank that needs it).
    uniform = bool(counts) and all(c == counts[0] for c in counts)
    return _HeadPlan(
        q_counts=q_counts,
        kv_counts=[hi - lo for lo, hi in kv_ranges],
        send_index=torch.tensor(send, dtype=torch.int64, device=device),
        expand=None if uniform or n == 0 else torch.tensor(owner, dtype=torch.int64, device=device),
    )


class UlyssesAttention:
    """Sequence-parallel attention by head-scattering all-to-all (DeepSpeed-Ulysses) over packed samples.

    Each rank calls :meth:`attend` with its local ``q [B, T/sp, Hq, D]`` and ``k``/``v``
    ``[B, T/sp, Hkv, D]``. One all-to-all (q, k and v in a single message) gives every rank all
    ``B · T`` tokens for its share of the heads; core's :class:`~lmstack.core.PackedAttention` runs
    over the global ``cu_seqlens`` (any of its implementations, sliding windows included); a second
    all-to-all returns each rank its tokens with all heads. Both all-to-alls are differentiable (the
    backward is the reverse all-to-all), so autograd handles the rest.

    Heads that the degree does not divide are split unevenly, not padded: rank ``r`` gets
    ``Hq // sp`` query heads, plus one for the first ``Hq % sp`` ranks (``Hq=6, sp=4``: 2, 2, 1, 1),
    which costs no more time than padding to a multiple of ``sp`` (the busiest rank has
    ``ceil(Hq / sp)`` heads either way) and sends and computes no zero heads. Each rank receives the
    key/value heads its query heads use (``h // (Hq / Hkv)``), so a kv head shared by two ranks'
    query heads travels to both, and grouped-query attention is kept wherever the local grouping
    stays uniform (e.g. ``Hq=8, Hkv=2`` at ``sp=2`` or ``4``); otherwise kv heads are repeated
    locally to one per query head. With fewer query heads than ranks, some ranks attend to nothing.

    Args:
        cu_seqlens: Global cumulative sample lengths over the flattened ``B · T`` tokens of the full
            batch (the same on every rank of the group).
        group: The sequence-parallel group: a process group, a 1-D device mesh
            (``parallel_mesh["sp"]``), or None for the default group (a single process without one
            attends locally).
        impl: The :class:`~lmstack.core.PackedAttention` implementation run on the gathered sequence.
        layout: How the batch was sharded (:func:`shard_sequence`'s layout).
        host_cu_seqlens: The boundaries in host memory when ``cu_seqlens`` lives on an accelerator.
    """

    def __init__(
        self,
        cu_seqlens: Tensor,
        group: GroupLike = None,
        *,
        impl: PackedImpl = "auto",
        layout: SequenceLayout = "contiguous",
        host_cu_seqlens: Tensor | None = None,
    ) -> None:
        self.group, host = _backend_setup(cu_seqlens, group, layout, host_cu_seqlens)
        self.layout: SequenceLayout = layout
        self._total = int(host[-1])
        self.inner = PackedAttention(cu_seqlens, impl=impl, host_cu_seqlens=host)
        self._plans: dict[tuple[int, int, torch.device], _HeadPlan] = {}
        self._orders: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def _order(self, batch: int, local: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Global index of each received token (source rank major) and the sort into global order."""
        key = (batch, local, device)
        if key not in self._orders:
            sp = self.group.size
            src = torch.cat(
                [sequence_token_index(batch, local * sp, r, sp, layout=self.layout) for r in range(sp)]
            )
            self._orders[key] = (src.to(device), torch.argsort(src).to(device))
        return self._orders[key]

    def attend(
        self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None
    ) -> Tensor:
        """See :meth:`~lmstack.core.AttentionBackend.attend`; ``q``, ``k``, ``v`` are this rank's slice."""
        b, tl, hq, d = q.shape
        hkv = k.shape[2]
        sp, rank = self.group.size, self.group.rank
        _check_tokens(self._total, b, tl, sp)
        if sp == 1:
            return self.inner.attend(layer_idx, q, k, v, scale=scale, window=window)
        key = (hq, hkv, q.device)
        if key not in self._plans:
            plan = self._plans[key] = _head_plan(hq, hkv, rank, sp, q.device)
            logger.debug(
                "ulysses heads over sp=%d: query heads %s, kv heads received %s, kv repeated locally: %s",
                sp, plan.q_counts, plan.kv_counts, plan.expand is not None,
            )  # fmt: skip
        plan = self._plans[key]
        n = b * tl
        src, order = self._order(b, tl, q.device)
        my_q, my_kv = plan.q_counts[rank], plan.kv_counts[rank]
        mine = my_q + 2 * my_kv

        heads = torch.cat([q, k, v], dim=2).reshape(n, hq + 2 * hkv, d).transpose(0, 1)  # [H', N_l, D]
        send = heads.index_select(0, plan.send_index)
        in_splits = [plan.q_counts[r] + 2 * plan.kv_counts[r] for r in range(sp)]
        recv = _AllToAll.apply(send, [mine] * sp, in_splits, self.group.group)  # [sp * mine, N_l, D]
        # Source-rank-major tokens -> the global flat order cu_seqlens speaks of.
        recv = recv.view(sp, mine, n, d).permute(0, 2, 1, 3).reshape(sp * n, mine, d)
        recv = recv.index_select(0, order)
        lq, lk, lv = recv.split([my_q, my_kv, my_kv], dim=1)
        if my_q == 0:
            out = lq  # nothing to attend, but stay on the graph so the backward all-to-all runs here too
        else:
            if plan.expand is not None:
                lk, lv = lk.index_select(1, plan.expand), lv.index_select(1, plan.expand)
            out = self.inner.attend(layer_idx, lq[None], lk[None], lv[None], scale=scale, window=window)[0]
        out = out.index_select(0, src)  # back to source-rank-major order
        out = out.view(sp, n, my_q, d).permute(0, 2, 1, 3).reshape(sp * my_q, n, d)
        back = _AllToAll.apply(out, plan.q_counts, [my_q] * sp, self.group.group)  # [Hq, N_l, D]
        return back.transpose(0, 1).reshape(b, tl, hq, d)
