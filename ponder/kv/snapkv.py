"""SnapKV (arXiv 2404.14469): after prefill, keep per KV head the entries the prompt's last queries attend to.

The queries of an observation window at the end of the prompt (for a question asked after a document: the
question itself) vote for keys; votes are summed over the window, pooled over the query heads that share a KV
head, smoothed along the sequence so a selected entry brings its neighbours, and each KV head keeps its own
top entries plus the window. Decoding then appends to the compressed cache.

``alloc`` spreads the budget unevenly over layers (``pyramid``, PyramidKV 2406.02069) and KV heads (``ada``,
AdaKV 2407.11550): see ``ponder/kv/alloc.py``.

Options beyond the paper's (``gqa``, ``pool``, ``sinks``) exist because a 135M model's attention is diffuse: see
docs/kv.md for what each changes on needle-in-a-haystack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ponder.cache import KVCache
from ponder.kv import alloc
from ponder.kv.base import KVHook, KVOptions, KVPolicy, KVState, forced_slots, keep_top, pool_group, smooth, window_probs


@dataclass(frozen=True)
class SnapKVOptions(KVOptions):
    window: int = 32  # observation window: the last prompt tokens, whose queries vote (and which are kept)
    kernel: int = 31  # pooling width along the sequence: wide enough to keep a multi-token answer (a number) whole
    pool: str = "max"  # max | avg
    gqa: str = "max"  # how a KV head's query heads combine: max | mean
    sinks: int = 4  # first tokens always kept
    alloc: str = "uniform"  # budget across layers and heads: uniform | pyramid | ada | pyramid-ada
    beta: float = 20.0  # pyramid: the top layer keeps budget / beta
    floor: float = 0.2  # ada: every head keeps at least this share of its layer's per-head budget

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alloc not in alloc.MODES:
            raise ValueError(f"alloc must be one of {', '.join(alloc.MODES)}, got {self.alloc!r}")
        if self.beta < 1 or not 0 <= self.floor <= 1:
            raise ValueError("beta must be >= 1 and floor in [0, 1]")
        if self.window < 1 or self.kernel < 1 or self.sinks < 0:
            raise ValueError("window and kernel must be >= 1, sinks >= 0")
        if self.pool not in ("max", "avg") or self.gqa not in ("max", "mean"):
            raise ValueError("pool must be max or avg, gqa max or mean")


class WindowVotes(KVHook):
    """Per layer, the observation window's attention summed over its queries and pooled per KV head."""

    def __init__(self, window: int, gqa: str) -> None:
        self.window, self.gqa = window, gqa
        self.scores: dict[int, torch.Tensor] = {}  # layer -> # [Hkv, S]

    def observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, ctx: object) -> None:
        probs = window_probs(q, keys, self.window)  # [Hkv, g, w, S]
        self.scores[layer] = pool_group(probs.sum(2), self.gqa)


class SnapKV(KVPolicy):
    name = "snapkv"

    o: SnapKVOptions

    @property
    def pads(self) -> bool:  # type: ignore[override]
        return self.o.alloc != "uniform"

    def prefill_hook(self, n_layers: int, n: int) -> KVHook | None:
        return WindowVotes(self.o.window, self.o.gqa)

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        n = cache.lengths[0]
        kept = self.o.kept(n)
        if kept >= n:
            return KVState()
        assert isinstance(hook, WindowVotes)
        window = min(self.o.window, kept)
        forced = forced_slots(n, min(self.o.sinks, kept - window), window, cache.k[0].device)
        scores = [smooth(hook.scores[layer][:, :n], self.o.kernel, self.o.pool) for layer in range(len(cache.k))]
        if self.o.alloc == "uniform":
            cache.select(0, [keep_top(s, kept, forced) for s in scores])
            return KVState()
        budgets = alloc.layer_budgets(kept, n, len(scores), self.o.alloc, self.o.beta, int(forced.sum()))
        counts = [alloc.head_counts(s, b, self.o.alloc, self.o.floor, forced) for s, b in zip(scores, budgets)]
        width = max(int(c.max()) for c in counts)
        cache.select(0, [alloc.keep_counts(s, c, forced, width) for s, c in zip(scores, counts)], counts)
        return KVState(pad=width - kept)
