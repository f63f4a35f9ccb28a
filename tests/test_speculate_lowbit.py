"""lowbit: the target's own q4/int8 copy drafts over the target's KV cache (``ponder/speculate/lowbit.py``).

The lossless matrices (test_speculate_core.py, test_seeded_sampling.py, test_speculate_smollm2.py) cover its output;
here: it leaves the cache as it found it, drafts what the copy decodes alone, and refuses what it cannot do."""

from pathlib import Path

import pytest
import torch

import ponder
from ponder.errors import PonderError
from ponder.speculate import make_speculator
from ponder.speculate.base import DraftBatch, DraftRow


def _prefilled(target, prompts: list[list[int]], slots: int = 64):
    cache = target.model.new_cache(len(prompts), slots)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    with torch.inference_mode():
        target.model(ids, cache, n_new=[len(p) for p in prompts])
    return cache


def test_drafts_leave_the_cache_as_they_found_it_and_follow_the_copy(cyclic) -> None:
    spec = make_speculator("lowbit:k=5", cyclic)
    drafter = spec.drafter
    prompts = [[5, 6, 7, 8, 9, 5, 6], [3, 1, 4, 1, 5, 9, 2, 6, 11, 12]]
    # the cache holds tokens[:-1]; tokens[-1] is the pending token
    cache = _prefilled(cyclic, [p[:-1] for p in prompts])
    lengths = list(cache.lengths)
    before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
    rows = [DraftRow(p, None, budget) for p, budget in zip(prompts, (5, 2))]
    with torch.inference_mode():
        trees = drafter.propose(DraftBatch(rows, cyclic.model, cache)).trees
    assert cache.lengths == lengths
    for (k0, v0), k1, v1 in zip(before, cache.k, cache.v):
        for b, n in enumerate(lengths):  # the committed slots are untouched (drafts wrote only above them)
            assert torch.equal(k0[b, :, :n], k1[b, :, :n]) and torch.equal(v0[b, :, :n], v1[b, :, :n])
    assert [len(t) for t in trees] == [5, 2]  # budgets respected (threshold 0: full chains)
    assert all(t.parents == list(range(-1, len(t) - 1)) for t in trees)  # chains
    # each row's chain is the copy's own greedy continuation over the target's K/V of the prompt
    for b, (p, tree) in enumerate(zip(prompts, trees)):
        own = _prefilled(cyclic, [p[:-1]])
        feed, want = [p[-1]], []
        with torch.inference_mode():
            for _ in range(len(tree)):
                logits = drafter.copy(torch.tensor([feed]), own, last_only=True)[0, -1]
                want.append(int(logits[: drafter.vocab].argmax()))
                feed = [want[-1]]
        assert tree.tokens == want, b


class _Counting:
    """The copy, counting its forwards (a plain wrapper the drafter calls as it calls the copy)."""

    def __init__(self, model) -> None:
        self.model, self.forwards, self.tokens = model, 0, 0

    def __call__(self, ids, cache, **kw):
        self.forwards, self.tokens = self.forwards + 1, self.tokens + ids.shape[1]
        return self.model(ids, cache, **kw)

    def forward_tree(self, ids, cache, depth, visible):
        self.forwards, self.tokens = self.forwards + 1, self.tokens + ids.shape[1]
        return self.model.forward_tree(ids, cache, depth, visible)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("budgets", [(9,), (9, 4, 7)])
