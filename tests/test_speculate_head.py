"""The trained-head drafter: it computes what the head was trained to compute, drafts from the target's own
states, and keeps greedy and seeded sampling output identical to plain decoding."""

from pathlib import Path

import pytest
import torch

from ponder.distill.data import record_hidden
from ponder.distill.train import read_data
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator
from ponder.speculate.head import HeadDrafter, HeadOptions, _Growth


def test_drafting_computes_what_training_computed(cyclic, cyclic_head_dir: Path) -> None:
    """After a prompt's prefill states, the head's prediction of the first draft equals training-time test's step 1
    at the prompt's last position, a depth-2 node's output equals step 2 one position later, and its child's step 3
    (a sibling of the depth-2 node, kept in the cache, must stay out of the child's attention)."""
    _, seqs = read_data(Path(cyclic_head_dir).parent / "data")
    seq = max(seqs, key=lambda s: len(s.tokens) - s.answer_start)
    P, toks = seq.answer_start, seq.tokens.tolist()
    drafter = HeadDrafter.build(HeadOptions(path=str(cyclic_head_dir)), cyclic)
    head = drafter.head
    with torch.inference_mode():
        state = drafter.new_state(toks[:P])
        prompt = record_hidden(cyclic.model, toks[:P], head.feature_layers)
        drafter.prefilled(state, {k: v.to(torch.bfloat16).float() for k, v in prompt.items()})  # as stored
        drafter._feed(state, toks[: P + 1])
        T = len(toks)
        dev = cyclic.model.device
        emb = cyclic.model.embed(seq.tokens[1:]).float()
        feats = [seq.hidden[layer][: T - 1].float().to(dev) for layer in head.feature_layers]
        outs = head.ttt_outputs(head.inputs(head.fused(feats), emb), emb, 3)
        assert torch.allclose(state.last, outs[0][P - 1], atol=1e-4)
        # a path of two draft nodes grown as the drafter grows trees, each level over its frontier alone: the
        # depth-3 node attends to its parent's K/V kept from the level before, as step 3 attends to step 2's key
        grow = _Growth(tokens=[toks[P + 1], toks[P + 3]], parents=[-1, -1], probs=[1.0, 1.0], cum=[0.0, 0.0],
                       outs={-1: state.last}, frontier=[1, 0])  # node 1: a sibling the second level leaves out
        g = drafter._expand(state.cache, [grow], [0])
        assert torch.allclose(g[1], outs[1][P], atol=1e-4)
        grow.tokens.append(toks[P + 2])
        grow.parents.append(0)
        grow.frontier = [2]
        g = drafter._expand(state.cache, [grow], [0])
        assert torch.allclose(g[0], outs[2][P + 1], atol=1e-4)


def test_batched_trees_equal_each_row_grown_alone(cyclic, cyclic_head_dir: Path) -> None:
    """Growing three rows' trees level by level together (one scoring product and one layer pass per level, rows
    of different lengths in a scratch cache) gives each row the tree it gets alone, and leaves the rows' own caches
    as they were."""
    drafter = HeadDrafter.build(HeadOptions(path=str(cyclic_head_dir), depth=4, k=3, stop=0.0), cyclic)
    prompts = _chat_prompts(cyclic)
    with torch.inference_mode():
        states = []
        for toks in prompts:
            state = drafter.new_state(toks)
            drafter.prefilled(state, record_hidden(cyclic.model, toks, drafter.head.feature_layers))
            drafter._feed(state, toks + [toks[-1]])
            states.append(state)
        assert len({s.cache.lengths[0] for s in states}) == 3
        lengths = [s.cache.lengths[0] for s in states]
        together = drafter._trees(states)
        alone = [drafter._trees([s])[0] for s in states]
    assert [s.cache.lengths[0] for s in states] == lengths
    for a, b in zip(together, alone):
        assert len(a) == 3 + 9 + 9 + 9  # depth 4, k 3, no early stop: k children per level's k best nodes
        assert a.tokens == b.tokens and a.parents == b.parents
        assert max(abs(x - y) for x, y in zip(a.scores, b.scores)) < 1e-4


def _chat_prompts(cyclic) -> list[list[int]]:
    """Prompts the head was trained on (the built-in ones), where it drafts well enough to be accepted."""
    from ponder.bench.suites import BUILTIN

    eng = Engine(cyclic)
    return [eng.encode(text, chat=True) for _, text in BUILTIN[:3]]


@pytest.mark.parametrize("batch", [1, 3])
def test_head_is_lossless_and_drafts(cyclic, cyclic_head_dir: Path, batch: int) -> None:
    prompts = _chat_prompts(cyclic)[:batch]
    plain = Engine(cyclic)
    for params in (SamplingParams(max_new_tokens=20, ignore_eos=True),
                   SamplingParams(max_new_tokens=20, temperature=0.5, seed=2, ignore_eos=True)):
        ref = [c.output_ids for c in plain.generate(prompts, params)]
        for spec in (f"head:{cyclic_head_dir}:adaptive=false", f"head:{cyclic_head_dir}+pld"):
            out = Engine(cyclic, make_speculator(spec, cyclic)).generate(prompts, params)
            assert [c.output_ids for c in out] == ref, spec
        forced = Engine(cyclic, make_speculator(f"head:{cyclic_head_dir}:adaptive=false", cyclic)).generate(prompts, params)
        assert all(c.spec.drafted > 0 for c in forced)
        assert sum(c.spec.accepted for c in forced) > 0


def test_a_smaller_draft_vocabulary_scores_only_its_most_frequent_tokens(cyclic, cyclic_head_dir: Path) -> None:
    """``vocab=N`` keeps the head's N most frequent draft tokens: its scores are the first N of the whole head's,
    every drafted token is one of them, and the output stays plain decoding's."""
    full = HeadDrafter.build(HeadOptions(path=str(cyclic_head_dir)), cyclic)
    small = HeadDrafter.build(HeadOptions(path=str(cyclic_head_dir), vocab=12), cyclic)
    kept = full.head.draft_ids[:12].tolist()
    assert small.head.draft_ids.tolist() == kept and len(full.head.draft_ids) > 12
    prompts = _chat_prompts(cyclic)
    with torch.inference_mode():
        g = torch.randn(5, cyclic.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        g = g.to(cyclic.model.device)
        torch.testing.assert_close(small.head.scores(g), full.head.scores(g)[:, :12], rtol=1e-5, atol=1e-5)
        state = small.new_state(prompts[0])
        small.prefilled(state, record_hidden(cyclic.model, prompts[0], small.head.feature_layers))
        small._feed(state, prompts[0] + [kept[0]])  # the states pair with the next token
        tree = small._trees([state])[0]
    assert len(tree.tokens) > 0 and set(tree.tokens) <= set(kept)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ref = [c.output_ids for c in Engine(cyclic).generate(prompts, params)]
    spec = make_speculator(f"head:{cyclic_head_dir}:vocab=12:adaptive=false", cyclic)
    assert [c.output_ids for c in Engine(cyclic, spec).generate(prompts, params)] == ref
    with pytest.raises(PonderError, match="vocab"):
        make_speculator(f"head:{cyclic_head_dir}:vocab=3", cyclic)


def test_missing_head_names_the_command(cyclic, tmp_path: Path) -> None:
    with pytest.raises(PonderError, match="ponder distill train head"):
        make_speculator(f"head:{tmp_path / 'none'}", cyclic)
    with pytest.raises(PonderError, match="depth"):
        make_speculator("head:x:depth=0", cyclic)
