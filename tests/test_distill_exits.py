"""Exit adapters on the tiny models: identity at initialisation (the plain early exit, bit for bit), training end to
end through the CLI raises agreement, the early-exit drafter's use of them, errors. The lossless matrices
(test_speculate_core.py, test_seeded_sampling.py) run ``early-exit:layer=1:adapter=...`` with drafts accepted."""

from pathlib import Path

import pytest
import torch

from ponder.cli import main
from ponder.distill.exits import ExitAdapters, agreement, default_layers, load_exits, states
from ponder.distill.train import Sequence, read_data, save_artifact, split
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import SamplingParams
from ponder.speculate import DraftBatch, DraftRow, make_speculator
from test_speculate_core import PROMPTS


def _identity_artifact(path: Path, model, layers: tuple[int, ...], mlp: dict[int, int] | None = None) -> Path:
    """Untrained adapters saved as ``ponder distill train exits`` saves trained ones."""
    adapters = ExitAdapters(model.config.hidden_size, layers, mlp)
    recipe = {"kind": "exits", "layers": list(layers), "mlp": {str(k): v for k, v in (mlp or {}).items()},
              "model": "test"}
    save_artifact(path, adapters.tensors(), recipe)
    return path


def test_default_layers_scale_with_depth() -> None:
    assert default_layers(30) == (8, 12, 16, 20, 24)
    assert default_layers(3) == (1, 2) and default_layers(2) == (1,)


