"""Budget allocation across layers and KV heads for score-based eviction (used by ``snapkv:alloc=...``).

- **uniform**: every layer and KV head keeps the row's budget ``kept``.
- **pyramid** (PyramidKV, arXiv 2406.02069): lower layers attend broadly and keep more, upper layers attend to a few
  entries and keep fewer. Layer budgets fall linearly from the bottom to the top layer, whose budget is
  ``kept / beta`` (the paper's beta = 20), and average exactly ``kept``.
- **ada** (AdaKV, arXiv 2407.11550): within a layer, the ``Hkv * budget`` entries are shared by the KV heads by
  score: a head whose attention is concentrated needs few entries, a diffuse head gets more. Every head first gets
  a guaranteed ``floor`` share of the layer budget (the paper's safeguard, alpha = 0.2), then the remaining entries
  go to the highest scores over all heads of the layer at once.
- **pyramid-ada**: pyramid layer budgets, each shared across heads as in ada.

The cache keeps one length per row, so a row's storage is as long as its largest (layer, head) budget; shorter
ones leave holes that attention masks (``ponder/cache.py``). Live entries equal the budget, the tensors the
largest share: ``kv_bytes`` reports the tensors. A varlen attention kernel would also free the holes.
"""

from __future__ import annotations

import math

import torch

MODES = ("uniform", "pyramid", "ada", "pyramid-ada")


def layer_budgets(kept: int, n: int, n_layers: int, how: str, beta: float, least: int) -> list[int]:
    """Entries each layer keeps (per KV head, on average over heads) for a row of n prompt tokens and budget
    ``kept``; no layer keeps fewer than ``least`` (the forced sinks and window) or more than n. Sums to
    ``n_layers * kept`` exactly."""
    if not how.startswith("pyramid") or n_layers == 1:
        return [kept] * n_layers
    top = max(kept / beta, least)
    bottom = 2 * kept - top
    if bottom > n:  # a light compression: the bottom layers keep everything, the top as much as the mean needs
        bottom, top = n, 2 * kept - n
    exact = [bottom + (top - bottom) * i / (n_layers - 1) for i in range(n_layers)]
    out = [math.floor(x) for x in exact]
    short = n_layers * kept - sum(out)
    for i in sorted(range(n_layers), key=lambda i: out[i] - exact[i])[:short]:  # largest remainders round up
        out[i] += 1
    return out


def head_counts(scores: torch.Tensor, budget: int, how: str, floor: float, forced: torch.Tensor) -> torch.Tensor:
    """# [Hkv] entries each KV head of a layer keeps: ``budget`` each (uniform), or ``Hkv * budget`` shared by score
    (ada) with at least ``max(ceil(floor * budget), forced count)`` per head. scores # [Hkv, S]."""
    Hkv, S = scores.shape
    if not how.endswith("ada") or Hkv == 1:
        return torch.full((Hkv,), budget, dtype=torch.long)
    least = min(budget, max(math.ceil(floor * budget), int(forced.sum())))
    ranked = _with_forced(scores, forced).sort(-1, descending=True).values  # [Hkv, S]
    spare = Hkv * (budget - least)
    counts = torch.full((Hkv,), least, dtype=torch.long)
    if spare > 0:
        pool = ranked[:, least:]  # each head's candidates beyond its guaranteed share, best first
        winners = pool.flatten().topk(spare).indices // pool.shape[1]
        counts += torch.bincount(winners, minlength=Hkv).cpu()
    return counts


def keep_counts(scores: torch.Tensor, counts: torch.Tensor, forced: torch.Tensor, width: int) -> torch.Tensor:
    """# [Hkv, width] slots: head h's ``counts[h]`` best (forced first), ascending, then padding (slot 0, which
    the cache marks as a hole). scores # [Hkv, S], width >= counts.max()."""
    idx = _with_forced(scores, forced).topk(width, dim=-1).indices  # [Hkv, width], best first
    beyond = torch.arange(width, device=idx.device)[None, :] >= counts.to(idx.device)[:, None]
    idx = idx.masked_fill(beyond, scores.shape[1]).sort(-1).values  # kept slots ascend, padding sorts last
    return idx.masked_fill(idx == scores.shape[1], 0)


def _with_forced(scores: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    s = scores.float().clone()
    s[:, forced] = float("inf")
    return s
