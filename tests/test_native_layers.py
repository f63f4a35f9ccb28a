"""ponder's native decoder layers (ponder/model/native_layers.py, decoder.c): one C call runs a forward's layers for
int8 and q4 models. A token's bits must not depend on the other tokens, rows or layers of the call (speculation
stays lossless on it), and the hidden states must stay within the per-operator layers' rounding."""

from pathlib import Path

import pytest
import torch
from test_kernels import decode_hidden, prefilled, smollm2_like, verify_hidden
from test_speculate_core import PROMPTS, drafted_and_accepted

import ponder
from ponder.engine import Engine
from ponder.model import native
from ponder.model.native_layers import NativeLayers, unsupported
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator

pytestmark = pytest.mark.skipif(native.q4_library() is None, reason=f"no native 4-bit GEMM: {native.q4_reason()}")


def native_model(dtype: str, layers: int = 2) -> torch.nn.Module:
    model = smollm2_like(dtype, layers=layers, vocab=256)
    model.native_layers = NativeLayers(model)
    return model


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_decode_and_verify_agree_bit_for_bit(dtype: str) -> None:
    """Decode steps vs one verify forward of 6 tokens (one row; two rows of different lengths): identical bits, and
    within the per-operator layers' rounding (the norms, rotary embedding and SwiGLU sum in their own order)."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (37, 61)]
    tokens = [torch.randint(256, (6,), generator=g).tolist() for _ in prompts]
    eager, fast = smollm2_like(dtype, vocab=256), native_model(dtype)
    with torch.inference_mode():
        for rows in (1, 2):
            dec = decode_hidden(fast, prompts[:rows], tokens[:rows])
            ver = verify_hidden(fast, prompts[:rows], tokens[:rows])
            ref = decode_hidden(eager, prompts[:rows], tokens[:rows])
            assert torch.equal(dec, ver), (rows, (dec - ver).abs().max())
            scale = ref.abs().amax(-1, keepdim=True)
            assert ((dec - ref).abs() <= 0.02 * scale).all(), ((dec - ref).abs() / scale).max()
            assert not torch.equal(dec, ref)  # it really ran the C layers
    assert fast.native_layers.forwards > 0 and not fast.native_layers.fallbacks


def test_tree_nodes_get_the_bits_of_decoding_their_path() -> None:
    """A verify forward over a tree (the pending token, two children, a grandchild under the second): each node's
    state equals decoding the path to it one token at a time."""
    model = native_model("q4")
    g = torch.Generator().manual_seed(4)
    prompt = [torch.randint(256, (29,), generator=g).tolist()]
    a, b, c, d = torch.randint(256, (4,), generator=g).tolist()
    ids = torch.tensor([[a, b, c, d]])
    depth = torch.tensor([[0, 1, 1, 2]])
    visible = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]], dtype=torch.bool)
    with torch.inference_mode():
        cache = prefilled(model, prompt)
        tree = model.run_layers(model.embed(ids), model.tree_context(cache, depth, visible), cache)
        for node, path in ((0, [a]), (1, [a, b]), (2, [a, c]), (3, [a, c, d])):
            alone = decode_hidden(model, prompt, [path])[0, -1]
            assert torch.equal(tree[0, node], alone), node


def test_layer_ranges_and_captures_give_the_same_bits() -> None:
    """Layers [0, 2) then [2, 5) in two calls equal [0, 5) in one; captured states are the layers' outputs."""
    model = native_model("q4", layers=5)
    g = torch.Generator().manual_seed(3)
    prompt = [torch.randint(256, (40,), generator=g).tolist()]
    ids = torch.randint(256, (1, 3), generator=g)
    depth = torch.arange(3)[None]
    visible = torch.ones(3, 3, dtype=torch.bool).tril()[None]
    with torch.inference_mode():
        cache = prefilled(model, prompt)
        capture = dict.fromkeys((0, 2, 5))
        whole = model.run_layers(model.embed(ids), model.tree_context(cache, depth, visible), cache, capture=capture)
        cache = prefilled(model, prompt)
        ctx = model.tree_context(cache, depth, visible)
        h2 = model.run_layers(model.embed(ids), ctx, cache, 0, 2)
        split = model.run_layers(h2, ctx, cache, 2, 5)
    assert torch.equal(split, whole) and torch.equal(capture[2], h2) and torch.equal(capture[5], whole)
    assert torch.equal(capture[0], model.embed(ids))


