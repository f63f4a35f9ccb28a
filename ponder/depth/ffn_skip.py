"""FFN skipping (FFN-SkipLLM, arXiv 2404.03865): skip the FFN blocks that barely change the residual stream.

The paper observes that, within a generation, the FFN blocks of some middle layers leave the hidden state almost
unchanged (their input and output residual states have a cosine similarity near 1: "saturated"), and that which
blocks are saturated is visible in the first tokens. So each row decodes its first ``warmup`` tokens at full
depth, measuring per layer the cosine between the FFN block's input and output residual states, then skips the
``skip`` most saturated FFN blocks among layers ``[lo, hi)`` (those at or above ``threshold`` only) for the rest of
its answer. Attention always runs, so every layer's K/V is written exactly as the full model would and no fill is
needed; the first and last layers are left alone, as in the paper. ``skip=0`` is the full model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ponder.depth.base import DepthPolicy, DepthRow
from ponder.errors import PonderError


@dataclass(frozen=True)
class FFNSkipOptions:
    skip: int = 0  # FFN blocks skipped per row after the warm-up (0: none)
    warmup: int = 4  # decoded tokens at full depth that measure saturation
    threshold: float = 0.0  # only blocks whose mean cosine reaches this are skipped
    lo: float = 0.2  # candidate layers: [lo * L, hi * L)
    hi: float = 0.9

    def __post_init__(self) -> None:
        if self.skip < 0 or self.warmup < 1:
            raise ValueError("skip must be >= 0 and warmup >= 1")
        if not 0.0 <= self.lo < self.hi <= 1.0:
            raise ValueError(f"need 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")


@dataclass
class _Saturation:
    sums: dict[int, float]
    seen: int = 0
    skipped: frozenset[int] | None = None  # decided after the warm-up


class FFNSkip(DepthPolicy):
    name = "ffn-skip"

    def __init__(self, options: FFNSkipOptions) -> None:
        super().__init__()
        self.options = options
        self.allowed: tuple[int, ...] = ()

    def bind(self, loaded: Any) -> None:
        super().bind(loaded)
        o, L = self.options, self.n_layers
        self.allowed = tuple(range(int(o.lo * L), int(o.hi * L)))
        if o.skip > len(self.allowed):
            raise PonderError(f"ffn-skip:skip={o.skip}: only {len(self.allowed)} layers are candidates "
                              f"([{o.lo}, {o.hi}) of {L}); lower skip or widen lo/hi")

    def new_row(self, prompt_len: int, max_new: int) -> _Saturation:
        return _Saturation({layer: 0.0 for layer in self.allowed})

    def wants_saturation(self, rows: list[DepthRow]) -> bool:
        return self.options.skip > 0 and any(r.policy_state.skipped is None for r in rows)

    def ffn_rows(self, layer: int, rows: list[DepthRow]) -> torch.Tensor | None:
        if self.options.skip == 0 or not any(r.policy_state.skipped and layer in r.policy_state.skipped
                                             for r in rows):
            return None
        return torch.tensor([not (r.policy_state.skipped and layer in r.policy_state.skipped) for r in rows])

    def skips_ffn(self, rows: list[DepthRow]) -> bool:
        return any(r.policy_state.skipped for r in rows)

    def observe(self, rows: list[DepthRow], exits: list[int], ffn_saturation: dict[int, torch.Tensor]) -> None:
        if not ffn_saturation:
            return
        for b, r in enumerate(rows):
            s = r.policy_state
            if s.skipped is not None:
                continue
            for layer in self.allowed:
                s.sums[layer] += float(ffn_saturation[layer][b])
            s.seen += 1
            if s.seen >= self.options.warmup:
                ranked = sorted(self.allowed, key=lambda layer: -s.sums[layer])
                chosen = [layer for layer in ranked if s.sums[layer] / s.seen >= self.options.threshold]
                s.skipped = frozenset(chosen[: self.options.skip])

    def report(self) -> dict[str, Any]:
        return {**super().report(), "candidates": [self.allowed[0], self.allowed[-1] + 1] if self.allowed else []}
