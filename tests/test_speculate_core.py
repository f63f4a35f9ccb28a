"""Speculative decoding: lossless greedy matrix over every registered drafter and every dtype, trees, cache
compaction, the tree verify forward, and the sampling acceptance rule (exact and statistical).

The greedy matrix runs on ``cyclic_model`` (a tiny checkpoint whose continuation mostly follows short cycles), where
every drafter drafts and gets drafts accepted: each case asserts it, so a drafter that silently stops drafting fails
the matrix instead of passing it by comparing two plain runs."""

from pathlib import Path

import pytest
import torch

import ponder
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import RowNoise, SamplingParams, gumbel_noise, sample, warp
from ponder.speculate import drafter_names, make_speculator
from ponder.speculate.accept import accept
from ponder.speculate.tree import DraftTree, merge


PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7],  # repetitive: copying drafters get accepted
    [3, 1, 4, 1, 5, 9, 2, 6],
    [11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11],
    [40, 41, 42],
]


def spec_table(
    model_dir: Path, head_dir: Path, medusa_dir: Path | None = None, exits_dir: Path | None = None,
) -> dict[str, list[str]]:
    """A concrete SPEC per registered drafter (a new drafter without an entry fails the matrix); ``head_dir``,
    ``medusa_dir`` and ``exits_dir`` hold a draft head, Medusa heads and exit adapters trained for the model in
    ``model_dir``."""
    medusa_dir, exits_dir = medusa_dir or head_dir, exits_dir or head_dir
    return {
        "pld": ["pld", "pld:branches=3:max_ngram=4"],
        "lookahead": ["lookahead"],
        "recycling": ["recycling", "recycling:k=8:widths=8-2-1"],
        "draft": [f"draft:{model_dir}"],
        "lowbit": ["lowbit", "lowbit:weights=int8:k=4"],
        "early-exit": ["early-exit:layer=1", "early-exit", f"early-exit:layer=1:adapter={exits_dir}"],
        "head": [f"head:{head_dir}", f"head:{head_dir}:depth=3:k=2"],
        "medusa": [f"medusa:{medusa_dir}", f"medusa:{medusa_dir}:heads=2:k=3"],
    }


@pytest.fixture(scope="module")
def baseline(cyclic) -> dict[int, list[list[int]]]:
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    eng = Engine(cyclic)
    return {b: [c.output_ids for c in eng.generate(PROMPTS[:b] if b > 1 else PROMPTS[:1], params)] for b in (1, 3)}


def drafted_and_accepted(completions: list) -> tuple[int, int]:
    return sum(c.spec.drafted for c in completions), sum(c.spec.accepted for c in completions)


def test_every_drafter_has_a_spec(tiny_dir: Path) -> None:
    assert set(spec_table(tiny_dir, tiny_dir)) == set(drafter_names())


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_matrix_equals_baseline(
    cyclic, cyclic_dir: Path, cyclic_head_dir: Path, cyclic_medusa_dir: Path, cyclic_exits_dir: Path, baseline,
    batch: int,
) -> None:
    table = spec_table(cyclic_dir, cyclic_head_dir, cyclic_medusa_dir, cyclic_exits_dir)
    specs = [s for v in table.values() for s in v]
    specs += ["pld+recycling", "lookahead+early-exit:layer=1", "pld+recycling:adaptive=false:max_nodes=12",
              f"head:{cyclic_head_dir}+pld", f"head:{cyclic_head_dir}+medusa:{cyclic_medusa_dir}"]
    specs = [f"{s}:explore=0" for s in specs]  # the gate times steps; here every case must draft (and accept)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[:1]
    for spec in specs:
        eng = Engine(cyclic, make_speculator(spec, cyclic))
        counts = []
        for _ in range(2):  # the second run starts from what the drafters and policy learned
            out = eng.generate(prompts, params)
            assert [c.output_ids for c in out] == baseline[batch], spec
            counts.append(drafted_and_accepted(out))
        # not vacuous: the verify path really checked drafts, and kept some (the two runs count together)
        assert sum(d for d, _ in counts) > 0 and sum(a for _, a in counts) > 0, (spec, counts)
    # single prompts of every shape too (ragged batches above, lone rows here)
    eng = Engine(cyclic, make_speculator("pld", cyclic))
    plain = Engine(cyclic)
    alone = [eng.generate([p], params)[0] for p in PROMPTS]
    assert [c.output_ids for c in alone] == [plain.generate([p], params)[0].output_ids for p in PROMPTS]
    assert all(c.spec.drafted > 0 for c in alone) and drafted_and_accepted(alone)[1] > 0