@pytest.mark.parametrize("mlp", [None, {1: 8}])
def test_identity_adapters_are_the_plain_early_exit(cyclic, tmp_path: Path, mlp) -> None:
    """Untrained adapters (with or without an MLP) change nothing, bit for bit: the same logits, the same drafts
    with the same scores, the same hidden states handed to the verify."""
    path = _identity_artifact(tmp_path / "exits", cyclic.model, (1, 2), mlp)
    adapters, _ = load_exits(path, cyclic.model)
    assert adapters.mlp_widths == (mlp or {})
    h = torch.randn(4, 7, cyclic.model.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(cyclic.model.logits(adapters(1, h)), cyclic.model.logits(h))
        assert torch.equal(adapters(1, h.to(torch.bfloat16)), h.to(torch.bfloat16))
    model, tokens = cyclic.model, PROMPTS[0]
    cache = model.new_cache(1, 64)
    proposals = []
    with torch.inference_mode():
        model(torch.tensor([tokens[:-1]]), cache)
        for spec in ("early-exit:layer=1", f"early-exit:layer=1:adapter={path}"):
            drafter = make_speculator(spec, cyclic).drafter
            proposals.append(drafter.propose(DraftBatch([DraftRow(tokens, None, 6)], model, cache)))
    plain, adapted = proposals
    assert len(plain.trees[0]) > 0 and cache.lengths == [len(tokens) - 1]
    assert (plain.trees[0].tokens, plain.trees[0].scores) == (adapted.trees[0].tokens, adapted.trees[0].scores)
    assert plain.start_layer == adapted.start_layer == 1 and torch.equal(plain.hidden[0], adapted.hidden[0])


def test_recomputed_states_are_the_recorded_ones(tiny, tiny_data_dir: Path) -> None:
    """Data recorded without the exit layers gets them from one more target forward: the same states."""
    seq = read_data(tiny_data_dir)[1][0]
    bare = Sequence(seq.source, seq.tokens, seq.answer_start, {})  # as if no layer had been recorded
    keep = torch.tensor([0, 3, len(seq.tokens) - 1])
    stored, recomputed = states(tiny.model, seq, (1, 2), keep), states(tiny.model, bare, (1, 2), keep)
    assert set(stored.hidden) == set(recomputed.hidden) == {1, 2, 3}
    assert all(torch.equal(stored.hidden[k], recomputed.hidden[k]) for k in (1, 2, 3))
    assert stored.tokens.tolist() == seq.tokens[keep].tolist() and stored.answer_start == 2


def test_train_exits_end_to_end(tiny, tiny_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    data = tiny_data_dir
    out = tmp_path / "exits"
    assert main(["distill", "train", "exits", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                 "--epochs", "3", "--lr", "1e-2", "--accum", "2", "--positions", "48", "--max-len", "256",
                 "--quiet"]) == 0
    assert (out / "loss.png").stat().st_size > 1000
    adapters, recipe = load_exits(out, tiny.model)
    assert recipe["kind"] == "exits" and recipe["layers"] == [1, 2] and adapters.layers == (1, 2)
    held = recipe["heldback"]
    assert len(held["top1_identity"]) == len(held["top1_adapted"]) == 2 and held["positions"] > 0
    # trained: every layer agrees more often with the full model on the training sequences than the plain exit
    _, seqs = read_data(data, 256)
    train = [states(tiny.model, s, (1, 2), None) for s in split(seqs)[0]]
    before = agreement(None, tiny.model, train, (1, 2))
    after = agreement(adapters, tiny.model, train, (1, 2))
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_exit_mlp_trains_and_loads(tiny, tiny_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """``--mlp-layers``: the named exit layer's map is followed by a trained residual MLP of ``--width``; the
    artifact reloads to the adapters that were evaluated, and the MLP changes that layer's exit."""
    out = tmp_path / "exits"
    assert main(["distill", "train", "exits", "--model", str(tiny_dir), "--data", str(tiny_data_dir), "--out",
                 str(out), "--epochs", "3", "--lr", "1e-2", "--positions", "48", "--max-len", "256",
                 "--mlp-layers", "2", "--width", "24", "--quiet"]) == 0
    adapters, recipe = load_exits(out, tiny.model)
    assert recipe["mlp"] == {"2": 24} and adapters.mlp_widths == {2: 24} and set(adapters.mlps) == {"2"}
    mlp = adapters.mlps["2"]
    assert mlp.up.weight.shape == (24, tiny.model.config.hidden_size) and mlp.down.weight.abs().sum() > 0
    _, seqs = read_data(tiny_data_dir, 256)
    held = [states(tiny.model, s, (1, 2), None) for s in split(seqs)[1]]
    assert agreement(adapters, tiny.model, held, (1, 2)) == recipe["heldback"]["top1_adapted"]
    h = held[0].hidden[2].float()
    with torch.inference_mode():
        affine = h + adapters.maps["2"](h)
        assert torch.equal(adapters(2, h), mlp(affine)) and not torch.equal(adapters(2, h), affine)
    E = tiny.model.config.hidden_size
    assert adapters.extra_macs(2) == E * E + 2 * E * 24 and adapters.extra_macs(1) == E * E


def test_auto_chooses_among_the_adapters_layers(cyclic, cyclic_exits_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    want = [c.output_ids for c in Engine(cyclic).generate(PROMPTS, params)]
    spec = make_speculator(f"early-exit:adapter={cyclic_exits_dir}:probe=1", cyclic)
    drafter = spec.drafter
    assert drafter.candidates == [1, 2] and drafter.adapters is not None
    out = Engine(cyclic, spec).generate(PROMPTS, params, batch_size=3)
    assert [c.output_ids for c in out] == want
    assert set(drafter.stats.rate) == {1, 2}  # probed through the adapters


def test_errors_are_one_line_and_name_the_fix(
    cyclic, cyclic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(PonderError, match="ponder distill train exits"):
        make_speculator(f"early-exit:adapter={tmp_path / 'none'}", cyclic)
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PonderError, match="ponder distill train exits"):
        make_speculator("early-exit:adapter=default", cyclic)
    only2 = _identity_artifact(tmp_path / "only2", cyclic.model, (2,))
    with pytest.raises(PonderError, match="no layer 1"):
        make_speculator(f"early-exit:layer=1:adapter={only2}", cyclic)
    for args, message in ((["--layers", "0,2"], "must lie in [1, 2]"), (["--layers", "x"], "comma-separated"),
                          (["--positions", "-1"], "--positions >= 0"), (["--mlp-layers", "1;2"], "--mlp-layers"),
                          (["--mlp-layers", "2", "--layers", "1"], "exit MLPs go on exit layers"),
                          (["--mlp-layers", "1", "--width", "0"], "--width >= 1")):
        capsys.readouterr()
        data = tmp_path / "nodata"
        assert main(["distill", "train", "exits", "--model", str(cyclic_dir), "--data", str(data), "--quiet", *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ponder: error:") and message in err, err


def test_a_paused_drafter_probes_one_candidate_layer_at_a_time(cyclic, cyclic_exits_dir: Path) -> None:
    """In a step the gate leaves undrafted (budget 0), each probe evaluates one candidate's exit head, in turn (all
    of them on every probe made plain decoding 9% slower); drafting steps probe them all."""
    spec = make_speculator(f"early-exit:adapter={cyclic_exits_dir}:probe=1:threshold=0", cyclic)
    drafter = spec.drafter
    cache = cyclic.model.new_cache(1, 64)
    with torch.inference_mode():
        cyclic.model(torch.tensor([[5, 6]]), cache)  # the row's tokens but the pending one
        paused = [drafter.propose(DraftBatch([DraftRow([5, 6, 7], None, 0)], cyclic.model, cache)) for _ in range(4)]
        drafting = drafter.propose(DraftBatch([DraftRow([5, 6, 7], None, 4)], cyclic.model, cache))
    assert all(not p.trees[0].tokens for p in paused)
    assert [p.capture for p in paused] == [(2,), (1,), (2,), (1,)]
    assert cache.lengths == [2]  # drafting leaves the cache as it found it
    assert drafting.trees[0].tokens and drafting.capture == (1, 2)
    assert drafter.report()["drafting_steps"] == 1 and drafter.report()["steps"] == 5
