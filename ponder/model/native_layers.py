"""ponder's native decoder layers: every decode step and verify forward of a 4-bit or int8-block model runs its
layers in one C call (``decoder.c``), with the GEMM and attention kernels the per-operator path calls.

Why: with ponder's 4-bit GEMM, a q4 decode step of SmolLM2 on a 2-core CPU spends ~2.7 ms multiplying and ~5 ms
around it (121 GEMM calls and 30 attention calls each through a Python wrapper, ~1500 small eager operators or ~5
compiled graphs with their guards). ``decoder.c`` runs layers [a, b) for every new token of a forward in one call:
norms, GEMMs, rotary embedding, cache writes, attention, SwiGLU and residual adds, all in C.

Numerics: the GEMM and attention are ``q4mm.c``'s and ``attention.c``'s (the same bits as the per-operator path);
the norms, rotary embedding and SwiGLU have their own summation order and exp, so the hidden states differ from the
eager layers' in the last bits. Every part reads only its own token's values, so a token's bits do not depend on
the other tokens, rows or threads of the call, nor on which layers one call runs: plain decoding and speculation's
verify forwards on this path give the same tokens (the lossless matrix runs on it), and a drafter may run the
first layers in one call and the rest in another.

What it covers: forwards whose attention is planned for the native kernel (``StepContext.plan``: decode steps and
verify forwards of quantized models, chains, trees, ragged rows, sliding windows) on models whose four projections
per layer are ``Q4Linear`` on ponder's kernel or ``Int8BlockLinear``. Prefills (several prompt tokens per row: the
same for plain and speculative decoding) and forwards with a KV-cache policy's hook or per-head holes run the
per-operator layers (counted by reason in ``report()``, as ``fast.py`` does), so a generation's decode steps never
switch paths. ``ponder.load(..., native=False)`` (``native=false`` in a bench method) keeps the per-operator layers.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ponder.cache import KVCache
from ponder.model import native

if TYPE_CHECKING:
    from ponder.model.llama import LlamaModel


def _linear_fields(layer: nn.Module) -> tuple[list[torch.Tensor], list[int]] | None:
    """(tensors kept alive, [packed pointer, bias pointer or 0, planes]) of a projection ``decoder.c`` can run."""
    from ponder.model.q4 import Q4Linear
    from ponder.model.quant import Int8BlockLinear

    if isinstance(layer, Q4Linear) and layer.native:
        planes = 1
    elif isinstance(layer, Int8BlockLinear):
        planes = 2
    else:
        return None
    keep = [layer.packed] + ([] if layer.bias is None else [layer.bias])
    return keep, [layer.packed.data_ptr(), 0 if layer.bias is None else layer.bias.data_ptr(), planes]


def unsupported(model: "LlamaModel") -> str | None:
    """Why ``model``'s layers cannot run natively (None: they can)."""
    cfg = model.config
    if model.device.type != "cpu" or model.kv_dtype != torch.float32:
        return "not a float32 model on the CPU"
    if cfg.head_dim % 16 or cfg.hidden_size % 32 or cfg.intermediate_size % 32:
        return f"head dim {cfg.head_dim} / widths {cfg.hidden_size}, {cfg.intermediate_size} outside the kernels"
    for blk in model.layers:
        for lin in (blk.attn.wqkv, blk.attn.wo, blk.mlp.wgate_up, blk.mlp.wdown):
            if _linear_fields(lin) is None:
                return f"projection {type(lin).__name__} is not on ponder's 4-bit GEMM"
        if any(not isinstance(n, nn.RMSNorm) or n.weight is None for n in (blk.attn_norm, blk.mlp_norm)):
            return "a norm other than RMSNorm with a weight"
    if native.DECODER.library() is None:
        return native.DECODER.reason
    if not native.DECODER.library().ponder_q4_fast():
        return "no AVX512-BF16 (this CPU or the compiler's -march=native lacks it)"
    return None


