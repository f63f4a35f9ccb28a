"""A plain ``nn.Module`` decoder for the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2).

Explicit KV cache, explicit positions, grouped-query attention, execution of any range of layers and a head usable
on any hidden state (``logits(h)``): the seams that early exit and self-speculation use. Q/K/V and gate/up
projections are fused into one matmul each, which matters on CPU where decode is dominated by per-call overhead.

Shape notation: B batch rows, T new tokens per row, S cache slots read, H heads, Hkv KV heads, D head dim,
E hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ponder.cache import KVCache
from ponder.model import native
from ponder.model.config import ModelConfig
from ponder.model.linear import Linear
from ponder.model.rope import apply_rope, inv_frequencies, rope_tables

if TYPE_CHECKING:
    from ponder.kv.base import KVHook
    from ponder.model.fast import FastPath
    from ponder.model.native_layers import NativeLayers


@dataclass
class StepContext:
    """What every layer of one forward shares: positions' rotations, where K/V go, what attention may see."""

    cos: torch.Tensor  # [B, T, 1, D]
    sin: torch.Tensor  # [B, T, 1, D]
    write_start: int | None  # all rows write slots [write_start, write_start + T); None: ragged, use `slots`
    slots: torch.Tensor | None  # [B, T] cache slot of each new token (ragged rows)
    read_len: int  # attention reads slots [0, read_len)
    mask: torch.Tensor | None  # [B or 1, 1, T, S] bool, True = may attend; None with `causal` or plain decode
    causal: bool  # SDPA's own causal mask applies (fresh rows, all the same length)
    row_read: list[int] | None = None  # ragged decode: row b attends slots [0, row_read[b]), one SDPA call per row
    kv_hook: "KVHook | None" = None  # a KV-cache policy's view of (or say in) each layer's attention (ponder/kv)
    prefill: bool = False  # several prompt tokens per row: one attention call, alike in plain and speculative decoding
    # invariant attention (``LlamaModel.invariant_attention``): per new token # [B, T, 3] int64 on the CPU, its row's
    # prefix length (slots before this forward's new tokens), its parent among the row's new tokens (-1: the prefix
    # itself; -1 after the first token: padding, not computed) and the first slot it may read (sliding window)
    queries: torch.Tensor | None = None
    plan: torch.Tensor | None = None  # ``queries`` as the native kernel reads them (``native.plan``), where it runs
    # asked before each layer the Python loop runs (not the native or compiled layers): True stops the forward with
    # ``Interrupted``, its earlier layers' K/V for the new tokens written and the cache not advanced
    stop: Callable[[], bool] | None = None
    # every row continues a common prefix of this many slots, causally, with nothing else masked (a prompt's later
    # chunk): attention may take the prefix and the new tokens apart (``_attend_after_prefix``); else None
    prefix: int | None = None


