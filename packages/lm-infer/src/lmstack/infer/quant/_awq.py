"""AWQ: activation-aware weight quantization (Lin et al., 2023), calibration and search.

AWQ keeps round-to-nearest group-wise quantization (:func:`~lmstack.infer.quant._packing.quantize_groupwise`)
but first changes the float model, without changing what it computes, so that rounding hurts less:

1. **Scale search.** Input channels that carry large activations matter most. For each block of
   linears that read the same input, a per-input-channel scale ``s = mean|x| ** alpha`` (normalised
   so that ``sqrt(max(s) * min(s)) = 1``) multiplies the linears' weight columns and divides the
   operation that produced their input (the RMSNorm's weight, or the output rows of the linear before).
   ``alpha`` is picked from the grid ``0, 1/n_grid, ..., (n_grid-1)/n_grid`` by the mean squared error
   of the block's output (the attention module, the MLP, or the one following linear) between the
   float model and the model with those linears quantized. ``alpha = 0`` is plain round-to-nearest,
   so no block ends up with a larger calibration error than round-to-nearest gives it.
2. **Clipping search.** For each quantized linear but q and k (whose error the attention softmax
   amplifies, as AWQ also leaves them), each (output row, group) gets the maximum absolute value
   ``max|w| * (1 - i / n_grid)``, ``i < max_shrink * n_grid``, whose group output error
   ``mean_tokens((x_g . (Q(w_g) - w_g))^2)`` is least; ``i = 0`` is no clipping, so clipping never
   increases it. The weights are clamped in place.

The blocks of a Llama-family decoder layer: ``input_layernorm -> q, k, v`` (inspecting the attention
module), ``v -> o`` (only without GQA, where v's outputs are o's inputs one to one), and
``post_attention_layernorm -> gate, up`` (inspecting the MLP), ``up -> down``.

Calibration runs decoder layer by decoder layer: the calibration tokens' hidden states enter layer
``i``, its linears' inputs are captured, the search runs, and the float layer's output (the scales
fold exactly, so it is the same before and after) becomes layer ``i + 1``'s input. Memory holds one
layer's activations at a time.

After :func:`awq_quantize` the model is still a float model (scales folded, weights clipped);
round-to-nearest of every decoder-layer linear (``quantize_groupwise(w, bits, group_size)``, or a
packer running ``method="rtn"``) then gives the AWQ model. The clip values are also returned
(:meth:`AWQResult.clip_values`): passing them as ``clip=`` gives the same codes, since clamping twice
is clamping once. The output head and the embeddings stay in float, as AWQ leaves them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmstack.core import CausalLM, DenseAttention
from lmstack.core.model import DecoderLayer
from lmstack.infer._errors import InferError
from lmstack.infer.quant._packing import fake_quantize

__all__ = [
    "DEFAULT_CALIBRATION",
    "AWQResult",
    "BlockScale",
    "LayerAWQ",
    "LinearClip",
    "awq_quantize",
    "calibration_tokens",
]

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path("out") / "world" / "articles.jsonl"
"""Where calibration text comes from by default: the bundled world's articles, as
``python examples/world/generate.py --out out/world`` writes them (relative to the working directory)."""

# Tokens per forward while calibrating: bounds the attention scores' memory (batch x heads x T x T).
_TOKENS_PER_CHUNK = 4096
# Output rows per step of the clipping search: bounds its [rows, groups, tokens] error tensor.
_CLIP_ROWS = 1024
# The linears AWQ never clips: the softmax turns q and k errors into large attention changes.
_NO_CLIP = ("q_proj", "k_proj")


class _Encoder(Protocol):
    """What calibration needs of a tokenizer (:class:`lmstack.core.Tokenizer` has it)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @property
    def eos_token_id(self) -> int | None: ...


