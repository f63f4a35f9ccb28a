"""Decode vs verify on the kernels ponder picks on the machine the tests run on.

Greedy speculation reproduces plain greedy decoding only if a token's logits come out the same whether the token is
computed alone (a decode step: 1-row projections, one query attending an unmasked span) or inside a verify forward
(n-row projections, possibly MKL's packed GEMM, many queries under a tree mask). Which kernels give which bits
depends on the CPU and the BLAS build, so these tests check the machine they run on, with SmolLM2's shapes and the
same set-up speculation uses (``pack_for_rows`` for 4-32 rows):

- int8, q4 and fp16 round every projection's input to 8 or 11 bits of mantissa, so a last-bit difference can cross a
  rounding boundary and change tokens a few steps later: their projections must be row-invariant bit for bit and
  their attention (token by token, ``LlamaModel.invariant_attention``) must give the same bits; the whole decoder's
  hidden state must come out identical, for chains, trees and rows of equal or different lengths.
- fp32 keeps 24 bits between kernels, so kernels may differ in the last bits (they do between MKL's 1-row and
  n-row sgemm on some CPUs, and between one-query and masked many-query attention everywhere); that changes a token
  only where its top-2 logits nearly tie. The tests bound the difference, which catches a kernel that computes at
  reduced precision.
- bf16 speculation is refused (``ponder.speculate``): bf16 GEMM is not row-invariant on every CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ponder.cache import KVCache
from ponder.files import _umask
from ponder.model.config import ModelConfig
from ponder.model.llama import LlamaModel
from ponder.model.loader import attend_natively
from ponder.model.quant import convert_dtype

# row counts of speculation's verify forwards (up to 32 tokens, ``Speculator.prepare``): every count where a kernel
# could switch (1-9), around the packed sizes 16 and 32, and one between
ROWS = [*range(1, 10), 12, 15, 16, 17, 24, 31, 32, 33]
EXACT = ("fp16", "int8", "q4")  # dtypes whose lossless speculation needs identical bits (module doc)


def smollm2_like(dtype: str, layers: int = 2, vocab: int = 8192) -> LlamaModel:
    """SmolLM2-135M's shapes (E=576, 9/3 heads, FFN 1536; a sixth of its vocabulary) with random weights, converted
    as ``ponder.load`` does and packed as speculation packs it."""
    cfg = ModelConfig("llama", vocab, 576, 1536, layers, 9, 3, 64, 2048, 1e-5, 100000.0)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model = convert_dtype(model, dtype).eval()
    if dtype == "fp32":
        attend_natively(model)
    model.pack_for_rows(4, 8, 16, 32)
    return model


def projections(model: LlamaModel) -> dict[str, torch.nn.Module]:
    layer = model.layers[0]
    return {"wqkv": layer.attn.wqkv, "wo": layer.attn.wo, "wgate_up": layer.mlp.wgate_up, "wdown": layer.mlp.wdown,
            "lm_head": model.lm_head}


def fp32_bound(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """1e-5 of sum_k |x_k w_k| per output, # [n, out]: any summation order in fp32 stays well within it (typical
    differences are ~1e-6 of it), a kernel computing in bf16 or TF32 does not."""
    w = layer.weight.float()
    return 1e-5 * (x.float().abs() @ w.abs().T)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "q4"])
def test_projection_rows_match_decode(dtype: str) -> None:
    """Each row of an n-row projection (n = 2..33, packed where ponder packs) against the same row computed alone."""
    model = smollm2_like(dtype)
    # int8 and q4 heads re-score each row's best logits one by one (their approximate copies are row-invariant)
    head_exact = dtype in ("fp16", "int8", "q4")
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for name, layer in projections(model).items():
            act = model.dtype if name == "lm_head" or dtype not in ("int8", "q4") else torch.float32
            x = torch.randn(max(ROWS), layer.in_features, generator=g).to(act)  # [N, in]
            alone = torch.cat([layer(x[j : j + 1]) for j in range(len(x))])  # [N, out]: decode's 1-row calls
            exact = dtype in EXACT and (name != "lm_head" or head_exact)
            for n in ROWS:
                many = layer(x[:n])
                if exact:
                    bad = [j for j in range(n) if not torch.equal(many[j], alone[j])]
                    assert not bad, f"{dtype} {name}: rows {bad} of a {n}-row call differ from the 1-row call"
                else:
                    err = (many.float() - alone[:n].float()).abs()
                    assert (err <= fp32_bound(x[:n], layer)).all(), f"{dtype} {name}, {n} rows: {err.max():.3g}"


def prefilled(model: LlamaModel, prompts: list[list[int]]) -> KVCache:
    """A cache holding each prompt in its own row, prefilled one row at a time as the engine does."""
    cache = model.new_cache(len(prompts), 128)
    for b, p in enumerate(prompts):
        row = cache.row(b)
        model(torch.tensor([p]), row)
        cache.set_length(b, row.lengths[0])
    return cache


def decode_hidden(model: LlamaModel, prompt: list[list[int]], tokens: list[list[int]]) -> torch.Tensor:
    """Final hidden states # [B, T, E] of ``tokens`` fed one decode step at a time after ``prompt`` (ragged rows)."""
    cache = prefilled(model, prompt)
    out = []
    for t in range(len(tokens[0])):
        ctx = model.step_context(cache, 1, [1] * len(prompt))
        out.append(model.run_layers(model.embed(torch.tensor([[r[t]] for r in tokens])), ctx, cache))
        cache.advance([1] * len(prompt))
    return torch.cat(out, 1)


