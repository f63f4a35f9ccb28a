"""The captured decode/verify layers: a group of ``GROUP`` decoder layers' step compiled once with ``torch.compile``
(inductor) and reused by every group of layers, for decode steps and verify forwards.

In eager mode a q4 decode step of SmolLM2 is ~1500 small operators (norms, rotary embedding, dtype casts, residual
adds, cache writes) around 121 int4 matmuls and 30 attention calls, and their dispatch costs as much as the
matmuls. ``layer_step`` is the layer's decode/verify path written as one function of tensors (the layer's modules,
the hidden state, the rotations, this layer's K/V cache tensors, the write position and the mask); ``group_step``
runs it over a group of consecutive layers. Compiled with dynamic shapes it becomes one graph whose norm, rotary,
cast and residual operators are fused, with the matmul and attention kernels called as they are. Every group shares
it (the modules' weights and caches are graph inputs; PyTorch's regional compilation of repeated blocks), so
compiling costs seconds, not one compile per layer, and inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by
default under /tmp) lets the next process on the machine skip most of that. Why groups: each call of a compiled
function pays its guards and wrapper (~25 us), so one layer per call costs ~0.8 ms of a ~8 ms q4 decode step on
SmolLM2's 30 layers; groups of 5 cut that to a sixth (measured on an AMD EPYC, 2 threads, decode at a 256-token
prefix, alternating rounds: 8.3 -> 7.3 ms), while a graph of all 30 layers compiles ~5x longer for less (7.6 ms).

What it covers: every forward that attends in the cache's dtype (decode steps and speculation's verify forwards,
equal or ragged rows, tree and sliding-window masks). A ragged decode step (rows of different lengths, one token
each: every step of a continuously batched server) attends row by row over each row's own slots, as the eager layer
does, through ``ragged_decode_attention``, an operator of ponder's own that the compiled graph calls like any
kernel. Attending under one mask over the longest row instead made every row read the longest row's K/V: continuous
batching of 32 Spec-Bench prompts (q4, AMD EPYC, 2 threads) ran 88.5 / 67.0 tokens/s at batch 8 / 16 that way and
116.3 / 99.6 row by row (docs/architecture.md). Quantized models' batch-invariant attention (``llama.attend_queries``:
the native kernel of ``native.py``, or one decode-shaped PyTorch call per token) is an operator of the same kind,
``invariant_attention``.

Prefills run the eager layers (they are the same for plain and speculative decoding, and one row at a time), and so
do forwards with a KV-cache policy's hook or per-head holes: ``FastPath.fallbacks`` counts those by reason so the
bench can say so. So a generation never switches between compiled and eager decode steps, whose last bits may
differ.

Numerics: the same operators in the same order; fusion keeps fp32 elementwise results (tests/test_fast.py checks
decode and verify against eager, and the lossless matrix runs on it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ponder.model.llama import attend_queries, attend_rows
from ponder.model.rope import apply_rope


# ponder's attention operators, which a compiled graph calls like kernels (module doc). Defined on a plain
# ``torch.library.Library`` rather than with ``torch.library.custom_op``, whose wrapper costs ~5-14 us more per call
# (measured 2026-12-04, AMD EPYC), 30 calls a decode step.
_ops = torch.library.Library("ponder", "FRAGMENT")
_ops.define("ragged_decode_attention(Tensor q, Tensor keys, Tensor values, Tensor reads) -> Tensor")
_ops.define("invariant_attention(Tensor q, Tensor keys, Tensor values, Tensor queries, Tensor? plan) -> Tensor")


def _ragged_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, reads: torch.Tensor,
) -> torch.Tensor:
    """The eager layer's ragged decode (``llama.attend_rows``: one attention call per row over its own slots, reads
    # [B] int64 on the CPU) as an operator a compiled graph can call."""
    return attend_rows(q, keys, values, reads.tolist())


def _invariant_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, plan: Optional[torch.Tensor],
) -> torch.Tensor:
    """The eager layer's batch-invariant attention (``llama.attend_queries``: queries # [B, T, 3] int64 on the CPU,
    ``plan`` the native kernel's form of them or None) as an operator a compiled graph can call."""
    return attend_queries(q, keys, values, queries, None, plan)


_ops.impl("ragged_decode_attention", _ragged_decode_attention, "CPU")
_ops.impl("invariant_attention", _invariant_attention, "CPU")


@torch.library.register_fake("ponder::ragged_decode_attention")
def _ragged_decode_attention_shape(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, reads: torch.Tensor,
) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.register_fake("ponder::invariant_attention")
def _invariant_attention_shape(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, plan: Optional[torch.Tensor],
) -> torch.Tensor:
    return torch.empty_like(q)


ragged_decode_attention = torch.ops.ponder.ragged_decode_attention.default
invariant_attention = torch.ops.ponder.invariant_attention.default


