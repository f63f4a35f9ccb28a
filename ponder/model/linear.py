"""Projection layer that picks, per number of input rows, the fastest fp32 kernel this machine has.

Which BLAS path is fast for a few rows depends on the CPU. Measured with SmolLM2's 121 fp32 projections per
forward (2 threads, PyTorch 2.13 with MKL):

| rows | ``F.linear`` (x W^T) | ``W @ x^T`` | MKL packed (4, 8, 16) |
|------|----------------------|-------------|-----------------------|
| Intel Xeon, 2026-11-25: 1 / 8 | ~21 / ~49 ms | - | - / ~30 ms |
| AMD EPYC, 2026-12-02: 1 / 2 / 4 / 16 | 25.7 / 41.4 / 39.2 / - ms | 25.8 / 13.3 / 20.3 / 39.7 ms | - |

So the same product written as ``W @ x^T`` (another of MKL's code paths) is 3x faster for 2 rows on that AMD CPU,
and there one input row padded with a zero row to two runs in half the time of the row alone. ``ponder.model.
kernels`` measures the candidates once per machine and gives every ``Linear`` a route: for each row count, the
kernel to use and how many rows to pad to (padding to a larger count whenever that is cheaper, which also makes the
cost curve monotone in the row count: no cliffs for the speculative policy to trip on). Kernels:

- ``plain``: ``F.linear``;
- ``nt``: ``(W @ x^T)^T``; the same sums in MKL's other operand order;
- ``packed``: MKL's packed GEMM on a weight reordered once per row count (``pack_rows``: another copy of the
  weights each, so the engine packs only the sizes the route uses);
- ``dnn``: oneDNN's fp32 inner product (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor itself emits for
  frozen CPU linears) on one copy of the weights in oneDNN's blocked layout (``prepare_dnn``), made once when the
  route uses it. On the AMD EPYC above it costs 17 / 16 / 22 / 25 ms for 1 / 4 / 8 / 16 rows over 120 random matrices
  of SmolLM2's projection shapes, against 15 / 21 / 44 / 55 ms for the best MKL call: the cheapest kernel from 4 rows
  up, which takes the verify forwards of speculation (and batches) off MKL's slow small-M paths. From 2 rows on, a
  row's bits do not depend on the other rows of the call (tests/test_kernels.py; a 1-row call may sum in another
  order). Row counts beyond the route (prefills) stay on ``F.linear``, the kernel transformers uses, so prompt logits
  keep matching transformers' within 1e-4 (oneDNN would be 1.3-1.4x faster there for 64-512 rows, but moved SmolLM2's
  prompt logits 1.1e-4).

Bits: kernels may differ in the last bits of fp32 sums (see tests/test_kernels.py); fp32 speculation is therefore
exact up to near ties (docs/speculation.md), as it was with one kernel, whose 1-row and n-row calls differ too.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MIN_PACKED_ROWS = 4  # below this the packed kernel is never chosen
# fp16 on the CPU: a one-row product runs padded with a zero row to two. On a Xeon with AVX512-FP16 (2026-12-05) a
# row's fp16 product alone had other bits than among 2-33 rows (which all agreed), so decode steps and speculation's
# verify forwards disagreed in last bits, which fp16's rounding turns into other tokens; padded, they agree
# (tests/test_kernels.py checks the machine the tests run on). Elsewhere it costs one zero row.
FP16_PAD = 2


def can_pack(weight: torch.Tensor) -> bool:
    """MKL's packed GEMM exists for fp32 on CPU in PyTorch builds with MKL."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


