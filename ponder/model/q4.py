"""``--dtype q4``: 4-bit projections kept as GGUF stores them, a 4-bit head with exact re-scoring of its top logits.

**Weights.** The default model's GGUF holds each projection as Q4_1 blocks: per 32 consecutive weights of a row one
fp16 scale ``d``, one fp16 minimum ``m`` and 32 four-bit codes ``q``, the weight being ``w = d * q + m`` (Q4_0: no
minimum, ``w = d * (q - 8)``). Models that are not Q4 GGUFs (a Hugging Face directory in fp16/fp32) are quantized by
ponder into the same format: per block of 32, ``m`` = the minimum, ``d`` = (maximum - minimum) / 15, ``q`` rounded
to nearest.

**Kernel.** Where the CPU has AVX512-BF16, ponder multiplies with its own GEMM (``q4mm.c``, built by ``native.py``;
``pack_native`` lays the blocks out for it): activations rounded to bf16, the blocks' d and m used exactly as the
GGUF stores them (fp16; ponder's own rounding of other models, and the head's copy, round d and m to fp16), fp32
output. Per block it computes ``d * (sum x (128 + q) - 128 sum x) + m sum x``, so unpacking a
code to bf16 is one OR (``0x4300 | q`` is bf16's 128 + q) and a row costs one ``vdpbf16ps`` per 32 weights; vector
lanes are output columns, so the codes are unpacked once for up to 8 rows and nothing is summed across lanes. A
row's bits therefore never depend on the other rows of the call or on the thread count (tests/test_q4mm.py), which
speculation's verify forwards need to stay lossless. Against PyTorch's CPU int4 kernel, which multiplies 4 rows at
a time, over SmolLM2's 120 projections (random weights, 2 threads, AMD EPYC with AVX512-BF16, 2026-12-05):

| rows in the call | 1 | 2 | 4 | 5 | 8 | 16 | 64 |
|---|---|---|---|---|---|---|---|
| ponder's ``q4mm.c`` | 2.7 ms | 3.4 | 4.9 | 5.5 | 8.6 | 15.3 | 54 |
| ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations) | 4.7 ms | 5.4 | 7.3 | 12.1 | 12.4 | 22.7 | 83 |

A prefill's projections (``Q4Linear.forward(x, bulk=True)``) run on the GEMM's bulk kernel instead, which uses AMX
where the CPU has it: the same products, rows still independent, sums rounded in AMX's order; ~2.5x faster prefills
on a Xeon with AMX (docs/performance.md). Decode steps and verify forwards never use it (their bits must agree).

Elsewhere (no AVX512-BF16, no C compiler, ``PONDER_NATIVE=0``) the projections run on PyTorch's kernel, which
computes ``w = (q - 8) * scale + zero`` with bf16 scale and zero: a Q4_1 block maps onto it with ``scale = d`` and
``zero = m + 8 d``, rounded to bf16 (those two roundings depart from the GGUF's weights; that kernel returns bf16).
Either way the residual stream, norms and attention stay fp32, and decode/verify steps attend token by token as in
int8 mode (``quant.py``: batch-invariant attention keeps speculation lossless); tests/test_kernels.py checks on the
machine that runs the tests that a row gets the bits it gets alone.

**Head.** A 49152 x 576 fp32 head costs ~7 ms per decode step, more than all 30 layers' 4-bit projections (~2.5 ms).
``RescoredHead`` multiplies by a 4-bit copy (the same kernel and blocks as the projections, ~0.45 ms; an int8
copy with one scale per vocabulary row, ~0.7 ms, where the shape does not suit the int4 packing), whose logits
are too coarse to pick the top token reliably (the true top token is the 4-bit copy's own top token at 83% of
SmolLM2's positions). So the ``RESCORE`` best rows of those approximate logits are scored again in fp32 against the
full-precision weight (for the default model: the GGUF's Q8_0 embedding, dequantized): the greedy token is the fp32
head's whenever it ranks in the approximate top ``RESCORE`` (at 1500 of 1500 positions of a README passage for both
copies; it is within the top 4 at 99.3%), and the re-scored logits are the fp32 head's to the last bit in every row
whatever the batch (an elementwise product and a sum over the hidden axis). The other logits keep the approximation,
which only sampling far into the tail can notice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ponder.errors import PonderError
from ponder.files import remove_quietly, temp_beside
from ponder.model import native

GROUP = 32  # weights per GGUF block and per scale of the int4 kernel
INNER_K_TILES = 8  # the CPU packing's tile parameter (it accepts 2, 4 or 8)
RESCORE = 16  # approximate top logits re-scored exactly per row
Q4_TYPES = ("Q4_0", "Q4_1")


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def native_kernel() -> bool:
    """Whether ponder's own 4-bit GEMM (``q4mm.c``) runs on this CPU (module doc)."""
    return native.q4_library() is not None