def test_guesses_draft_the_copys_own_chains_in_fewer_forwards(cyclic, budgets) -> None:
    """With guesses from the row's history, the chains are the ones the copy drafts token by token (``guess=0``),
    the cache is left as found, and on text that repeats itself the copy runs fewer forwards than it drafts
    tokens; a batch of 3 (a repeating row, one whose history has nothing to copy, a short budget) does not guess."""
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [3, 1, 4, 1, 5, 9, 2, 6, 11, 12], [40, 41, 42, 40, 41]]
    prompts = prompts[: len(budgets)]
    chains = {}
    for guess in (0, 3):
        drafter = make_speculator(f"lowbit:k=9:guess={guess}", cyclic).drafter
        drafter.copy = counting = _Counting(drafter.copy)
        cache = _prefilled(cyclic, [p[:-1] for p in prompts])
        lengths = list(cache.lengths)
        before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
        rows = [DraftRow(p, drafter.new_state(p), budget) for p, budget in zip(prompts, budgets)]
        with torch.inference_mode():
            trees = drafter.propose(DraftBatch(rows, cyclic.model, cache)).trees
        assert cache.lengths == lengths
        for (k0, v0), k1, v1 in zip(before, cache.k, cache.v):
            for b, n in enumerate(lengths):
                assert torch.equal(k0[b, :, :n], k1[b, :, :n]) and torch.equal(v0[b, :, :n], v1[b, :, :n])
        chains[guess] = [t.tokens for t in trees]
        assert [len(t) for t in trees] == list(budgets)
        if guess and len(budgets) == 1:
            assert counting.forwards < max(budgets) - 1, counting.forwards  # guesses took several tokens at once
        else:
            assert counting.forwards == max(budgets) and counting.tokens == max(budgets)
    assert chains[3] == chains[0]


def test_threshold_cuts_chains(cyclic) -> None:
    drafter = make_speculator("lowbit:k=6:threshold=0.999999", cyclic).drafter
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6]]
    cache = _prefilled(cyclic, [p[:-1] for p in prompts])
    with torch.inference_mode():
        tree = drafter.propose(DraftBatch([DraftRow(prompts[0], None, 6)], cyclic.model, cache)).trees[0]
    assert len(tree) < 6 and tree.scores == [1.0] * len(tree)


def test_refusals_are_one_line(cyclic_dir: Path) -> None:
    q4 = ponder.load(str(cyclic_dir), "q4")
    with pytest.raises(PonderError, match="already runs with q4 weights"):
        make_speculator("lowbit", q4)
    fp16 = ponder.load(str(cyclic_dir), "fp16")
    with pytest.raises(PonderError, match="must share the cache"):
        make_speculator("lowbit", fp16)
    with pytest.raises(PonderError, match="weights must be one of q4, int8"):
        make_speculator("lowbit:weights=fp16", fp16)


def test_bench_keeps_a_draft_models_dtype_with_the_drafter() -> None:
    """``draft:MODEL:dtype=q4`` is the draft model's dtype; ``pld:dtype=q4`` the target's."""
    from ponder.bench.methods import parse_spec

    spec = parse_spec("draft:some-model:dtype=q4")
    assert spec.dtype == "fp32" and spec.speculator == "draft:some-model:dtype=q4"
    spec = parse_spec("draft:some-model:dtype=q4+pld:dtype=int8")
    assert spec.dtype == "int8" and spec.speculator == "draft:some-model:dtype=q4+pld"
    assert parse_spec("lowbit:dtype=int8").dtype == "int8"


def test_policy_defaults_follow_the_drafter_unless_the_spec_sets_them(cyclic) -> None:
    assert make_speculator("lowbit", cyclic).max_nodes == 40
    assert make_speculator("pld+lowbit", cyclic).max_nodes == 40
    assert make_speculator("lowbit:max_nodes=8", cyclic).max_nodes == 8
    assert make_speculator("pld", cyclic).max_nodes == 15


