"""Medusa heads on the tiny models: the cartesian-product tree, training end to end through the CLI, the drafter's
indexing of target states, errors. Losslessness with drafts accepted is in the drafter matrices
(test_speculate_core.py, test_seeded_sampling.py)."""

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

import ponder
from ponder.cli import main
from ponder.distill.data import record_hidden
from ponder.distill.medusa import MedusaHeads, evaluate, load_medusa
from ponder.distill.train import add_labels, load_artifact, read_data, split, vocab_map
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import SamplingParams
from ponder.speculate import DraftBatch, DraftRow, RowResult, make_speculator
from ponder.speculate.medusa import MedusaDrafter, MedusaOptions, product_tree
from ponder.speculate.tree import DraftTree
from test_speculate_core import PROMPTS


def test_product_tree_keeps_the_most_probable_paths() -> None:
    """Best-first over the cartesian product equals brute force: the budget's most probable prefixes."""
    rng = random.Random(0)
    probs = [sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(3)]
    tokens = [[10 * d + j for j in range(3)] for d in range(3)]
    paths = [p for n in (1, 2, 3) for p in itertools.product(range(3), repeat=n)]
    prob = {p: math.prod(probs[d][j] for d, j in enumerate(p)) for p in paths}
    for budget in (1, 4, 9, 39, 50):
        tree = product_tree(probs, tokens, budget, "medusa")
        assert len(tree) == min(budget, len(paths))
        got = sorted(tree.path_probs(), reverse=True)
        assert got == pytest.approx(sorted(prob.values(), reverse=True)[: len(tree)])
        for i, (tok, parent, depth) in enumerate(zip(tree.tokens, tree.parents, tree.depths())):
            assert tok // 10 == depth - 1 and (parent < 0) == (depth == 1)  # head d drafts depth d
            assert tree.scores[i] == probs[depth - 1][tok % 10]  # a node's score: its head's probability


def test_untrained_heads_repeat_the_target(tiny) -> None:
    """W = 0, b = 0: head k's scores are the target's own logits (over the draft vocabulary), so training starts
    from 'the token after next is the next one'."""
    V = tiny.model.config.vocab_size
    heads = MedusaHeads(tiny.model.config, 2, torch.arange(V))
    heads.attach(tiny.model)
    h = torch.randn(5, tiny.model.config.hidden_size)
    with torch.no_grad():
        want = tiny.model.logits(h)
        assert torch.allclose(heads.scores(h), torch.stack([want, want], dim=1), atol=1e-5)


