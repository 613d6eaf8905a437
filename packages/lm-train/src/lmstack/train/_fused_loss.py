"""The output head and the token cross-entropy in one pass over row chunks, never holding ``[N, V]`` logits.

The plain path of a language-modelling loss computes ``logits = hidden @ W.T`` (``[N, V]``), an fp32
copy, its log-softmax, and in backward a gradient of each: with a large vocabulary these are the
largest activations of a training step. Here the rows go through the head ``chunk`` at a time: a
chunk's logits live only while its loss and its gradients are computed, already in forward. The loss
is a sum, so the gradients w.r.t. ``hidden``, ``W`` and the bias are known there up to the scalar
that backward brings, and backward only scales them.

* :func:`fused_linear_cross_entropy`: the summed cross-entropy (what
  :class:`~lmstack.train._objectives.LanguageModeling` minimises) with gradients equal to those of
  ``F.cross_entropy(F.linear(hidden, W, b).float(), targets, reduction="sum")`` up to float summation
  order.
* :class:`FusedLinearCrossEntropy`: the same as a ``head=`` of :meth:`lmstack.core.CausalLM.forward`,
  falling back to the plain path for output heads that are not a plain ``nn.Linear`` (LoRA, 4-bit).
* :func:`fused_linear_token_logps` (and :class:`FusedTokenLogps`, its ``head=``): per-token log-probs
  (reduction none, for preference losses), keeping one fp32 log-normaliser per row and recomputing
  each chunk's logits in backward.

Precision follows the plain path: the matmuls run in the input dtype, or in the autocast dtype when
called under :func:`torch.autocast` (as ``F.linear`` would), and the softmax in fp32. The weight (and
bias) gradient is accumulated over chunks in fp32 and cast to the parameter's dtype once at the end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lmstack.train._preference_losses import token_logps
from lmstack.train.data._errors import TrainConfigError, TrainError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FusedLinearCrossEntropy",
    "FusedTokenLogps",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_token_logps",
]

logger = logging.getLogger(__name__)

#: The fp32 logits one chunk may hold by default: rows per chunk = this // (vocab * 4). Measured on CPU
#: (fp32, one thread, N = 1024, forward + backward): at V = 4096 (one chunk) as fast as the plain path;
#: at V = 49152 (341 rows) ~8% faster than it, within ~3% of 128-256 MiB chunks and with ~60 MiB less
#: peak memory than 128 MiB. Not tuned on GPUs, where larger chunks may keep the matmuls busier.
DEFAULT_CHUNK_BYTES = 64 << 20

# Dtypes autocast lowers (float64 stays float64 under autocast, as it does for F.linear).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``budget_bytes``.

    Args:
        vocab_size: Columns of the logits.
        budget_bytes: Bytes of fp32 logits a chunk may hold.

    Returns:
        At least 1.
    """
    return max(1, budget_bytes // (max(1, vocab_size) * 4))


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------


def _compute_dtype(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it applies, else the inputs' own."""
    device_type = hidden.device.type
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    if torch.is_autocast_enabled(device_type) and all(t.dtype in _AUTOCAST_ELIGIBLE for t in tensors):
        return torch.get_autocast_dtype(device_type)
    if any(t.dtype != hidden.dtype for t in tensors):
        raise TrainConfigError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype})"
            + ("" if bias is None else f" and bias ({bias.dtype})")
            + " must share a dtype outside autocast; cast them, or run under torch.autocast."
        )
    return hidden.dtype


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    """Autocast off for the explicit casts below (they already chose the dtype the plain path would)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    chunk_size: int | None,
    ignore_index: int | None,
) -> int:
    """Validates shapes, dtypes and targets; returns the chunk size to use."""
    if hidden.dim() != 2:
        raise TrainConfigError(f"hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise TrainConfigError(
            f"weight must be [vocab, hidden_size={hidden.shape[1]}] (an nn.Linear weight), "
            f"got shape {tuple(weight.shape)}."
        )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise TrainConfigError(f"bias must be [vocab={vocab}], got shape {tuple(bias.shape)}.")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise TrainConfigError(
            f"targets must be [tokens={hidden.shape[0]}] (one id per hidden row), "
            f"got shape {tuple(targets.shape)}."
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TrainConfigError(f"targets must be integer token ids, got dtype {targets.dtype}.")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TrainConfigError(
            f"hidden and weight must be floating point, got {hidden.dtype}, {weight.dtype}."
        )
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise TrainConfigError(f"hidden, weight, targets and bias must be on one device, got {devices}.")
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise TrainConfigError(f"chunk_size must be a positive number of rows (or None), got {chunk_size!r}.")
    if targets.numel() and targets.device.type == "cpu":
        # On CPU, an error that names the problem; on an accelerator this check would stall the step
        # on a host sync, and the device-side assert of the gather still catches the id.
        wanted = targets if ignore_index is None else targets[targets != ignore_index]
        if wanted.numel() and bool(((wanted < 0) | (wanted >= vocab)).any()):
            bad = wanted[(wanted < 0) | (wanted >= vocab)][0].item()
            allowed = "" if ignore_index is None else f" or ignore_index={ignore_index}"
            raise TrainConfigError(f"target id {bad} is outside the vocabulary [0, {vocab}){allowed}.")
    return chunk_size


def _exp_normalize_(logits: Tensor, *, softmax: bool) -> Tensor:
    """Log-sum-exp of each row of fp32 ``logits`` ``[n, V]``, turning them into ``exp(logits - max)``.

    With ``softmax`` the rows end up as the softmax. In place, unlike ``torch.logsumexp``, which
    allocates a second ``[n, V]`` for its exponentials.
    """
    top = logits.amax(dim=1, keepdim=True)
    total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)
    if softmax:
        logits.div_(total)
    return (total.log_() + top).squeeze(1)


def _scale(grad: Tensor | None, by: Tensor) -> Tensor | None:
    # In place (no second [V, C] tensor): the stored gradient serves one backward only.
    return None if grad is None else grad.mul_(by.to(grad.dtype) if grad.dtype != by.dtype else by)


# ------------------------------------------------------------------------------------------------
# summed cross-entropy
# ------------------------------------------------------------------------------------------------


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ W.T + b``, with every gradient computed in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk: int,
        ignore_index: int,
        dtype: torch.dtype,
    ) -> Tensor:
        needs = ctx.needs_input_grad
        need_h, need_w, need_b = needs[0], needs[1], bias is not None and needs[2]
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulated over chunks in fp32 (at least): a bf16 sum would round once per chunk.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with _no_autocast(hidden.device.type):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                h = hidden[start:stop].to(dtype)  # [n, C]
                t = targets[start:stop]
                valid = t != ignore_index
                t = t.masked_fill(~valid, 0)[:, None]  # [n, 1], in range for gather/scatter
                logits = F.linear(h, w, b).float()  # [n, V]; .float() is no copy when fp32
                picked = logits.gather(1, t).squeeze(1)
                # d loss / d logits = softmax - onehot, in place of the logits (no second [n, V]).
                grad = logits
                lse = _exp_normalize_(grad, softmax=need_h or need_w or need_b)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if not (need_h or need_w or need_b):  # no_grad or nothing trainable: the loss only
                    del logits, grad
                    continue
                grad.scatter_add_(1, t, torch.full_like(picked[:, None], -1.0))
                # Ignored rows: masking the [n, C] operands (not the [n, V] gradient) drops them.
                g = grad.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (g @ w).masked_fill_(~valid[:, None], 0)
                if grad_w is not None:
                    h_valid = h.masked_fill(~valid[:, None], 0)
                    if g.dtype == acc:
                        grad_w.addmm_(g.t(), h_valid)
                    else:
                        grad_w += (g.t() @ h_valid).to(acc)
                if grad_b is not None:
                    grad_b.addmv_(grad.t(), valid.to(grad.dtype))
                # Freed before the next chunk's logits exist, not after: one chunk alive at a time.
                del logits, grad, g
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None or bias is None else grad_b.to(bias.dtype),
        )
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if getattr(ctx, "used", False):
            raise TrainError(
                "fused_linear_cross_entropy's gradients were already used by a backward; it supports one "
                "backward per forward (run the forward again instead of retain_graph=True)."
            )
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (
            _scale(grad_h, grad_out),
            _scale(grad_w, grad_out),
            _scale(grad_b, grad_out),
            None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Summed token cross-entropy of ``hidden @ weight.T + bias``, without ``[N, V]`` logits.

    Equals ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum",
    ignore_index=ignore_index)`` in value and in its gradients w.r.t. ``hidden``, ``weight`` and
    ``bias`` (up to float summation order), holding at most ``chunk_size`` rows of logits at a time.
    The gradients are computed in forward and stored (``[N, C]``, ``[V, C]``, ``[V]``), so backward
    costs nothing; a tensor that does not require grad (a frozen head, say) gets no gradient work.

    Under :func:`torch.autocast` the matmuls run in the autocast dtype, as ``F.linear`` would; the
    softmax is fp32 either way. Double backward is not supported.

    Args:
        hidden: ``[N, C]`` final hidden states (the rows that carry a loss).
        weight: ``[V, C]`` output head weight (an ``nn.Linear`` weight; may be tied to the embedding).
        targets: ``[N]`` target token ids (``ignore_index`` rows contribute nothing).
        bias: Optional ``[V]`` output head bias.
        chunk_size: Rows per chunk; None sizes chunks to :data:`DEFAULT_CHUNK_BYTES` of fp32 logits.
        ignore_index: Target id whose rows carry no loss.

    Returns:
        A 0-d fp32 tensor (0 when ``N == 0``).

    Raises:
        TrainConfigError: A shape, dtype or device mismatch, a target outside the vocabulary, or a
            ``chunk_size`` below 1.
    """
    chunk = _check_inputs(hidden, weight, targets, bias, chunk_size, ignore_index)
    dtype = _compute_dtype(hidden, weight, bias)
    loss: Tensor = _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, targets.long(), chunk, ignore_index, dtype
    )
    return loss