class NativeLayers:
    """Runs layer ranges of one model through ``decoder.c`` (module doc); ``run`` returns None where it cannot."""

    def __init__(self, model: "LlamaModel", bulk: bool = False) -> None:
        """``bulk``: every product on the GEMM's bulk kernel (``decoder.c``; a model loaded with amx=True)."""
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"native layers: {why}")
        self.lib = native.DECODER.library()
        cfg = model.config
        self.eps = float(model.layers[0].attn_norm.eps if model.layers[0].attn_norm.eps is not None
                         else torch.finfo(torch.float32).eps)
        self.dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     cfg.intermediate_size)
        self.keep: list[torch.Tensor] = []  # every tensor whose address the table holds
        rows = []
        for blk in model.layers:
            row = []
            for norm in (blk.attn_norm, blk.mlp_norm):
                w = norm.weight.detach().float().contiguous()
                self.keep.append(w)
                row.append(w.data_ptr())
            for lin in (blk.attn.wqkv, blk.attn.wo, blk.mlp.wgate_up, blk.mlp.wdown):
                fields = _linear_fields(lin)
                assert fields is not None
                self.keep += fields[0]
                row += fields[1]
            rows.append(row)
        self.weights = torch.tensor(rows, dtype=torch.int64)  # [L, 14] as decoder.c reads them
        self.bulk = bulk
        self.forwards = 0
        self.fallbacks: Counter[str] = Counter()

    @staticmethod
    def reason_not(ctx: Any, cache: Any) -> str | None:
        """Why this forward runs the per-operator layers (None: it runs natively)."""
        if ctx.prefill:
            return "prefill"
        # the C code reads and writes the plain cache's layout: a policy's cache class (int8/int4 KV keeps a
        # residual window) or evicted slots need the per-operator layers
        if ctx.kv_hook is not None or cache.holes is not None or type(cache) is not KVCache:
            return "KV policy"
        if ctx.plan is None:
            return "attention not planned"
        return None

    def run(
        self, h: torch.Tensor, ctx: Any, cache: Any, start: int, end: int,
        capture: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Layers [start, end) on h # [B, T, E], or None (the reason counted) when this forward cannot run here.
        ``capture`` as in ``LlamaModel.run_layers``."""
        if (why := self.reason_not(ctx, cache)) is not None:
            if why != "prefill":
                self.fallbacks[why] += 1
            return None
        B, T, E = h.shape
        M, n = B * T, end - start
        ks, vs = cache.k[start:end], cache.v[start:end]
        stride = ks[0].stride()
        if (h.dtype != torch.float32 or any(t.dtype != torch.float32 or t.stride() != stride for t in ks + vs)
                or stride[-1] != 1):
            self.fallbacks["layout"] += 1
            return None
        self.forwards += 1
        out = h.reshape(M, E).to(torch.float32, copy=True).contiguous()
        if ctx.write_start is not None:
            slot = ctx.write_start + torch.arange(T).expand(B, T)
        else:
            slot = ctx.slots.cpu()
        slots = torch.stack([torch.arange(B)[:, None].expand(B, T), slot], dim=-1).contiguous()
        D = ctx.cos.shape[-1]
        cos = ctx.cos.expand(B, T, 1, D).reshape(M, D).float().contiguous()
        sin = ctx.sin.expand(B, T, 1, D).reshape(M, D).float().contiguous()
        caches = torch.tensor([[k.data_ptr(), v.data_ptr()] for k, v in zip(ks, vs)], dtype=torch.int64)
        targets = [0] * n
        if capture is not None:
            if start in capture:
                capture[start] = h
            for layer in capture:
                if start < layer <= end:
                    capture[layer] = torch.empty(B, T, E)
                    targets[layer - start - 1] = capture[layer].data_ptr()
        capture_ptrs = torch.tensor(targets, dtype=torch.int64)
        args = (out.data_ptr(), M, *self.dims[:4], self.dims[4], self.eps, n,
                self.weights[start:end].data_ptr(), caches.data_ptr(), *stride[:3], slots.data_ptr(), cos.data_ptr(),
                sin.data_ptr(), ctx.plan.data_ptr(), capture_ptrs.data_ptr(), int(self.bulk), torch.get_num_threads())
        if torch.autograd.profiler._is_profiler_enabled:  # a ctypes call is invisible to the profiler: name it
            with torch.profiler.record_function("ponder::native_decoder"):
                rc = self.lib.ponder_decoder(*args)
        else:
            rc = self.lib.ponder_decoder(*args)
        if rc == -2:
            raise MemoryError("native decoder: no memory for its scratch")
        if rc != 0:
            raise RuntimeError(f"native decoder refused the model's shapes ({self.dims})")
        return out.view(B, T, E)

    def report(self) -> dict[str, Any]:
        return {"native_forwards": self.forwards, "eager_fallbacks": dict(self.fallbacks)}
