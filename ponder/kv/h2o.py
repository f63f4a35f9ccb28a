"""H2O, heavy-hitter oracle (arXiv 2306.14048): keep the entries that received the most attention, plus a window
of recent ones.

A key's score is the attention it received, accumulated over every query that saw it: all prompt queries at
prefill, then each decoded token's. Scores are per KV head (pooled over its query heads), so each KV head keeps
its own heavy hitters. While decoding a row grows to ``cap + chunk`` entries and is then evicted back to ``cap``.
With speculative decoding only the queries of accepted tokens add to the scores, as they would without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ponder.cache import KVCache
from ponder.kv.base import KVHook, KVOptions, KVPolicy, KVState, forced_slots, keep_top, pool_group


@dataclass(frozen=True)
class H2OOptions(KVOptions):
    recent: float = 0.5  # share of the kept entries reserved for the most recent tokens
    sinks: int = 0
    gqa: str = "mean"  # how a KV head's query heads combine: mean | max
    chunk: int = 32  # decode-time eviction granularity (see ``ponder.kv.base``)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0 or self.sinks < 0 or self.chunk < 1 or self.gqa not in ("mean", "max"):
            raise ValueError("recent must be in [0, 1], sinks >= 0, chunk >= 1, gqa mean or max")


def _probs(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """q # [B, T, H, D] over keys # [B, Hkv, S, D] -> probabilities # [B, Hkv, g, T, S] (visible # [B, T, S])."""
    B, T, H, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    qh = q.permute(0, 2, 1, 3).reshape(B, Hkv, H // Hkv * T, D).float()
    logits = (qh @ keys.float().transpose(2, 3) / math.sqrt(D)).view(B, Hkv, H // Hkv, T, S)
    if visible is not None:
        logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    return logits.softmax(-1)


class PromptAttention(KVHook):
    """Per layer, the attention each prompt key received from all prompt queries # [Hkv, S] (one row, causal)."""

    def __init__(self, gqa: str, block: int = 256) -> None:
        self.gqa, self.block = gqa, block
        self.scores: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, ctx: object) -> None:
        T, S = q.shape[1], keys.shape[2]
        total = torch.zeros(keys.shape[1], S, device=keys.device)
        for s in range(0, T, self.block):  # query blocks bound the memory of the [Hkv, g, block, S] probabilities
            e = min(T, s + self.block)
            queries = torch.arange(S - T + s, S - T + e, device=q.device)
            visible = torch.arange(S, device=q.device)[None, :] <= queries[:, None]
            total += pool_group(_probs(q[:, s:e], keys, visible[None])[0].sum(2), self.gqa)
        self.scores[layer] = total


class StepAttention(KVHook):
    """Per layer, this step's attention probabilities # [B, Hkv, T, S], pooled over query heads."""

    def __init__(self, gqa: str) -> None:
        self.gqa = gqa
        self.probs: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, ctx: object) -> None:
        B, T, S = q.shape[0], q.shape[1], keys.shape[2]
        visible = None
        if getattr(ctx, "mask", None) is not None:
            visible = ctx.mask[:, 0].expand(B, T, S)
        elif getattr(ctx, "row_read", None) is not None:
            read = torch.tensor(ctx.row_read, device=q.device)
            visible = (torch.arange(S, device=q.device)[None, :] < read[:, None])[:, None].expand(B, T, S)
        self.probs[layer] = pool_group(_probs(q, keys, visible), self.gqa)


class H2O(KVPolicy):
    name = "h2o"
    evicts_in_decode = True
    observes_decode = True

    o: H2OOptions

    def prefill_hook(self, n_layers: int, n: int) -> KVHook | None:
        return PromptAttention(self.o.gqa)

    def _keep(self, scores: list[torch.Tensor], length: int, kept: int) -> list[torch.Tensor]:
        recent = min(kept, round(self.o.recent * kept))
        forced = forced_slots(length, min(self.o.sinks, kept - recent), recent, scores[0].device)
        return [keep_top(s[:, :length], kept, forced) for s in scores]

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        assert isinstance(hook, PromptAttention)
        n = cache.lengths[0]
        kept = self.o.kept(n)
        scores = [hook.scores[layer] for layer in range(len(cache.k))]
        if kept < n:
            keep = self._keep(scores, n, kept)
            cache.select(0, keep)
            scores = [s.gather(1, k) for s, k in zip(scores, keep)]
        return KVState(cap=self.o.cap(n), scores=scores)

    def decode_hook(self, states: list[KVState], cache: KVCache) -> KVHook | None:
        return StepAttention(self.o.gqa)

    def after_step(self, cache: KVCache, states: list[KVState], hook: KVHook | None,
                   accepted: list[list[int]] | None = None, starts: list[int] | None = None) -> None:
        assert isinstance(hook, StepAttention)
        for b, st in enumerate(states):
            inputs = accepted[b] if accepted is not None else [0]
            start = starts[b] if starts is not None else cache.lengths[b] - 1
            self._accumulate(st, b, hook, inputs, start)
            n = cache.lengths[b]
            if n >= st.cap + self.o.chunk:
                keep = self._keep(st.scores, n, st.cap)
                cache.select(b, keep)
                st.scores = [s[:, :n].gather(1, k) for s, k in zip(st.scores, keep)]

    @staticmethod
    def _accumulate(st: KVState, b: int, hook: StepAttention, inputs: list[int], start: int) -> None:
        """Add the committed queries' attention to the row's scores; the new entries (verify inputs ``inputs``,
        now packed at slots ``start...``) get their first scores."""
        cols = start + torch.tensor(inputs, device=st.scores[0].device)
        for layer, s in enumerate(st.scores):
            a = hook.probs[layer][b][:, inputs].sum(1)  # [Hkv, S]
            st.scores[layer] = torch.cat([s + a[:, :start], a[:, cols]], 1)  # s # [Hkv, start]: the row's entries