def verify_hidden(model: LlamaModel, prompt: list[list[int]], tokens: list[list[int]]) -> torch.Tensor:
    """The same hidden states from one verify forward over each row's chain of ``tokens`` (as ``forward_tree``)."""
    cache = prefilled(model, prompt)
    B, T = len(tokens), len(tokens[0])
    depth = torch.arange(T)[None].expand(B, T)  # [B, T]: a chain
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)  # [B, T, T]
    ctx = model.tree_context(cache, depth, visible)
    return model.run_layers(model.embed(torch.tensor(tokens)), ctx, cache)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "q4"])
def test_decoder_hidden_states_match_decode(dtype: str) -> None:
    """The decoder's final hidden state of each token: decode steps vs one verify forward of 16 tokens, for one row
    and for two rows of different lengths (ragged decode attends row by row; the verify's mask covers both)."""
    model = smollm2_like(dtype, vocab=256)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (37, 61)]
    tokens = [torch.randint(256, (16,), generator=g).tolist() for _ in prompts]
    with torch.inference_mode():
        for rows in (1, 2):
            dec = decode_hidden(model, prompts[:rows], tokens[:rows])
            ver = verify_hidden(model, prompts[:rows], tokens[:rows])
            if dtype in EXACT:
                assert torch.equal(dec, ver), f"{dtype}, {rows} rows: {(dec - ver).abs().max():.3g}"
            else:
                scale = dec.abs().amax(-1, keepdim=True)  # [B, T, 1]
                assert ((dec - ver).abs() <= 1e-5 * scale).all(), f"{dtype}: {((dec - ver).abs() / scale).max():.3g}"


def test_route_plan_pads_to_cheaper_row_counts_and_keeps_plain_within_the_margin() -> None:
    from ponder.model.kernels import MARGIN, plan

    costs = {("plain", 1): 10.0, ("nt", 1): 10.0, ("plain", 2): 30.0, ("nt", 2): 6.0, ("plain", 3): 31.0,
             ("nt", 3): 12.0, ("plain", 4): 9.0 * (1 + MARGIN / 2), ("nt", 4): 9.0}
    route = plan(costs)
    assert route[1] == ("nt", 2)  # one row padded to two costs less than one row alone
    assert route[2] == ("nt", 2)
    assert route[3] == ("nt", 4) or route[3] == ("plain", 4)  # the 4-row call is cheaper than any 3-row one
    assert route[4] == ("plain", 4)  # within the margin: plain stays
    # the routed cost never decreases with the row count (no cliffs)
    cost = {n: costs[route[n]] for n in route}
    assert all(cost[n] <= cost[n + 1] for n in range(1, 4))


def test_routes_are_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    from ponder.model import kernels

    model = smollm2_like("fp32", layers=1, vocab=256)
    calls = []
    real = kernels.measure
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: calls.append(1) or real(*a, reps=1, **k))
    first = kernels.tune(model, tmp_path)
    assert len(calls) == 2 and set(first) == {"layers", "head"}  # the projections and the head
    assert model.layers[0].mlp.wdown.route == first["layers"] and model.lm_head.route == first["head"]
    assert set(first["layers"]) == set(range(1, max(kernels.ROWS) + 1))
    again = smollm2_like("fp32", layers=1, vocab=256)
    assert kernels.tune(again, tmp_path) == first and len(calls) == 2  # read back, not measured
    int8 = smollm2_like("int8", layers=1, vocab=256)  # int8 projections and a re-scored head: nothing routed
    assert kernels.tune(int8, tmp_path) == {}
    assert kernels.tune(smollm2_like("fp16", layers=1, vocab=256), tmp_path) == {}  # fp32 only