class Linear(nn.Linear):
    """``nn.Linear`` plus a per-row-count kernel route (module doc) and optional MKL-packed weight copies."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw: object) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.packed: dict[int, torch.Tensor] = {}  # row count -> packed weight
        self.route: dict[int, tuple[str, int]] = {}  # rows -> (kernel, rows padded to); empty: F.linear everywhere
        self.dnn: torch.Tensor | None = None  # the weight in oneDNN's layout (an opaque tensor), when a route uses it

    def pack_rows(self, *sizes: int) -> None:
        """Prepare the packed kernel for forwards of up to max(sizes) rows and free other packs. Without a route,
        pack these sizes (a batch of n rows uses the smallest size >= n; sizes below MIN_PACKED_ROWS are
        ignored); with one, pack the sizes the route sends those row counts to."""
        if self.route:
            most = max(sizes, default=0)
            wanted = {rows for n, (kernel, rows) in self.route.items() if kernel == "packed" and n <= most}
        else:
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

    def prepare_dnn(self) -> None:
        """Make the oneDNN copy of the weight (``dnn`` kernel) if this build has the kernel; idempotent."""
        if self.dnn is None and can_dnn(self.weight):
            self.dnn = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    def forward(self, x: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """x # [..., in] -> # [..., out]. ``bulk``: the rows are a prefill's, whose bits need not match a decode
        step's (the quantized layers multiply them on a kernel of their own where one is faster: ``q4.py``)."""
        n = x.numel() // self.in_features
        if x.requires_grad and torch.is_grad_enabled():  # a backward through it (duo's margin gradients): the
            return F.linear(x, self.weight, self.bias)  # packed and oneDNN kernels have no autograd
        if self.route:
            kernel, rows = self.route.get(n, ("plain", n))
            if (kernel == "packed" and rows not in self.packed) or (kernel == "dnn" and self.dnn is None):
                kernel, rows = "plain", n
        else:  # no route: F.linear, or the smallest packed size that holds the rows
            rows = next((s for s in self.packed if s >= n), 0) if n >= MIN_PACKED_ROWS else 0
            kernel, rows = ("packed", rows) if rows else ("plain", n)
        if kernel == "plain" and n == 1 and self.weight.dtype == torch.float16 and self.weight.device.type == "cpu":
            kernel, rows = "plain", FP16_PAD  # one fp16 row: padded (``FP16_PAD``)
        elif kernel == "plain":
            return F.linear(x, self.weight, self.bias)
        out = self.run(kernel, x.reshape(n, self.in_features), rows)
        return out.view(*x.shape[:-1], self.out_features)

    def run(self, kernel: str, flat: torch.Tensor, rows: int) -> torch.Tensor:
        """flat # [n, in] through ``kernel`` with the rows zero-padded to ``rows`` -> # [n, out]."""
        n = flat.shape[0]
        if rows > n:
            flat = torch.cat([flat, flat.new_zeros(rows - n, self.in_features)])
        if kernel == "packed":
            packed = _outside_graphs(_packed_linear) if torch.compiler.is_compiling() else _packed_linear
            out = packed(flat, self.packed[rows], self.weight, self.bias, rows)
        elif kernel == "dnn":
            dnn = _outside_graphs(_dnn_linear) if torch.compiler.is_compiling() else _dnn_linear
            out = dnn(flat, self.dnn, self.bias)
        elif kernel == "nt":
            # a row-major input (its transpose a column-major operand) is the layout the route was measured with:
            # an input that is itself a transposed view (the output of another nt product, e.g. through SwiGLU's
            # chunks) makes MKL take another path, ~4x slower for SmolLM2's down projection on 2 rows
            out = torch.matmul(self.weight, flat.contiguous().T).T
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(flat, self.weight, self.bias)
        return out[:n]


def can_dnn(weight: torch.Tensor) -> bool:
    """oneDNN's fp32 inner product exists on CPU in PyTorch builds with mkldnn."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _dnn_linear(flat: torch.Tensor, dnn: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's inner product on the reordered weight, always run eagerly (an opaque tensor has no fake-tensor
    form for the compiler to trace)."""
    return torch.ops.mkldnn._linear_pointwise(flat, dnn, bias, "none", [], "")


def _packed_linear(
    flat: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """MKL's packed GEMM, always run eagerly: inductor's lowering of it needs a static row count, and the fast
    path (fast.py) compiles with dynamic shapes. While compiling, the caller takes it through ``_outside_graphs``."""
    return torch.ops.mkl._mkl_linear(flat, packed, weight, bias, rows)


@functools.cache
def _outside_graphs(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``kernel`` wrapped by ``torch.compiler.disable``, made once per kernel on first use: wrapping imports
    torch._dynamo (~1.3 s, which every process would otherwise pay at start) and costs ~50 us, too much to pay per
    call."""
    return torch.compiler.disable(kernel)
