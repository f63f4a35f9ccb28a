"""Prefix caching: requests that share a prefix (a system prompt, a chat history) reuse its KV instead of
prefilling it again.

After a prompt is prefilled, the engine core stores a copy of its K/V (and the hidden states a drafter captured
during the prefill) as an **entry**. A later prompt that begins with the same tokens copies the matching slots into
its own cache and prefills only the rest (at least its last token, whose logits pick the first output token). The
K/V of position i depend only on tokens 0..i, so the copied entries are what the prompt's own prefill computes, up
to the last bits of floating-point sums over a different number of rows (fp32 output is token-identical except at
near ties of the top two logits, as for speculative verification: docs/speculation.md).

Lookup is by blocks of ``BLOCK`` tokens: each entry registers a chained hash of every block-aligned prefix of its
tokens, so a lookup walks the new prompt's blocks once; the entries holding the deepest hit are checked token by
token (a hash collision never reuses a wrong entry) and extended past the last whole block, and the longest match
wins. Memory is bounded (``max_bytes``);
the least recently used entries go first, and an entry whose tokens are a prefix of a newer one's is dropped
when the newer one arrives (the newer one serves every lookup the older one would).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ponder.cache import KVCache

BLOCK = 16  # tokens per hashed block


@dataclass
class Entry:
    tokens: list[int]
    kv: "KVCache"  # one row holding exactly len(tokens) slots
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> # [len(tokens), E] (drafters' states)
    keys: list[int] = field(default_factory=list)  # its block-prefix hashes
    nbytes: int = 0


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    reused_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    stored: int = 0
    evicted: int = 0


class PrefixCache:
    """Prompts' K/V by prefix, least recently used first out, at most ``max_bytes`` held (module doc)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self.index: dict[int, set[int]] = {}  # block-prefix hash -> ids of the entries holding that prefix
        self.bytes = 0
        self.stats = PrefixStats()
        self._next = 0

    @staticmethod
    def block_keys(tokens: list[int]) -> list[int]:
        """The chained hash of each whole block-aligned prefix of ``tokens``."""
        keys, key = [], 0
        for s in range(0, len(tokens) - BLOCK + 1, BLOCK):
            key = hash((key, tuple(tokens[s : s + BLOCK])))
            keys.append(key)
        return keys

    def lookup(self, tokens: list[int], limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``tokens``, and how many of its slots to reuse (at most
        ``limit``, at least one block; (None, 0) when none does). Marks the entry recently used."""
        self.stats.lookups += 1
        ids: set[int] = set()
        blocks = 0
        for depth, key in enumerate(self.block_keys(tokens[:limit])):
            if key not in self.index:
                break
            ids, blocks = self.index[key], depth + 1
        best, best_n = None, 0
        for eid in ids:
            entry = self.entries[eid]
            n = blocks * BLOCK
            if entry.tokens[:n] != tokens[:n]:  # a hash collision: not this one
                continue
            end = min(limit, len(entry.tokens), len(tokens))
            while n < end and entry.tokens[n] == tokens[n]:
                n += 1
            if n > best_n:
                best, best_n = eid, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        self.stats.hits += 1
        self.stats.reused_tokens += best_n
        return self.entries[best], best_n

    def insert(self, tokens: list[int], kv: "KVCache", hidden: dict[int, torch.Tensor] | None = None) -> None:
        """Store a prompt's K/V (``kv``: one row, its first len(tokens) slots are the prompt's; copied here)."""
        keys = self.block_keys(tokens)
        if not keys:
            return
        n = len(tokens)
        row = _first_slots(kv, n)
        entry = Entry(list(tokens), row, {k: v[:n].clone() for k, v in (hidden or {}).items()}, keys)
        entry.nbytes = row.nbytes() + sum(v.numel() * v.element_size() for v in entry.hidden.values())
        if entry.nbytes > self.max_bytes:
            return
        for eid, old in list(self.entries.items()):  # entries the new one covers
            if len(old.tokens) <= n and old.tokens == tokens[: len(old.tokens)]:
                self._drop(eid)
        while self.bytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.stats.evicted += 1
        eid, self._next = self._next, self._next + 1
        self.entries[eid] = entry
        for key in keys:
            self.index.setdefault(key, set()).add(eid)
        self.bytes += entry.nbytes
        self.stats.stored += 1

    def _drop(self, eid: int) -> None:
        entry = self.entries.pop(eid)
        self.bytes -= entry.nbytes
        for key in entry.keys:
            holders = self.index[key]
            holders.discard(eid)
            if not holders:
                del self.index[key]


def _first_slots(kv: "KVCache", n: int) -> "KVCache":
    """A copy of a one-row cache's first n slots."""
    view = kv.row(0)
    view.lengths = [n]
    return view.trimmed()