@dataclass
class BlockScale:
    """The scale search's outcome for one block of linears sharing an input.

    Attributes:
        alpha: The chosen exponent (0 means no scaling: plain round-to-nearest was best).
        scales: ``[in_features]`` float32 per-input-channel scales folded into the block.
        loss_rtn: Mean squared output error of the inspected module with round-to-nearest (``alpha = 0``).
        loss: The same error at the chosen ``alpha`` (``<= loss_rtn``).
    """

    alpha: float
    scales: Tensor
    loss_rtn: float
    loss: float


@dataclass
class LinearClip:
    """The clipping search's outcome for one linear.

    Attributes:
        max_val: ``[out_features, in_features / group_size]`` float32 maximum absolute value per group
            (the weights are clamped to ``[-max_val, max_val]``; the ``clip`` of ``quantize_groupwise``).
        loss_before: Mean over groups and tokens of the squared group output error without clipping.
        loss: The same with the chosen clips (``<= loss_before``).
    """

    max_val: Tensor
    loss_before: float
    loss: float


@dataclass
class LayerAWQ:
    """What AWQ did to one decoder layer.

    Attributes:
        index: The layer's index.
        scales: Block name (``"qkv"``, ``"v_o"``, ``"gate_up"``, ``"up_down"``) to its scale search.
        clips: Linear name (``"v_proj"``, ``"o_proj"``, ``"gate_proj"``, ``"up_proj"``,
            ``"down_proj"``) to its clipping search; empty with ``clip=False``.
    """

    index: int
    scales: dict[str, BlockScale] = field(default_factory=dict)
    clips: dict[str, LinearClip] = field(default_factory=dict)


@dataclass
class AWQResult:
    """The outcome of :func:`awq_quantize`: the settings and every layer's scales, clips and losses.

    The model it came from has been transformed in place; quantize it with round-to-nearest at the same
    ``bits`` and ``group_size`` to get the AWQ model.

    Attributes:
        bits: Bits per weight code.
        group_size: Input columns per quantization group.
        n_samples: Calibration sequences used.
        seq_len: Tokens per calibration sequence.
        layers: One :class:`LayerAWQ` per decoder layer, in order.
    """

    bits: int
    group_size: int
    n_samples: int
    seq_len: int
    layers: list[LayerAWQ]

    def clip_values(self) -> dict[str, Tensor]:
        """Each clipped linear's ``[out, in / group_size]`` clip by its module name in the model.

        Names are the model's (``"model.layers.0.self_attn.o_proj"``), ready for
        ``quantize_groupwise(w, bits, group_size, clip=...)``; the weights are already clamped to them.
        """
        values = {}
        for layer in self.layers:
            for name, found in layer.clips.items():
                parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                values[f"model.layers.{layer.index}.{parent}.{name}"] = found.max_val
        return values

    def summary(self) -> str:
        """One line per layer: each block's alpha and its output error against round-to-nearest."""
        lines = [
            f"AWQ {self.bits}-bit, group {self.group_size}, "
            f"calibrated on {self.n_samples} x {self.seq_len} tokens"
        ]
        for layer in self.layers:
            parts = [
                f"{name} alpha={b.alpha:.2f} err {b.loss:.3g}/{b.loss_rtn:.3g} rtn"
                for name, b in layer.scales.items()
            ]
            if layer.clips:
                before = sum(c.loss_before for c in layer.clips.values())
                after = sum(c.loss for c in layer.clips.values())
                parts.append(f"clip err {after:.3g}/{before:.3g}")
            lines.append(f"layer {layer.index}: " + "; ".join(parts))
        return "\n".join(lines)


# -- calibration data --------------------------------------------------------------------------------
def _read_texts(path: Path) -> list[str]:
    if not path.is_file():
        hint = (
            " (generate the bundled world with `python examples/world/generate.py --out out/world`, or "
            "pass calibration texts)"
            if path == DEFAULT_CALIBRATION
            else ""
        )
        raise InferError(f"calibration file {path} does not exist{hint}.")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InferError(f"{path}:{number}: a calibration jsonl row needs a string 'text' field.")
            texts.append(row["text"])
    return texts


