"""Rotary position embeddings (RoPE, arXiv 2104.09864) with the Llama family's scaling variants.

Layout is the Hugging Face one: the rotation pairs dimension i with i + head_dim/2 ("rotate half").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ponder.errors import PonderError


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair rotation frequencies, # [head_dim/2], fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise PonderError(f"unsupported rope scaling {kind!r}; ponder supports default, linear and llama3")


def _llama3_scaled(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    ramp = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - ramp) * scaled / factor + ramp * scaled
    in_between = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_between, blended, scaled)


def rope_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for every position, each # [max_positions, head_dim], fp32.

    The sin table's first half is negated, so that ``apply_rope`` needs one ``roll`` instead of slice, negate and
    concatenate (the same products, so the same rounding as the textbook form).
    """
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    half = inv_freq.shape[0]
    signed_sin = emb.sin()
    signed_sin[:, :half].neg_()
    return emb.cos(), signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x # [B, T, H, D] by cos / signed sin # [B, T, 1, D]: x*cos + rotate_half(x)*sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