# ------------------------------------------------------------------------------------------------
# per-token log-probs
# ------------------------------------------------------------------------------------------------


class _FusedLinearTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ W.T + b)[i, targets[i]]`` by chunks; backward recomputes each chunk.

    With a frozen head (LoRA) only ``hidden`` needs a gradient, and ``d logp_i / d hidden_i =
    (onehot_i - softmax_i) @ W`` does not depend on the incoming gradient: forward computes it (an
    ``[N, C]`` tensor) and backward only scales its rows, with no recompute.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk: int,
        dtype: torch.dtype,
    ) -> Tensor:
        needs = ctx.needs_input_grad
        frozen_head = needs[0] and not needs[1] and not (bias is not None and needs[2])
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        jac = torch.empty_like(hidden) if frozen_head else None
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with _no_autocast(hidden.device.type):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                logits = F.linear(hidden[start:stop].to(dtype), w, b).float()
                t = targets[start:stop, None]
                picked = logits.gather(1, t).squeeze(1)
                lse[start:stop] = _exp_normalize_(logits, softmax=jac is not None)
                out[start:stop] = picked - lse[start:stop]
                if jac is not None:  # onehot - softmax, in place of the softmax
                    grad = logits.neg_().scatter_add_(1, t, torch.ones_like(picked[:, None]))
                    jac[start:stop] = grad.to(dtype) @ w
                    del grad
                del logits
        ctx.frozen_head, ctx.chunk, ctx.dtype = frozen_head, chunk, dtype
        if jac is not None:
            ctx.save_for_backward(jac)
        else:  # the inputs themselves (no copies) and one fp32 number per row
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.frozen_head:
            (jac,) = ctx.saved_tensors
            return jac * grad_out[:, None].to(jac.dtype), None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk: int = ctx.chunk
        dtype: torch.dtype = ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = torch.promote_types(dtype, torch.float32)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        with _no_autocast(hidden.device.type):
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                h = hidden[start:stop].to(dtype)
                g_out = grad_out[start:stop, None].float()  # [n, 1]
                logits = F.linear(h, w, b).float()
                # d logp_i / d logits_i = onehot - softmax, times the incoming gradient of row i.
                grad = logits.sub_(lse[start:stop, None]).exp_().mul_(-g_out)
                grad.scatter_add_(1, targets[start:stop, None], g_out)
                g = grad.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = g @ w
                if grad_w is not None:
                    if g.dtype == acc:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).to(acc)
                if grad_b is not None:
                    grad_b += grad.sum(0)
                del logits, grad, g
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def fused_linear_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-row fp32 log-probability of each target under ``hidden @ weight.T + bias``, chunk by chunk.

    Equals ``token_logps(F.linear(hidden, weight, bias), targets)`` of
    :mod:`lmstack.train._preference_losses` with the same gradients (up to float summation order), but
    never holds ``[N, V]`` logits: forward keeps one fp32 log-normaliser per row, and backward
    recomputes each chunk's logits (one more head matmul per chunk than the plain path). When only
    ``hidden`` needs a gradient (a frozen head, as with LoRA), forward computes its per-row gradient
    instead (``[N, C]``) and backward only scales it: the same two matmuls as the plain path.

    Args:
        hidden: ``[N, C]`` final hidden states.
        weight: ``[V, C]`` output head weight.
        targets: ``[N]`` target ids, every one a valid id (mask the result afterwards).
        bias: Optional ``[V]`` output head bias.
        chunk_size: Rows per chunk; None sizes chunks to :data:`DEFAULT_CHUNK_BYTES` of fp32 logits.

    Returns:
        ``[N]`` fp32 log-probs.

    Raises:
        TrainConfigError: A shape, dtype or device mismatch, a target outside the vocabulary, or a
            ``chunk_size`` below 1.
    """
    chunk = _check_inputs(hidden, weight, targets, bias, chunk_size, None)
    dtype = _compute_dtype(hidden, weight, bias)
    logps: Tensor = _FusedLinearTokenLogps.apply(hidden, weight, bias, targets.long(), chunk, dtype)
    return logps


# ------------------------------------------------------------------------------------------------
# as an output head of CausalLM.forward
# ------------------------------------------------------------------------------------------------


def _fusable(module: nn.Module) -> bool:
    """Whether calling ``module`` is exactly ``F.linear(x, module.weight, module.bias)``.

    Only a plain ``nn.Linear`` (not a subclass: bitsandbytes' ``Linear4bit`` and lmstack's CPU variant
    of it subclass it with their own forward), with no forward hooks (an FSDP2 unit on the head
    gathers its weight in one), and not a tensor-parallel ``DTensor`` shard. peft's LoRA layers and
    parametrized linears are other types and so fall back too.
    """
    if type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return False
    return all(type(p) in (nn.Parameter, Tensor) for p in (module.weight, module.bias) if p is not None)


class FusedLinearCrossEntropy:
    """An output head for :meth:`lmstack.core.CausalLM.forward` returning the summed cross-entropy.

    ``model(ids, positions, attn, logits_indices=indices, head=FusedLinearCrossEntropy(targets))``
    returns what ``F.cross_entropy(model(ids, ..., logits_indices=indices).float(), targets,
    reduction="sum")`` would, through :func:`fused_linear_cross_entropy` when the model's ``lm_head``
    is a plain ``nn.Linear`` (tied to the embedding or not), and through exactly that plain path
    otherwise (a LoRA-adapted or quantized head).

    Args:
        targets: ``[N]`` target ids of the rows the head sees (``[B, T]`` without ``logits_indices``).
        chunk_size: Rows per chunk (None: :func:`default_chunk_size`).
        ignore_index: Target id whose rows carry no loss.
        min_rows: Fuse only from this many rows on (None: half the hidden size). The fused path keeps
            a weight-sized ``[V, C]`` fp32 gradient from forward to backward, the plain one about two
            ``[N, V]`` fp32 tensors: below ``C / 2`` rows the plain path holds less (SFT of a large
            model on a few loss tokens a micro-batch). 0 always fuses.

    Attributes:
        fused: After a call, whether the fused path ran (None before the first call).
    """

    def __init__(
        self,
        targets: Tensor,
        chunk_size: int | None = None,
        ignore_index: int = -100,
        min_rows: int | None = None,
    ) -> None:
        self.targets = targets
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index
        self.min_rows = min_rows
        self.fused: bool | None = None

    def __call__(self, hidden: Tensor, lm_head: nn.Module) -> Tensor:
        """The summed cross-entropy of ``lm_head(hidden)`` against the targets (a 0-d fp32 tensor).

        Raises:
            TrainConfigError: ``hidden`` and the targets disagree in shape, or see
                :func:`fused_linear_cross_entropy`.
        """
        targets = self.targets
        if hidden.dim() == 3 and tuple(targets.shape) == tuple(hidden.shape[:2]):  # no logits_indices
            hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if hidden.dim() != 2 or tuple(targets.shape) != (hidden.shape[0],):
            raise TrainConfigError(
                f"FusedLinearCrossEntropy got hidden states {tuple(hidden.shape)} but targets "
                f"{tuple(targets.shape)}; pass one target per row the head sees (logits_indices)."
            )
        min_rows = hidden.shape[1] // 2 if self.min_rows is None else self.min_rows
        self.fused = _fusable(lm_head) and hidden.shape[0] >= min_rows
        if self.fused:
            assert isinstance(lm_head, nn.Linear)
            return fused_linear_cross_entropy(
                hidden,
                lm_head.weight,
                targets,
                bias=lm_head.bias,
                chunk_size=self.chunk_size,
                ignore_index=self.ignore_index,
            )
        logger.debug("output head %s is not a plain nn.Linear: plain cross-entropy", type(lm_head).__name__)
        logits = lm_head(hidden)
        return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=self.ignore_index)


class FusedTokenLogps:
    """An output head for :meth:`lmstack.core.CausalLM.forward` returning per-row target log-probs.

    ``model(ids, positions, attn, logits_indices=indices, head=FusedTokenLogps(targets))`` returns
    what ``token_logps(model(ids, ..., logits_indices=indices), targets)`` would (``[N]`` fp32), through
    :func:`fused_linear_token_logps` when ``lm_head`` is a plain ``nn.Linear``, and through exactly that
    plain path (with ``chunk_size`` as its log-softmax chunk) otherwise.

    Args:
        targets: ``[N]`` target ids of the rows the head sees, every one a valid id.
        chunk_size: Rows per chunk (None: :func:`default_chunk_size` when fused, one piece when not).

    Attributes:
        fused: After a call, whether the fused path ran (None before the first call).
    """

    def __init__(self, targets: Tensor, chunk_size: int | None = None) -> None:
        self.targets = targets
        self.chunk_size = chunk_size
        self.fused: bool | None = None

    def __call__(self, hidden: Tensor, lm_head: nn.Module) -> Tensor:
        """The ``[N]`` fp32 log-probs of the targets under ``lm_head(hidden)``.

        Raises:
            TrainConfigError: ``hidden`` is not ``[N, C]`` for the ``N`` targets, or see
                :func:`fused_linear_token_logps`.
        """
        if hidden.dim() != 2 or tuple(self.targets.shape) != (hidden.shape[0],):
            raise TrainConfigError(
                f"FusedTokenLogps got hidden states {tuple(hidden.shape)} but targets "
                f"{tuple(self.targets.shape)}; pass logits_indices and one target per selected row."
            )
        self.fused = _fusable(lm_head)
        if self.fused:
            assert isinstance(lm_head, nn.Linear)
            return fused_linear_token_logps(
                hidden, lm_head.weight, self.targets, bias=lm_head.bias, chunk_size=self.chunk_size
            )
        logger.debug("output head %s is not a plain nn.Linear: plain log-probs", type(lm_head).__name__)
        return token_logps(lm_head(hidden), self.targets, chunk_size=self.chunk_size)