class Interrupted(Exception):
    """A forward stopped between two layers because its ``StepContext.stop`` said so (``LlamaModel.forward``)."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.wqkv = Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.wo = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache, layer: int) -> torch.Tensor:
        """x # [B, T, E] -> attention output # [B, T, E]; writes this layer's K/V for the new tokens."""
        B, T, _ = x.shape
        qkv = self.wqkv(x, bulk=ctx.prefill).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], ctx.cos, ctx.sin)
        q, k = qk.split([self.n_heads, self.n_kv], dim=2)
        v = qkv[:, :, self.n_heads + self.n_kv :]
        keys, values = cache.write(layer, k.to(cache.dtype), v.to(cache.dtype), ctx.write_start, ctx.slots, ctx.read_len)
        q = q.to(keys.dtype)  # the cache's dtype (``LlamaModel.kv_dtype``)
        holes = cache.hole_mask(layer, ctx.read_len)
        picked = None
        if ctx.kv_hook is not None:
            ctx.kv_hook.observe(layer, q, keys, ctx)
            picked = ctx.kv_hook.select(layer, q, keys, values, ctx)
            if picked is not None:
                keys, values, ctx = picked
                holes = None  # the hook chose the entries (a policy with holes never selects)
        if ctx.queries is not None and picked is None:
            out = attend_queries(q, keys, values, ctx.queries, holes, ctx.plan).to(x.dtype)
        else:
            out = _attend(q, keys, values, ctx, self.n_heads // self.n_kv, holes).to(x.dtype)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim), bulk=ctx.prefill)


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: StepContext, group: int,
    holes: torch.Tensor | None = None,
) -> torch.Tensor:
    """q # [B, T, H, D] over keys/values # [B, Hkv, S, D] -> # [B, T, H, D]; ``holes`` # [B, Hkv, S] marks slots a
    KV head does not hold (per-head KV budgets), which its query heads must not see."""
    B, T, H, D = q.shape
    if T == 1:
        # One query per row: fold each KV head's query group into the query axis, so GQA needs no repeated K/V.
        qg = q.view(B, keys.shape[1], group, D)
        if ctx.row_read is None:
            mask = ctx.mask
            if holes is not None:
                mask = ~holes[:, :, None, :] if mask is None else mask & ~holes[:, :, None, :]
            # reshape, not view: CUDA's kernels may return a strided output
            return F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask).reshape(B, 1, H, D)
        return attend_rows(qg, keys, values, ctx.row_read, holes).reshape(B, 1, H, D)
    mask, causal = ctx.mask, ctx.causal
    if (ctx.prefix is not None and ctx.prefix >= SPLIT_PREFIX and T >= SPLIT_TOKENS and holes is None
            and q.device.type == "cpu" and keys.shape[2] == ctx.prefix + T
            and not (torch.is_grad_enabled() and q.requires_grad)):  # its log-sum-exps carry no gradient
        return _attend_after_prefix(q, keys, values, ctx.prefix, group)
    if mask is not None and not causal and group > 1:
        # A masked many-query step (verify, tree, ragged prefill): fold each KV head's query group into the query
        # axis as for one query, so SDPA takes its fused kernel instead of repeating K/V for every query head
        # (enable_gqa with a mask falls back to the math path on the CPU: ~1/3 of a 2-token verify forward there).
        Hkv = keys.shape[1]
        qf = q.transpose(1, 2).reshape(B, Hkv, group * T, D)  # query head h = kv * group + g -> row g * T + t
        mf = mask.repeat(1, 1, group, 1) if mask.shape[2] == T else mask  # [B, 1, group * T, S]
        if holes is not None:
            mf = mf & ~holes[:, :, None, :]
        out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mf)  # [B, Hkv, group * T, D]
        return out.reshape(B, H, T, D).transpose(1, 2)
    if holes is not None:
        held = (~holes).repeat_interleave(group, dim=1)[:, :, None, :]  # [B, H, 1, S]
        if causal:
            S = keys.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        mask, causal = held if mask is None else mask & held, False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=group > 1
    )
    return out.transpose(1, 2)


# the shortest prefix, and the fewest new tokens, attended apart (``_attend_after_prefix``; else one masked call)
SPLIT_PREFIX, SPLIT_TOKENS = 512, 64


