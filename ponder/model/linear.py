"""Projection layer with a faster CPU kernel for small batches of rows.

Measured on this project's CPU (Xeon, 2 cores, MKL 2024.2), SmolLM2's 121 fp32 projections per decode step:
``F.linear`` takes ~21 ms for 1 input row but ~49 ms for 8, because MKL's plain sgemm handles 4-16 rows poorly.
The same matmuls on weights reordered once with MKL's packed-GEMM API take ~30 ms for 8 rows, bit-identical.
A packed weight only serves one row count, so ``Linear`` keeps the plain weight for 1-3 rows and, once
``pack_rows(8)`` was called, pads 4-8 rows up to 8 for the packed kernel (8 padded rows are still cheaper than
5 plain ones). Each packed size costs another copy of the weights, so the engine asks for packs only when it
decodes a batch or verifies drafts (speculative decoding packs 4, 8 and 16 rows: whole-model forwards of 4, 8 and
16 tokens then take ~34, ~41 and ~50 ms instead of ~45, ~60 and ~62 ms with plain sgemm; 1-3 tokens ~30 ms).

Bits: on that Xeon the packed kernel and plain sgemm gave every row the bits it gets alone. On an AMD EPYC (same
PyTorch and MKL) the packed kernel and plain sgemm agree for 4 and more rows, but 1, 2 and 3 rows each get other
last bits; padding a decode step's row to 4 would make them agree at ~2.4x the projections' time there (rough, on
a shared machine), so fp32 keeps the fast kernels and speculation on fp32 is exact up to near ties
(docs/speculation.md). tests/test_kernels.py bounds the difference on the machine it runs on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_PACKED_ROWS = 4  # below this, plain sgemm is as fast as the packed kernel


def can_pack(weight: torch.Tensor) -> bool:
    """MKL's packed GEMM exists for fp32 on CPU in PyTorch builds with MKL."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


class Linear(nn.Linear):
    """``nn.Linear`` plus optional MKL-packed copies of the weight, each serving batches of up to its row count."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw: object) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.packed: dict[int, torch.Tensor] = {}  # row count -> packed weight

    def pack_rows(self, *sizes: int) -> None:
        """Prepare the packed kernel for these row counts (a batch of n rows uses the smallest size >= n); sizes
        below MIN_PACKED_ROWS are ignored, and packs for other sizes are freed."""
        wanted = {s for s in sizes if s >= MIN_PACKED_ROWS}
        if not can_pack(self.weight):
            return
        self.packed = {
            s: self.packed[s] if s in self.packed else torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), s)
            for s in sorted(wanted)
        }

    def unpack(self) -> None:
        """Free the packed copies."""
        self.packed = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x # [..., in] -> # [..., out]."""
        n = x.numel() // self.in_features
        size = next((s for s in self.packed if s >= n), 0) if n >= MIN_PACKED_ROWS else 0
        if not size:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(n, self.in_features)
        if n < size:
            flat = torch.cat([flat, flat.new_zeros(size - n, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, self.packed[size], self.weight, self.bias, size)
        return out[:n].view(*x.shape[:-1], self.out_features)