def calibration_tokens(
    tokenizer: _Encoder,
    texts: Sequence[str] | str | os.PathLike[str] | None = None,
    *,
    n_samples: int = 64,
    seq_len: int = 512,
) -> Tensor:
    """Calibration sequences: the texts tokenized into one stream, cut into ``seq_len``-token blocks.

    The texts are joined with the end-of-sequence token between them (when the tokenizer has one), and
    ``n_samples`` blocks are taken at evenly spaced offsets over the whole stream, so a long corpus is
    sampled end to end rather than read from its start. A stream too short for ``n_samples`` blocks
    gives as many as it holds (logged), or one shorter block when it holds none.

    Args:
        tokenizer: Turns text into token ids.
        texts: Strings, or a path: a ``.jsonl`` file (each row's ``text``) or any other text file
            (read whole). Default: :data:`DEFAULT_CALIBRATION`, the bundled world's articles.
        n_samples: How many sequences.
        seq_len: Tokens per sequence.

    Returns:
        ``[samples, tokens]`` int64 token ids.

    Raises:
        InferError: No file at the path, a malformed row, or fewer than two tokens in all.
    """
    if n_samples < 1 or seq_len < 2:
        raise InferError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}.")
    if texts is None:
        texts = DEFAULT_CALIBRATION
    if isinstance(texts, (str, os.PathLike)):
        texts = _read_texts(Path(texts))
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        if stream and eos is not None:
            stream.append(int(eos))
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
    if len(stream) < 2:
        raise InferError(f"the calibration texts hold {len(stream)} tokens; give AWQ more text.")
    ids = torch.tensor(stream, dtype=torch.int64)
    if len(stream) < seq_len:
        logger.warning(
            "calibration text holds %d tokens, fewer than seq_len=%d: one sequence", len(stream), seq_len
        )
        return ids[None]
    count = min(n_samples, len(stream) // seq_len)
    if count < n_samples:
        logger.warning("calibration text holds %d tokens: %d of %d sequences", len(stream), count, n_samples)
    starts = torch.linspace(0, len(stream) - seq_len, count).round().long().tolist()
    return torch.stack([ids[s : s + seq_len] for s in starts])


# -- checks ------------------------------------------------------------------------------------------
_LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def _check_model(model: CausalLM, bits: int, group_size: int, n_grid: int) -> None:
    if not isinstance(model, CausalLM):
        raise InferError(f"awq_quantize takes an lmstack.core.CausalLM, got {type(model).__name__}.")
    if model.inference_layout is not None:
        raise InferError(
            "awq_quantize needs a model that was not prepared for inference (its projections are fused "
            "and frozen); load the checkpoint again with lmstack.core.load_pretrained and quantize that."
        )
    if model.model.embed_tokens.weight.device.type == "meta":
        raise InferError("awq_quantize needs real weights, not meta tensors; load the checkpoint first.")
    if bits not in (2, 3, 4, 8):
        raise InferError(f"unsupported bit width {bits}; use 4 (or 8; 2 and 3 for experiments).")
    if n_grid < 1:
        raise InferError(f"n_grid must be at least 1, got {n_grid}.")
    in_sizes = set()
    for i, layer in enumerate(model.model.layers):
        for parent, name in _LINEARS:
            module = getattr(getattr(layer, parent), name, None)
            if type(module) is not nn.Linear:
                raise InferError(
                    f"awq_quantize needs plain nn.Linear projections, but model.layers.{i}.{parent}.{name} "
                    f"is {type(module).__name__}; merge adapters (or load the float checkpoint) first."
                )
            in_sizes.add(module.in_features)
    bad = sorted(n for n in in_sizes if group_size <= 0 or n % group_size)
    if bad:
        common = math.gcd(*in_sizes)
        fits = [g for g in (128, 64, 32, 16, 8) if common % g == 0]
        suggestion = f"group_size={fits[0]} divides all of them" if fits else "no usual group size fits"
        raise InferError(
            f"group_size {group_size} does not divide the in_features {bad} of this model's linears "
            f"(all in_features: {sorted(in_sizes)}); {suggestion}."
        )


# -- running a layer ---------------------------------------------------------------------------------
def _chunks(x: Tensor, rows: int) -> Iterator[Tensor]:
    for start in range(0, x.shape[0], rows):
        yield x[start : start + rows]


class _LayerRunner:
    """Runs one decoder layer (or one of its parts) over the calibration hidden states, chunk by chunk."""

    def __init__(self, model: CausalLM, seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows = max(1, _TOKENS_PER_CHUNK // seq_len)
        positions = torch.arange(seq_len, device=device)[None]
        self.cos, self.sin = model.model.rotary(positions, None, dtype=dtype)  # [1, T, D], broadcast
        self.attn = DenseAttention()

    def _rope(self, b: int) -> tuple[Tensor, Tensor]:
        return self.cos.expand(b, -1, -1), self.sin.expand(b, -1, -1)

    def layer(self, layer: DecoderLayer, x: Tensor) -> Tensor:
        return torch.cat([layer(c, *self._rope(c.shape[0]), self.attn) for c in _chunks(x, self.rows)])

    def attention(self, layer: DecoderLayer) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            return layer.self_attn(x, *self._rope(x.shape[0]), self.attn)

        return run

    def capture(
        self, layer: DecoderLayer, x: Tensor, names: Sequence[str]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The inputs of the named linears while ``layer`` runs over ``x``, and the layer's output."""
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        hooks = []
        for parent, name in _LINEARS:
            if name in parts:
                module = getattr(getattr(layer, parent), name)
                hooks.append(
                    module.register_forward_pre_hook(
                        lambda _m, args, n=name: parts[n].append(args[0].detach())
                    )
                )
        try:
            out = self.layer(layer, x)
        finally:
            for hook in hooks:
                hook.remove()
        return {name: torch.cat(p) for name, p in parts.items()}, out


# -- the scale search --------------------------------------------------------------------------------
def _scales_for(x_mean: Tensor, alpha: float) -> Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _search_scale(
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    linears: Sequence[nn.Linear],
    *,
    bits: int,
    group_size: int,
    n_grid: int,
    rows: int,
) -> BlockScale:
    """Pick alpha for one block: the grid point whose quantized block output is closest to the float one.

    Args:
        run: The inspected module as a function of the block's input (chunk of ``[b, T, in]``).
        x: The block's captured input ``[N, T, in]``.
        linears: The linears reading ``x``; their weights are restored before returning.
        bits: Bits per code.
        group_size: Input columns per group.
        n_grid: Grid points ``0, 1/n_grid, ...``.
        rows: Sequences per forward.
    """
    reference = [run(c) for c in _chunks(x, rows)]
    numel = sum(r.numel() for r in reference)
    x_mean = x.detach().abs().to(torch.float32).reshape(-1, x.shape[-1]).mean(0)
    originals = [lin.weight.detach().clone() for lin in linears]
    best: BlockScale | None = None
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = _scales_for(x_mean, alpha)
            for lin, w in zip(linears, originals, strict=True):
                scaled = fake_quantize(w.to(torch.float32) * s, bits, group_size) / s
                lin.weight.copy_(scaled.to(w.dtype))
            err = sum(
                float((run(c).to(torch.float32) - r.to(torch.float32)).pow(2).sum())
                for c, r in zip(_chunks(x, rows), reference, strict=True)
            )
            loss = err / numel
            if best is None:
                best = BlockScale(alpha, s, loss, loss)
            elif loss < best.loss:
                best = BlockScale(alpha, s, best.loss_rtn, loss)
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    assert best is not None
    return best


def _fold(prev: nn.Module, linears: Sequence[nn.Linear], s: Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' input columns by it (exact)."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm: its weight multiplies each channel
        weight = prev.weight
        assert isinstance(weight, Tensor)
        weight.div_(s.to(weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


# -- the clipping search -----------------------------------------------------------------------------
def _search_clip(
    w: Tensor, x: Tensor, *, bits: int, group_size: int, n_grid: int, max_shrink: float
) -> LinearClip:
    """Per (row, group) maximum absolute value minimising the group's output error on ``x``.

    Args:
        w: ``[out, in]`` weight.
        x: ``[tokens, in]`` inputs.
        bits: Bits per code.
        group_size: Input columns per group.
        n_grid: Shrink steps of ``1 / n_grid``.
        max_shrink: The largest shrink tried (``0.5``: down to half the group's maximum).
    """
    out_f, in_f = w.shape
    groups = in_f // group_size
    w32 = w.detach().to(torch.float32)
    xg = x.detach().to(torch.float32).reshape(-1, groups, group_size)
    org_max = w32.abs().reshape(out_f, groups, group_size).amax(-1)
    best_max = org_max.clone()
    best_err = torch.full_like(org_max, math.inf)
    base_err = torch.zeros_like(org_max)
    for i in range(max(1, int(max_shrink * n_grid))):
        max_val = org_max * (1 - i / n_grid)
        diff = (fake_quantize(w32, bits, group_size, clip=max_val) - w32).reshape(out_f, groups, group_size)
        err = torch.cat(
            [torch.einsum("ogk,ngk->ogn", d, xg).pow(2).mean(-1) for d in _chunks(diff, _CLIP_ROWS)]
        )  # [out, groups]
        if i == 0:
            base_err = err
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return LinearClip(best_max, float(base_err.mean()), float(best_err.mean()))


def _clamp_groups(lin: nn.Linear, max_val: Tensor, group_size: int) -> None:
    out_f, in_f = lin.weight.shape
    c = max_val.to(lin.weight.dtype).unsqueeze(-1)
    g = lin.weight.view(out_f, in_f // group_size, group_size)
    torch.clamp(g, -c, c, out=g)


# -- the driver --------------------------------------------------------------------------------------
@torch.no_grad()
def awq_quantize(
    model: CausalLM,
    tokenizer: _Encoder,
    texts: Sequence[str] | str | os.PathLike[str] | None = None,
    *,
    bits: int = 4,
    group_size: int = 128,
    n_samples: int = 64,
    seq_len: int = 512,
    n_grid: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
    clip_tokens: int = 512,
    progress: bool | None = None,
) -> AWQResult:
    """Calibrate AWQ on local text and transform ``model`` in place (scales folded, weights clipped).

    Afterwards the model is still a float model that computes the same as before up to the clipping;
    round-to-nearest group-wise quantization of its decoder-layer linears at the same ``bits`` and
    ``group_size`` (``quantize_groupwise`` / ``fake_quantize``, or a packer's ``method="rtn"``) gives
    the AWQ-quantized model. See the module docstring for the method.

    Args:
        model: An unprepared float :class:`~lmstack.core.CausalLM` (tied embeddings, GQA and Qwen2's
            q/k/v biases are handled; the output head and embeddings stay float).
        tokenizer: Turns the calibration texts into tokens (the model's tokenizer).
        texts: Calibration text: strings, or a ``.jsonl`` (rows with ``text``) or text file. Default:
            the bundled world's articles at :data:`DEFAULT_CALIBRATION`.
        bits: Bits per weight code.
        group_size: Input columns per quantization group; must divide every linear's in_features.
        n_samples: Calibration sequences (AWQ's paper: 128).
        seq_len: Tokens per calibration sequence (AWQ's paper: 512).
        n_grid: Grid points of the scale search (alpha in ``i / n_grid``) and shrink steps of the clip
            search. ``n_grid=1`` tries alpha 0 only, i.e. no scaling.
        clip: Run the clipping search.
        max_shrink: The clipping search tries maximum values down to ``(1 - max_shrink) * max|w|``.
        clip_tokens: Calibration tokens (evenly spaced) the clipping search measures errors on.
        progress: Show a progress bar over layers (None: only on an interactive terminal).

    Returns:
        The scales, clips and losses of every layer.

    Raises:
        InferError: The model was prepared for inference, has non-``nn.Linear`` projections or meta
            weights, ``group_size`` does not divide an in_features, or the calibration text is missing.
    """
    _check_model(model, bits, group_size, n_grid)
    ids = calibration_tokens(tokenizer, texts, n_samples=n_samples, seq_len=seq_len)
    param = model.model.embed_tokens.weight
    device, dtype = param.device, param.dtype
    ids = ids.to(device)
    runner = _LayerRunner(model, ids.shape[1], device, dtype)
    logger.info("AWQ %d-bit group %d: %d calibration sequences of %d tokens", bits, group_size, *ids.shape)
    x = torch.cat([model.model.embed_tokens(c) for c in _chunks(ids, runner.rows)])  # [N, T, C]
    settings = {"bits": bits, "group_size": group_size, "n_grid": n_grid, "rows": runner.rows}
    layers = []
    captured = ("q_proj", "o_proj", "gate_proj", "down_proj")
    for index, layer in enumerate(
        tqdm(model.model.layers, desc="AWQ", unit="layer", disable=_hide(progress))
    ):
        assert isinstance(layer, DecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        feats, out = runner.capture(layer, x, captured)
        found = LayerAWQ(index)
        # Every block's scales come from the float layer's inputs; folding is exact, so the blocks do
        # not disturb each other's search.
        plan: list[tuple[str, nn.Module, list[nn.Linear], Callable[[Tensor], Tensor], Tensor]] = [
            ("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], runner.attention(layer),
             feats["q_proj"]),
        ]  # fmt: skip
        if attn.v_proj.out_features == attn.o_proj.in_features:  # no GQA: v's outputs are o's inputs
            plan.append(("v_o", attn.v_proj, [attn.o_proj], attn.o_proj, feats["o_proj"]))
        plan += [
            (
                "gate_up",
                layer.post_attention_layernorm,
                [mlp.gate_proj, mlp.up_proj],
                mlp,
                feats["gate_proj"],
            ),
            ("up_down", mlp.up_proj, [mlp.down_proj], mlp.down_proj, feats["down_proj"]),
        ]
        for name, _prev, linears, run, inputs in plan:
            found.scales[name] = _search_scale(run, inputs, linears, **settings)
        del feats
        for name, prev, linears, _run, _inputs in plan:
            _fold(prev, linears, found.scales[name].scales.to(device))
        if clip:
            targets = [(p, n) for p, n in _LINEARS if n not in _NO_CLIP]
            feats, _ = runner.capture(layer, x, [n for _, n in targets])
            for parent, name in targets:
                lin = getattr(getattr(layer, parent), name)
                inputs = feats.pop(name).reshape(-1, lin.in_features)
                pick = (
                    torch.linspace(0, inputs.shape[0] - 1, min(clip_tokens, inputs.shape[0])).round().long()
                )
                found.clips[name] = _search_clip(
                    lin.weight, inputs[pick.to(device)], bits=bits, group_size=group_size, n_grid=n_grid,
                    max_shrink=max_shrink,
                )  # fmt: skip
                _clamp_groups(lin, found.clips[name].max_val, group_size)
        layers.append(found)
        x = out  # the float layer's output: what the next layer sees in the float model
        logger.debug("AWQ layer %d: %s", index, {k: round(v.alpha, 2) for k, v in found.scales.items()})
    return AWQResult(bits, group_size, ids.shape[0], ids.shape[1], layers)


def _hide(progress: bool | None) -> bool | None:
    """The ``disable`` of tqdm: None lets tqdm show the bar only on a terminal."""
    return None if progress is None else not progress
