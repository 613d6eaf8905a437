"""Rotary position embeddings with the scaling kinds the Llama family uses.

The inverse frequencies are tiny (``head_dim / 2`` numbers), so they are computed per forward
rather than cached: that keeps the module free of device-bound state (models are built on the meta
device and loaded in place) and lets dynamic NTK scaling follow each sequence's length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmstack.core._config import ModelConfig, RopeScaling, yarn_attention_factor

__all__ = ["RotaryEmbedding", "apply_rotary", "rotate_half"]


def _plain_inv_freq(base: float, dim: int, device: torch.device | None) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: Tensor, rs: RopeScaling) -> Tensor:
    assert rs.low_freq_factor is not None and rs.high_freq_factor is not None
    assert rs.original_max_position_embeddings is not None
    old_ctx = rs.original_max_position_embeddings
    low_wavelen = old_ctx / rs.low_freq_factor
    high_wavelen = old_ctx / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are interpolated by the full factor, short ones kept, and
    # the band between blends the two linearly in 1/wavelength.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(
    base: float, dim: int, rs: RopeScaling, max_pos: int, device: torch.device | None
) -> Tensor:
    original = rs.original_max_position_embeddings or max_pos
    beta_fast = rs.beta_fast or 32
    beta_slow = rs.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rs.factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1 where frequencies are high enough to extrapolate unchanged
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding(torch.nn.Module):
    """Computes ``cos`` and ``sin`` tables for given token positions.

    Args:
        config: The model configuration (head_dim, rope_theta, rope_scaling, max_position_embeddings).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.scaling = config.rope_scaling
        self.max_position_embeddings = config.max_position_embeddings
        self.attention_scaling = 1.0
        if self.scaling is not None and self.scaling.rope_type == "yarn":
            self.attention_scaling = yarn_attention_factor(self.scaling)

    def inv_freq(self, device: torch.device | None = None) -> Tensor:
        """Inverse frequencies (``[head_dim / 2]``, float32) for sequences within the trained context."""
        rs = self.scaling
        if rs is None or rs.rope_type == "dynamic":
            return _plain_inv_freq(self.base, self.dim, device)
        if rs.rope_type == "linear":
            return _plain_inv_freq(self.base, self.dim, device) / rs.factor
        if rs.rope_type == "llama3":
            return _llama3_inv_freq(_plain_inv_freq(self.base, self.dim, device), rs)
        return _yarn_inv_freq(self.base, self.dim, rs, self.max_position_embeddings, device)

    def _dynamic_inv_freq(self, seq_len: Tensor, device: torch.device) -> Tensor:
        """NTK-aware inverse frequencies; ``seq_len`` is a scalar or one length per token."""
        assert self.scaling is not None
        factor = self.scaling.factor
        max_pos = self.max_position_embeddings
        seq_len = torch.clamp(seq_len, min=max_pos).to(torch.float32)
        base = self.base * ((factor * seq_len / max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = (
            torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).to(torch.float32) / self.dim
        )
        return 1.0 / (base.unsqueeze(-1) ** exponents)

    def forward(self, positions: Tensor, seq_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(cos, sin)``, each ``[*positions.shape, head_dim]`` in float32.

        Args:
            positions: Integer positions of the tokens, any shape.
            seq_lens: Dynamic NTK only: the length of the sequence each token belongs to (same
                shape as ``positions``). When omitted, the longest position in the call decides,
                as in the reference implementation.
        """
        device = positions.device
        pos = positions.to(torch.float32)
        if self.scaling is not None and self.scaling.rope_type == "dynamic":
            # One table for the call ([dim/2]) or one per token ([*shape, dim/2]).
            inv = self._dynamic_inv_freq(positions.max() + 1 if seq_lens is None else seq_lens, device)
            freqs = pos.unsqueeze(-1) * inv
        else:
            freqs = pos.unsqueeze(-1) * self.inv_freq(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    """Rotate the two halves of the last dimension: ``(a, b) -> (-b, a)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (``[B, T, H, D]``) by the tables ``cos``/``sin`` (``[B, T, D]``)."""
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return (x * cos) + (rotate_half(x) * sin)