@pytest.mark.parametrize("dtype,native", [("fp16", True), ("int8", True), ("q4", True), ("q4", False)])
def test_greedy_speculation_is_lossless_in_every_dtype(
    tiny_dir: Path, cyclic_dir: Path, cyclic_head_dir: Path, dtype: str, native: bool,
) -> None:
    """fp32 is the matrix above; fp16, int8 and q4 round activations to 11 and 8 bits of mantissa, where a last-bit
    difference between a decode step and a verify forward would change tokens, so they attend token by token (see
    ``quant.py``; tests/test_kernels.py checks the kernels bit for bit). The random model with itself as the draft
    model gets long chains accepted; the cyclic one gets trees (recycling) and early exit's reused hidden states
    accepted, and the trained head (with int8 weights of its own under int8 and q4 targets); an int8 target also
    with its q4 copy drafting (``lowbit``). int8 and q4 run
    ponder's native decoder layers where the CPU has them (``native_layers.py``), q4 also per operator."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    # explore=0: the gate times steps, and every case here must draft (and accept) whatever the machine's load
    for model_dir, specs in ((tiny_dir, [f"draft:{tiny_dir}:explore=0"]),
                             (cyclic_dir, ["recycling:explore=0", "early-exit:layer=1:explore=0",
                                           f"head:{cyclic_head_dir}:explore=0"]
                              + (["lowbit:explore=0"] if dtype == "int8" else []))):
        target = ponder.load(str(model_dir), dtype, native=native)
        want = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=1)]
        for spec in specs:
            eng = Engine(target, make_speculator(spec, target))
            if spec.startswith("head"):
                from ponder.model.quant import Int8Linear

                int8 = [m for m in eng.speculator.drafter.head.modules() if isinstance(m, Int8Linear)]
                assert bool(int8) == (dtype in ("int8", "q4")), dtype
            for size in (1, 3):
                out = eng.generate(PROMPTS, params, batch_size=size)
                assert [c.output_ids for c in out] == want, (dtype, spec, size)
                drafted, accepted = drafted_and_accepted(out)
                assert drafted > 0 and accepted > 0, (dtype, spec, size, drafted, accepted)


def test_bf16_speculation_is_refused(tiny_dir: Path) -> None:
    """bf16 matmuls are not row-invariant on every CPU (SmolLM2's 1536-wide FFN projection on an AMD EPYC: a row
    computed among 8 or more rows rounds differently than alone), so speculation would not be lossless."""
    bf16 = ponder.load(str(tiny_dir), "bf16")
    with pytest.raises(PonderError, match="not lossless with --dtype bf16"):
        make_speculator("pld", bf16)


def test_copying_is_accepted(tiny) -> None:
    """Not vacuous: on a prompt the random model continues periodically, pld drafts get accepted."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    eng = Engine(tiny, make_speculator("pld:adaptive=false:min_prob=0", tiny))
    c = eng.generate([PROMPTS[2]], params)[0]
    assert c.spec.steps < len(c.output_ids) and c.spec.accepted > 0


def test_stops_like_baseline(tiny) -> None:
    plain, eng = Engine(tiny), Engine(tiny, make_speculator("pld:adaptive=false:min_prob=0", tiny))
    for n in (1, 2, 7):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        a, b = plain.generate([PROMPTS[2]], params)[0], eng.generate([PROMPTS[2]], params)[0]
        assert a.output_ids == b.output_ids and len(b.output_ids) == n
    full = plain.generate([PROMPTS[2]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    stop = plain.tokenizer.decode(full.output_ids[3:5])
    if stop.strip():
        params = SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,))
        a, b = plain.generate([PROMPTS[2]], params)[0], eng.generate([PROMPTS[2]], params)[0]
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


def test_tree_basics() -> None:
    t = merge([DraftTree.chain([1, 2, 3]), DraftTree.chain([1, 2, 4]), DraftTree.chain([5])])
    assert (t.tokens, t.parents) == ([1, 2, 3, 4, 5], [-1, 0, 1, 1, -1])
    assert t.depths() == [1, 2, 3, 3, 1]
    assert t.children() == [[0, 4], [1], [2, 3], [], [], []]
    t.scores = [0.9, 0.5, 0.1, 0.4, 0.3]
    best = t.best(3)
    assert best.tokens == [1, 2, 5] and best.parents == [-1, 0, -1]
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 5])
    with pytest.raises(ValueError):
        t.keep([1])  # parent 0 missing
    assert accept(t, [1, 2, 4, 9, 9, 9]) == ([0, 1, 3], 9)
    assert accept(t, [7, 0, 0, 0, 0, 0]) == ([], 7)