# ponder's 4-bit GEMM as an operator a compiled graph calls like a kernel (as ``fast.py``'s attention operators)
_ops = torch.library.Library("ponder", "FRAGMENT")
_ops.define("q4_mm(Tensor x, Tensor packed, int out_features) -> Tensor")
_ops.impl("q4_mm", native.q4_mm, "CPU")


@torch.library.register_fake("ponder::q4_mm")
def _q4_mm_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


q4_mm = torch.ops.ponder.q4_mm.default
_ops.define("q4_mm_bulk(Tensor x, Tensor packed, int out_features) -> Tensor")
_ops.impl("q4_mm_bulk", native.q4_mm_bulk, "CPU")
torch.library.register_fake("ponder::q4_mm_bulk")(_q4_mm_shape)
q4_mm_bulk = torch.ops.ponder.q4_mm_bulk.default


def pack_native(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """codes # [out, in] (0..15), d and m # [out, in / 32] -> the layout ``q4mm.c`` reads, # [out / 16, in / 32,
    320] uint8: per strip of 16 rows and block of 32 weights, 256 bytes of codes (byte 2c + e of chunk p: row c's
    code 2p + e in the low nibble, 16 + 2p + e in the high one), 16 fp16 d, 16 fp16 m."""
    out, inn = codes.shape
    if out % 16 or inn % GROUP or d.shape != (out, inn // GROUP) or m.shape != d.shape:
        raise PonderError(f"ponder's 4-bit GEMM needs rows in strips of 16 and blocks of {GROUP}: got codes "
                          f"{tuple(codes.shape)}, d {tuple(d.shape)}, m {tuple(m.shape)}")
    S, KB = out // 16, inn // GROUP
    c = codes.to(torch.uint8).reshape(S, 16, KB, 2, 8, 2).permute(0, 2, 4, 1, 5, 3)  # strip, block, p, row, e, half
    nibbles = (c[..., 0] | (c[..., 1] << 4)).reshape(S, KB, 256)

    def halves(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float16).reshape(S, 16, KB).permute(0, 2, 1).contiguous().view(torch.uint8)

    return torch.cat([nibbles, halves(d), halves(m)], dim=-1).contiguous()


class Q4Linear(nn.Module):
    """``y = x W^T + b`` with W # [out, in] as 4-bit codes in groups of 32 along ``in`` (module doc): in the layout
    of ponder's kernel (``native``) or of PyTorch's."""

    def __init__(self, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None,
                 native: bool | None = None) -> None:
        """codes # [out, in] integers 0..15, d and m # [out, in / 32]: weight = d * code + m, block by block.
        ``native``: ponder's kernel (default: where it runs, ``native_kernel()``, and out is a multiple of 16)."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if self.in_features % GROUP or d.shape != (self.out_features, self.in_features // GROUP) or d.shape != m.shape:
            raise PonderError(f"q4 needs rows in blocks of {GROUP}: got codes {tuple(codes.shape)}, d {tuple(d.shape)}")
        self.native = (self.out_features % 16 == 0 and native_kernel()) if native is None else native
        self.bulk_always = False  # every product on the bulk kernel (a model loaded with amx=True; loader.py)
        if self.native:
            self.register_buffer("packed", pack_native(codes, d, m))
            self.register_buffer("scale_zero", None)
        else:
            if not kernel_available():
                raise PonderError(f"--dtype q4 needs PyTorch's CPU int4 kernel, which torch {torch.__version__} lacks")
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(),
                                                                        INNER_K_TILES)
            scale = d.float()
            zero = m.float() + 8 * scale
            self.register_buffer("packed", packed)
            self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def packed_as(
        cls, out_features: int, in_features: int, packed: torch.Tensor, scale_zero: torch.Tensor | None,
        bias: torch.Tensor | None = None,
    ) -> "Q4Linear":
        """A layer from tensors already in a kernel's layout (the kernel-ready cache; no ``scale_zero``: ponder's)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = out_features, in_features
        layer.native = scale_zero is None
        layer.bulk_always = False
        layer.register_buffer("packed", packed)
        layer.register_buffer("scale_zero", scale_zero)
        layer.register_buffer("bias", None if bias is None else bias.detach().float())
        return layer

    def forward(self, x: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """x # [..., in] -> # [..., out], in x's dtype (the product itself is computed from bf16 activations).
        ``bulk``: a prefill's rows, multiplied by the GEMM's bulk kernel (AMX where the CPU has it; module doc)."""
        if x.device.type != "cpu":
            raise PonderError("--dtype q4 runs on the CPU only (PyTorch's GPU int4 kernel packs weights differently)")
        flat = x.reshape(-1, self.in_features)
        if self.native:
            mm = q4_mm_bulk if bulk or self.bulk_always else q4_mm
            y = mm(flat.float(), self.packed, self.out_features).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, GROUP,
                                                           self.scale_zero).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, # [out, in] fp32: the kernel applied to the identity matrix."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        if self.native:
            return q4_mm(eye, self.packed, self.out_features).T
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye.to(torch.bfloat16), self.packed, GROUP,
                                                          self.scale_zero).float().T

    def extra_repr(self) -> str:
        kernel = "ponder" if self.native else "torch"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"kernel={kernel}"


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1-style rounding of an fp32 weight # [out, in]: codes # [out, in], d and m # [out, in / 32]."""
    out, inn = w.shape
    if inn % GROUP:
        raise PonderError(f"--dtype q4 needs every projection's input width to be a multiple of {GROUP}, got {inn}")
    blocks = w.detach().float().reshape(out, inn // GROUP, GROUP)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((blocks - lo[..., None]) / d[..., None]).clamp(0, 15)
    return codes.reshape(out, inn).to(torch.uint8), d, lo


def gguf_blocks(tensor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes # [out, in], d and m # [out, in / 32] of a Q4_0/Q4_1 tensor from ``gguf.GGUFReader`` (exact: fp16
    d and m widened to fp32, ``d * code + m`` equals the GGUF's own dequantization)."""
    kind = tensor.tensor_type.name
    raw = np.asarray(tensor.data, dtype=np.uint8)
    out = raw.shape[0]
    head = 4 if kind == "Q4_1" else 2  # bytes of d (and m) before each block's 16 bytes of codes
    blocks = raw.reshape(out, -1, head + GROUP // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * d
    nib = blocks[..., head:]
    codes = np.concatenate([nib & 0x0F, nib >> 4], axis=-1)  # byte j holds code j (low) and code j + 16 (high)
    return torch.from_numpy(codes.reshape(out, -1)), torch.from_numpy(d), torch.from_numpy(m)


class RescoredHead(nn.Module):
    """LM head: approximate logits from a 4-bit (or int8) copy, the best ``RESCORE`` of each row re-scored in fp32
    (module doc)."""

    def __init__(self, weight: torch.Tensor, approx: nn.Module | None = None) -> None:
        """weight # [V, E] fp32, the full-precision head (shared with a tied embedding, not copied); ``approx``: its
        copy when already made (the kernel-ready cache's 4-bit one; int8 mode's ``Int8BlockLinear``), else a 4-bit
        copy made here (int8 rows where E % 32 or V % 16)."""
        super().__init__()
        self.weight = weight  # a plain attribute: the embedding owns it when tied
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.approx = approx
        self.qweight = self.qscale = None
        if approx is None and self.in_features % GROUP == 0 and self.out_features % 16 == 0:  # the packing's tiles
            self.approx = Q4Linear(*quantize_blocks(weight))
        elif approx is None:
            from ponder.model.quant import int8_rows

            self.qweight, self.qscale = int8_rows(weight)
        self.rescore = min(RESCORE, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x # [..., E] -> logits # [..., V] fp32."""
        flat = x.reshape(-1, self.in_features)
        approx = self.approximate(flat)
        top = approx.topk(self.rescore, dim=-1).indices  # [N, k]
        exact = (self.weight[top] * flat.float()[:, None, :]).sum(-1)  # [N, k]: per row, fixed summation order
        approx.scatter_(1, top, exact)
        return approx.view(*x.shape[:-1], self.out_features)

    def approximate(self, flat: torch.Tensor) -> torch.Tensor:
        """The approximate copy's logits # [N, V] fp32 of flat # [N, E]."""
        if self.approx is not None:
            return self.approx(flat.float())
        return torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.qscale).float()

    def extra_repr(self) -> str:
        bits = "int4" if isinstance(self.approx, Q4Linear) else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, approx={bits}, " \
               f"rescore={self.rescore}"


def quantize_q4(model: nn.Module, gguf: Path | None = None, cache: Path | None = None) -> nn.Module:
    """Swap every decoder projection for a ``Q4Linear`` (from ``gguf``'s own blocks when given) and the head for a
    ``RescoredHead``, in place. ``cache``: a safetensors file holding the kernel-ready tensors of an earlier call on
    the same model (read if present, written if not), which saves re-reading the GGUF's blocks (~2.5 s)."""
    names = [(i, owner, name) for i in range(len(model.layers)) for owner, name in (
        ("attn", "wqkv"), ("attn", "wo"), ("mlp", "wgate_up"), ("mlp", "wdown"))]
    stored = _read_cache(cache)
    blocks = {} if stored is not None or gguf is None else _gguf_projection_blocks(gguf, model.config)
    for i, owner, name in names:
        parent = getattr(model.layers[i], owner)
        lin = getattr(parent, name)
        if stored is not None:
            layer = Q4Linear.packed_as(lin.out_features, lin.in_features, stored[f"{i}.{name}.packed"],
                                       stored.get(f"{i}.{name}.scale_zero"), lin.bias)
        else:
            codes, d, m = blocks[(i, name)] if blocks else quantize_blocks(lin.weight)
            layer = Q4Linear(codes, d, m, lin.bias)
        setattr(parent, name, layer)
    weight = model.lm_head.weight.detach()
    approx = None
    if stored is not None and "head.packed" in stored:
        approx = Q4Linear.packed_as(*weight.shape, stored["head.packed"], stored.get("head.scale_zero"))
    model.lm_head = RescoredHead(weight, approx)
    if cache is not None and stored is None:
        layers = {f"{i}.{name}": getattr(getattr(model.layers[i], owner), name) for i, owner, name in names}
        if model.lm_head.approx is not None:
            layers["head"] = model.lm_head.approx
        tensors = {f"{key}.{t}": getattr(layer, t) for key, layer in layers.items() for t in ("packed", "scale_zero")
                   if getattr(layer, t) is not None}
        _write_cache(cache, tensors)
    model.invariant_attention = True  # speculation stays lossless (quant.py)
    return model


def cache_name() -> str:
    """The kernel-ready cache's file name: which kernel's layout it holds (PyTorch's may change with its version)."""
    torch_version = torch.__version__.split("+")[0]  # a layer outside ponder's tiles keeps PyTorch's layout
    if native_kernel():
        return f"q4-v3-ponder-torch{torch_version}.safetensors"
    return f"q4-v2-torch{torch_version}.safetensors"  # v2: with the 4-bit head


def _read_cache(path: Path | None) -> dict[str, torch.Tensor] | None:
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception:  # a damaged cache is rebuilt from the GGUF
        return None


def _write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        tmp = temp_beside(path)  # concurrent loads each write their own, the last one's stays
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except Exception:  # OSError, or safetensors' own error for a full or read-only directory
        pass  # it only costs the next load the GGUF read
    finally:
        if tmp is not None:
            remove_quietly(tmp)  # also after an interrupt: no ~80 MB leftovers


# GGUF tensor names of each fused projection, in fusion order
FUSED = {"wqkv": ("attn_q", "attn_k", "attn_v"), "wo": ("attn_output",), "wgate_up": ("ffn_gate", "ffn_up"),
         "wdown": ("ffn_down",)}


def _gguf_projection_blocks(path: Path, cfg: Any) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
    """(layer, fused projection) -> (codes, d, m) read from the GGUF file's Q4 blocks."""
    from ponder.model.gguf_convert import _open, _unpermute

    reader = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = str(reader.fields["general.architecture"].contents()) if "general.architecture" in reader.fields else "?"
    out: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
    for i in range(cfg.num_hidden_layers):
        for fused, parts in FUSED.items():
            pieces = []
            for part in parts:
                t = tensors.get(f"blk.{i}.{part}.weight")
                if t is None:
                    raise PonderError(f"{path.name} lacks blk.{i}.{part}.weight")
                if t.tensor_type.name not in Q4_TYPES:
                    raise PonderError(
                        f"--dtype q4 reads Q4_0/Q4_1 GGUF projections, but {t.name} in {path.name} is "
                        f"{t.tensor_type.name}; use --dtype int8 or fp32 with this file"
                    )
                codes, d, m = gguf_blocks(t)
                if arch == "llama" and part in ("attn_q", "attn_k"):  # llama.cpp's rotary row order (gguf_convert)
                    heads = cfg.num_attention_heads if part == "attn_q" else cfg.num_key_value_heads
                    codes, d, m = (_unpermute(x, heads) for x in (codes, d, m))
                pieces.append((codes, d, m))
            out[(i, fused)] = tuple(torch.cat(xs).contiguous() for xs in zip(*pieces))
    return out
