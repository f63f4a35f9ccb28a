"""The fast path (ponder/model/fast.py): the compiled decode/verify layer against the eager layers, and lossless
speculation on it."""

from pathlib import Path

import pytest
import torch
from test_kernels import decode_hidden, smollm2_like, verify_hidden
from test_speculate_core import PROMPTS, drafted_and_accepted

import ponder
from ponder.engine import Engine
from ponder.model.fast import FastPath, ragged_decode_attention
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator

pytestmark = pytest.mark.serial  # compiles: with both cores (Makefile)


@pytest.mark.parametrize("dtype", ["fp32", "q4"])
def test_compiled_decode_and_verify_agree(dtype: str) -> None:
    """q4 needs bit-identical decode steps and verify forwards on the compiled path (one row and two ragged rows);
    fp32 stays within the eager layers' rounding of them."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (37, 61)]
    tokens = [torch.randint(256, (6,), generator=g).tolist() for _ in prompts]
    eager = smollm2_like(dtype, vocab=256)
    fast = smollm2_like(dtype, vocab=256)
    fast.fast = FastPath()
    with torch.inference_mode():
        for rows in (1, 2):
            dec = decode_hidden(fast, prompts[:rows], tokens[:rows])
            ver = verify_hidden(fast, prompts[:rows], tokens[:rows])
            ref = decode_hidden(eager, prompts[:rows], tokens[:rows])
            scale = ref.abs().amax(-1, keepdim=True)
            if dtype == "q4":
                assert torch.equal(dec, ver), (rows, (dec - ver).abs().max())
            else:
                assert ((dec - ver).abs() <= 1e-5 * scale).all()
            assert ((dec - ref).abs() <= (0.05 if dtype == "q4" else 1e-5) * scale).all()
    assert fast.fast.forwards > 0 and not fast.fast.fallbacks


def test_greedy_speculation_is_lossless_on_the_fast_path(tiny_dir: Path, cyclic_dir: Path) -> None:
    """The lossless matrix's shape on compiled q4 layers: batch 1 and 3 (ragged rows) against compiled plain
    decoding one prompt at a time; every case drafts and gets drafts accepted."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for model_dir, specs in ((tiny_dir, [f"draft:{tiny_dir}:explore=0"]),
                             (cyclic_dir, ["pld:explore=0", "recycling:explore=0", "early-exit:layer=1:explore=0"])):
        target = ponder.load(str(model_dir), "q4", compile=True, native=False)
        want = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=1)]
        for spec in specs:
            eng = Engine(target, make_speculator(spec, target))
            for size in (1, 3):
                out = eng.generate(PROMPTS, params, batch_size=size)
                assert [c.output_ids for c in out] == want, (spec, size)
                drafted, accepted = drafted_and_accepted(out)
                assert drafted > 0 and accepted > 0, (spec, size, drafted, accepted)
        assert target.model.fast.forwards > 0 and not target.model.fast.fallbacks