def test_speculation_is_lossless_on_native_layers(tiny_dir: Path, cyclic_dir: Path) -> None:
    """The lossless matrix's shape on native q4 and int8 layers: batch 1 and 3 (ragged rows), chains and trees."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for dtype in ("q4", "int8"):
        for model_dir, specs in ((tiny_dir, [f"draft:{tiny_dir}:explore=0"]),
                                 (cyclic_dir, ["pld:explore=0", "recycling:explore=0"])):
            target = ponder.load(str(model_dir), dtype)
            assert target.model.native_layers is not None
            want = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=1)]
            for spec in specs:
                eng = Engine(target, make_speculator(spec, target))
                for size in (1, 3):
                    out = eng.generate(PROMPTS, params, batch_size=size)
                    assert [c.output_ids for c in out] == want, (dtype, spec, size)
                    drafted, accepted = drafted_and_accepted(out)
                    assert drafted > 0 and accepted > 0, (dtype, spec, size, drafted, accepted)
            assert target.model.native_layers.forwards > 0 and not target.model.native_layers.fallbacks


def test_what_runs_per_operator_and_says_so(tiny_dir: Path) -> None:
    """fp32 models and ``native=False`` keep the per-operator layers; a KV policy's forwards fall back, counted."""
    from ponder.kv import make_policy

    assert ponder.load(str(tiny_dir)).model.native_layers is None
    assert unsupported(ponder.load(str(tiny_dir)).model) is not None
    assert ponder.load(str(tiny_dir), "q4", native=False).model.native_layers is None
    target = ponder.load(str(tiny_dir), "q4")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    Engine(target, kv=make_policy("h2o", 0.5)).generate(PROMPTS[:2], params)
    assert target.model.native_layers.fallbacks["KV policy"] > 0
    # a policy's own cache layout (int8 KV keeps a residual window) falls back even in a forward without the
    # policy's hook (lowbit's copy drafts over the target's cache so): the C code would write outside it
    from ponder.kv.quant import QuantKVCache, QuantOptions

    cfg = target.model.config
    cache = QuantKVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 32, cfg.head_dim, torch.float32, "cpu",
                         QuantOptions(group=4, residual=4), 2)
    before = target.model.native_layers.fallbacks["KV policy"]
    target.model(torch.tensor([[3, 4, 5]]), cache)
    target.model(torch.tensor([[6]]), cache)
    assert target.model.native_layers.fallbacks["KV policy"] == before + 1


def test_info_and_bench_name_the_path(tiny_dir: Path) -> None:
    from ponder.bench.methods import parse_spec
    from ponder.cli import model_summary

    assert model_summary(ponder.load(str(tiny_dir), "q4"))["decoder layers"].startswith("native")
    assert "--no-native" in model_summary(ponder.load(str(tiny_dir), "q4", native=False))["decoder layers"]
    assert parse_spec("baseline:dtype=q4").path != parse_spec("baseline:dtype=q4:native=false").path
    assert parse_spec("pld:dtype=q4").path == parse_spec("baseline:dtype=q4").path
    with pytest.raises(ponder.PonderError, match="native must be true or false"):
        parse_spec("baseline:dtype=q4:native=maybe")


