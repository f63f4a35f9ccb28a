"""The EAGLE-style draft head on the tiny model: training-time test attention, training end to end, artifacts."""

from pathlib import Path

import pytest
import torch

from ponder.distill.data import DataOptions, make_data
from ponder.distill.head import DraftHead, _ttt_mask, evaluate, load_head, train_head
from ponder.distill.train import TrainConfig, add_labels, load_artifact, read_data, split, vocab_map
from ponder.errors import PonderError

SPECBENCH = Path(__file__).parents[1].parent / "shared" / "specbench" / "dev.jsonl"


@pytest.fixture(scope="module")
def data_dir(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "data"
    make_data(tiny, DataOptions(tokens=600, max_new_tokens=24, batch_size=8), out, progress=False)
    return out


def test_ttt_mask_is_what_drafting_sees() -> None:
    m = _ttt_mask(5, 3, torch.device("cpu")).int()
    # position 4 at step 3: step-1 keys 0..2, the step-2 key at 3, the step-3 key at 4
    assert m[4].tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0] + [0, 0, 0, 0, 1]
    assert _ttt_mask(4, 1, torch.device("cpu")).int().tolist() == torch.ones(4, 4).tril().int().tolist()


def test_step_one_equals_a_causal_pass_of_the_layer(tiny) -> None:
    """Step 1 of training-time test is the ordinary causal forward of the head's layer (the inference path)."""
    head = DraftHead(tiny.model.config, (1, 2), torch.arange(20))
    head.attach(tiny.model)
    z = torch.randn(7, tiny.model.config.hidden_size)
    with torch.inference_mode():
        g1 = head.ttt_outputs(z, z, 1)[0]
        cache = head.inner.new_cache(1, 7)
        ctx = head.inner.step_context(cache, 7, [7])
        ref = head.inner.run_layers(z[None], ctx, cache)[0]
    assert torch.allclose(g1, ref, atol=1e-5)


def test_train_head_end_to_end(tiny, data_dir: Path, tmp_path: Path) -> None:
    recipe = train_head(tiny, data_dir, tmp_path / "head", vocab=48, steps=2,
                        cfg=TrainConfig(epochs=1, lr=3e-3, accum=4), max_len=256, progress=False)
    assert (tmp_path / "head" / "loss.png").stat().st_size > 1000
    assert recipe["kind"] == "head" and recipe["vocab"] == 48 and recipe["ttt_steps"] == 2
    assert recipe["target"] == "soft" and recipe["feature_weight"] == 0.1  # the defaults
    assert len(recipe["heldback"]["top1_by_depth"]) == 2 and recipe["heldback"]["positions"][0] > 0
    head, loaded_recipe = load_head(tmp_path / "head", tiny.model)
    assert loaded_recipe == recipe
    # the held-back figure (pooled from the figures per kind of prompt) is evaluate's over all held-back sequences
    manifest, seqs = read_data(data_dir, 256)
    add_labels(tiny.model, seqs, max(manifest["recipe"]["layers"]))
    vmap = vocab_map(head.draft_ids, tiny.model.config.vocab_size)
    direct = evaluate(head.float(), tiny.model, split(seqs)[1], 2, vmap)
    assert recipe["heldback_by_kind"] and direct["positions"] == recipe["heldback"]["positions"]
    # (the recipe evaluated the fp32 weights before they were stored in bf16: a position or two may flip)
    assert direct["top1_by_depth"] == pytest.approx(recipe["heldback"]["top1_by_depth"], abs=0.03)
    tensors, _ = load_artifact(tmp_path / "head", "head")
    assert torch.equal(head.fc.weight, tensors["fc.weight"])  # bf16-stored weights come back as stored
    assert torch.equal(head.inner.embed_tokens.weight, tiny.model.lm_head.weight[head.draft_ids])  # output rows
    with pytest.raises(PonderError, match="ponder distill train medusa"):
        load_artifact(tmp_path / "nothing", "medusa")
    with pytest.raises(PonderError, match="not a 'medusa'"):
        load_artifact(tmp_path / "head", "medusa")


def test_feature_choice_prefers_the_default_low_mid_high_layers():
    from ponder.distill.head import feature_choice

    assert feature_choice([2, 15, 27, 30], 30) == (2, 15, 27)
    assert feature_choice([2, 8, 12, 15, 16, 20, 24, 27, 30], 30) == (2, 15, 27)  # data also made for exit adapters
    assert feature_choice([5, 9, 30], 30) == (5, 9)


