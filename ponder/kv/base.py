"""KV-cache compression: the policy seam, budgets and the scoring helpers the policies share.

Glossary
- **compression ratio** r: the fraction of a row's prompt KV entries removed (kvpress convention); a row of n
  prompt tokens keeps ``int(n * (1 - r))``. **budget** N: entries kept (``min(n, N)``). Ratio 0 (or a budget at
  least the context) is exactly a no-op: nothing is scored, nothing moves.
- **sinks**: the first tokens, which every head attends to heavily (StreamingLLM); policies keep them.
- **window**: the most recent entries, always kept.
- **cap** and **chunk**: policies that also evict while decoding (streaming, h2o) let a row grow to ``cap + chunk``
  entries and then evict down to ``cap``, so the gather over every layer is paid once per ``chunk`` tokens. With
  speculative decoding the engine drafts no further than the next eviction point, so evictions happen at the same
  lengths and the policy decides on the same scores as without speculation (lossless relative to the policy).
- **GQA pooling**: scores of the query heads that share a KV head are pooled into one score per KV head; a KV
  head keeps one set of entries, K/V are never duplicated per query head.

Hooks (``../shared/DESIGN.md``): after prefill a policy may compress the row (``compress``); during every forward a
``KVHook`` sees each layer's queries and keys (``observe``); after a step it may evict (``after_step``).
Compression moves kept entries to the front of smaller tensors: the batch cache is allocated at the compressed
size, so memory and attention time shrink, not just a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ponder.cache import KVCache


@dataclass(frozen=True)
class KVOptions:
    """What every policy takes: how much to remove (``ratio``) or keep (``budget``)."""

    ratio: float = 0.0
    budget: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (the fraction of entries removed), got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 (entries kept), got {self.budget}")
        if self.budget is not None and self.ratio > 0:
            raise ValueError("give either ratio or budget, not both")

    def kept(self, n: int) -> int:
        """Entries a row of n prompt tokens keeps after prefill."""
        if self.budget is not None:
            return min(n, self.budget)
        return max(1, min(n, int(n * (1.0 - self.ratio))))

    def cap(self, n: int) -> int:
        """Entries a decode-time evicting policy keeps a row at (for a prompt of n tokens)."""
        return self.budget if self.budget is not None else self.kept(n)


@dataclass
class KVState:
    """One row's policy state: the decode cap (evicting policies), storage padding and per-layer scores
    # [Hkv, slots] (h2o)."""

    cap: int | None = None
    pad: int = 0  # slots the row's storage holds beyond its budget (holes of uneven per-layer/per-head budgets)
    scores: list[torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class KVHook:
    """Sees every layer's attention inputs during one forward. ``observe`` gets q # [B, T, H, D] (rotated), the
    readable keys # [B, Hkv, S, D] (this step's included) and the step's context (masks, per-row lengths)."""

    def observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, ctx: Any) -> None:
        """Look at the layer's attention inputs (score entries)."""

    def select(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: Any
    ) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """Optionally replace what this layer attends to: (keys, values # [B, Hkv, S', D], a context whose mask and
        lengths describe them). None: attend to everything readable."""
        return None


