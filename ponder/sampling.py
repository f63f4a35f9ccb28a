"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus, arXiv 1904.09751).

Every row has its own ``torch.Generator``: with a seed, a row's samples depend only on the seed and its logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ponder.errors import PonderError


class InvalidParameter(PonderError, ValueError):
    """A sampling or generation parameter outside its valid range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter("stop must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidParameter(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generators(params: SamplingParams, rows: int, device: torch.device) -> list[torch.Generator | None]:
    """One generator per row (seeded ``seed + row``), or None for greedy."""
    if params.greedy:
        return [None] * rows
    out = []
    for r in range(rows):
        g = torch.Generator(device=device)
        if params.seed is None:
            g.seed()
        else:
            g.manual_seed(params.seed + r)
        out.append(g)
    return out


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling probabilities # [B, V] from logits # [B, V] after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row # [B] from logits # [B, V]."""
    if params.greedy:
        return logits.argmax(-1)
    probs = warp(logits, params)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Margin between the best and second-best logit per row # [B]: tiny margins are floating-point near-ties."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[:, 0] - top[:, 1]
