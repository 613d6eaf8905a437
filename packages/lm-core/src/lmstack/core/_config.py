"""Typed model configuration, read from and written to Hugging Face ``config.json`` files.

One :class:`ModelConfig` covers the Llama family as lmstack implements it: ``llama``, ``mistral``,
``qwen2`` (qkv bias, optional sliding window), ``internlm2`` (packed ``wqkv``, its own key names) and
``internlm3``. RoPE parameters are accepted in both spellings found in the wild: ``rope_theta`` +
``rope_scaling`` (older checkpoints such as InternLM2.5) and ``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.core._errors import ConfigError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeScaling", "load_config"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "internlm2", "internlm3")
SUPPORTED_ROPE_TYPES = ("linear", "dynamic", "llama3", "yarn")

# Defaults that differ per model type, as the reference implementations define them.
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "internlm2": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "internlm3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "head_dim": 128},
}

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "internlm3": "InternLM3ForCausalLM",
}

# Keys that this module interprets; everything else in a config.json is carried in `extra` so that a
# load -> save round trip keeps it.
_KNOWN_KEYS = frozenset(
    {
        "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "attention_bias", "mlp_bias", "bias", "qkv_bias", "tie_word_embeddings", "sliding_window",
        "use_sliding_window", "max_window_layers", "layer_types", "hidden_act", "bos_token_id",
        "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "auto_map", "partial_rotary_factor",
        "transformers_version", "pretraining_tp",
    }
)  # fmt: skip


def _nearest(name: str, choices: tuple[str, ...] | frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class RopeScaling:
    """How rotary position embeddings are stretched beyond the pretraining context.

    Attributes:
        rope_type: ``linear`` (position interpolation), ``dynamic`` (NTK-aware base scaling that grows
            with the sequence, as InternLM2.5 uses for 1M context), ``llama3`` (frequency-dependent
            scaling) or ``yarn``.
        factor: The context extension factor.
        original_max_position_embeddings: The pretraining context (llama3, yarn).
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only.
        beta_fast: yarn only; defaults to 32.
        beta_slow: yarn only; defaults to 1.
        attention_factor: yarn only; scales cos/sin (default derived from ``factor``).
        mscale: yarn only (DeepSeek-style attention factor).
        mscale_all_dim: yarn only.
        truncate: yarn only; round the correction range to whole dimensions.
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return the Hugging Face spelling of these parameters (without ``rope_theta``)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("rope_type", "factor") or value is None:
                continue
            if f.name == "truncate" and value is True:
                continue
            out[f.name] = value
        return out


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only transformer of the Llama family.

    Build one with :func:`load_config` (from a checkpoint directory or ``config.json``),
    :meth:`from_dict`, or directly for a new model.

    Attributes:
        model_type: One of ``llama``, ``mistral``, ``qwen2``, ``internlm2``, ``internlm3``.
        vocab_size: Number of token embeddings.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU feed-forward block.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (grouped-query attention when fewer than query heads).
        head_dim: Width of one head.
        max_position_embeddings: Context the model was trained for (the base of RoPE scaling).
        rms_norm_eps: Epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: RoPE scaling, or None for plain RoPE.
        qkv_bias: Bias on the q, k and v projections (default: True for qwen2, else False).
        o_bias: Bias on the attention output projection (default: as ``qkv_bias`` where the type ties
            them, llama, internlm2 and internlm3; else False).
        mlp_bias: Bias on the feed-forward projections.
        tie_word_embeddings: Whether the output projection shares the input embedding matrix.
        sliding_window: Attention window of layers whose type is ``sliding_attention``.
        layer_types: Per layer, ``full_attention`` or ``sliding_attention``.
        hidden_act: Activation of the gated feed-forward; only SiLU (SwiGLU) is supported.
        bos_token_id: Beginning-of-sequence token.
        eos_token_id: End-of-sequence token(s).
        pad_token_id: Padding token.
        dtype: The checkpoint's declared dtype name (e.g. ``bfloat16``), if any.
        extra: Keys of the source config.json this class does not interpret, kept for round trips.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Fill derived fields on the frozen instance, then validate everything once.
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.model_type == "qwen2")
        if self.o_bias is None:
            tied_bias = self.model_type in ("llama", "internlm2", "internlm3")
            object.__setattr__(self, "o_bias", bool(self.qkv_bias) and tied_bias)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if (
            self.head_dim is None
            and isinstance(self.num_attention_heads, int)
            and self.num_attention_heads > 0
        ):
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            if isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
                object.__setattr__(self, "layer_types", (kind,) * self.num_hidden_layers)
        elif not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate()

    # -- validation ------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; lmstack implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}.{_nearest(str(self.model_type), SUPPORTED_MODEL_TYPES)}",
                field="model_type",
            )
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.", field=name)
        assert self.num_key_value_heads is not None and self.head_dim is not None
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention.",
                field="num_key_value_heads",
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}.", field="head_dim")
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            raise ConfigError(
                f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}.", field="rms_norm_eps"
            )
        if not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 1:
            raise ConfigError(
                f"rope_theta must be a number > 1, got {self.rope_theta!r}.", field="rope_theta"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; the Llama family uses 'silu' (SwiGLU).",
                field="hidden_act",
            )
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ConfigError(
                f"sliding_window must be a positive integer or null, got {self.sliding_window!r}.",
                field="sliding_window",
            )
        assert self.layer_types is not None
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries "
                f"but num_hidden_layers is {self.num_hidden_layers}.",
                field="layer_types",
            )
        for kind in self.layer_types:
            if kind not in ("full_attention", "sliding_attention"):
                raise ConfigError(
                    f"layer_types entry {kind!r} is not supported "
                    "(use 'full_attention' or 'sliding_attention').",
                    field="layer_types",
                )
            if kind == "sliding_attention" and self.sliding_window is None:
                raise ConfigError(
                    "layer_types asks for sliding_attention but sliding_window is null.",
                    field="sliding_window",
                )
        if self.rope_scaling is not None:
            _validate_rope(self.rope_scaling)
        self._validate_biases()

    def _validate_biases(self) -> None:
        # Only bias patterns each type's reference implementation (and checkpoint format) can express.
        allowed = {
            "llama": self.qkv_bias == self.o_bias,
            "internlm3": self.qkv_bias == self.o_bias,
            "internlm2": self.qkv_bias == self.o_bias and not self.mlp_bias,
            "qwen2": self.qkv_bias and not self.o_bias and not self.mlp_bias,
            "mistral": not (self.qkv_bias or self.o_bias or self.mlp_bias),
        }[self.model_type]
        if not allowed:
            raise ConfigError(
                f"{self.model_type} cannot have qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                f"mlp_bias={self.mlp_bias}: llama/internlm3 use one attention bias for q, k, v and o; "
                "internlm2 the same without mlp bias; qwen2 biases q, k, v only; mistral has none.",
                field="qkv_bias",
            )

    # -- derived ---------------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head."""
        assert self.num_key_value_heads is not None
        return self.num_attention_heads // self.num_key_value_heads

    def window_of(self, layer_idx: int) -> int | None:
        """The attention window of layer ``layer_idx`` (None for full attention)."""
        assert self.layer_types is not None
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with some fields changed (validated again)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = None
        return dataclasses.replace(self, **changes)

    # -- Hugging Face dictionaries -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build a config from the contents of a Hugging Face ``config.json``.

        Raises:
            ConfigError: if the model type is unknown or a field is missing, of the wrong type or
                inconsistent; the error names the field.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(raw).__name__}.")
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError(
                "config has no 'model_type'; add one of " + ", ".join(SUPPORTED_MODEL_TYPES) + ".",
                field="model_type",
            )
        model_type = str(model_type).lower()
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {raw.get('model_type')!r} is not supported; lmstack implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}.{_nearest(model_type, SUPPORTED_MODEL_TYPES)}",
                field="model_type",
            )
        defaults = _TYPE_DEFAULTS[model_type]

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(
                    f"config is missing required field {key!r} (model_type {model_type}).", field=key
                )
            return raw[key]

        def get(key: str, default: Any = None) -> Any:
            value = raw.get(key, defaults.get(key, default))
            return defaults.get(key, default) if value is None and key in defaults else value

        if model_type == "internlm2":
            # InternLM2's `bias` covers the packed wqkv and wo projections, not the feed-forward.
            bias = bool(raw.get("bias", False))
            qkv_bias, o_bias, mlp_bias = bias, bias, False
        elif model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            qkv_bias = o_bias = mlp_bias = False
        else:  # llama, internlm3
            attn_bias = bool(raw.get("attention_bias", raw.get("qkv_bias", False)))
            qkv_bias = o_bias = attn_bias
            mlp_bias = bool(raw.get("mlp_bias", raw.get("bias", False)))

        sliding_window = None
        layer_types = raw.get("layer_types")
        if model_type == "mistral":
            # An explicit null disables the window; an absent key means the reference default.
            sliding_window = raw["sliding_window"] if "sliding_window" in raw else defaults["sliding_window"]
        elif model_type == "qwen2" and raw.get("use_sliding_window", False):
            sliding_window = raw.get("sliding_window", 4096)
            if layer_types is None and sliding_window is not None:
                max_window_layers = int(raw.get("max_window_layers", 28))
                layer_types = [
                    "sliding_attention" if i >= max_window_layers else "full_attention"
                    for i in range(int(need("num_hidden_layers")))
                ]
        if layer_types is not None and sliding_window is None:
            # A config that lists layer types but has no window attends fully everywhere.
            layer_types = ["full_attention"] * len(layer_types)

        if raw.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise ConfigError(
                "partial_rotary_factor other than 1.0 is not supported by the Llama-family model.",
                field="partial_rotary_factor",
            )
        rope_theta, rope_scaling = _parse_rope(raw, model_type)

        head_dim = raw["head_dim"] if "head_dim" in raw else defaults.get("head_dim")
        dtype = raw.get("dtype", raw.get("torch_dtype"))
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_KEYS}
        try:
            return cls(
                model_type=model_type,
                vocab_size=need("vocab_size"),
                hidden_size=need("hidden_size"),
                intermediate_size=need("intermediate_size"),
                num_hidden_layers=need("num_hidden_layers"),
                num_attention_heads=need("num_attention_heads"),
                num_key_value_heads=raw.get("num_key_value_heads"),
                head_dim=head_dim,
                max_position_embeddings=get("max_position_embeddings", 2048),
                rms_norm_eps=get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=mlp_bias,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                sliding_window=sliding_window,
                layer_types=tuple(layer_types) if layer_types is not None else None,
                hidden_act=str(raw.get("hidden_act", "silu")),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                pad_token_id=raw.get("pad_token_id"),
                dtype=str(dtype) if dtype is not None else None,
                extra=extra,
            )
        except TypeError as exc:  # e.g. a string where a number belongs, compared inside validation
            raise ConfigError(f"invalid config value: {exc}") from exc

    def to_dict(self, model_type: str | None = None) -> dict[str, Any]:
        """Return a Hugging Face ``config.json`` dictionary that ``transformers`` loads.

        Args:
            model_type: Write the config for this type instead of ``self.model_type``; ``internlm2``
                models are written as ``llama`` (transformers implements no InternLM2).
        """
        target = model_type or ("llama" if self.model_type == "internlm2" else self.model_type)
        if target not in _ARCHITECTURES:
            raise ConfigError(f"cannot write a config of model_type {target!r}.", field="model_type")
        if target != self.model_type and self.model_type != "internlm2":
            # Bias patterns differ per type: check that the target type can express this model's.
            self.replace(model_type=target)
        out: dict[str, Any] = dict(self.extra)
        out.update(
            {
                "model_type": target,
                "architectures": [_ARCHITECTURES[target]],
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "hidden_act": self.hidden_act,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "rope_theta": self.rope_theta,
            }
        )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling.to_dict(), "rope_theta": self.rope_theta}
        # Both spellings, so transformers 4 (rope_scaling) and 5 (rope_parameters) read the same RoPE.
        out["rope_parameters"] = rope
        out["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling is not None else None
        if target in ("llama", "internlm3"):
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if target == "mistral":
            out["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            if target != "qwen2":
                raise ConfigError(f"{target} has no sliding-window attention; this model uses one.")
            out["use_sliding_window"] = True
            out["sliding_window"] = self.sliding_window
            out["layer_types"] = list(self.layer_types or ())
            first = next((i for i, t in enumerate(self.layer_types or ()) if t == "sliding_attention"), 0)
            out["max_window_layers"] = first
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out


def _validate_rope(rs: RopeScaling) -> None:
    if rs.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rs.rope_type!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_ROPE_TYPES)} "
            f"or none.{_nearest(rs.rope_type, SUPPORTED_ROPE_TYPES)}",
            field="rope_scaling.rope_type",
        )
    if isinstance(rs.factor, bool) or not isinstance(rs.factor, (int, float)) or not rs.factor > 0:
        raise ConfigError(
            f"rope scaling factor must be a positive number, got {rs.factor!r}.", field="rope_scaling.factor"
        )
    if rs.rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if getattr(rs, name) is None:
                raise ConfigError(f"llama3 rope scaling needs {name!r}.", field=f"rope_scaling.{name}")
        assert rs.low_freq_factor is not None and rs.high_freq_factor is not None
        if rs.high_freq_factor <= rs.low_freq_factor:
            raise ConfigError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor.",
                field="rope_scaling.high_freq_factor",
            )