def test_compact_moves_the_accepted_path(tiny) -> None:
    cache = tiny.model.new_cache(1, 16)
    for t in cache.k + cache.v:
        t[0, :, :, 0] = torch.arange(16, dtype=t.dtype)
    cache.set_length(0, 10)
    cache.compact(0, 4, [0, 2, 5])
    assert cache.lengths == [7]
    assert cache.k[0][0, 0, 4:7, 0].tolist() == [4.0, 6.0, 9.0]
    assert cache.v[-1][0, 0, :4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_forward_tree_matches_sequential_decoding(tiny) -> None:
    m = tiny.model
    prefix, tree = [5, 6, 7, 8], DraftTree([10, 11, 12, 13], [-1, 0, 0, 2])  # branches 10-11 and 10-12-13
    with torch.inference_mode():
        cache = m.new_cache(1, 32)
        m(torch.tensor([prefix]), cache)
        T = len(tree) + 1
        visible = torch.eye(T, dtype=torch.bool)
        for i, p in enumerate(tree.parents):
            visible[i + 1] |= visible[p + 1]
        depth = torch.tensor([[0] + tree.depths()])
        logits = m.forward_tree(torch.tensor([[9] + tree.tokens]), cache, depth, visible[None])[0]
        assert cache.lengths == [4]  # the verify forward does not advance the cache
        for node, branch in [(0, [9]), (1, [9, 10]), (2, [9, 10, 11]), (3, [9, 10, 12]), (4, [9, 10, 12, 13])]:
            ref_cache = m.new_cache(1, 32)
            ref = m(torch.tensor([prefix + branch]), ref_cache)[0, -1]
            assert torch.allclose(logits[node], ref, atol=1e-5), node
        # keep the path 10-12-13, then the next logits equal a fresh run over prefix + path
        cache.compact(0, 4, [0, 1, 3, 4])
        nxt = m(torch.tensor([[21]]), cache)[0, -1]
        ref = m(torch.tensor([prefix + [9, 10, 12, 13, 21]]), m.new_cache(1, 32))[0, -1]
        assert torch.allclose(nxt, ref, atol=1e-5)


def _frequencies(pick, logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """How often ``pick(logits, params, noise)`` returns each token over n output positions' noise."""
    counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
    for pos in range(n):
        counts[int(pick(logits, params, [gumbel_noise(7, 0, pos, logits.shape[-1])]))] += 1
    return counts / n


def test_gumbel_sampling_follows_the_warped_distribution() -> None:
    """Over independent positions' noise, the Gumbel-max token follows warp(...) for plain, top-k and top-p
    sampling, within 4 standard deviations; and the check catches a rule that samples from something else."""
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, -1.0]])
    n = 4000
    bound = 4 * (0.25 / n) ** 0.5
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                   SamplingParams(temperature=1.3, top_p=0.8)):
        freq = _frequencies(sample, logits, params, n)
        assert (freq - warp(logits, params)[0]).abs().max() < bound, params

    def too_cold(lg: torch.Tensor, params: SamplingParams, noise: list[torch.Tensor]) -> torch.Tensor:
        return sample(lg, SamplingParams(temperature=params.temperature * 0.8), noise)

    params = SamplingParams(temperature=1.0)
    assert (_frequencies(too_cold, logits, params, n) - warp(logits, params)[0]).abs().max() > bound


def test_noise_is_a_pure_function_of_seed_row_and_position() -> None:
    a = gumbel_noise(3, 1, 5, 64)
    assert torch.equal(a, gumbel_noise(3, 1, 5, 64)) and torch.isfinite(a).all()
    for other in ((4, 1, 5), (3, 2, 5), (3, 1, 6)):
        assert not torch.equal(a, gumbel_noise(*other, 64)), other
    noise = RowNoise(3, 1)
    assert torch.equal(noise.at(5, 64), a)
    noise.at(6, 64)
    noise.forget_below(6)
    assert set(noise.drawn) == {6}


def test_sampling_end_to_end_matches_the_model(tiny) -> None:
    """The second sampled token (the first one a verify step commits) follows the model's exact marginal
    sum_t1 p(t1) p(t2 | t1), within 4.5 standard deviations per token, and drafts were really accepted."""
    prompt, m = PROMPTS[0], tiny.model
    base = SamplingParams(max_new_tokens=3, temperature=0.6, ignore_eos=True)
    with torch.inference_mode():
        p1 = warp(m(torch.tensor([prompt]), m.new_cache(1, 32))[:, -1], base)[0].double()
        exact = torch.zeros_like(p1)
        for t1 in torch.nonzero(p1 > 1e-9).flatten().tolist():
            logits = m(torch.tensor([prompt + [t1]]), m.new_cache(1, 32))[:, -1]
            exact += p1[t1] * warp(logits, base)[0].double()
    eng = Engine(tiny, make_speculator("pld:adaptive=false:min_prob=0+recycling:adaptive=false", tiny))
    n, accepted = 500, 0
    counts = torch.zeros_like(exact)
    for seed in range(n):
        c = eng.generate([prompt], SamplingParams(max_new_tokens=3, temperature=0.6, seed=seed, ignore_eos=True))[0]
        accepted += c.spec.accepted
        counts[c.output_ids[1]] += 1
    assert accepted > 0
    freq = counts / n
    bound = 4.5 * (exact * (1 - exact) / n).sqrt() + 2 / n
    assert bool(((freq - exact).abs() <= bound).all()), (freq - exact).abs().max()


def test_bad_specs(tiny, tmp_path: Path) -> None:
    for spec, needle in [("nope", "unknown drafter"), ("pld:zzz=1", "unknown option"), ("recycling:k=x", "type int"),
                         ("early-exit:layer=99", "layer"), ("recycling:widths=9", "widths")]:
        with pytest.raises(PonderError, match=needle):
            make_speculator(spec, tiny)
    with pytest.raises(PonderError):
        make_speculator(f"draft:{tmp_path / 'missing'}", tiny)  # the draft model's load error, one line
