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


def sinks_and_recent(length: int, kept: int, sinks: int, n_layers: int, n_kv: int, device: torch.device) -> list[torch.Tensor]:
    """Per layer # [Hkv, kept]: slots ``[0, s)`` and the last ``kept - s`` slots (s = sinks, at most kept)."""
    s = min(sinks, kept)
    idx = torch.cat([torch.arange(s), torch.arange(length - (kept - s), length)]).to(device)
    return [idx[None].expand(n_kv, -1) for _ in range(n_layers)]


class Streaming(KVPolicy):
    name = "streaming"
    evicts_in_decode = True

    def __init__(self, options: StreamingOptions) -> None:
        super().__init__(options)
        self.o = options

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        n = cache.lengths[0]
        kept = self.o.kept(n)
        if kept < n:
            cache.select(0, sinks_and_recent(n, kept, self.o.sinks, len(cache.k), cache.k[0].shape[1], cache.k[0].device))
        return KVState(cap=self.o.cap(n))

    def after_step(self, cache: KVCache, states: list[KVState], hook: KVHook | None,
                   accepted: list[list[int]] | None = None, starts: list[int] | None = None) -> None:
        for b, st in enumerate(states):
            n = cache.lengths[b]
            if st.cap is not None and n >= st.cap + self.o.chunk:
                cache.select(b, sinks_and_recent(n, st.cap, self.o.sinks, len(cache.k), cache.k[0].shape[1],
                                                 cache.k[0].device))
