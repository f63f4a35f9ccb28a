"""ponder's 4-bit GEMM (ponder/model/q4mm.c, q4.pack_native): it multiplies by the GGUF block weights (d * q + m)
with bf16-rounded activations, a row's bits do not depend on the other rows of the call or on the thread count, and
the scalar build (CPUs without AVX512-BF16) gives the vector build's bits."""

import pytest
import torch

from ponder.model import native
from ponder.model.q4 import GROUP, Q4Linear, pack_native

pytestmark = pytest.mark.skipif(native.Q4.library() is None, reason=f"q4 kernel not built: {native.Q4.reason}")


def blocks(out: int, inn: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes with fp16-representable d and m (a Q4_1 tensor's fields)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.uint8)
    d = (torch.rand(out, inn // GROUP, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out, inn // GROUP, generator=g) * 0.1).half().float()
    return codes, d, m


def weight(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return codes.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)


def mm(lib, x: torch.Tensor, packed: torch.Tensor, out: int, threads: int = 2) -> torch.Tensor:
    y = torch.empty(x.shape[0], out)
    assert lib.ponder_q4_mm(x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], out, x.shape[1], threads) == 0
    return y


@pytest.mark.parametrize("out,inn", [(80, 64), (96, 576), (48, 1536)])
def test_products_are_the_block_weights_times_bf16_activations(out: int, inn: int) -> None:
    codes, d, m = blocks(out, inn)
    packed = pack_native(codes, d, m)
    x = torch.randn(19, inn) * 3  # 19 rows: tiles of 8, 8, 3; 80 columns: 5 strips, split 2 / 3 between threads
    got = mm(native.Q4.library(), x, packed, out)
    ref = x.to(torch.bfloat16).double() @ weight(codes, d, m).double().T
    assert (got.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_a_rows_bits_do_not_depend_on_the_call() -> None:
    lib = native.Q4.library()
    codes, d, m = blocks(160, 576, seed=1)
    packed = pack_native(codes, d, m)
    x = torch.randn(13, 576)
    together = mm(lib, x, packed, 160)
    alone = torch.cat([mm(lib, x[i : i + 1], packed, 160) for i in range(13)])
    assert torch.equal(together, alone)
    assert torch.equal(mm(lib, x, packed, 160, threads=1), together)
    assert torch.equal(mm(lib, x[3:9], packed, 160, threads=3), together[3:9])


@pytest.mark.skipif(native.q4_library() is None, reason="no AVX512-BF16: only the scalar build exists here")
def test_the_scalar_build_gives_the_vector_builds_bits() -> None:
    scalar = native.Kernel("q4mm", native.Q4.signatures, native.FLAGS + ["-mno-avx512bf16"]).library()
    assert scalar is not None and scalar.ponder_q4_fast() == 0
    codes, d, m = blocks(32, 128, seed=2)
    packed = pack_native(codes, d, m)
    x = torch.randn(5, 128)
    assert torch.equal(mm(scalar, x, packed, 32), mm(native.q4_library(), x, packed, 32))


def test_layer_dequantizes_to_the_gguf_weights_and_refuses_bad_shapes() -> None:
    from ponder.errors import PonderError

    codes, d, m = blocks(64, 96, seed=3)
    layer = Q4Linear(codes, d, m, native=True)
    assert layer.native and layer.scale_zero is None and "kernel=ponder" in repr(layer)
    assert torch.equal(layer.dequantized(), weight(codes, d, m))
    x = torch.randn(2, 3, 96)
    assert layer(x).shape == (2, 3, 64)
    torch_layer = Q4Linear(codes, d, m, native=False)  # PyTorch's kernel: scale and zero rounded to bf16
    assert (torch_layer.dequantized() - weight(codes, d, m)).abs().max() < 2**-7 * weight(codes, d, m).abs().max()
    with pytest.raises(PonderError, match="q4 kernel: needs float32"):
        native.q4_mm(torch.randn(1, 96), layer.packed, 60)


def test_info_says_which_kernel_multiplies(tiny_dir) -> None:
    import ponder
    from ponder.cli import model_summary

    fast = native.q4_library() is not None
    info = model_summary(ponder.load(str(tiny_dir), "q4"))
    assert info["weight kernel"].startswith("ponder's 4-bit GEMM (q4mm.c" if fast else "PyTorch's int4 kernel (")
    int8 = model_summary(ponder.load(str(tiny_dir), "int8"))["weight kernel"]
    assert int8.startswith("ponder's 4-bit GEMM (int8 blocks" if fast else "PyTorch's _weight_int8pack_mm")
    assert "weight kernel" not in model_summary(ponder.load(str(tiny_dir), "fp32"))


def test_int8_blocks_are_two_4bit_planes_of_the_q8_0_codes() -> None:
    """int8 on ponder's GEMM: the layer multiplies by d * q exactly (q within [-127, 127], each weight within half a
    step of its original), with bf16 activations, and a row's bits do not depend on the call."""
    from torch import nn

    from ponder.model.quant import Int8BlockLinear, int8_blocks

    lin = nn.Linear(96, 48, bias=True)
    layer = Int8BlockLinear(lin)
    codes, d = int8_blocks(lin.weight)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    want = codes.float() * d.repeat_interleave(GROUP, 1)
    assert torch.equal(layer.dequantized(), want)
    assert ((want - lin.weight).abs() <= d.repeat_interleave(GROUP, 1) / 2 + 1e-7).all()
    x = torch.randn(6, 96)
    ref = x.to(torch.bfloat16).double() @ want.double().T + lin.bias.double()
    assert (layer(x).double() - ref).abs().max().item() < 1e-5
    assert torch.equal(torch.cat([layer(x[i : i + 1]) for i in range(6)]), layer(x))


@pytest.mark.parametrize("rows", [2, 3, 4, 10, 11, 12])
def test_every_tile_shape_gives_the_same_products(rows: int) -> None:
    """One thread over 16 strips: tiles of 8 and 4 strips whose sums live in the output (not registers), then the
    remainders; each row's bits as when it is alone."""
    lib = native.Q4.library()
    codes, d, m = blocks(256, 128, seed=4)
    packed = pack_native(codes, d, m)
    x = torch.randn(rows, 128)
    got = mm(lib, x, packed, 256, threads=1)
    ref = x.to(torch.bfloat16).double() @ weight(codes, d, m).double().T
    assert (got.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert torch.equal(torch.cat([mm(lib, x[i : i + 1], packed, 256, threads=1) for i in range(rows)]), got)


def test_bad_inputs_are_refused_before_the_kernel_reads_them() -> None:
    from ponder.errors import PonderError

    codes, d, m = blocks(64, 96, seed=5)
    packed = pack_native(codes, d, m)
    for x, n in ((torch.randn(2, 96, dtype=torch.float16), 64), (torch.randn(2, 3, 96), 64),
                 (torch.randn(2, 96), 80), (torch.randn(2, 64), 64)):
        with pytest.raises(PonderError, match="q4 kernel: needs float32"):
            native.q4_mm(x, packed, n)
    assert native.q4_mm(torch.randn(0, 96), packed, 64).shape == (0, 64)
    with pytest.raises(PonderError, match="strips of 16"):
        pack_native(codes[:60], d[:60], m[:60])


def bulk(lib, x: torch.Tensor, packed: torch.Tensor, out: int, threads: int = 2) -> torch.Tensor:
    y = torch.empty(x.shape[0], out)
    assert lib.ponder_q4_mm_bulk(x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], out, x.shape[1],
                                 threads) == 0
    return y


def test_bulk_products_are_the_same_products_and_a_rows_own() -> None:
    """The prefill kernel (AMX where the CPU has it): the block weights times bf16 activations as the decode
    kernel computes them (to the last bits where there is no AMX), a row's bits independent of the call's other
    rows (tiles of 16: 37 rows = 16 + 16 + 5), its strips (3 per tile: 10 strips) and threads."""
    lib = native.Q4.library()
    codes, d, m = blocks(160, 576, seed=4)
    packed = pack_native(codes, d, m)
    x = torch.randn(37, 576) * 3
    got = bulk(lib, x, packed, 160)
    ref = x.to(torch.bfloat16).double() @ weight(codes, d, m).double().T
    assert (got.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    alone = torch.cat([bulk(lib, x[i : i + 1], packed, 160) for i in range(37)])
    assert torch.equal(got, alone)
    assert torch.equal(bulk(lib, x, packed, 160, threads=1), got)
    assert torch.equal(bulk(lib, x[3:20], packed, 160, threads=3), got[3:20])
    if not native.q4_amx():
        assert torch.equal(got, mm(lib, x, packed, 160))
    layer = Q4Linear(codes, d, m)
    assert torch.equal(layer(x, bulk=True), got) and torch.equal(layer(x), mm(lib, x, packed, 160))
