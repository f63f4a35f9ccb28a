"""KV-cache quantization, KIVI style (arXiv 2402.02750): int8 or int4 codes, keys per channel, values per token,
the most recent entries in full precision.

Keys have outlier channels, so a key's scale and zero point are shared per channel over a group of ``group``
consecutive tokens; values are quantized per token. New entries land in a full-precision residual; once it holds
``residual + group`` entries, its oldest ``group`` are quantized. Asymmetric min-max quantization with
``2**bits - 1`` steps: every dequantized element is within half a step, ``(max - min) / (2 * (2**bits - 1))`` of
its group (keys) or token (values), of the original (``test_kv.py`` checks this bound).

Bytes (``nbytes``, exact): codes (1 byte per element for int8, half for int4, packed two per byte), a float scale
and zero per key group and channel and per value token, plus the residual. Attention dequantizes into a
temporary full-precision tensor per layer: memory shrinks, decoding gets slower on CPU (no fused kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ponder.cache import KVCache
from ponder.kv.base import KVHook, KVOptions, KVPolicy, KVState


@dataclass(frozen=True)
class QuantOptions(KVOptions):
    bits: int = 8  # 8 or 4
    group: int = 32  # tokens sharing a key scale per channel
    residual: int = 32  # most recent entries kept in full precision (at least)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (4, 8) or self.group < 1 or self.residual < 0:
            raise ValueError("bits must be 8 or 4, group >= 1, residual >= 0")
        if self.ratio or self.budget is not None:
            raise ValueError("quant keeps every entry: it takes bits, group and residual, not ratio or budget")


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max codes of x along ``dim`` -> (uint8 codes shaped like x, scale, zero) with
    ``x ~= codes * scale + zero``."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    codes = ((x - lo) / scale).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis (even index in the low nibble)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


class QuantKVCache(KVCache):
    """Per layer: codes # [B, Hkv, S_max, D or D/2], key scale/zero # [B, Hkv, S_max/group, D], value scale/zero
    # [B, Hkv, S_max, 1], and a full-precision residual # [B, Hkv, W, D] holding row b's slots from ``base[b]``
    (the quantized prefix, a multiple of ``group``) on."""

    def __init__(self, n_layers: int, batch: int, n_kv: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, o: QuantOptions, extra: int) -> None:
        if o.bits == 4 and head_dim % 2:
            raise ValueError("int4 KV needs an even head dimension")
        self.o, self.head_dim = o, head_dim  # self.dtype: the residual's (KVCache.dtype)
        self.max_len = -(-max_len // o.group) * o.group
        self.width = o.residual + o.group + extra + 1  # residual slots: the window, a group to flush, a step's writes
        d = head_dim // 2 if o.bits == 4 else head_dim
        g = self.max_len // o.group
        z = lambda *shape, dt=dtype: [torch.zeros(shape, dtype=dt, device=device) for _ in range(n_layers)]  # noqa: E731
        self.kc, self.vc = z(batch, n_kv, self.max_len, d, dt=torch.uint8), z(batch, n_kv, self.max_len, d, dt=torch.uint8)
        self.ks, self.kz = z(batch, n_kv, g, head_dim), z(batch, n_kv, g, head_dim)
        self.vs, self.vz = z(batch, n_kv, self.max_len, 1), z(batch, n_kv, self.max_len, 1)
        self.k, self.v = z(batch, n_kv, self.width, head_dim), z(batch, n_kv, self.width, head_dim)  # the residual
        self.lengths, self.evicted, self.base = [0] * batch, [0] * batch, [0] * batch
        self.holes = None  # quantization keeps every entry: no holes

    def _tensors(self) -> list[torch.Tensor]:
        return self.kc + self.vc + self.ks + self.kz + self.vs + self.vz + self.k + self.v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    # --- writing and reading ----------------------------------------------------------------------------------------
    def write(self, layer, k, v, write_start, slots, read_len):
        B, T = k.shape[:2]
        if slots is None:
            slots = torch.arange(write_start, write_start + T, device=k.device)[None].expand(B, T)
        idx = slots - torch.tensor(self.base, device=k.device)[:, None]  # residual index of each new token
        if int(idx.max()) >= self.width or int(idx.min()) < 0:
            raise ValueError("quantized KV cache: a write falls outside the full-precision residual")
        rows = torch.arange(B, device=k.device)[:, None].expand(B, T)
        self.k[layer][rows, :, idx] = k
        self.v[layer][rows, :, idx] = v
        return self._read(layer, read_len)

    def _read(self, layer: int, read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K, V # [B, Hkv, read_len, D]: dequantized prefix, then each row's residual."""
        B, H = self.k[layer].shape[:2]
        q = min(max(self.base), read_len)
        # zeros, not empty: a masked slot still meets the attention matmul, and 0 * NaN garbage would be NaN
        keys = torch.zeros(B, H, read_len, self.head_dim, dtype=self.dtype, device=self.k[layer].device)
        values = torch.zeros_like(keys)
        if q:
            keys[:, :, :q], values[:, :, :q] = self._dequant(layer, slice(None), 0, q)
        for b in range(B):
            n = min(self.width, read_len - self.base[b])
            if n > 0:
                keys[b, :, self.base[b] : self.base[b] + n] = self.k[layer][b, :, :n]
                values[b, :, self.base[b] : self.base[b] + n] = self.v[layer][b, :, :n]
        return keys, values

    def _dequant(self, layer: int, rows: slice | int, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [s, e) (multiples of the group) of the codes, dequantized -> K, V # [..., Hkv, e - s, D]."""
        G, unpack = self.o.group, (unpack4 if self.o.bits == 4 else (lambda c: c))
        kc, vc = unpack(self.kc[layer][rows][..., s:e, :]), unpack(self.vc[layer][rows][..., s:e, :])
        shape = kc.shape[:-2] + ((e - s) // G, G, self.head_dim)
        ks, kz = self.ks[layer][rows][..., s // G : e // G, None, :], self.kz[layer][rows][..., s // G : e // G, None, :]
        keys = (kc.view(shape).to(self.dtype) * ks + kz).flatten(-3, -2)
        values = vc.to(self.dtype) * self.vs[layer][rows][..., s:e, :] + self.vz[layer][rows][..., s:e, :]
        return keys, values

    # --- moving entries from the residual into codes -----------------------------------------------------------------
    def flush(self) -> None:
        """Quantize, per row, the oldest residual groups beyond the full-precision window."""
        G = self.o.group
        for b in range(self.batch):
            while self.lengths[b] - self.base[b] >= self.o.residual + G:
                for layer in range(len(self.k)):
                    self._store(layer, b, self.base[b], self.k[layer][b, :, :G], self.v[layer][b, :, :G])
                    for t in (self.k[layer], self.v[layer]):
                        t[b, :, : self.width - G] = t[b, :, G:].clone()
                self.base[b] += G

    def _store(self, layer: int, b: int, s: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v # [Hkv, n, D] (n a multiple of the group) into row b's slots [s, s + n)."""
        G, H, n, D = self.o.group, k.shape[0], k.shape[1], k.shape[2]
        kc, ks, kz = quantize(k.float().view(H, n // G, G, D), self.o.bits, dim=2)  # per channel over a group
        vc, vs, vz = quantize(v.float(), self.o.bits, dim=-1)  # per token
        kc, vc = kc.view(H, n, D), vc
        if self.o.bits == 4:
            kc, vc = pack4(kc), pack4(vc)
        self.kc[layer][b, :, s : s + n], self.vc[layer][b, :, s : s + n] = kc, vc
        self.ks[layer][b, :, s // G : (s + n) // G], self.kz[layer][b, :, s // G : (s + n) // G] = ks[:, :, 0], kz[:, :, 0]
        self.vs[layer][b, :, s : s + n], self.vz[layer][b, :, s : s + n] = vs, vz

    # --- the rest of the cache interface -----------------------------------------------------------------------------
    def copy_row(self, b: int, src: KVCache, src_row: int = 0) -> None:
        """Row b := a full-precision one-row cache's row, its prefix quantized group by group."""
        n, G = src.lengths[src_row], self.o.group
        if src.holes is not None:
            raise ValueError("a quantized KV cache cannot hold a row with per-head holes; use one KV policy at a time")
        q = max(0, (n - self.o.residual) // G * G)
        if n - q > self.width or n > self.max_len:
            raise ValueError(f"row of {n} slots does not fit the quantized cache")
        for layer in range(len(self.k)):
            if q:
                self._store(layer, b, 0, src.k[layer][src_row, :, :q], src.v[layer][src_row, :, :q])
            self.k[layer][b, :, : n - q] = src.k[layer][src_row, :, q:n]
            self.v[layer][b, :, : n - q] = src.v[layer][src_row, :, q:n]
        self.lengths[b], self.evicted[b], self.base[b] = n, src.evicted[src_row], q

    def compact(self, row: int, start: int, keep: list[int]) -> None:
        if keep != list(range(len(keep))):
            src = torch.tensor([start - self.base[row] + k for k in keep], device=self.k[0].device)
            s = start - self.base[row]
            for t in self.k + self.v:
                t[row, :, s : s + len(keep)] = t[row].index_select(1, src)
        self.set_length(row, start + len(keep))

    def keep_rows(self, rows: list[int]) -> None:
        if rows == list(range(self.batch)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.k[0].device)
        for name in ("kc", "vc", "ks", "kz", "vs", "vz", "k", "v"):
            setattr(self, name, [t.index_select(0, index) for t in getattr(self, name)])
        self.lengths = [self.lengths[r] for r in rows]
        self.evicted = [self.evicted[r] for r in rows]
        self.base = [self.base[r] for r in rows]

    def select(self, row: int, keep: list[torch.Tensor]) -> None:
        raise ValueError("a quantized KV cache does not evict entries; use one KV policy at a time")

    def row(self, b: int) -> KVCache:
        raise ValueError("a quantized KV cache is filled with copy_row, not through a row view")

    def extend(self, other: KVCache) -> None:
        raise ValueError("a quantized KV cache does not admit rows while decoding (KV policies run batch by batch)")

    def ensure(self, max_len: int) -> None:
        if max_len > self.max_len:
            raise ValueError(f"quantized KV cache of {self.max_len} slots cannot grow to {max_len}")


class Quant(KVPolicy):
    name = "quant"

    o: QuantOptions

    def is_noop(self, n: int, max_new: int) -> bool:
        return False

    def slots(self, n: int, max_new: int) -> int:
        return n + max_new

    def new_cache(self, model: torch.nn.Module, batch: int, slots: int, extra: int) -> KVCache:
        cfg = model.config
        return QuantKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots + extra, cfg.head_dim,
                            model.kv_dtype, model.device, self.o, extra)

    def compress(self, cache: KVCache, hook: KVHook | None) -> KVState:
        return KVState()

    def room(self, state: KVState, cache: KVCache, b: int) -> int | None:
        assert isinstance(cache, QuantKVCache)
        return max(1, cache.base[b] + self.o.residual + self.o.group - cache.lengths[b])

    def after_step(self, cache: KVCache, states: list[KVState], hook: KVHook | None,
                   accepted: list[list[int]] | None = None, starts: list[int] | None = None) -> None:
        assert isinstance(cache, QuantKVCache)
        cache.flush()