class KVPolicy:
    """One technique's hyperparameters plus the hooks; per-row run-time state lives in ``KVState``."""

    name = "none"
    evicts_in_decode = False
    observes_decode = False  # its decode hook must see every layer (a drafter's hidden states are not reused)
    speculates = True  # composes with speculative decoding (False: the engine refuses the combination)
    pads = False  # rows may keep more slots than the budget (uneven per-layer/per-head budgets: KVState.pad)

    def __init__(self, options: KVOptions) -> None:
        self.o = options  # each policy narrows the type to its own options dataclass

    @property
    def chunk(self) -> int:
        return int(getattr(self.o, "chunk", 0))

    def is_noop(self, n: int, max_new: int) -> bool:
        """Nothing would ever be removed from a row of n prompt tokens generating ``max_new`` more: ratio 0, or a
        budget covering the prompt (and, for policies that evict while decoding, the whole context)."""
        o = self.o
        if o.budget is None:
            return o.ratio == 0.0
        return o.budget >= n + (max_new if self.evicts_in_decode else 0)

    def slots(self, n: int, max_new: int) -> int:
        """Cache slots a row of n prompt tokens needs for ``max_new`` more tokens."""
        if self.is_noop(n, max_new):
            return n + max_new
        kept = self.o.kept(n)
        if self.evicts_in_decode:
            return min(kept + max_new, max(kept, self.o.cap(n) + self.chunk))
        return kept + max_new

    def new_cache(self, model: Any, batch: int, slots: int, extra: int) -> KVCache:
        """The batch cache: ``slots`` per row for the compressed prompt and new tokens, ``extra`` verify slots."""
        return model.new_cache(batch, slots + extra)

    def prefill_hook(self, n_layers: int, n: int) -> KVHook | None:
        """A hook that collects what ``compress`` needs while the prompt runs (None: nothing to collect)."""
        return None

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        """After prefill of a one-row cache: evict to the budget; return the row's decode state."""
        raise NotImplementedError

    def decode_hook(self, states: list[KVState], cache: KVCache) -> KVHook | None:
        return None

    def after_step(self, cache: KVCache, states: list[KVState], hook: KVHook | None,
                   accepted: list[list[int]] | None = None, starts: list[int] | None = None) -> None:
        """After a forward committed entries (``accepted[b]``: the verify inputs kept, in slot order from
        ``starts[b]``, for speculative steps): evict rows that reached ``cap + chunk``."""

    def room(self, state: KVState, cache: KVCache, b: int) -> int | None:
        """Entries row b may still add before the policy next changes its cache (None: no limit). Speculative
        steps commit no more than this, so the change happens at the same length as without speculation."""
        if not self.evicts_in_decode or state.cap is None:
            return None
        return max(1, state.cap + self.chunk - cache.lengths[b])


# --- scoring helpers --------------------------------------------------------------------------------------------------
def window_probs(q: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """Attention probabilities of the last ``window`` queries of a fresh one-row prefill over all its keys.

    q # [1, T, H, D], keys # [1, Hkv, S=T, D] -> # [Hkv, group, w, S] (causal: query i sees keys up to its slot).
    """
    _, T, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    w = min(window, T)
    qw = q[0, T - w :].transpose(0, 1).reshape(Hkv, H // Hkv * w, D).float()  # [Hkv, g*w, D]
    logits = qw @ keys[0].float().transpose(1, 2) / math.sqrt(D)  # [Hkv, g*w, S]
    logits = logits.view(Hkv, H // Hkv, w, S)
    qslot = torch.arange(S - w, S, device=q.device)[:, None]
    logits = logits.masked_fill(torch.arange(S, device=q.device)[None, :] > qslot, float("-inf"))
    return logits.softmax(-1)


def pool_group(scores: torch.Tensor, how: str) -> torch.Tensor:
    """# [Hkv, group, ..., S] -> # [Hkv, ..., S]: one score per KV head from its query heads."""
    return scores.amax(1) if how == "max" else scores.mean(1)


def smooth(scores: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """Pool # [Hkv, S] along S so neighbours of a high-scoring entry score high too (keeps spans together)."""
    if kernel <= 1:
        return scores
    x = scores[:, None]
    pad = kernel // 2
    if how == "max":
        out = F.max_pool1d(F.pad(x, (pad, kernel - 1 - pad), value=float("-inf")), kernel, stride=1)
    else:
        out = F.avg_pool1d(F.pad(x, (pad, kernel - 1 - pad), mode="replicate"), kernel, stride=1)
    return out[:, 0]


def keep_top(scores: torch.Tensor, n: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Per KV head, the ``n`` slots with the highest scores (``forced`` # [S] bool slots always), ascending.

    scores # [Hkv, S] -> # [Hkv, n] long."""
    s = scores.float().clone()
    if forced is not None:
        s[:, forced] = float("inf")
    idx = s.topk(n, dim=-1).indices
    return idx.sort(-1).values


def forced_slots(S: int, sinks: int, window: int, device: torch.device) -> torch.Tensor:
    """# [S] bool: the first ``sinks`` and the last ``window`` slots."""
    slot = torch.arange(S, device=device)
    return (slot < sinks) | (slot >= S - window)
