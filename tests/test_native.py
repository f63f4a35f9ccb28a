"""The native batch-invariant attention kernel (ponder/model/native.py, attention.c): it computes attention (close
to PyTorch's), gives every token the bits it gets alone whatever shares the call, and steps aside cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ponder.model import native
from ponder.model.llama import attend_queries

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernel not built: {native.reason()}")


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """attend_queries' per-token PyTorch calls (no plan)."""
    return attend_queries(q, keys, values, queries)


def case(B: int, T: int, Hkv: int, G: int, D: int, S: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hkv * G, D, generator=g)
    keys = torch.randn(B, Hkv, S, D, generator=g)
    values = torch.randn(B, Hkv, S, D, generator=g)
    return q, keys, values


@pytest.mark.parametrize("Hkv,G,D", [(3, 3, 64), (2, 4, 128), (4, 1, 32), (1, 8, 16)])
def test_chains_match_pytorch_attention(Hkv: int, G: int, D: int) -> None:
    """Rows of different prefix lengths, each with a chain of new tokens (one row padded after its first two):
    the kernel's output is PyTorch's attention to float32 rounding, padding gets zeros."""
    B, T, S = 3, 4, 90
    q, keys, values = case(B, T, Hkv, G, D, S)
    queries = torch.tensor([[(L, t - 1, 0) for t in range(T)] for L in (50, 71, 20)])
    queries[2, 2:, 1] = -1  # row 2: two tokens, then padding
    plan = native.plan(queries)
    got = attend_queries(q, keys, values, queries, None, plan)
    want = reference(q, keys, values, queries)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2, 2:], torch.zeros_like(got[2, 2:]))


def test_trees_and_windows_match_pytorch_attention() -> None:
    """A tree row (two branches and padding) and a sliding window's first readable slot (also past the prefix, as
    a small window over a deep tree has it): the same attention as PyTorch's per-token calls."""
    q, keys, values = case(2, 7, 3, 3, 64, 80, seed=1)
    parents = [-1, 0, 0, 1, 2, 4, -1]
    queries = torch.tensor([[(40, p, 0) for p in parents], [(60, p, 0) for p in parents]])
    queries[1, :, 2] = torch.tensor([55, 57, 57, 58, 58, 62, 0])  # row 1: a window; token 5 starts past the prefix
    got = attend_queries(q, keys, values, queries, None, native.plan(queries))
    want = reference(q, keys, values, queries)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_token_gets_the_bits_it_gets_alone() -> None:
    """Batch invariance, the kernel's reason to exist: each token of a 3-row, 6-token verify (chains, so tokens
    share key loads; two threads) has exactly the output of a one-token decode call with its own keys."""
    B, T, Hkv, G, D, S = 3, 6, 3, 3, 64, 400
    q, keys, values = case(B, T, Hkv, G, D, S, seed=2)
    lengths = [300, 123, 377]
    queries = torch.tensor([[(L, t - 1, 0) for t in range(T)] for L in lengths])
    together = native.attend(q, keys, values, native.plan(queries))
    for b, L in enumerate(lengths):
        for t in range(T):
            one = torch.tensor([[(L + t, -1, 0)]])
            alone = native.attend(q[b : b + 1, t : t + 1], keys[b : b + 1], values[b : b + 1], native.plan(one))
            assert torch.equal(together[b, t], alone[0, 0]), (b, t)


def test_one_token_decode_matches_sdpa() -> None:
    q, keys, values = case(1, 1, 3, 3, 64, 257, seed=3)
    got = native.attend(q, keys, values, native.plan(torch.tensor([[(256, -1, 0)]])))
    want = F.scaled_dot_product_attention(q.view(1, 3, 3, 64), keys, values).view(1, 1, 9, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_and_dtypes_keep_the_pytorch_calls() -> None:
    """A head dim that is not a multiple of 16, or fp16, is computed by the per-token calls despite a plan."""
    queries = torch.tensor([[(20, -1, 0), (20, 0, 0)]])
    q, keys, values = case(1, 2, 2, 2, 24, 30, seed=4)
    assert not native.fits(q, keys)
    got = attend_queries(q, keys, values, queries, None, native.plan(queries))
    assert torch.equal(got, reference(q, keys, values, queries))
    q16, k16, v16 = (x.half() for x in case(1, 2, 2, 2, 64, 30, seed=5))
    assert not native.fits(q16, k16)


def test_switched_off_by_environment(tiny_dir) -> None:
    """PONDER_NATIVE=0: no kernel, and fp32 attends with PyTorch's calls as without it (no per-token fallback)."""
    code = ("import sys, ponder; from ponder.model import native; "
            "print(native.library() is None, native.reason(), ponder.load(sys.argv[1]).model.invariant_attention)")
    run = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PONDER_NATIVE": "0"})
    assert run.stdout.split() == ["True", "PONDER_NATIVE=0", "False"], run.stderr


def test_info_says_how_invariant_attention_runs(tiny_dir) -> None:
    import ponder
    from ponder.cli import _invariant_attention

    assert _invariant_attention(ponder.load(str(tiny_dir), "int8").model) == "native kernel (one call per layer)"
    assert _invariant_attention(ponder.load(str(tiny_dir), "fp16").model).startswith("one PyTorch call per token")
    # fp32 on the CPU: every row of a decode step in one native call (loader.load_model)
    assert _invariant_attention(ponder.load(str(tiny_dir), "fp32").model) == "native kernel (one call per layer)"
    assert _invariant_attention(ponder.load(str(tiny_dir), "bf16").model).startswith("off")


def test_built_once_into_the_cache_and_a_missing_compiler_is_a_fallback(tmp_path) -> None:
    """The first process builds the kernel into $PONDER_CACHE/native, the next one loads that file; with no usable
    compiler the kernel is simply not used, with the reason."""
    code = ("from ponder.model import native; lib = native.library(); "
            "print(lib is not None, native.reason())")
    env = {**os.environ, "PONDER_CACHE": str(tmp_path / "cache")}
    env.pop("PONDER_NATIVE", None)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert first.stdout.split() == ["True", "None"], first.stderr
    built = list((tmp_path / "cache" / "native").glob("attention-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert again.stdout.split() == ["True", "None"], again.stderr
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again
    none = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "PONDER_CACHE": str(tmp_path / "other"), "CC": str(tmp_path / "no-such-cc")})
    assert none.stdout.startswith("False "), none.stderr
    assert "no-such-cc" in none.stdout


def test_fp32_with_per_head_holes_attends_as_without_the_kernel(tiny_dir) -> None:
    """The kernel does not take per-head holes (``snapkv:alloc=...``): fp32, which needs no identical bits, keeps
    PyTorch's one masked call there instead of the per-token fallback (~3x its time); int8 keeps the token-by-token
    path, which its lossless speculation needs."""
    import ponder

    prompt = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]])
    depth, visible = torch.arange(3)[None].expand(2, 3), torch.ones(3, 3, dtype=torch.bool).tril()[None].expand(2, 3, 3)
    for dtype, with_holes in (("fp32", False), ("int8", True)):
        model = ponder.load(str(tiny_dir), dtype).model
        cache = model.new_cache(2, 32)
        with torch.inference_mode():
            model(prompt, cache)
        assert model.step_context(cache, 1, [1, 1]).queries is not None
        assert model.tree_context(cache, depth, visible).queries is not None
        cache._ensure_holes()
        assert (model.step_context(cache, 1, [1, 1]).queries is not None) == with_holes
        assert (model.tree_context(cache, depth, visible).queries is not None) == with_holes
