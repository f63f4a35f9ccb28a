"""TokenSelect (arXiv 2411.02886): per decode step, each KV head attends only to the entries its queries score
highest; nothing is evicted.

Per layer and KV head, every query head of the group scores all readable keys (q.k), turns its scores into a
softmax, and the heads vote by summing them (soft voting), so one head's sharp preference is not drowned by
another's flat scores. The top entries (``ratio`` of them skipped, or ``budget`` kept), the first ``sinks`` and the
``window`` most recent are gathered into smaller K/V tensors that attention reads. While consecutive queries stay
similar (cosine >= ``reuse``, averaged over the query heads) the previous step's choice of older entries is
reused and the scoring is skipped (the paper's selection cache).

What it saves is attention reads, not memory: the cache stays whole, which is why a question asked after the
document can still find what prefill-time eviction would have dropped.
It selects per decode query, so it does not compose with speculative decoding (the engine says so).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ponder.cache import KVCache
from ponder.kv.base import KVHook, KVOptions, KVPolicy, KVState


@dataclass(frozen=True)
class TokenSelectOptions(KVOptions):
    sinks: int = 4
    window: int = 32  # most recent entries, always attended
    reuse: float = 0.9  # reuse the previous selection while cos(q_t, q_{t-1}) >= reuse (> 1 never reuses)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 1 or self.reuse < -1:
            raise ValueError("sinks must be >= 0, window >= 1, reuse >= -1")


class Selector(KVHook):
    """The batch's per-step selection; remembers, per layer, the last query and selection of every row."""

    def __init__(self, o: TokenSelectOptions, states: list[KVState]) -> None:
        self.o, self.states = o, states

    def select(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: Any):
        B, T, H, D = q.shape
        if T != 1:
            return None
        valid = ctx.row_read or [ctx.read_len] * B
        kept = [self.o.kept(n) for n in valid]
        if all(k >= n for k, n in zip(kept, valid)):
            return None
        idx = torch.zeros(B, keys.shape[1], max(kept), dtype=torch.long, device=keys.device)
        mask = torch.zeros(B, 1, 1, max(kept), dtype=torch.bool, device=keys.device)
        for b in range(B):
            sel = self._row(layer, b, q[b, 0], keys[b], valid[b], kept[b])  # [Hkv, kept_b]
            idx[b, :, : sel.shape[1]] = sel
            mask[b, ..., : sel.shape[1]] = True
        gather = idx[..., None].expand(-1, -1, -1, D)
        ctx = dataclasses.replace(ctx, mask=mask, row_read=None, read_len=idx.shape[2], prefix=None)
        return keys.gather(2, gather), values.gather(2, gather), ctx

    def _row(self, layer: int, b: int, q: torch.Tensor, keys: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Slots one row's KV heads attend to: q # [H, D], keys # [Hkv, S, D] (n valid) -> # [Hkv, k] ascending."""
        if k >= n:
            return torch.arange(n, device=keys.device)[None].expand(keys.shape[0], -1)
        st = self.states[b].extra
        local = min(n, self.o.window)
        sinks = min(self.o.sinks, n - local)
        free = k - local - sinks
        prev_q, prev_sel = st.get(("q", layer)), st.get(("sel", layer))
        older = None
        if prev_q is not None and prev_sel is not None and prev_sel.shape[1] == free:
            cos = torch.nn.functional.cosine_similarity(q.float(), prev_q, dim=-1).mean()
            if cos >= self.o.reuse:
                older = prev_sel
        if older is None:
            older = self._vote(q, keys, n, sinks, n - local, free)
        st[("q", layer)], st[("sel", layer)] = q.float(), older
        head = torch.arange(sinks, device=keys.device)[None].expand(keys.shape[0], -1)
        tail = torch.arange(n - local, n, device=keys.device)[None].expand(keys.shape[0], -1)
        return torch.cat([head, older, tail], 1)

    @staticmethod
    def _vote(q: torch.Tensor, keys: torch.Tensor, n: int, lo: int, hi: int, free: int) -> torch.Tensor:
        """Soft voting: per KV head, the ``free`` slots in ``[lo, hi)`` with the largest summed softmax over its
        query heads. -> # [Hkv, free] ascending."""
        Hkv, D = keys.shape[0], keys.shape[2]
        qg = q.view(Hkv, -1, D).float()  # [Hkv, g, D]
        probs = (qg @ keys[:, :n].float().transpose(1, 2) / math.sqrt(D)).softmax(-1)  # [Hkv, g, n]
        votes = probs.sum(1)[:, lo:hi]
        return (votes.topk(free, dim=-1).indices + lo).sort(-1).values


class TokenSelect(KVPolicy):
    name = "tokenselect"
    speculates = False

    o: TokenSelectOptions

    def is_noop(self, n: int, max_new: int) -> bool:
        o = self.o
        return o.ratio == 0.0 if o.budget is None else o.budget >= n + max_new

    def slots(self, n: int, max_new: int) -> int:
        return n + max_new  # nothing is evicted

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        return KVState()

    def decode_hook(self, states: list[KVState], cache: KVCache) -> KVHook | None:
        return Selector(self.o, states)