def _attend_after_prefix(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prefix: int, group: int,
) -> torch.Tensor:
    """T new tokens per row after a common ``prefix`` of slots (a later chunk of a prompt), q # [B, T, H, D] ->
    # [B, T, H, D], on the CPU: the prefix, which every new token sees whole, in one unmasked call (each KV head's
    query group folded into the query axis, so GQA repeats no K/V), and the new tokens among themselves in one causal
    call, merged by their log-sum-exps (the split of FlashAttention's online softmax, arXiv 2205.14135). One masked
    call over all keys reads, per layer, a float mask of group x T x (prefix + T) that PyTorch makes from the boolean
    one: at a 512-token chunk after 6,000 tokens on SmolLM2, 47 ms against 25 ms this way (2 Xeon cores); never
    slower from ~512 prefix slots and 64 new tokens on (2-32 new tokens, as a draft model's catch-up: 5-25% slower,
    so those keep the masked call). Equal to the masked call up to float rounding (tests/test_model.py). Inference
    only: the flash call's log-sum-exp carries no gradient."""
    B, T, H, D = q.shape
    Hkv = keys.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    qf = q.transpose(1, 2).reshape(B, Hkv, group * T, D)  # query head h = kv * group + g -> row g * T + t
    old, old_lse = flash(qf, keys[:, :, :prefix], values[:, :, :prefix])[:2]
    new_k, new_v = keys[:, :, prefix:], values[:, :, prefix:]
    if group > 1:
        new_k, new_v = new_k.repeat_interleave(group, 1), new_v.repeat_interleave(group, 1)  # only T keys
    new, new_lse = flash(q.transpose(1, 2), new_k, new_v, is_causal=True)[:2]
    old, old_lse = old.reshape(B, H, T, D), old_lse.reshape(B, H, T, 1)
    top = torch.maximum(old_lse, new_lse[..., None])
    w_old, w_new = torch.exp(old_lse - top), torch.exp(new_lse[..., None] - top)
    return ((old * w_old + new * w_new) / (w_old + w_new)).transpose(1, 2)


def attend_rows(
    qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, reads: list[int], holes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ragged decode: one query group per row, qg # [B, Hkv, G, D], over keys/values # [B, Hkv, S, D], row b reading
    only its own valid slots [0, reads[b]) -> # [B, Hkv, G, D]. Instead of the longest row's span under a mask: for
    mixed prompt lengths that cuts the K/V bytes read several-fold. ``holes`` as in ``_attend``."""
    out = [
        F.scaled_dot_product_attention(
            qg[b : b + 1], keys[b : b + 1, :, :n], values[b : b + 1, :, :n],
            attn_mask=None if holes is None else ~holes[b : b + 1, :, None, :n],
        )
        for b, n in enumerate(reads)
    ]
    return torch.cat(out)


def attend_queries(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, holes: torch.Tensor | None = None,
    plan: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch-invariant attention: q # [B, T, H, D] over keys/values # [B, Hkv, S, D] -> # [B, T, H, D], every new
    token computed by the very call a one-token decode step makes for it: one attention call over its KV head's
    query group and, as contiguous slots in the order plain decoding has them, the keys it sees (its row's prefix
    from its first readable slot, then its ancestors among the new tokens and itself). So a token's attention
    output has the same bits in a decode step and in a verify forward of any size, batch or tree shape, which
    quantized weights' bf16 activations need for speculation to stay lossless (``quant.py``).

    ``queries`` # [B, T, 3] as ``StepContext.queries``; ``holes`` as in ``_attend``. Every row gets calls of its
    own, also in a decode step of rows of equal lengths: the CPU flash kernel's result for a row depends on how many
    rows share the call (2 rows vs 1, 3 of 4 key lengths differ in the last bits; tests/test_kernels.py). A row
    whose new tokens form a chain reads its slots as they are; a tree row's tokens are visited depth first, each
    token's K/V copied to the slot after its parent's in a scratch copy of the row, so every token reads one
    contiguous run.

    With ``plan`` (``native.plan(queries)``, where the native kernel is built), float32 attention without holes
    runs in one call of ``native.attend`` instead: the same guarantee, a summation order of its own."""
    if plan is not None and holes is None and native.fits(q, keys) and keys.stride() == values.stride():
        return native.attend(q, keys, values, plan)
    B, T, H, D = q.shape
    Hkv = keys.shape[1]
    qv = q.contiguous().view(B, T, Hkv, H // Hkv, D)  # token t of row b: qv[b, t], one decode step's query shape
    info = queries.tolist()
    held = None if holes is None else ~holes[:, :, None, :]  # [B, Hkv, 1, S]

    def one(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, mask: torch.Tensor | None):
        return F.scaled_dot_product_attention(qg, k[:, :, lo:hi], v[:, :, lo:hi],
                                              attn_mask=None if mask is None else mask[:, :, :, lo:hi])

    if B == 1 and T == 1 and held is None:  # a one-row decode step
        n, _, lo = info[0][0]
        return one(qv[:, 0], keys, values, lo, n + 1, None).view(B, 1, H, D)
    chain = [native.is_chain(row) for row in info]
    cells: list[list[torch.Tensor | None]] = [[None] * T for _ in range(B)]
    pad = None
    for b, row in enumerate(info):
        mask = None if held is None else held[b : b + 1]
        if chain[b]:
            for t, (L, p, lo) in enumerate(row):
                if t == 0 or p >= 0:
                    cells[b][t] = one(qv[b, t : t + 1], keys[b : b + 1], values[b : b + 1], lo, L + t + 1, mask)
        else:
            _tree_row(qv[b], keys[b : b + 1], values[b : b + 1], row, mask, cells[b], one)
        for t in range(T):
            if cells[b][t] is None:  # padding after the row's last token: its output is never read
                pad = torch.zeros_like(qv[0, :1]) if pad is None else pad
                cells[b][t] = pad
    return torch.cat([torch.cat(row, 0) for row in cells], 0).view(B, T, H, D)


def _tree_row(
    qv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: list[list[int]], mask: torch.Tensor | None,
    cells: list[torch.Tensor | None], one: "Callable[..., torch.Tensor]",
) -> None:
    """``attend_queries`` for one row whose new tokens form a tree (qv # [T, Hkv, G, D], keys/values # [1, Hkv, S, D]):
    tokens visited depth first, each one's K/V copied into a scratch copy of the row at the slot after its
    parent's, so the slots after the prefix always hold the path from the root to the token being computed."""
    T, L = len(row), row[0][0]
    depth, children = [0] * T, [[] for _ in range(T)]
    for t, (_, p, _) in enumerate(row[1:], 1):
        if p >= 0:
            depth[t] = depth[p] + 1
            children[p].append(t)
    top = L + max(depth) + 1
    k, v = keys[:, :, :top].clone(), values[:, :, :top].clone()
    mask = None if mask is None else mask[..., :top]
    stack = [0]
    while stack:
        t = stack.pop()
        k[:, :, L + depth[t]] = keys[:, :, L + t]
        v[:, :, L + depth[t]] = values[:, :, L + t]
        cells[t] = one(qv[t : t + 1], k, v, row[t][2], L + depth[t] + 1, mask)
        stack.extend(reversed(children[t]))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wgate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.wdown = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """x # [B, T, E] -> # [B, T, E] (SwiGLU); ``bulk``: a prefill's rows (``Linear.forward``)."""
        gate, up = self.wgate_up(x, bulk=bulk).chunk(2, dim=-1)
        return self.wdown(F.silu(gate) * up, bulk=bulk)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, ctx: StepContext, cache: KVCache, layer: int) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), ctx, cache, layer)
        return h + self.mlp(self.mlp_norm(h), ctx.prefill)