@pytest.mark.skipif(not native.q4_amx(), reason="this CPU's GEMM has no AMX")
def test_amx_everywhere_keeps_rows_and_speculation_exact(tiny_dir: Path, cyclic_dir: Path) -> None:
    """``amx=True``: decode steps and verify forwards both on the bulk kernel, so a token's bits still do not
    depend on its batch or on drafting (greedy batch 1 == batch 3 == pld), while they are other bits than the
    default kernel's (it really runs)."""
    model = smollm2_like("q4", vocab=256)
    model.native_layers = NativeLayers(model, bulk=True)
    for m in model.modules():
        if hasattr(m, "bulk_always"):
            m.bulk_always = True
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (37, 61)]
    tokens = [torch.randint(256, (6,), generator=g).tolist() for _ in prompts]
    with torch.inference_mode():
        dec = decode_hidden(model, prompts, tokens)
        assert torch.equal(dec, verify_hidden(model, prompts, tokens))
        assert torch.equal(dec[:1], decode_hidden(model, prompts[:1], tokens[:1]))  # alone == in a batch of two
        assert not torch.equal(dec, decode_hidden(native_model("q4"), prompts, tokens))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for dtype in ("q4", "int8"):
        target = ponder.load(str(cyclic_dir), dtype, amx=True)
        bulk = [m.bulk_always for m in target.model.modules() if hasattr(m, "bulk_always")]
        assert target.model.native_layers.bulk and len(bulk) >= 4 and all(bulk)
        want = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=1)]
        assert [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=3)] == want, dtype
        out = Engine(target, make_speculator("pld:explore=0", target)).generate(PROMPTS, params, batch_size=3)
        assert [c.output_ids for c in out] == want, dtype
        assert drafted_and_accepted(out)[1] > 0


def test_amx_is_refused_where_it_cannot_apply(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One line, before anything runs, wherever ``amx`` cannot do what it says: fp32, a CPU whose GEMM has no AMX
    (faked here on every CPU), a model some of whose products the GEMM does not tile; and where it can, it reaches
    every product (faked AMX: the bulk kernel is then the plain one, so only the switches are checked)."""
    from ponder.bench.methods import parse_spec
    from ponder.model import kernels

    with pytest.raises(ponder.PonderError, match="applies to int8 and q4"):
        ponder.load(str(tiny_dir), "fp32", amx=True)
    with pytest.raises(ponder.PonderError, match="amx=true applies to dtype=int8 or dtype=q4"):
        parse_spec("baseline:amx=true")
    with monkeypatch.context() as m:
        m.setattr(native, "q4_amx", lambda: False)
        for dtype in ("q4", "int8"):
            with pytest.raises(ponder.PonderError, match="cannot use AMX here"):
                ponder.load(str(tiny_dir), dtype, amx=True)
            with pytest.raises(ponder.PonderError, match=f"method 'baseline:dtype={dtype}:amx=true': --amx: .*cannot "
                                                          "use AMX here"):
                parse_spec(f"baseline:dtype={dtype}:amx=true")  # when the run is parsed, not when its turn comes
    monkeypatch.setattr(native, "q4_amx", lambda: True)
    assert parse_spec("baseline:dtype=q4:amx=true").path != parse_spec("baseline:dtype=q4").path
    for dtype in ("q4", "int8"):
        loaded = ponder.load(str(tiny_dir), dtype, amx=True)
        switches = [m.bulk_always for m in loaded.model.modules() if hasattr(m, "bulk_always")]
        assert len(switches) >= 4 and all(switches) and loaded.model.native_layers.bulk
        assert not any(m.bulk_always for m in ponder.load(str(tiny_dir), dtype).model.modules()
                       if hasattr(m, "bulk_always"))
    tune = kernels.tune

    def one_layer_off_the_gemm(model: torch.nn.Module, path: Path) -> object:
        model.layers[0].mlp.wdown.native = False  # as a shape the GEMM does not tile would leave it
        return tune(model, path)

    monkeypatch.setattr(kernels, "tune", one_layer_off_the_gemm)
    with pytest.raises(ponder.PonderError, match=r"--amx: 1 of this model's \d+ int8/q4 products have shapes"):
        ponder.load(str(tiny_dir), "q4", amx=True)