def test_train_medusa_end_to_end(tiny, tiny_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    data_dir = tiny_data_dir
    out = tmp_path / "medusa"
    assert main(["distill", "train", "medusa", "--model", str(tiny_dir), "--data", str(data_dir), "--out", str(out),
                 "--vocab", "48", "--heads", "3", "--epochs", "3", "--lr", "1e-2", "--accum", "2", "--max-len", "256",
                 "--quiet"]) == 0
    assert (out / "loss.png").stat().st_size > 1000
    heads, recipe = load_medusa(out, tiny.model)
    assert recipe["kind"] == "medusa" and recipe["heads"] == heads.n_heads == 3 and recipe["vocab"] == 48
    assert len(recipe["heldback"]["top1_by_head"]) == 3 and recipe["heldback"]["positions"][0] > 0
    tensors, _ = load_artifact(out, "medusa")
    assert torch.equal(heads.blocks[2].weight, tensors["blocks.2.weight"])  # bf16-stored weights as stored
    assert torch.equal(heads.out, tiny.model.lm_head.weight[heads.draft_ids])  # the frozen output rows
    # trained: every head beats its untrained start on the training sequences
    _, seqs = read_data(data_dir, 256)
    add_labels(tiny.model, seqs, tiny.model.config.num_hidden_layers)
    train, _ = split(seqs)
    vmap = vocab_map(heads.draft_ids, tiny.model.config.vocab_size)
    start = MedusaHeads(tiny.model.config, 3, heads.draft_ids)
    start.attach(tiny.model)
    before = evaluate(start, train, tiny.model.config.num_hidden_layers, vmap)["top1_by_head"]
    after = evaluate(heads, train, tiny.model.config.num_hidden_layers, vmap)["top1_by_head"]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_drafter_reads_the_state_that_training_read(cyclic, cyclic_medusa_dir: Path) -> None:
    """After the prefill, depth d of the tree is head d's guess from the prompt's last position (what training
    scores at that position); after a verify step, the state of the last committed input."""
    _, seqs = read_data(Path(cyclic_medusa_dir).parent / "data")
    seq = max(seqs, key=lambda s: len(s.tokens) - s.answer_start)
    P, toks = seq.answer_start, seq.tokens.tolist()
    drafter = MedusaDrafter.build(MedusaOptions(path=str(cyclic_medusa_dir), k=1), cyclic)
    L = cyclic.model.config.num_hidden_layers
    state = drafter.new_state(toks[:P])
    prompt = record_hidden(cyclic.model, toks[:P], (L,))
    drafter.prefilled(state, {k: v.to(torch.bfloat16).float() for k, v in prompt.items()})  # as stored
    tree = drafter.propose(DraftBatch([DraftRow(toks[:P + 1], state, 8)], cyclic.model, None)).trees[0]
    with torch.no_grad():
        want = [int(drafter.heads.draft_ids[drafter.heads.head_scores(i, seq.hidden[L][P - 1].float()).argmax()])
                for i in range(drafter.heads.n_heads)]
    assert tree.tokens == want and tree.parents == [-1, 0, 1]  # k=1: one chain, one node per head
    hidden = torch.randn(4, cyclic.model.config.hidden_size)  # verify inputs: pending token + 3 nodes
    for path, last in (([], 0), ([0, 1], 2)):
        drafter.observe(DraftBatch([DraftRow([], state, 8)], cyclic.model, None),
                        [RowResult(DraftTree.chain([1, 2, 3]), path, [], torch.zeros(4, 1), hidden={L: hidden})])
        assert torch.equal(state.last, hidden[last])


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_medusa_is_lossless_in_other_dtypes(cyclic_dir: Path, cyclic_medusa_dir: Path, dtype: str) -> None:
    target = ponder.load(str(cyclic_dir), dtype)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [c.output_ids for c in Engine(target).generate(PROMPTS, params)]
    eng = Engine(target, make_speculator(f"medusa:{cyclic_medusa_dir}:adaptive=false", target))
    out = eng.generate(PROMPTS, params, batch_size=3)
    assert [c.output_ids for c in out] == want
    assert sum(c.spec.accepted for c in out) > 0


def test_errors_are_one_line_and_name_the_fix(
    cyclic, cyclic_dir: Path, cyclic_head_dir: Path, cyclic_medusa_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(PonderError, match="ponder distill train medusa"):
        make_speculator(f"medusa:{tmp_path / 'none'}", cyclic)
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PonderError, match="ponder distill train medusa"):
        make_speculator("medusa", cyclic)  # the model's default artifact does not exist
    with pytest.raises(PonderError, match="not a 'medusa'"):
        make_speculator(f"medusa:{cyclic_head_dir}", cyclic)
    with pytest.raises(PonderError, match="holds 3 trained heads"):
        make_speculator(f"medusa:{cyclic_medusa_dir}:heads=4", cyclic)
    with pytest.raises(PonderError, match="k >= 1"):
        make_speculator(f"medusa:{cyclic_medusa_dir}:k=0", cyclic)
    for args, message in ((["--heads", "0"], "--heads >= 1"), (["--data", str(tmp_path)], "`ponder distill data`")):
        capsys.readouterr()
        assert main(["distill", "train", "medusa", "--model", str(cyclic_dir), "--quiet", *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ponder: error:") and message in err, err