class LlamaModel(nn.Module):
    """Decoder-only Llama-family LM. ``forward`` = ``embed`` -> ``run_layers`` -> ``logits``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), False)
        self._cos = self._sin = torch.empty(0)
        # True: decode steps and verify forwards attend token by token (``attend_queries``), so a token's attention
        # output has the same bits whether it is computed alone (decode) or among other queries (a verify forward):
        # quantized modes need that to stay lossless under speculation (see ``quant.py``); fp32 on the CPU turns it
        # on where the native kernel runs (``loader.attend_natively``: one call per layer for all rows). False: a verify
        # forward attends in one masked call (fp32 differs from a decode step only in last bits, at exact ties).
        # Prefills (several tokens per row in ``forward``) attend in one call either way: plain and speculative
        # decoding prefill alike
        self.invariant_attention = False
        # True (fp32, ``loader.attend_natively``): the token-by-token path only where the native kernel runs it; a
        # cache with per-head holes, which the kernel does not take, attends in PyTorch's calls as without it
        self.native_only = False
        self.fast: "FastPath | None" = None  # the compiled decode/verify layer (fast.py), when loaded with compile
        self.native_layers: "NativeLayers | None" = None  # decode/verify layers in one C call (native_layers.py)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's and attention's dtype."""
        return self.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, self.kv_dtype, self.device
        )

    def pack_for_rows(self, *sizes: int) -> None:
        """Prepare the projections' batched CPU kernel for forwards of these token counts (see ``linear.py``)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack_rows(*sizes)

    # --- the three stages ---------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids # [B, T] (on any device) -> hidden # [B, T, E] on the model's."""
        return self.embed_tokens(ids.to(self.device))

    def run_layers(
        self, h: torch.Tensor, ctx: StepContext, cache: KVCache, start: int = 0, end: int | None = None,
        capture: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run layers ``[start, end)`` on h # [B, T, E]; each writes its K/V for the new tokens. ``capture``: its
        keys name layers l in ``[start, end]`` whose input hidden state (l = ``end``: the output) is stored into it."""
        end = len(self.layers) if end is None else end
        if self.native_layers is not None and (out := self.native_layers.run(h, ctx, cache, start, end, capture)) \
                is not None:
            return out
        if self.fast is not None and (out := self.fast.run(self, h, ctx, cache, start, end, capture)) is not None:
            return out
        for i in range(start, end):
            if ctx.stop is not None and ctx.stop():
                raise Interrupted(f"stopped before layer {i}")
            if capture is not None and i in capture:
                capture[i] = h
            h = self.layers[i](h, ctx, cache, i)
        if capture is not None and end in capture:
            capture[end] = h
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on any hidden state # [..., E] -> # [..., V]."""
        return self.lm_head(self.norm(h))

    def forward(
        self, ids: torch.Tensor, cache: KVCache, n_new: list[int] | None = None, last_only: bool = False,
        kv_hook: "KVHook | None" = None, capture: dict[int, torch.Tensor] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Append ids # [B, T] to the cache and return logits # [B, T, V] (# [B, 1, V] with ``last_only``).

        ``n_new[b]`` is how many of row b's T tokens are real (the rest is right padding); the cache advances by it.
        ``kv_hook`` sees every layer's queries and readable keys (KV-cache policies score entries with it).
        ``capture``: as in ``forward_tree``, its keys name layers l whose input hidden state # [B, T, E] (the output
        of layers ``[0, l)``; l = the number of layers: the last layer's output) is stored into it.
        ``stop``: asked before each layer (``StepContext.stop``); True raises ``Interrupted`` and leaves the cache's
        lengths as they were (slots past them hold the stopped forward's K/V until a later write overwrites them).
        """
        B, T = ids.shape
        n_new = [T] * B if n_new is None else n_new
        ctx = self.step_context(cache, T, n_new)
        ctx.kv_hook = kv_hook
        ctx.stop = stop
        h = self.run_layers(self.embed(ids), ctx, cache, 0, None, capture)
        cache.advance(n_new)
        if last_only:
            last = torch.tensor([n - 1 for n in n_new], device=h.device)
            h = h[torch.arange(B, device=h.device), last].unsqueeze(1)
        return self.logits(h)

    def forward_tree(
        self, ids: torch.Tensor, cache: KVCache, depth: torch.Tensor, visible: torch.Tensor,
        start_layer: int = 0, hidden: torch.Tensor | None = None, capture: dict[int, torch.Tensor] | None = None,
        kv_hook: "KVHook | None" = None,
    ) -> torch.Tensor:
        """Verify forward: logits # [B, T, V] for draft trees, without advancing the cache.

        ids # [B, T]: per row the pending token then the tree's nodes (right-padded); depth # [B, T]: 0 for the
        pending token; visible # [B, T, T] bool: which of the row's new tokens each one attends to (itself and its
        ancestors). K/V go to slots ``lengths[b] + j``; the caller keeps the accepted ones and rolls back the rest.
        ``hidden`` # [B, T, E] replaces embedding and layers ``[0, start_layer)`` when a drafter already ran them.
        ``capture``: its keys name layers l whose input hidden state (the output of layers ``[0, l)``) is stored
        into it, # [B, T, E] (self-speculation uses them to judge exit layers).
        """
        ctx = self.tree_context(cache, depth.to(self.device), visible.to(self.device))
        ctx.kv_hook = kv_hook
        native_runs = self.native_layers is not None and self.native_layers.reason_not(ctx, cache) is None
        if hidden is not None and self.fast is not None and self.fast.reason_not(ctx, cache) is None \
                and not native_runs:
            # the fast path groups layers from layer 0 in fixed groups, so every forward of a generation runs the
            # same compiled graphs (starting at start_layer would regroup the layers and change the last bits)
            hidden, start_layer = None, 0
        h = self.embed(ids) if hidden is None else hidden
        return self.logits(self.run_layers(h, ctx, cache, start_layer, None, capture))

    # --- per-step metadata ----------------------------------------------------------------------------------------
    def tree_context(self, cache: KVCache, depth: torch.Tensor, visible: torch.Tensor) -> StepContext:
        """StepContext for T tree tokens per row: positions ``lengths[b] + depth``, slots ``lengths[b] + j``, and a
        mask letting each token see the row's cached prefix plus the new tokens ``visible`` marks."""
        B, T = depth.shape
        lengths = cache.lengths
        if max(lengths) + T > cache.max_len:
            raise ValueError(f"cache overflow: {max(lengths)} + {T} tokens > {cache.max_len} slots")
        dev = self.device
        _check_window(self.config, cache)
        L = torch.tensor(lengths, device=dev)[:, None]  # [B, 1]
        pos = torch.tensor(cache.positions, device=dev)[:, None] + depth  # [B, T]
        read_len = max(lengths) + T
        keys = torch.arange(read_len, device=dev)[None, :]  # [1, S]
        rel = keys - L  # [B, S]: key slot relative to the row's first new slot
        in_tree = (rel >= 0) & (rel < T)
        idx = rel.clamp(0, T - 1)
        tree_part = visible.gather(2, idx[:, None, :].expand(B, T, read_len)) & in_tree[:, None, :]
        mask = (rel < 0)[:, None, :] | tree_part  # [B, T, S]
        if self.config.sliding_window is not None:
            key_pos = torch.where(in_tree, L + depth.gather(1, idx), keys)  # [B, S]
            mask &= key_pos[:, None, :] > pos[:, :, None] - self.config.sliding_window
        cos, sin = self._rope_at(pos, max(cache.positions) + T)
        uniform = len(set(lengths)) == 1
        slots = None if uniform else L + torch.arange(T, device=dev)[None, :]
        queries = self._tree_queries(cache, depth, visible) if self._invariant_for(cache) else None
        return StepContext(cos, sin, lengths[0] if uniform else None, slots, read_len, mask[:, None], False,
                           queries=queries, plan=self.native_plan(queries))

    def _invariant_for(self, cache: KVCache) -> bool:
        """Whether this forward over ``cache`` attends token by token (``invariant_attention``, ``native_only``)."""
        return self.invariant_attention and not (self.native_only and cache.holes is not None)

    def native_plan(self, queries: torch.Tensor | None) -> torch.Tensor | None:
        """``StepContext.plan`` for these queries: where the native kernel is built and attention runs in float32
        on the CPU (``native.py``), else None."""
        if queries is None or self.kv_dtype != torch.float32 or self.device.type != "cpu" or native.library() is None:
            return None
        return native.plan(queries)

    def _tree_queries(self, cache: KVCache, depth: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``StepContext.queries`` for draft trees: each token's parent is the token it sees one level up."""
        window = self.config.sliding_window
        rows = []
        for length, first, d, vis in zip(cache.lengths, cache.positions, depth.tolist(), visible.tolist()):
            row = []
            for t in range(len(d)):
                parent = next((j for j in range(t) if vis[t][j] and d[j] == d[t] - 1), -1) if d[t] else -1
                lo = 0 if window is None else max(0, first + d[t] + 1 - window)
                row.append((length, parent, lo))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def slot_context(self, cache: KVCache, slots: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> StepContext:
        """StepContext for T new tokens per row written to explicit cache slots # [B, T] at positions # [B, T], each
        attending to the slots ``mask`` # [B, T, S] marks (S: the slots read). For callers that lay out slots above
        a row's length themselves (the head drafter keeps its tree nodes' K/V there between levels); the cache's
        lengths are theirs to keep."""
        if mask.shape[-1] > cache.max_len or int(slots.max()) >= mask.shape[-1]:
            raise ValueError(f"slots up to {int(slots.max())} with {mask.shape[-1]} read, cache of {cache.max_len}")
        cos, sin = self._rope_at(pos, int(pos.max()) + 1)
        return StepContext(cos, sin, None, slots, mask.shape[-1], mask[:, None], False)

    def step_context(self, cache: KVCache, T: int, n_new: list[int]) -> StepContext:
        """Rotations, write slots and attention mask for T new tokens per row, computed once for all layers."""
        lengths = cache.lengths
        if max(lengths) + T > cache.max_len:
            raise ValueError(f"cache overflow: {max(lengths)} + {T} tokens > {cache.max_len} slots")
        dev = self.device
        _check_window(self.config, cache)
        uniform = len(set(lengths)) == 1 and len(set(n_new)) == 1
        start = lengths[0]
        read_len = max(lengths) + T
        window = self.config.sliding_window
        needs_window = window is not None and read_len > window
        first = cache.positions
        if uniform and len(set(first)) == 1:
            pos = torch.arange(first[0], first[0] + T, device=dev)[None, :]  # [1, T]
        else:
            pos = torch.tensor(first, device=dev)[:, None] + torch.arange(T, device=dev)[None, :]  # [B, T]
        cos, sin = self._rope_at(pos, max(first) + T)
        # several tokens per row (a prefill) need not match a decode step bit for bit: one attention call
        queries = None
        if T == 1 and self._invariant_for(cache):  # a decode step reads its row's slots from the window's first
            lo = [0 if window is None else max(0, p + 1 - window) for p in first]
            queries = torch.tensor([[(n, -1, a)] for n, a in zip(lengths, lo)], dtype=torch.long)
        plan = self.native_plan(queries)
        if uniform and not needs_window and (T == 1 or start == 0):
            return StepContext(cos, sin, start, None, read_len, None, causal=T > 1, prefill=T > 1, queries=queries,
                               plan=plan)
        slots = torch.tensor(lengths, device=dev)[:, None] + torch.arange(T, device=dev)[None, :]  # [B, T]
        if T == 1 and not needs_window:
            return StepContext(cos, sin, None, slots, read_len, None, False, row_read=[n + 1 for n in lengths],
                               queries=queries, plan=plan)
        keys = torch.arange(read_len, device=dev)
        mask = keys[None, None, :] <= slots[:, :, None]  # [B, T, S]: causal over slots (positions may be offset)
        if window is not None:
            mask &= keys[None, None, :] > pos[:, :, None] - window
        return StepContext(cos, sin, start if uniform else None, None if uniform else slots, read_len, mask[:, None],
                           False, prefill=T > 1, queries=queries, plan=plan,
                           prefix=start if uniform and not needs_window and T > 1 else None)

    def _rope_at(self, pos: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin # [B, T, 1, D] for positions # [B, T] (all below ``need``), in the model dtype."""
        if self._cos.shape[0] < need:
            size = max(need, 2 * self._cos.shape[0], 256)
            cos, sin = rope_tables(self.inv_freq.float().cpu(), size)
            self._cos, self._sin = cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)
        return self._cos[pos][:, :, None], self._sin[pos][:, :, None]


def _check_window(cfg: ModelConfig, cache: KVCache) -> None:
    """Sliding-window masks compare slot numbers, which stop being positions once entries are evicted."""
    if cfg.sliding_window is not None and any(cache.evicted):
        raise ValueError("KV-cache compression is not supported on sliding-window models (e.g. Mistral)")
