"""Weight dtypes: fp32 (exact), bf16/fp16 (half-width weights and activations), int8 (lossy).

fp16 attends token by token for decode and verify steps, as int8 does (below): its activations keep 11 bits of
mantissa, few enough for a last-bit difference between a decode step and a verify forward to change tokens. bf16
cannot be speculated with (``ponder.speculate.REFUSED_DTYPES``): its CPU GEMM is not row-invariant
(tests/test_kernels.py).

``int8`` stores every decoder-layer projection as int8 weights and multiplies them with bf16 activations; the
residual stream, norms and attention stay fp32. The LM head stays fp32 where ponder's GEMM does not run; where it
does, the head is ``q4.RescoredHead`` over an int8-block copy: the copy's logits, with each row's 16 best re-scored
in fp32 against the full-precision weight, so the greedy token is the fp32 head's whenever it ranks in the copy's
top 16 (as q4's 4-bit head does; a 49152 x 576 fp32 head cost 4.3 ms of a 10.4 ms int8 decode step, 2026-12-05).
Where ponder's 4-bit GEMM runs (``q4.py``: AVX512-BF16 and a C compiler), the weights are int8 in blocks of 32 along
the input, one fp16 scale each (GGUF's Q8_0 layout, ``Int8BlockLinear``); elsewhere one scale per output channel
(symmetric, round to nearest; ``torch._weight_int8pack_mm``, a fused CPU/GPU kernel, ``Int8Linear``). Blocks follow
the weights more closely: SmolLM2's GGUF weights are Q4_1 blocks, which per-channel int8 rounds a second time to a
coarse grid (top-1 agreement with fp32 97.4% against 98.5% with blocks of 32, 2,433 teacher-forced positions of 26
Spec-Bench prompts, simulated in fp32, 2026-12-05), and the block kernel reads ~40 bytes per 32 weights against the
per-channel kernel's 32 but runs at ponder's GEMM's speed. Measured on SmolLM2-135M (3 chat prompts, 303
teacher-forced greedy tokens, per-channel) and why it is built this way:

| int8 variant                                              | top-1 agreement with fp32 |
|-----------------------------------------------------------|---------------------------|
| PyTorch dynamic quantization (int8 activations), all      | 53-60%                    |
| weight-only int8, bf16 activations, head int8 too         | 96.4%                     |
| weight-only int8, bf16 activations, fp32 head             | 99.3%                     |

(the head ponder uses now, an int8-block copy re-scored in fp32, gives the fp32 head's greedy token; above)

Dynamic quantization rounds activations to int8 with one scale per tensor, and this model's activations carry
large outlier channels, so every projection loses most of its precision. A bf16 head rounds logits to ~0.1, coarser
than many top-2 margins. Quantized modes are lossy: the bench reports their fidelity.

**Batch-invariant attention.** Speculative decoding must reproduce int8 plain decoding token for token, but a
verify forward computes a token's attention among several queries (a masked many-query kernel) where plain decoding
computes it alone, and the two sum in different orders. In fp32 that changes the last bit and the next token only at
exact ties; here every projection first rounds its input to bf16 (8 bits of mantissa), so a last-bit difference
can move a value across a bf16 rounding boundary and change the logits by ~0.2 a few steps later (measured on a
Spec-Bench prompt: plain and speculative int8 outputs parted after 18 tokens, 7 of 13 prompts differing within 96
tokens). So int8 mode attends token by token in decode steps and verify forwards alike
(``LlamaModel.invariant_attention``, ``llama.attend_queries``): each token's attention sums in an order of its own,
over its visible keys in the order plain decoding has them, so it has the same bits whatever else is in the forward.
In float32 ponder's C kernel does that for every token and row of a forward in one call per layer (``native.py``);
without it, each token gets the very PyTorch call a one-token decode step makes for it (a tree's tokens get their
ancestors copied into a scratch row). Every projection's input row is then identical whatever else is in the batch
(``_weight_int8pack_mm`` and ponder's GEMM are row-invariant, and so is the re-scored head; an fp32 head, where
ponder's GEMM does not run, is not, which only matters at exact ties, as in fp32 mode).
Prefills, alike in plain and speculative decoding, attend in one call. This replaced float64 attention (and a
float64 KV cache), which made both kernels' results round to the same fp32 value: token by token in fp32 gives
the same guarantee exactly, halves the KV bytes, and a q4 decode step's attention costs half as much (30 calls of
fp32 instead of float64 at a few hundred tokens of context); a verify forward makes one call per token instead of
one masked call, which still costs less than the float64 masked call up to 16 tokens (AMD EPYC, 2 threads).

What invariant attention does not cover: a verify forward's projections must give each row the bits it gets
alone. They do for ``_weight_int8pack_mm`` and fp16 ``F.linear`` on the CPUs measured (tests/test_kernels.py
checks the machine it runs on); bf16 ``F.linear`` does not (SmolLM2's 1536-wide down projection on an AMD EPYC:
some rows of an 8-or-more-row call round differently than alone), and with batch-invariant attention bf16
speculation still parted from bf16 plain decoding after 31 and 45 tokens on 2 of 4 Spec-Bench prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ponder.errors import PonderError
from ponder.model.llama import LlamaModel
from ponder.model.q4 import GROUP, native_kernel, pack_native, q4_mm, q4_mm_bulk, quantize_q4

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert_dtype(model: LlamaModel, dtype: str, gguf: Path | None = None, q4_cache: Path | None = None,
                  device: str = "cpu") -> LlamaModel:
    """Cast (fp32, bf16, fp16) or quantize (int8, q4) the weights; q4 takes the projections' 4-bit blocks from the
    ``gguf`` file the model came from, where there is one, kernel-ready tensors cached in ``q4_cache`` (``q4.py``).
    ``device``: the device type the model will run on (int8 blocks need ponder's CPU kernel)."""
    if dtype in FLOAT_DTYPES:
        model = model.to(FLOAT_DTYPES[dtype])
        if dtype == "fp16":
            model.invariant_attention = True  # as for int8 (module doc)
        return model
    if dtype == "int8":
        return quantize_int8(model, blocks=device == "cpu")
    if dtype == "q4":
        return quantize_q4(model, gguf, q4_cache)
    raise ValueError(f"unknown dtype {dtype}")


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 # [out, in] times per-output-channel scales # [out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = int8_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """x # [..., in] -> # [..., out], in x's dtype (``bulk``: as ``Linear.forward``; one kernel here)."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer effectively multiplies by, # [out, in] fp32 (for tests and error bounds)."""
        return self.qweight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8BlockLinear(nn.Module):
    """``y = x W^T + b`` with W as int8 codes in blocks of 32 along ``in`` (``w = d * q``, q in [-127, 127], one fp16
    ``d`` per block, as GGUF's Q8_0), multiplied by ponder's 4-bit GEMM (``q4mm.c``, bf16 activations, fp32 sums).

    The GEMM reads 4-bit codes with a scale and a minimum per block, so a block's codes are split into two 4-bit
    planes: with ``q + 128 = 16 h + l`` (h, l in 0..15), ``d q = (16 d) h - 128 d + d l``, i.e. plane h with scale
    16 d and minimum -128 d plus plane l with scale d and minimum 0 (16 d and 128 d are exact in fp16). Both planes
    go through one kernel call as 2 x out output columns whose halves are added: exact products in fp32 lanes, so a
    row's bits still never depend on the other rows of the call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % GROUP or self.out_features % 16:
            raise PonderError(f"int8 blocks need in % {GROUP} == 0 and out % 16 == 0, got "
                              f"{tuple(linear.weight.shape)}")
        codes, d = int8_blocks(linear.weight)
        u = (codes.to(torch.int16) + 128).to(torch.uint8)
        zeros = torch.zeros_like(d)
        self.register_buffer("packed", pack_native(torch.cat([u >> 4, u & 15]), torch.cat([16 * d, d]),
                                                   torch.cat([-128 * d, zeros])))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.bulk_always = False  # every product on the bulk kernel (a model loaded with amx=True; loader.py)

    def forward(self, x: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """x # [..., in] -> # [..., out], in x's dtype (the product itself is computed from bf16 activations;
        ``bulk``: a prefill's rows, on the GEMM's bulk kernel, ``q4mm.c``)."""
        if x.device.type != "cpu":
            raise PonderError("int8 blocks run on ponder's CPU kernel: load the model with its device (ponder.load("
                              "..., device=...)) to get int8 per output channel there")
        y = self._product(x.reshape(-1, self.in_features).float(), bulk).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _product(self, flat: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        both = (q4_mm_bulk if bulk or self.bulk_always else q4_mm)(flat, self.packed, 2 * self.out_features)
        return both[:, : self.out_features] + both[:, self.out_features :]

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, # [out, in] fp32: the kernel applied to the identity matrix."""
        return self._product(torch.eye(self.in_features, dtype=torch.float32)).T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"blocks=32"


