"""StreamingLLM (arXiv 2309.17453): keep the attention sinks (the first tokens) and a window of recent entries.

After prefill a row keeps ``sinks`` first entries and the most recent ones up to its budget; while decoding it
grows to ``cap + chunk`` entries and then drops the oldest non-sink entries back to ``cap``. Kept entries keep
their original positions (as kvpress does), rather than the paper's positions re-numbered within the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ponder.cache import KVCache
from ponder.kv.base import KVHook, KVOptions, KVPolicy, KVState


@dataclass(frozen=True)
class StreamingOptions(KVOptions):
    sinks: int = 4
    chunk: int = 32  # decode-time eviction granularity (see ``ponder.kv.base``)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.chunk < 1:
            raise ValueError("sinks must be >= 0 and chunk >= 1")


def sinks_and_recent(cache: KVCache, row: int, kept: int, sinks: int) -> list[torch.Tensor]:
    """Per layer of ``cache`` # [Hkv, kept]: row's slots ``[0, s)`` and its last ``kept - s`` slots (s = sinks, at
    most kept)."""
    n, s = cache.lengths[row], min(sinks, kept)
    idx = torch.cat([torch.arange(s), torch.arange(n - (kept - s), n)]).to(cache.k[0].device)
    return [idx[None].expand(cache.k[0].shape[1], -1) for _ in cache.k]


class Streaming(KVPolicy):
    name = "streaming"
    evicts_in_decode = True

    o: StreamingOptions

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        n = cache.lengths[0]
        kept = self.o.kept(n)
        if kept < n:
            cache.select(0, sinks_and_recent(cache, 0, kept, self.o.sinks))
        return KVState(cap=self.o.cap(n))

    def after_step(self, cache: KVCache, states: list[KVState], hook: KVHook | None,
                   accepted: list[list[int]] | None = None, starts: list[int] | None = None) -> None:
        for b, st in enumerate(states):
            n = cache.lengths[b]
            if st.cap is not None and n >= st.cap + self.o.chunk:
                cache.select(b, sinks_and_recent(cache, b, st.cap, self.o.sinks))