def test_processes_measuring_at_once_all_take_the_first_stored_routes(tmp_path, monkeypatch) -> None:
    """A route decides a product's last bits: a process that measured while another stored its routes first uses
    the stored ones (a server and its client engine must compute the same tokens)."""
    from ponder.model import kernels

    path = tmp_path / "routes.json"
    first = {"layers": {n: ("plain", n) for n in kernels.ROWS}}
    mine = {"layers": {n: ("nt", n) for n in kernels.ROWS}}
    assert kernels._write(path, first) == first
    assert kernels._write(path, mine) == first and kernels._read(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["routes.json"]  # no temporary file left
    with monkeypatch.context() as m:  # no hard links on this file system: still stored
        m.setattr(kernels.os, "link", lambda a, b: (_ for _ in ()).throw(PermissionError("no links")))
        assert kernels._write(tmp_path / "nolink.json", mine) == mine and kernels._read(tmp_path / "nolink.json") == mine
    damaged = tmp_path / "damaged.json"
    for text in ('{"layers": {"1": ["pl', "null"):  # a writer cut short, JSON of another shape: replaced
        damaged.write_text(text)
        assert kernels._write(damaged, mine) == mine and kernels._read(damaged) == mine
    assert damaged.stat().st_mode & 0o777 == 0o666 & ~_umask()  # readable by a shared cache's other users
    with monkeypatch.context() as m:  # a read-only cache: every write and even unlinking fail (EROFS)
        def refuse(*a, **k):
            raise OSError(30, "Read-only file system")

        m.setattr(kernels, "temp_beside", refuse)
        assert kernels._write(tmp_path / "ro" / "routes.json", mine) == mine
        m.undo()
        for name in ("link", "replace"):
            m.setattr(kernels.os, name, refuse)
        m.setattr(Path, "unlink", refuse)
        assert kernels._write(tmp_path / "ro.json", mine) == mine  # no traceback out of the cleanup
    model = smollm2_like("fp32", layers=1, vocab=256)
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: {})
    monkeypatch.setattr(kernels, "plan", lambda costs: mine["layers"])
    monkeypatch.setattr(kernels, "_write", lambda p, routes: {"layers": first["layers"], "head": first["layers"]})
    kernels.tune(model, tmp_path / "fresh")
    assert model.layers[0].mlp.wdown.route == first["layers"] and model.lm_head.route == first["layers"]


@pytest.mark.parametrize("kernel", ["plain", "nt", "packed"])
def test_every_kernel_computes_the_projection(kernel: str) -> None:
    """Each route target, padded or not, within the fp32 bound of F.linear."""
    from ponder.model.linear import Linear, can_pack

    layer = Linear(96, 80)
    torch.nn.init.normal_(layer.weight)
    if kernel == "packed":
        if not can_pack(layer.weight):
            pytest.skip("no MKL packed GEMM in this PyTorch build")
        layer.packed = {8: torch.ops.mkl._mkl_reorder_linear_weight(layer.weight.detach(), 8)}
    x = torch.randn(5, 96)
    for rows in (5, 8):
        if kernel == "packed" and rows != 8:
            continue
        err = (layer.run(kernel, x, rows) - torch.nn.functional.linear(x, layer.weight)).abs()
        assert (err <= fp32_bound(x, layer)).all()


def test_dnn_kernel_rows_do_not_depend_on_the_other_rows() -> None:
    """oneDNN's inner product (the ``dnn`` route) gives every row of a call of 2 or more rows the same bits at
    every such row count (a 1-row call may sum in another order: it does for SmolLM2's down projection on an AMD
    EPYC), and stays within fp32 summation noise of ``F.linear``; ``tune`` makes its weight copy only when a route
    uses it."""
    from ponder.model.linear import Linear, can_dnn

    model = smollm2_like("fp32")
    if not can_dnn(model.lm_head.weight):
        pytest.skip("this PyTorch build has no oneDNN fp32 inner product")
    layers = projections(model)
    for layer in layers.values():
        layer.route = {n: ("dnn", n) for n in ROWS}
        layer.prepare_dnn()
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for name, layer in layers.items():
            x = torch.randn(max(ROWS), layer.in_features, generator=g)
            most = layer(x)
            for n in ROWS[1:]:
                many = layer(x[:n])
                bad = [j for j in range(n) if not torch.equal(many[j], most[j])]
                assert not bad, f"dnn {name}: rows {bad} of a {n}-row call differ from the {len(x)}-row call"
            alone = torch.cat([layer(x[j : j + 1]) for j in range(len(x))])
            for out in (most, alone):
                err = (out - torch.nn.functional.linear(x, layer.weight)).abs()
                assert (err <= fp32_bound(x, layer)).all(), f"dnn {name}: {err.max():.3g}"
    # a route without the kernel frees the copy; one with it makes it
    from ponder.model.kernels import _give_route

    wo = Linear(576, 576)
    _give_route(wo, {1: ("dnn", 1)})
    assert wo.dnn is not None
    _give_route(wo, {1: ("nt", 2)})
    assert wo.dnn is None
    wo.route = {1: ("dnn", 1)}  # a route naming the kernel without its copy falls back to F.linear, same values
    x = torch.randn(1, 576)
    assert torch.equal(wo(x), torch.nn.functional.linear(x, wo.weight))
    # an input that needs a gradient takes F.linear, the one kernel with autograd (duo's margin gradients)
    _give_route(wo, {m: ("dnn", m) for m in range(1, 9)})
    x = torch.randn(8, 576)
    xg = x.clone().requires_grad_(True)
    wo(xg).sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad, wo.weight.detach().sum(0).expand_as(x), atol=1e-5)