def test_ragged_decode_reads_each_row_alone(tiny_dir: Path) -> None:
    """A ragged decode step attends row by row over each row's own slots (the eager layer's way), inside the
    compiled graph: the operator equals a masked attention over the longest row, and plain greedy decoding of
    prompts of different lengths in one compiled q4 batch equals each prompt decoded alone."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 2, 3, 16, generator=g, dtype=torch.float64)
    keys, values = (torch.randn(3, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    reads = torch.tensor([7, 40, 23])
    mask = (torch.arange(40)[None] < reads[:, None])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    got = ragged_decode_attention(q, keys, values, reads)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-12)
    target = ponder.load(str(tiny_dir), "q4", compile=True, native=False)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    alone = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=1)]
    assert len({len(p) for p in PROMPTS}) > 1  # the batch is ragged
    together = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=len(PROMPTS))]
    assert together == alone
    assert target.model.fast.forwards > 0 and not target.model.fast.fallbacks


def test_warm_up_compiles_what_serving_meets(tiny_dir: Path, cyclic_dir: Path) -> None:
    """``Engine.warm_up`` compiles the graphs of one row, equal rows, ragged rows and verify forwards, so that later
    generations (plain and speculative, any batch) compile nothing; without a fast path it does nothing."""
    from torch._dynamo.utils import counters

    assert Engine(ponder.load(str(tiny_dir), "q4")).warm_up() == 0.0
    target = ponder.load(str(cyclic_dir), "q4", compile=True, native=False)
    assert Engine(target, make_speculator("pld:explore=0", target)).warm_up() > 0
    graphs = counters["stats"]["unique_graphs"]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    for spec in (None, "pld:explore=0"):
        eng = Engine(target, None if spec is None else make_speculator(spec, target))
        for size in (1, 3, 4):
            eng.generate(PROMPTS, params, batch_size=size)
    assert counters["stats"]["unique_graphs"] == graphs


def test_kv_policies_run_eagerly_and_say_so(tiny_dir: Path) -> None:
    from ponder.kv import make_policy

    target = ponder.load(str(tiny_dir), compile=True)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = Engine(ponder.load(str(tiny_dir)), kv=make_policy("h2o", 0.5)).generate(PROMPTS[:2], params)
    got = Engine(target, kv=make_policy("h2o", 0.5)).generate(PROMPTS[:2], params)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]
    assert target.model.fast.fallbacks["KV policy"] > 0


def test_a_forward_that_reads_every_slot_gets_a_spare_one(tiny_dir: Path) -> None:
    """Reading the whole cache would compile graphs of its own (the slice is the full tensor): the fast path keeps
    one spare slot instead, and the step gives the bits it gives in a larger cache."""
    m = ponder.load(str(tiny_dir), compile=True).model
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    out = []
    with torch.inference_mode():
        for size in (9, 32):
            cache = m.new_cache(1, size)
            m(prompt, cache)
            out.append(m(torch.tensor([[13]]), cache)[0, -1])
            assert cache.max_len == (10 if size == 9 else 32) and cache.lengths == [9]
    assert torch.equal(out[0], out[1])


def test_capturing_or_starting_late_runs_the_same_graphs() -> None:
    """A verify that captures hidden states (the head drafter) or is handed a drafter's state at a later layer
    (early exit) gives the bits of a plain verify: on the fast path the layer groups are fixed from layer 0 (on
    SmolLM2 q4, regrouping layers around captured ones changed head+pld's tokens on 2 of 39 Spec-Bench prompts)."""
    from test_kernels import prefilled

    model = smollm2_like("q4", layers=12, vocab=256)
    model.fast = FastPath()
    g = torch.Generator().manual_seed(3)
    prompt = [torch.randint(256, (40,), generator=g).tolist()]
    ids = torch.randint(256, (1, 4), generator=g)
    depth = torch.arange(4)[None]
    visible = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    index = {id(layer): i for i, layer in enumerate(model.layers)}
    groups, compiled = [], model.fast.step

    def recording(blocks, *args):  # which layers each compiled call ran
        groups.append((index[id(blocks[0])], index[id(blocks[-1])] + 1))
        return compiled(blocks, *args)

    model.fast.step = recording
    with torch.inference_mode():
        plain = model.forward_tree(ids, prefilled(model, prompt), depth, visible)
        assert groups == [(0, 5), (5, 10), (10, 12)]
        capture = dict.fromkeys((2, 7, 12))
        groups.clear()
        captured = model.forward_tree(ids, prefilled(model, prompt), depth, visible, capture=capture)
        assert groups == [(0, 5), (5, 10), (10, 12)]
        cache = prefilled(model, prompt)
        h3 = model.run_layers(model.embed(ids), model.tree_context(cache, depth, visible), cache, 0, 3)
        groups.clear()
        late = model.forward_tree(ids, cache, depth, visible, start_layer=3, hidden=h3)
        assert groups == [(0, 5), (5, 10), (10, 12)]
    assert torch.equal(captured, plain) and torch.equal(late, plain)
    assert all(capture[k] is not None and capture[k].shape == (1, 4, 576) for k in capture)
    assert torch.equal(model.logits(capture[12]), plain)  # the last layer's output is the state the head reads