def test_sampling_rows_draft_the_copys_draws_with_the_targets_noise(cyclic) -> None:
    """Coupled drafting: a sampling row's chain is the copy's own Gumbel-max draws with the noise the target uses at
    those positions, not its argmax."""
    from ponder.sampling import RowNoise, SamplingParams, sample

    drafter = make_speculator("lowbit:k=6", cyclic).drafter
    params = SamplingParams(temperature=1.5, seed=3, max_new_tokens=32)
    prompt, position = [3, 1, 4, 1, 5, 9, 2, 6], 4  # as if 4 tokens had been generated (the pending one is the 4th)
    cache = _prefilled(cyclic, [prompt[:-1]])
    noise = RowNoise(3, 0)
    with torch.inference_mode():
        tree = drafter.propose(DraftBatch([DraftRow(prompt, None, 6, params, noise, position)], cyclic.model,
                                          cache)).trees[0]
        own = _prefilled(cyclic, [prompt[:-1]])
        feed, want, greedy = [prompt[-1]], [], []
        for j in range(6):
            logits = drafter.copy(torch.tensor([feed]), own, last_only=True)[0, -1, : drafter.vocab].float()[None]
            want.append(int(sample(logits, params, [RowNoise(3, 0).at(position + j, drafter.vocab)])[0]))
            greedy.append(int(logits.argmax()))
            feed = [want[-1]]
    assert tree.tokens == want
    assert want != greedy  # not vacuous: at this temperature the draws part from the argmax


def test_coupled_drafts_are_accepted_more_often_when_sampling(cyclic) -> None:
    """Sampling at temperature 1 on the cyclic model: the copy's coupled draws are accepted more often than its
    argmax drafts (``couple=false``); the output is plain seeded sampling's either way (test_seeded_sampling.py
    runs the coupled drafter; here both are compared with plain sampling too)."""
    from ponder.engine import Engine
    from ponder.sampling import SamplingParams

    prompts = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [3, 1, 4, 1, 5, 9, 2, 6], [40, 41, 42]]
    params = SamplingParams(max_new_tokens=48, temperature=1.0, seed=5, ignore_eos=True)
    want = [c.output_ids for c in Engine(cyclic).generate(prompts, params)]
    rates = {}
    for couple in ("true", "false"):
        eng = Engine(cyclic, make_speculator(f"lowbit:couple={couple}:explore=0:adaptive=false", cyclic))
        out = eng.generate(prompts, params)
        assert [c.output_ids for c in out] == want, couple
        rates[couple] = sum(c.spec.accepted for c in out) / max(1, sum(c.spec.drafted for c in out))
    assert rates["true"] > rates["false"], rates


def test_chains_stop_where_the_fullest_row_runs_out_of_cache(cyclic) -> None:
    """Every row runs each of the copy's forwards: a row with little room left caps the others' chains."""
    drafter = make_speculator("lowbit:k=8", cyclic).drafter
    prompts = [[5, 6, 7, 8, 9, 5, 6], [3, 1, 4, 1, 5, 9, 2, 6, 11, 12]]
    cache = _prefilled(cyclic, [p[:-1] for p in prompts], slots=12)  # row 1 holds 9 of 12 slots: room for 3
    rows = [DraftRow(p, None, 8) for p in prompts]
    with torch.inference_mode():
        trees = drafter.propose(DraftBatch(rows, cyclic.model, cache)).trees
    assert [len(t) for t in trees] == [3, 3] and cache.lengths == [6, 9]


@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_guesses_keep_a_sampling_rows_chain(cyclic, threshold) -> None:
    """A sampling row's chain (the copy's draws with the target's noise; 0.1 cuts it to 5 of 9 tokens here) is the
    same with guesses as token by token, and the guesses save forwards there too."""
    from ponder.sampling import RowNoise, SamplingParams

    params = SamplingParams(temperature=0.7, seed=3, max_new_tokens=32)
    prompt, position = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], 4
    chains, forwards = {}, {}
    for guess in (0, 3):
        drafter = make_speculator(f"lowbit:k=9:guess={guess}:threshold={threshold}", cyclic).drafter
        drafter.copy = counting = _Counting(drafter.copy)
        cache = _prefilled(cyclic, [prompt[:-1]])
        row = DraftRow(prompt, drafter.new_state(prompt), 9, params, RowNoise(3, 0), position)
        with torch.inference_mode():
            chains[guess] = drafter.propose(DraftBatch([row], cyclic.model, cache)).trees[0].tokens
        assert cache.lengths == [len(prompt) - 1]
        forwards[guess] = counting.forwards
    assert chains[3] == chains[0] and len(chains[0]) >= 3
    assert forwards[3] < forwards[0]