def _parse_rope(raw: Mapping[str, Any], model_type: str) -> tuple[float, RopeScaling | None]:
    """Read RoPE base and scaling from either spelling of the config."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError("rope_parameters must be an object.", field="rope_parameters")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ConfigError("rope_scaling must be an object or null.", field="rope_scaling")
    # rope_scaling, where present, wins (it is what older tools wrote and what transformers 5 prefers too).
    source: dict[str, Any] = dict(params or {})
    if scaling:
        source.update(scaling)
    # As in transformers 5: a theta inside the RoPE dict beats the top-level key.
    theta = source.get("rope_theta", theta if theta is not None else 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"rope_theta must be a number, got {theta!r}.", field="rope_theta")
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    rope_type = str(rope_type)
    max_pos = raw.get(
        "max_position_embeddings", _TYPE_DEFAULTS[model_type].get("max_position_embeddings", 2048)
    )
    factor = source.get("factor")
    original = source.get("original_max_position_embeddings")
    if rope_type == "yarn":
        original = original if original is not None else raw.get("original_max_position_embeddings", max_pos)
        if factor is None:
            factor = max_pos / original
    if factor is None:
        raise ConfigError(f"{rope_type} rope scaling needs a 'factor'.", field="rope_scaling.factor")
    unknown = (
        set(source) - {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type", "type", "rope_theta"}
    )
    if unknown:
        raise ConfigError(
            f"unknown rope scaling key(s) {sorted(unknown)} for type {rope_type!r}.",
            field=f"rope_scaling.{sorted(unknown)[0]}",
        )
    try:
        rs = RopeScaling(
            rope_type=rope_type,
            factor=factor,
            original_max_position_embeddings=original,
            low_freq_factor=source.get("low_freq_factor"),
            high_freq_factor=source.get("high_freq_factor"),
            beta_fast=source.get("beta_fast"),
            beta_slow=source.get("beta_slow"),
            attention_factor=source.get("attention_factor"),
            mscale=source.get("mscale"),
            mscale_all_dim=source.get("mscale_all_dim"),
            truncate=bool(source.get("truncate", True)),
        )
    except TypeError as exc:
        raise ConfigError(f"invalid rope scaling: {exc}", field="rope_scaling") from exc
    _validate_rope(rs)
    return float(theta), rs


def yarn_attention_factor(rs: RopeScaling) -> float:
    """The factor by which yarn scales cos and sin (the paper's ``mscale``)."""

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.mscale and rs.mscale_all_dim:
        return get_mscale(rs.factor, rs.mscale) / get_mscale(rs.factor, rs.mscale_all_dim)
    return get_mscale(rs.factor)


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a :class:`ModelConfig` from a checkpoint directory or a ``config.json`` file.

    Raises:
        ConfigError: if the file is missing, is not valid JSON, or describes an unsupported model.
    """
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}; point at a Hugging Face model directory.")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}.") from exc
    return ModelConfig.from_dict(raw)