def layer_step(
    blk: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
    start: int | None, slots: torch.Tensor | None, read_len: int, mask: torch.Tensor | None,
    reads: torch.Tensor | None = None, queries: torch.Tensor | None = None, plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder layer on h # [B, T, E]: K/V go to slots [start, start + T) of every row of kc/vc
    # [B, Hkv, S, D], or to ``slots`` # [B, T] (ragged rows); attention reads slots [0, read_len) under ``mask``
    # [B, 1, T, S] (verify forwards), row b its slots [0, reads[b]) (ragged decode: one token per row, reads # [B]),
    # unmasked (one-token decode steps of equal rows), or token by token as ``queries`` # [B, T, 3] says
    # (batch-invariant attention, ``StepContext.queries``)."""
    attn = blk.attn
    B, T, _ = h.shape
    H, Hkv, D = attn.n_heads, attn.n_kv, attn.head_dim
    qkv = attn.wqkv(blk.attn_norm(h)).view(B, T, H + 2 * Hkv, D)
    q, k = apply_rope(qkv[:, :, : H + Hkv], cos, sin).split([H, Hkv], dim=2)
    v = qkv[:, :, H + Hkv :]
    if slots is None:
        kc[:, :, start : start + T] = k.transpose(1, 2).to(kc.dtype)
        vc[:, :, start : start + T] = v.transpose(1, 2).to(vc.dtype)
    else:
        rows = torch.arange(B, device=h.device)[:, None].expand_as(slots)
        kc[rows, :, slots] = k.to(kc.dtype)
        vc[rows, :, slots] = v.to(vc.dtype)
    keys, values = kc[:, :, :read_len], vc[:, :, :read_len]
    q = q.to(kc.dtype)
    if queries is not None:  # batch-invariant attention (quantized weights): token by token, as llama.Attention does
        out = invariant_attention(q.contiguous(), keys, values, queries, plan)
    elif reads is not None:  # ragged decode: each row over its own slots (as llama._attend does)
        out = ragged_decode_attention(q.view(B, Hkv, H // Hkv, D), keys, values, reads).view(B, 1, H, D)
    elif mask is None:  # one query per row: fold each KV head's query group (as llama._attend does)
        out = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), keys, values).view(B, 1, H, D)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=H > Hkv
        ).transpose(1, 2)
    h = h + attn.wo(out.to(h.dtype).reshape(B, T, H * D))
    return h + blk.mlp(blk.mlp_norm(h))


GROUP = 5  # layers per compiled call (module doc)


def group_step(
    blocks: list[nn.Module], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ks: list[torch.Tensor],
    vs: list[torch.Tensor], start: int | None, slots: torch.Tensor | None, read_len: int, mask: torch.Tensor | None,
    reads: torch.Tensor | None = None, queries: torch.Tensor | None = None, plan: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``layer_step`` through consecutive layers ``blocks`` with their caches ``ks``/``vs``; every layer's output
    (always all of them, so a forward that captures hidden states runs the very graph one that does not runs)."""
    outs = []
    for blk, kc, vc in zip(blocks, ks, vs):
        h = layer_step(blk, h, cos, sin, kc, vc, start, slots, read_len, mask, reads, queries, plan)
        outs.append(h)
    return outs


class FastPath:
    """The compiled ``group_step`` and the count of forwards that could not use it."""

    def __init__(self, group: int = GROUP) -> None:
        import torch._dynamo

        # one graph per (decode | verify) x (dtype) x (group size) x (kernel routes that specialise on row counts)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.group = group
        self.step = torch.compile(group_step, dynamic=True)
        self.fallbacks: Counter[str] = Counter()
        self.forwards = 0

    def reason_not(self, ctx: Any, cache: Any) -> str | None:
        """Why this forward must run eagerly (None: it can run compiled)."""
        if ctx.prefill:
            return "prefill"
        if ctx.kv_hook is not None or cache.holes is not None:
            return "KV policy"
        return None

    def run(
        self, model: Any, h: torch.Tensor, ctx: Any, cache: Any, start: int, end: int,
        capture: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Layers [start, end) compiled, or None (and the reason counted) when this forward cannot be.

        Groups are fixed: layers [0, G), [G, 2G), ... (a range that starts or ends inside one runs that group's part
        of it as a graph of its own; only drafting passes do). Every decode step and verify forward runs all layers
        from 0, so the same graphs compute every token of a generation, with or without speculation: a compiled
        graph's last bits may depend on how many layers it fuses. ``capture`` as in ``LlamaModel.run_layers``."""
        if (why := self.reason_not(ctx, cache)) is not None:
            if why != "prefill":
                self.fallbacks[why] += 1
            return None
        self.forwards += 1
        if ctx.read_len >= cache.max_len:
            # reading every slot makes the cache slice the whole tensor, which compiles a graph of its own (and
            # recompiles the general one after it): keep one spare slot instead (a copy, only for such a forward)
            cache.reserve(ctx.read_len + 1)
        # ragged decode: each row reads its own slots (``ragged_decode_attention``, as the eager layer does)
        reads = None if ctx.row_read is None else torch.tensor(ctx.row_read)
        if capture is not None and start in capture:
            capture[start] = h
        a = start
        while a < end:
            b = min((a // self.group + 1) * self.group, end)
            outs = self.step(list(model.layers[a:b]), h, ctx.cos, ctx.sin, list(cache.k[a:b]), list(cache.v[a:b]),
                             ctx.write_start, ctx.slots, ctx.read_len, ctx.mask, reads, ctx.queries, ctx.plan)
            if capture is not None:
                for i, out in enumerate(outs):
                    if a + i + 1 in capture:
                        capture[a + i + 1] = out
            h, a = outs[-1], b
        return h

    def report(self) -> dict[str, Any]:
        return {"compiled_forwards": self.forwards, "eager_fallbacks": dict(self.fallbacks)}