def test_route_plan_takes_the_fewest_rows_within_the_margin() -> None:
    from ponder.model.kernels import plan

    # 6 rows measured 2% cheaper than 1 row (noise): one row stays one row
    costs = {("plain", 1): 40.0, ("dnn", 1): 28.4, ("dnn", 2): 28.3, ("dnn", 6): 27.9, ("plain", 6): 44.0}
    route = plan(costs)
    assert route[1] == ("dnn", 1)
    assert route[2] == ("dnn", 2)
    assert route[3] == ("dnn", 6)


def tree_hidden(model: LlamaModel, prompt: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
    """Final hidden states # [T, E] of one verify forward over a tree after ``prompt``: ``tokens[0]`` the root,
    ``parents[i]`` the index of token i's parent (-1: the root's; -1 after it: padding, as the engine pads rows)."""
    cache = prefilled(model, [prompt])
    T = len(tokens)
    depth, visible = torch.zeros(1, T, dtype=torch.long), torch.eye(T, dtype=torch.bool)[None]
    for i, p in enumerate(parents):
        if p >= 0:
            depth[0, i] = depth[0, p] + 1
            visible[0, i] |= visible[0, p]
    ctx = model.tree_context(cache, depth, visible)
    return model.run_layers(model.embed(torch.tensor([tokens])), ctx, cache)[0]


@pytest.mark.parametrize("dtype", EXACT)
def test_tree_and_equal_row_verifies_match_decode(dtype: str) -> None:
    """A verify forward over a tree (two branches, then padding) gives each node the hidden state decoding its path
    token by token gives it; two rows of equal length verified together (one attention call per token position
    for both) give each row the states that decoding it alone gives."""
    model = smollm2_like(dtype, vocab=256)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(256, (45,), generator=g).tolist()
    r, a1, b1, a2, b2, b3, pad = torch.randint(256, (7,), generator=g).tolist()
    with torch.inference_mode():
        tree = tree_hidden(model, prompt, [r, a1, b1, a2, b2, b3, pad], [-1, 0, 0, 1, 2, 4, -1])
        path_a = decode_hidden(model, [prompt], [[r, a1, a2]])[0]
        path_b = decode_hidden(model, [prompt], [[r, b1, b2, b3]])[0]
        assert torch.equal(tree[[0, 1, 3]], path_a), f"{dtype}: {(tree[[0, 1, 3]] - path_a).abs().max():.3g}"
        assert torch.equal(tree[[0, 2, 4, 5]], path_b), f"{dtype}: {(tree[[0, 2, 4, 5]] - path_b).abs().max():.3g}"
        prompts = [prompt, torch.randint(256, (45,), generator=g).tolist()]
        tokens = [torch.randint(256, (9,), generator=g).tolist() for _ in prompts]
        both = verify_hidden(model, prompts, tokens)
        for b in range(2):
            alone = decode_hidden(model, prompts[b : b + 1], tokens[b : b + 1])[0]
            assert torch.equal(both[b], alone), f"{dtype}, row {b}: {(both[b] - alone).abs().max():.3g}"


def test_route_plan_packs_for_few_row_counts() -> None:
    """Each packed row count is another copy of the weights: a plan packs for ``MAX_PACKED`` counts at most, those
    that serve the most row counts, and routes the others to the best of what is left."""
    from ponder.model.kernels import MAX_PACKED, plan

    costs = {}
    for n in range(1, 17):
        costs[("plain", n)] = 10.0 * n
        costs[("dnn", n)] = 8.0 * n
        if n >= 4:
            costs[("packed", n)] = 7.0 * n  # cheapest at every count: unbounded, it would pack for all 13
    route = plan(costs)
    packed = {rows for kernel, rows in route.values() if kernel == "packed"}
    assert 1 <= len(packed) <= MAX_PACKED
    assert all(kernel == "dnn" for n, (kernel, rows) in route.items() if rows not in packed and n >= 4)
    assert route[1] == ("dnn", 1)
