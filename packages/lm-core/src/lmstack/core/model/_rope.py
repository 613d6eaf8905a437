"""Rotary position embeddings with the scaling kinds the Llama family uses.

:class:`RotaryEmbedding` keeps one ``cos``/``sin`` table for positions ``0..L-1`` and looks tokens up
in it: the table is built on first use, rebuilt (to the next power of two) when a longer position
appears, and rebuilt when the device or dtype asked for changes. It is a plain attribute, not a
buffer, so models built on the meta device and loaded in place carry no stale state. Dynamic NTK
scaling beyond the trained context depends on each sequence's length, so those tokens are computed
directly rather than looked up.
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
        self._cache: tuple[Tensor, Tensor] | None = None  # (cos, sin), each [L, head_dim]

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

    def _cos_sin(self, freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of ``freqs`` (``[..., head_dim / 2]`` angles), scaled, in ``dtype``."""
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def table(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The cached ``(cos, sin)`` tables for positions ``0..L-1`` with ``L >= length`` (``[L, D]``)."""
        cache = self._cache
        if (
            cache is None
            or cache[0].shape[0] < length
            or cache[0].device != device
            or cache[0].dtype != dtype
        ):
            size = 1 << max(length - 1, 1).bit_length()  # the next power of two: few rebuilds
            positions = torch.arange(size, device=device).to(torch.float32)
            cache = self._cos_sin(positions.unsqueeze(-1) * self.inv_freq(device), dtype)
            self._cache = cache
        return cache

    def forward(
        self, positions: Tensor, seq_lens: Tensor | None = None, *, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Return ``(cos, sin)``, each ``[*positions.shape, head_dim]`` in ``dtype``.

        Args:
            positions: Integer positions of the tokens, any shape.
            seq_lens: Dynamic NTK only: the length of the sequence each token belongs to (same
                shape as ``positions``). When omitted, the longest position in the call decides,
                as in the reference implementation.
            dtype: The dtype of the tables (the activations'; the angles are computed in float32).
        """
        device = positions.device
        if positions.numel() == 0:
            empty = torch.empty((*positions.shape, self.dim), device=device, dtype=dtype)
            return empty, empty
        if positions.is_floating_point():
            return self._direct(positions, seq_lens, dtype)
        dynamic = self.scaling is not None and self.scaling.rope_type == "dynamic"
        # One host sync for everything the lookup needs to know.
        stats = [positions.min(), positions.max()]
        if dynamic and seq_lens is not None:
            stats.append(seq_lens.max())
        low, high, *longest = torch.stack(stats).tolist()
        if low < 0:
            return self._direct(positions, seq_lens, dtype)
        # Within the trained context dynamic NTK is plain RoPE; beyond it each length has its own table.
        if dynamic and (longest[0] if longest else high + 1) > self.max_position_embeddings:
            return self._direct(positions, seq_lens, dtype)
        cos, sin = self.table(high + 1, device, dtype)
        return cos[positions], sin[positions]

    def _direct(
        self, positions: Tensor, seq_lens: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Compute the tables for exactly these positions (no cache)."""
        device = positions.device
        pos = positions.to(torch.float32)
        if self.scaling is not None and self.scaling.rope_type == "dynamic":
            # One table for the call ([dim/2]) or one per token ([*shape, dim/2]).
            inv = self._dynamic_inv_freq(positions.max() + 1 if seq_lens is None else seq_lens, device)
            freqs = pos.unsqueeze(-1) * inv
        else:
            freqs = pos.unsqueeze(-1) * self.inv_freq(device)
        return self._cos_sin(freqs, dtype)


def rotate_half(x: Tensor) -> Tensor:
    """Rotate the two halves of the last dimension: ``(a, b) -> (-b, a)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (``[B, T, H, D]``) by the tables ``cos``/``sin`` (``[B, T, D]``)."""
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return (x * cos) + (rotate_half(x) * sin)
