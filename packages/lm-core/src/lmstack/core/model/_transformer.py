"""One readable decoder-only transformer for the whole Llama family.

Parameter names follow the Hugging Face Llama layout (``model.layers.N.self_attn.q_proj``...), so
checkpoints of llama, mistral, qwen2 and internlm3 map one to one and InternLM2's packed layout is
converted at load time. Shapes in comments: B batch, T tokens, H heads, D head dim, C hidden size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmstack.core._config import ModelConfig
from lmstack.core._errors import ConfigError
from lmstack.core.model import cpu_kernels
from lmstack.core.model._attention import AttentionBackend, DenseAttention
from lmstack.core.model._inference_layout import InferenceLinear, WeightLayout, resolve_layout
from lmstack.core.model._rope import RotaryEmbedding, apply_rotary

__all__ = ["MLP", "Attention", "CausalLM", "DecoderLayer", "RMSNorm", "Transformer"]

logger = logging.getLogger(__name__)

# Where and in what dtype a module creates its parameters (``"meta"`` allocates nothing, as loading does).
Device = torch.device | str | None
DType = torch.dtype | None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # Inference in float32: a few rows (decoding) through lmstack's C kernel (a 4-5 us call
            # against torch's 12 us, 19-38 us inside a decode step); more through torch's rms_norm, one
            # op where the formula below takes eight (bit-identical to it on the shapes checked).
            if cpu_kernels.few_rows(x, self.weight):  # not DTensors (tensor parallelism)
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Grouped-query self-attention; where keys live is the backend's business."""

    # How tensor parallelism shards this module: heads split across ranks on the way in, the output
    # projection reduces across ranks on the way out. Head counts are read off tensor shapes in
    # forward, so the same code runs on a rank's local shard.
    tp_plan: ClassVar[dict[str, str]] = {
        "q_proj": "colwise",
        "k_proj": "colwise",
        "v_proj": "colwise",
        "o_proj": "rowwise",
    }

    def __init__(self, config: ModelConfig, layer: int, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        assert config.head_dim is not None and config.num_key_value_heads is not None
        self.layer_idx = layer
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.window_of(layer)
        kw = {"device": device, "dtype": dtype}
        c, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(c, config.num_attention_heads * d, bias=bool(config.qkv_bias), **kw)
        self.k_proj = nn.Linear(c, config.num_key_value_heads * d, bias=bool(config.qkv_bias), **kw)
        self.v_proj = nn.Linear(c, config.num_key_value_heads * d, bias=bool(config.qkv_bias), **kw)
        self.o_proj = nn.Linear(config.num_attention_heads * d, c, bias=bool(config.o_bias), **kw)
        # Set by CausalLM.prepare_for_inference: q, k and v in one GEMM (then q_proj... are gone).
        self.qkv_proj: InferenceLinear | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend) -> Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            # Fused (inference): q and k sit side by side, so one rotation covers both heads' sets.
            hq = self.qkv_proj.sizes[0] // self.head_dim
            qk, v = self.qkv_proj(x).split(
                [self.qkv_proj.sizes[0] + self.qkv_proj.sizes[1], self.qkv_proj.sizes[2]], dim=-1
            )
            qk = apply_rotary(qk.view(b, t, -1, self.head_dim), cos, sin)  # [B, T, Hq + Hkv, D]
            q, k = qk[:, :, :hq], qk[:, :, hq:]
            v = v.view(b, t, -1, self.head_dim)
        else:
            q = self.q_proj(x).view(b, t, -1, self.head_dim)  # [B, T, Hq, D]
            k = self.k_proj(x).view(b, t, -1, self.head_dim)  # [B, T, Hkv, D]
            v = self.v_proj(x).view(b, t, -1, self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v, scale=self.scale, window=self.window)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(b, t, -1))

    def forward_rows(self, x: Tensor, cos: Tensor, sin: Tensor, attn: Any, rows: Tensor) -> Tensor:
        """The output at the flat token indices ``rows`` only (``[N, C]``); keys and values of every token.

        The backend must have ``attend_rows`` (see :meth:`CausalLM.forward`).
        """
        b, t, c = x.shape
        flat = x.reshape(b * t, c)[rows]  # [N, C]
        q = self.q_proj(flat).view(1, rows.numel(), -1, self.head_dim)  # [1, N, Hq, D]
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        d = cos.shape[-1]
        q = apply_rotary(q, cos.reshape(b * t, d)[rows][None], sin.reshape(b * t, d)[rows][None])[0]
        k = apply_rotary(k, cos, sin)
        out = attn.attend_rows(self.layer_idx, q, k, v, rows, scale=self.scale, window=self.window)
        return self.o_proj(out.reshape(rows.numel(), -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    tp_plan: ClassVar[dict[str, str]] = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}

    def __init__(self, config: ModelConfig, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        c, f, bias = config.hidden_size, config.intermediate_size, bool(config.mlp_bias)
        self.gate_proj = nn.Linear(c, f, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(c, f, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(f, c, bias=bias, device=device, dtype=dtype)
        # Set by CausalLM.prepare_for_inference: gate and up in one GEMM (then gate_proj, up_proj are gone).
        self.gate_up_proj: InferenceLinear | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then feed-forward."""

    def __init__(self, config: ModelConfig, layer: int, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, layer, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, device, dtype)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn: AttentionBackend, rows: Tensor | None = None
    ) -> Tensor:
        """``[B, T, C]`` out; with ``rows`` (flat token indices) only those rows' output, ``[N, C]``.

        The rows path goes through this forward (not a method of its own) so that wrappers hooked on
        the layer's call, such as an FSDP2 unit gathering its weights, see it.
        """
        if rows is not None:
            h = x.reshape(-1, x.shape[-1])[rows] + self.self_attn.forward_rows(
                self.input_layernorm(x), cos, sin, attn, rows
            )
            return h + self.mlp(self.post_attention_layernorm(h))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Embeddings, decoder layers and the final norm (the Hugging Face ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, device, dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.rotary = RotaryEmbedding(config)
        self.activation_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        attn: AttentionBackend,
        rope_seq_lens: Tensor | None = None,
        output_rows: Tensor | None = None,
    ) -> Tensor:
        """Embeddings, every decoder layer, then the final norm: hidden states ``[B, T, C]``.

        Args:
            input_ids: Token ids ``[B, T]``.
            positions: Their positions ``[B, T]``, which RoPE rotates by.
            attn: Where attention happens (:class:`AttentionBackend`).
            rope_seq_lens: For dynamic NTK RoPE, each token's sequence length ``[B, T]``; None lets the
                longest position in the call decide.
            output_rows: Flat indices of the only tokens whose output is wanted: the last layer then
                computes queries, attention, its output projection and feed-forward for those rows
                alone (keys and values for every token, which those rows attend to), and the result
                is ``[N, C]``. The backend must have ``attend_rows``.
        """
        x = self.embed_tokens(input_ids)  # [B, T, C]
        cos, sin = self.rotary(positions, rope_seq_lens, dtype=x.dtype)  # [B, T, D], once for all layers
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            extra = (output_rows,) if i == last and output_rows is not None else ()
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn, *extra, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, *extra)
        return self.norm(x)


class CausalLM(nn.Module):
    """A decoder-only language model of the Llama family (llama, mistral, qwen2, internlm2, internlm3).

    The model never owns a cache. Its forward takes token ids, their positions and an attention
    backend (:class:`DenseAttention` by default), so training (packed), evaluation (dense) and
    serving (paged, in lmstack-infer) run the same module.

    Args:
        config: The architecture.
        device: Where to create the parameters (``"meta"`` to allocate nothing, as loading does).
        dtype: Parameter dtype (default: torch's default dtype).

    Example:
        >>> cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> logits = CausalLM(cfg)(torch.tensor([[1, 2, 3]]))
        >>> logits.shape
        torch.Size([1, 3, 128])
    """

    # Set by lmstack.core.parallel.apply_tensor_parallel: "tensor", or "sequence" when the residual stream
    # holds a slice of each row (then the rows-only last layer, which indexes every token, cannot run).
    _tensor_parallel: str | None = None

    def __init__(self, config: ModelConfig, device: Device = None, dtype: DType = None) -> None:
        super().__init__()
        self.config = config
        self.model = Transformer(config, device, dtype)
        self.lm_head = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inference_layout: str | None = None
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    # -- parameters ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Initialise weights: normal(0, std) for projections and embeddings, 0 for biases, 1 for norms."""
        for module in self.modules():
            if isinstance(module, InferenceLinear):
                raise ConfigError("reset_parameters is not available after prepare_for_inference.")
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def tie_weights(self) -> None:
        """Make the output projection share the embedding matrix again (after a load replaced either)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def num_parameters(self) -> int:
        """Count parameters, a tied embedding once (and a prepared model's fused weights, by shape)."""
        count = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        for module in self.modules():
            if isinstance(module, InferenceLinear):  # buffers in a packed layout, not parameters
                count += module.in_features * module.out_features
                count += 0 if module.bias is None else module.out_features
        return count

    def tp_plan(self) -> dict[str, str]:
        """How each submodule would be sharded for tensor parallelism, by fully-qualified name pattern.

        ``colwise`` shards a linear layer's output features, ``rowwise`` its input features (with
        an all-reduce of the output); the embedding is sharded over the vocabulary.
        """
        plan = {"model.embed_tokens": "rowwise", "lm_head": "colwise"}
        for prefix, cls in (("self_attn", Attention), ("mlp", MLP)):
            for name, style in cls.tp_plan.items():
                plan[f"model.layers.*.{prefix}.{name}"] = style
        return plan

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        self.model.activation_checkpointing = enabled

    # -- inference layout ----------------------------------------------------------------------------
    @property
    def inference_layout(self) -> str | None:
        """The layout :meth:`prepare_for_inference` chose (``"onednn"``, ``"dense"``, ``"gemv"``), or None."""
        return self._inference_layout

    @torch.no_grad()
    def prepare_for_inference(
        self, layout: WeightLayout = "auto", *, single_sequence: bool = False
    ) -> CausalLM:
        """Fuse projections and lay weights out for the fastest matmul here; inference only, in place.

        q/k/v become one projection and gate/up another (one GEMM each, split after), and every
        projection and the untied output head store their weight as the device multiplies it fastest:
        on CPU (float32, or bfloat16 where supported) reordered once for oneDNN's linear, which measured
        faster than ``F.linear``, pre-transposed ``x @ W`` and MKL's packed GEMM at one and 32 tokens;
        elsewhere a plain fused ``[out, in]`` matrix. A tied output head keeps sharing the embedding.
        Logits are unchanged up to float summation order.

        The model keeps the Hugging Face layout on the outside: ``state_dict()`` (and so
        :func:`~lmstack.core.save_pretrained`) still writes ``q_proj``, ``k_proj``... with their
        biases. It is for serving only: do not train it, attach LoRA adapters to it, load weights
        into it (refused with :class:`~lmstack.core.CheckpointError`) or move/cast it afterwards; load,
        move and cast first, then prepare. Calling it again is a no-op.

        Args:
            layout: ``"auto"`` (the measured best for this device and dtype), ``"onednn"``, ``"dense"``
                or ``"gemv"`` (float32 on CPU: lmstack's compiled kernel for inputs of a few rows, the
                fastest layout for decoding one sequence at a time; the lmstack-core README measures it).
            single_sequence: The model will decode one sequence at a time (a serving engine with
                ``max_num_seqs=1``): ``"auto"`` then picks ``"gemv"`` where it runs.

        Returns:
            The model itself, in eval mode.

        Raises:
            ConfigError: The layout cannot run here, or a projection is not a plain ``nn.Linear`` (a
                LoRA or quantized layer: merge or dequantize it first), or the weights are on ``meta``.
        """
        if self._inference_layout is not None:
            return self
        weight = self.model.embed_tokens.weight
        if weight.device.type == "meta":
            raise ConfigError("prepare_for_inference needs real weights; load the checkpoint first.")
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _PROJECTIONS and type(module) is not nn.Linear and not _inference_ready(module):
                raise ConfigError(
                    f"prepare_for_inference needs plain nn.Linear projections, but {name} is "
                    f"{type(module).__name__}; merge adapters (or dequantize) first."
                )
        chosen = resolve_layout(layout, weight.device, weight.dtype, single_sequence=single_sequence)
        self.eval()
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            _fuse(layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), "o_proj", chosen)
            _fuse(layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"), "down_proj", chosen)
        if not self.config.tie_word_embeddings and not _inference_ready(self.lm_head):
            self.lm_head = InferenceLinear([("lm_head", self.lm_head)], "lm_head", chosen)  # type: ignore[assignment]
        self._inference_layout = chosen
        logger.info("prepared for inference: fused q/k/v and gate/up, %s weight layout", chosen)
        return self

    # -- forward -------------------------------------------------------------------------------------
    def _rows_only(self, attn: Any, indices: Tensor | None, tokens: int) -> bool:
        """Whether the last layer can run on the ``logits_indices`` rows alone (same result, less work)."""
        if indices is None or indices.dim() != 1 or not 0 < indices.numel() <= ROWS_ONLY_MAX_SHARE * tokens:
            return False
        if self._inference_layout is not None or not callable(getattr(attn, "attend_rows", None)):
            return False
        if self._tensor_parallel == "sequence":
            return False
        # A compiled layer would see a rows tensor of a new length every batch and recompile.
        if getattr(self.model.layers[-1], "_compiled_call_impl", None) is not None:
            return False
        if not getattr(attn, "supports_rows", lambda: True)() or indices.device.type != "cpu":
            return False
        # Rows in another order (or repeated) keep the plain path, which returns them as asked.
        return indices.numel() < 2 or bool((indices[1:] > indices[:-1]).all())

    @property
    def hidden_states(self) -> Transformer:
        """The body without the output head (:attr:`model`, see :meth:`Transformer.forward`).

        ``model.hidden_states(ids, positions, attn)`` gives ``[B, T, C]``; scoring code calls it
        to run the output head over slices of a long sequence.
        """
        return self.model

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attn: AttentionBackend | None = None,
        *,
        rope_seq_lens: Tensor | None = None,
        logits_indices: Tensor | None = None,
        head: Callable[[Tensor, nn.Module], Tensor] | None = None,
    ) -> Tensor:
        """Return logits ``[B, T, V]``, or ``[N, V]`` for the flat token indices in ``logits_indices``.

        Args:
            input_ids: ``[B, T]`` token ids.
            positions: ``[B, T]`` positions (default ``0..T-1`` for every row).
            attn: The attention backend (default: dense causal attention).
            rope_seq_lens: Dynamic NTK RoPE only: the length of each token's sequence ``[B, T]``
                (default: the longest position in the call, as the reference implementation does).
            logits_indices: Optional flat indices into the ``B * T`` tokens: only those tokens'
                logits are computed (a serving engine needs the last token of each sequence).
            head: Optional replacement of the output head: called as ``head(hidden, self.lm_head)`` with
                the final hidden states (``[N, C]`` with ``logits_indices``, else ``[B, T, C]``), and
                its result is returned instead of the logits. A fused loss (the lm head and the
                cross-entropy in chunks, never materialising ``[N, V]`` logits) goes here, so that it
                runs inside this forward, where data-parallel wrappers expect the weights to be used.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}.")
        if positions is None:
            b, t = input_ids.shape
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        attn = DenseAttention() if attn is None else attn
        if self._rows_only(attn, logits_indices, input_ids.numel()):
            h = self.model(input_ids, positions, attn, rope_seq_lens, output_rows=logits_indices)
        else:
            h = self.model(input_ids, positions, attn, rope_seq_lens)
            if logits_indices is not None:
                h = h.reshape(-1, h.shape[-1])[logits_indices]
        if head is not None:
            return head(h, self.lm_head)
        if (
            self._inference_layout == "gemv"
            and self._tied_head()
            and cpu_kernels.few_rows(h, self.lm_head.weight)
        ):  # a tied head stays the embedding's nn.Linear (an untied one is an InferenceLinear)
            return cpu_kernels.gemv(h, self.lm_head.weight, self.lm_head.bias)
        return self.lm_head(h)

    def _tied_head(self) -> bool:
        # A quantized head (lmstack-infer's weight-only linears) is an nn.Module without a weight.
        head = self.lm_head
        return isinstance(head, nn.Linear) and head.weight is self.model.embed_tokens.weight


# The last layer runs on the logits rows alone when they are at most this share of the tokens: below it
# the gather and the masked attention of the few rows cost less than the rows they skip.
ROWS_ONLY_MAX_SHARE = 0.5


def _inference_ready(module: nn.Module) -> bool:
    """Whether a module says it is already laid out for inference (a quantized linear, say)."""
    return bool(getattr(module, "inference_ready", False))


# The projections prepare_for_inference rewrites (by attribute name).
_PROJECTIONS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
)


def _fuse(
    parent: nn.Module,
    fused: str,
    names: tuple[str, ...],
    out: str,
    layout: Literal["onednn", "dense", "gemv"],
) -> None:
    """Replace ``parent``'s ``names`` projections with one fused module, and its ``out`` projection.

    Modules already laid out for inference (``inference_ready``, e.g. lmstack-infer's quantized
    linears, which fuse themselves) are left as they are.
    """
    if getattr(parent, fused) is None and all(type(getattr(parent, n)) is nn.Linear for n in names):
        parts = [(name, getattr(parent, name)) for name in names]
        for name in names:
            delattr(parent, name)
        setattr(parent, fused, InferenceLinear(parts, fused, layout))
    out_linear = getattr(parent, out)
    if type(out_linear) is nn.Linear:
        # Registered after the fused module, so state_dict() lists q, k, v before o (gate, up before down).
        delattr(parent, out)
        setattr(parent, out, InferenceLinear([(out, out_linear)], out, layout))