def int8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0-style rounding of weight # [out, in]: int8 codes # [out, in] and fp16-representable scales
    # [out, in / 32] (the largest magnitude of a block / 127, rounded up to an fp16 value so codes stay in range)."""
    out, inn = weight.shape
    blocks = weight.detach().float().reshape(out, inn // 32, 32)
    peak = blocks.abs().amax(-1)
    d = (peak / 127).to(torch.float16)
    d = torch.where(d.float() < peak / 127, torch.nextafter(d, torch.full_like(d, float("inf"))), d).float()
    codes = torch.round(blocks / torch.where(d > 0, d, 1)[..., None]).clamp(-127, 127)
    return codes.reshape(out, inn).to(torch.int8), d


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rounding of weight # [out, in] with one bf16 scale per row: (int8 # [out, in], bf16 # [out])."""
    if weight.shape[1] % 16:  # the kernel reads rows in 16-wide tiles and crashes the process on others
        raise PonderError(f"int8 weights need an input width that is a multiple of 16, got {tuple(weight.shape)}")
    w = weight.detach().float()
    # the kernel takes bf16 scales: round them first and quantize against the rounded value, so every weight
    # stays within half a step of its original (rounding the scale up keeps the extreme values in range)
    peak = w.abs().amax(dim=1)
    scale = (peak.clamp(min=1e-12) / 127.0).to(torch.bfloat16)
    up = scale.float() < peak / 127.0
    scale = torch.where(up, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int8_linears(module: nn.Module, skip_unsupported: bool = False, blocks: bool = False) -> None:
    """Swap every ``nn.Linear`` inside ``module`` for an ``Int8Linear`` (with ``blocks``: an ``Int8BlockLinear``
    where the shape suits ponder's GEMM), in place; with ``skip_unsupported``, those whose input width the kernel
    cannot take (not a multiple of 16) stay as they are instead of being refused."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (skip_unsupported and child.in_features % 16):
                fits = blocks and child.in_features % 32 == 0 and child.out_features % 16 == 0
                setattr(parent, name, Int8BlockLinear(child) if fits else Int8Linear(child))


def quantize_int8(model: LlamaModel, blocks: bool = True) -> LlamaModel:
    """Swap every projection inside the decoder layers for an ``Int8BlockLinear`` where ponder's GEMM runs (and
    ``blocks``: the model stays on the CPU) and the shape suits it, else for an ``Int8Linear``, in place (module
    doc)."""
    blocks = blocks and native_kernel()
    for layer in model.layers:
        int8_linears(layer, blocks=blocks)
    head = model.lm_head
    if blocks and head.in_features % GROUP == 0 and head.out_features % 16 == 0 and head.bias is None:
        from ponder.model.q4 import RescoredHead

        model.lm_head = RescoredHead(head.weight, Int8BlockLinear(head))  # module doc
    model.invariant_attention = True  # speculation stays lossless (module doc)
    return model


