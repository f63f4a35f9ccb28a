"""KV cache: preallocated per-layer tensors with per-row lengths.

Glossary
- **slot**: an index along the cache's sequence axis. Row b's token at position p lives in slot p, so a row's
  valid entries are slots ``[0, lengths[b])`` and ragged rows simply have different lengths.
- **rollback**: lowering a row's length; entries past it are dead and are overwritten by the next write,
  so the cache never serves a stale entry (attention masks everything at or past the row's length).
- **compaction**: after a draft tree is verified, moving the accepted path's entries (scattered over the tree's
  slots) to consecutive slots right after the row's prefix, then rolling back the rest.
- **eviction** (KV-cache compression, ``ponder/kv``): ``select`` keeps, per layer and KV head, chosen slots of a
  row and packs them to the front. Keys carry their rotary position already, so a kept entry keeps its position;
  ``evicted[b]`` counts the entries row b dropped, and its next token's position is ``lengths[b] + evicted[b]``.
  Different KV heads may keep different tokens. When layers or heads keep different numbers (budget allocation,
  ``snapkv:alloc=pyramid|ada``), a row's storage is as long as its largest (layer, head) and the shorter ones
  have **holes**: ``holes[layer][b, h, s]`` marks slots head h of that layer does not hold, which attention masks.
  Holes only ever lie before the row's first decoded token, so appends, rollback and compaction never meet them.
- **capacity** (continuous batching): ``extend(other, capacity=C)`` keeps the rows in a store of up to C rows, so
  a row joining writes only its own slots, and ``keep_rows_unordered`` fills a finished row's place with the last
  row (one row copied) instead of copying every row into new tensors; ``k``/``v`` are views of the store's first
  ``batch`` rows. Without it, a server batch of 16 rows with ~60 MB of K/V each copied ~1 GB at every finish and
  every join.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V for every layer, each # [B, Hkv, S_max, D]; ``lengths[b]`` valid slots per row (host ints)."""

    store: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (K, V) # [C, Hkv, S_max, D] (capacity)

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths: list[int] = [0] * batch
        self.evicted: list[int] = [0] * batch
        self.max_len = max_len
        self.holes: list[torch.Tensor] | None = None  # per layer # [B, Hkv, S_max] bool, made by the first select

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def dtype(self) -> torch.dtype:
        """What attention reads (K/V are stored, or dequantized, in this dtype)."""
        return self.k[0].dtype

    def nbytes(self) -> int:
        """Bytes held by the preallocated tensors (hole masks included; a store's spare rows too)."""
        kv = self.store[0] + self.store[1] if self.store is not None else self.k + self.v
        return sum(t.numel() * t.element_size() for t in kv + (self.holes or []))

    @property
    def positions(self) -> list[int]:
        """Per row, the position of the next token (tokens seen so far, evicted ones included)."""
        return [n + e for n, e in zip(self.lengths, self.evicted)]

    def select(self, row: int, keep: list[torch.Tensor], counts: list[torch.Tensor] | None = None) -> None:
        """Keep, in every layer l, the slots ``keep[l]`` # [Hkv, n] of ``row`` (one list per KV head) and pack them
        into slots ``[0, n)``; the rest is evicted. Each head's list should ascend (it keeps the order of time).
        With ``counts[l]`` # [Hkv], head h of layer l keeps only the first ``counts[l][h]`` of its list: the rest of
        its n slots become holes."""
        n = keep[0].shape[1]
        if n > self.lengths[row] or any(k.shape != keep[0].shape for k in keep):
            raise ValueError(f"row {row}: cannot keep {n} of {self.lengths[row]} slots (same count in every layer)")
        for layer, idx in enumerate(keep):
            for t in (self.k[layer], self.v[layer]):
                gathered = t[row].gather(1, idx[:, :, None].expand(-1, -1, t.shape[3]))  # [Hkv, n, D]
                t[row, :, :n] = gathered
        if counts is not None and any(bool((c < n).any()) for c in counts):
            self._ensure_holes()
            slot = torch.arange(self.max_len, device=self.k[0].device)
            for hole, c in zip(self.holes, counts):
                hole[row] = (slot[None, :] >= c.to(slot.device)[:, None]) & (slot[None, :] < n)
        elif self.holes is not None:
            for hole in self.holes:
                hole[row] = False
        self.evicted[row] += self.lengths[row] - n
        self.lengths[row] = n

    def _ensure_holes(self) -> None:
        """Allocate the (empty) hole masks the first time a row needs them."""
        if self.holes is None:
            self.holes = [torch.zeros(t.shape[:3], dtype=torch.bool, device=t.device) for t in self.k]

    def hole_mask(self, layer: int, read_len: int) -> torch.Tensor | None:
        """# [B, Hkv, read_len] bool, True where a KV head holds no entry (None: the cache has no holes)."""
        return None if self.holes is None else self.holes[layer][:, :, :read_len]

    def trimmed(self) -> "KVCache":
        """A copy whose sequence axis is just as long as its longest row (to hold a compressed row compactly)."""
        n = max(max(self.lengths), 1)
        out = KVCache.__new__(KVCache)
        out.k = [t[:, :, :n].clone() for t in self.k]
        out.v = [t[:, :, :n].clone() for t in self.v]
        out.holes = None if self.holes is None else [h[:, :, :n].clone() for h in self.holes]
        out.lengths, out.evicted, out.max_len = list(self.lengths), list(self.evicted), n
        return out

    def copy_row(self, b: int, src: "KVCache", src_row: int = 0) -> None:
        """Make row b a copy of ``src``'s row ``src_row`` (contents, length and evicted count)."""
        n = src.lengths[src_row]
        if n > self.max_len:
            raise ValueError(f"row of {n} slots does not fit a cache of {self.max_len}")
        for dst, s in zip(self.k + self.v, src.k + src.v):
            dst[b, :, :n] = s[src_row, :, :n]
        if src.holes is not None:
            self._ensure_holes()
        for layer, hole in enumerate(self.holes or []):
            hole[b] = False
            if src.holes is not None:
                hole[b, :, :n] = src.holes[layer][src_row, :, :n]
        self.lengths[b], self.evicted[b] = n, src.evicted[src_row]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, write_start: int | None, slots: torch.Tensor | None,
        read_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v # [B, T, Hkv, D] at slots ``write_start + t`` (all rows) or ``slots`` # [B, T] (ragged rows);
        return the readable K, V # [B, Hkv, read_len, D]."""
        kc, vc = self.k[layer], self.v[layer]
        if write_start is not None:
            s, e = write_start, write_start + k.shape[1]
            kc[:, :, s:e] = k.transpose(1, 2)
            vc[:, :, s:e] = v.transpose(1, 2)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)
            kc[rows, :, slots] = k
            vc[rows, :, slots] = v
        return kc[:, :, :read_len], vc[:, :, :read_len]

    def advance(self, n_new: list[int]) -> None:
        """Mark ``n_new[b]`` more slots of row b as valid (after a forward wrote them)."""
        self.lengths = [n + m for n, m in zip(self.lengths, n_new)]

    def truncate(self, row: int, length: int) -> None:
        """Roll row back to ``length`` valid slots."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def compact(self, row: int, start: int, keep: list[int]) -> None:
        """Move row's slots ``start + keep[j]`` to ``start + j`` in every layer and set its length to
        ``start + len(keep)``. ``keep`` ascends, so no entry is overwritten before it is read."""
        if keep != list(range(len(keep))):
            src = torch.tensor([start + k for k in keep], device=self.k[0].device)
            n = len(keep)
            for t in self.k + self.v:
                t[row, :, start : start + n] = t[row].index_select(1, src)
        self.set_length(row, start + len(keep))

    def ensure(self, max_len: int) -> None:
        """Grow the preallocated sequence axis to at least ``max_len`` slots (doubling), keeping the contents."""
        if max_len > self.max_len:
            self._grow(max(max_len, 2 * self.max_len))

    def reserve(self, max_len: int) -> None:
        """Grow the sequence axis to exactly ``max_len`` slots if it is shorter (no doubling), keeping the contents."""
        self._grow(max_len)

    def _grow(self, new: int) -> None:
        """Make the sequence axis exactly ``new`` slots long (>= the current length), keeping the contents."""
        if new <= self.max_len:
            return
        grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], new - t.shape[2], *t.shape[3:])], dim=2)  # noqa: E731
        if self.store is not None:
            self.store = ([grow(t) for t in self.store[0]], [grow(t) for t in self.store[1]])
            self._views()
        else:
            self.k = [grow(t) for t in self.k]
            self.v = [grow(t) for t in self.v]
        if self.holes is not None:
            self.holes = [grow(h) for h in self.holes]
        self.max_len = new

    def extend(self, other: "KVCache", capacity: int | None = None) -> None:
        """Append ``other``'s rows after this cache's (continuous batching: rows admitted while others decode).
        Both grow to the longer sequence axis. With ``capacity`` (the most rows the batch will hold) the rows live
        in a store of that many rows (module doc): only ``other``'s rows are copied; without it, everything is
        copied once into new tensors."""
        n = max(self.max_len, other.max_len)
        self._grow(n)
        other._grow(n)
        m = self.batch + other.batch
        if capacity is not None and self.holes is None and other.holes is None and type(self) is KVCache:
            if self.store is None or self.store[0][0].shape[0] < m:
                cap = max(capacity, m)
                store = ([t.new_empty(cap, *t.shape[1:]) for t in self.k],
                         [t.new_empty(cap, *t.shape[1:]) for t in self.v])
                for dst, src in zip(store[0] + store[1], self.k + self.v):
                    dst[: self.batch] = src
                self.store = store
            for dst, src in zip(self.store[0] + self.store[1], other.k + other.v):
                dst[self.batch : m] = src
            self.lengths = self.lengths + other.lengths
            self.evicted = self.evicted + other.evicted
            self._views()
            return
        self.store = None
        if self.holes is not None or other.holes is not None:
            self._ensure_holes()
            other._ensure_holes()
        self.k = [torch.cat([a, b]) for a, b in zip(self.k, other.k)]
        self.v = [torch.cat([a, b]) for a, b in zip(self.v, other.v)]
        if self.holes is not None:
            self.holes = [torch.cat([a, b]) for a, b in zip(self.holes, other.holes)]
        self.lengths = self.lengths + other.lengths
        self.evicted = self.evicted + other.evicted

    def _views(self) -> None:
        """``k``/``v`` as the store's first ``batch`` rows."""
        b = self.batch
        self.k = [t[:b] for t in self.store[0]]
        self.v = [t[:b] for t in self.store[1]]

    def keep_rows_unordered(self, rows: list[int]) -> list[int]:
        """Drop every row not in ``rows``, in whatever order is cheapest; returns the kept rows' old indices in
        their new order. In a store (module doc) each dropped row's place below the new batch size takes one of
        the last rows (only the moved rows' valid slots are copied); otherwise the order is kept (``keep_rows``)."""
        if self.store is None or self.holes is not None:
            self.keep_rows(rows)
            return list(rows)
        n = len(rows)
        order = list(range(self.batch))
        holes = sorted(set(range(n)) - set(rows))
        movers = [r for r in rows if r >= n]
        with torch.inference_mode(self.store[0][0].is_inference()):  # in-place writes keep the store's mode
            for hole, r in zip(holes, movers):
                used = self.lengths[r]
                for t in self.store[0] + self.store[1]:
                    t[hole, :, :used] = t[r, :, :used]
                order[hole] = r
        order = order[:n]
        self.lengths = [self.lengths[r] for r in order]
        self.evicted = [self.evicted[r] for r in order]
        self._views()
        return order

    def row(self, b: int) -> "KVCache":
        """A one-row cache sharing row b's storage: a forward on it writes into this cache. Its length is its own;
        copy it back with ``set_length`` after the forward."""
        view = KVCache.__new__(KVCache)
        view.k = [t[b : b + 1] for t in self.k]
        view.v = [t[b : b + 1] for t in self.v]
        view.holes = None if self.holes is None else [h[b : b + 1] for h in self.holes]
        view.lengths = [self.lengths[b]]
        view.evicted = [self.evicted[b]]
        view.max_len = self.max_len
        return view

    def set_length(self, b: int, length: int) -> None:
        """Declare row b's first ``length`` slots valid (after a forward through ``row(b)`` wrote them)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"row {b}: length {length} outside [0, {self.max_len}]")
        self.lengths[b] = length

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences), keeping order."""
        if rows == list(range(self.batch)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.k[0].device)
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.store = None
        if self.holes is not None:
            self.holes = [h.index_select(0, index) for h in self.holes]
        self.lengths = [self.lengths[r] for r in rows]
        self.evicted = [self.evicted[r] for r in rows]