def test_default_artifact_is_the_users_own_then_the_shipped_one(tiny, tmp_path, monkeypatch):
    from ponder.distill.train import artifact_dir, trained_artifact

    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped"
    own = artifact_dir(tiny, "head")
    assert trained_artifact(tiny, "head", shipped) == own  # neither: the user's path, whose error names the command
    (shipped / tiny.name / "head").mkdir(parents=True)
    (shipped / tiny.name / "head" / "weights.safetensors").write_bytes(b"x")
    assert trained_artifact(tiny, "head", shipped) == shipped / tiny.name / "head"
    own.mkdir(parents=True)
    (own / "weights.safetensors").write_bytes(b"x")
    assert trained_artifact(tiny, "head", shipped) == own


def test_soft_target_is_the_full_models_distribution_renormalised_over_the_draft_vocabulary(tiny, data_dir) -> None:
    """``--target soft`` (the default): the loss is the cross-entropy toward the target's next-token distribution
    restricted to the draft vocabulary (computed here from the full-vocabulary logits); with ``--feature-weight`` it
    adds the feature regression."""
    import torch.nn.functional as F

    from ponder.distill.head import ttt_loss
    from ponder.distill.train import add_labels, read_data, vocab_map

    _, seqs = read_data(data_dir, 256)
    n_layers = tiny.model.config.num_hidden_layers
    add_labels(tiny.model, seqs, n_layers)
    draft_ids = torch.arange(40, 88)
    head = DraftHead(tiny.model.config, (1,), draft_ids)
    head.attach(tiny.model)
    seq, vmap = seqs[0], vocab_map(draft_ids, tiny.model.config.vocab_size)
    with torch.no_grad():
        got = ttt_loss(head, tiny.model, seq, 1, vmap, prompts=True, soft=True, last_layer=n_layers)[0]
        T = len(seq.tokens)
        emb = tiny.model.embed_tokens(seq.tokens[1:]).float()
        g = head.ttt_outputs(head.inputs(head.fused([seq.hidden[1][: T - 1].float()]), emb), emb, 1)[0]
        p = F.softmax(tiny.model.logits(seq.hidden[n_layers][1:].float())[:, draft_ids], dim=-1)
        want = -(p * F.log_softmax(head.scores(g), dim=-1)).sum(-1).mean()
        hard = ttt_loss(head, tiny.model, seq, 1, vmap, prompts=True)[0]
        with_feature = ttt_loss(head, tiny.model, seq, 1, vmap, True, True, n_layers, feature=0.5)[0]
        h = seq.hidden[n_layers][1:].float()
        gap = (g - h) / h.pow(2).mean(-1, keepdim=True).sqrt()
        feature = F.smooth_l1_loss(gap, torch.zeros_like(gap))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, hard)
    assert torch.allclose(with_feature, want + 0.5 * feature, atol=1e-5) and feature > 0


def test_train_head_with_hard_targets_and_no_feature_regression(tiny, data_dir: Path, tmp_path: Path) -> None:
    recipe = train_head(tiny, data_dir, tmp_path / "hard", vocab=48, steps=2, cfg=TrainConfig(epochs=1, lr=3e-3,
                        accum=4), max_len=256, progress=False, soft=False, feature=0.0)
    assert recipe["target"] == "hard" and recipe["feature_weight"] == 0 and recipe["heldback"]["positions"][0] > 0
    head, _ = load_head(tmp_path / "hard", tiny.model)
    assert torch.isfinite(head.fc.weight).all()


def test_bf16_training_is_mixed_precision_and_still_learns(tiny, data_dir: Path, tmp_path: Path) -> None:
    from ponder.distill.train import train_loop

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4, 8))
    x = torch.randn(64, 8)
    y = (x @ torch.randn(8, 4)).argmax(-1)  # a linearly separable task
    seen = []

    def loss_of(_):
        out = x @ w.t()
        seen.append(out.dtype)
        return torch.nn.functional.cross_entropy(out, y)

    curve = train_loop([w], loss_of, list(range(8)), TrainConfig(epochs=4, lr=0.2, warmup=1, bf16=True),
                       progress=False)
    assert set(seen) == {torch.bfloat16} and w.dtype == torch.float32  # bf16 products, fp32 weights
    assert curve[-1][1] < 0.5 * curve[0][1]
    recipe = train_head(tiny, data_dir, tmp_path / "bf16", vocab=48, steps=2,
                        cfg=TrainConfig(epochs=1, lr=3e-3, accum=4, bf16=True), max_len=256, progress=False)
    assert recipe["train"]["bf16"] is True
    head, _ = load_head(tmp_path / "bf16", tiny.model)
    assert torch.isfinite(head.fc.weight).all()
