"""The default model's trained artifacts that ship with ponder (``make heads``: draft head, Medusa heads, exit adapters,
Duo-LLM's small FFNs and routers): present, small, and as good on held-back prompts, regenerated here, as their
recipes say."""

import json
from pathlib import Path

import pytest
import torch

from ponder.distill.train import SHIPPED, held_back, source_kind

MODEL_DIR = SHIPPED / "smollm2-135m"
KINDS = ("head", "medusa", "exits", "duo")


def test_shipped_artifacts_exist_with_their_recipes_and_total_at_most_25_mb():
    total = 0
    for kind in KINDS:
        recipe = json.loads((MODEL_DIR / kind / "recipe.json").read_text())
        assert recipe["kind"] == kind and recipe["model"] == "smollm2-135m"
        total += (MODEL_DIR / kind / "weights.safetensors").stat().st_size + (MODEL_DIR / kind / "recipe.json").stat().st_size
    assert total <= 25 * 2**20


@pytest.fixture(scope="module")
def heldback(smollm2):
    """Greedy and sampled answers, with their states, to the first held-back prompts of the shipped head's data
    recipe (128 new tokens instead of 256, to keep the test short)."""
    from tqdm import tqdm

    from ponder.distill.data import DataOptions, make_shard, chunk_seed, training_prompts
    from ponder.distill.train import add_labels, shard_sequences
    from ponder.engine import Engine

    recipe = json.loads((MODEL_DIR / "head" / "recipe.json").read_text())["data_recipe"]
    specbench = recipe["specbench"] if recipe["specbench"] and Path(recipe["specbench"]).exists() else ""
    options = DataOptions(**{**recipe, "layers": tuple(recipe["layers"]), "max_new_tokens": 128, "specbench": specbench})
    prompts = [p for p in training_prompts(options) if held_back(p.source)][:4]
    assert len(prompts) == 4
    shard = make_shard(Engine(smollm2), prompts, options, options.layers, chunk_seed(0, 0), tqdm(disable=True))
    seqs = shard_sequences(shard["tensors"], shard["sources"])
    add_labels(smollm2.model, seqs, smollm2.model.config.num_hidden_layers)
    return seqs


@pytest.mark.slow
def test_shipped_head_and_medusa_reach_their_heldback_accuracy(smollm2, heldback):
    from ponder.distill.head import evaluate, load_head
    from ponder.distill.medusa import evaluate as evaluate_medusa, load_medusa
    from ponder.distill.train import vocab_map

    head, recipe = load_head(MODEL_DIR / "head", smollm2.model)
    vmap = vocab_map(head.draft_ids.cpu(), smollm2.model.config.vocab_size)
    got = evaluate(head.float(), smollm2.model, heldback, recipe["ttt_steps"], vmap)["top1_by_depth"]
    (kind,) = {source_kind(s.source) for s in heldback}  # the recipe's figure for the same kind of prompt
    want = recipe["heldback_by_kind"][kind]["top1_by_depth"]
    assert got[0] == pytest.approx(want[0], abs=0.12), (got, want)  # 4 prompts against the recipe's held-back set
    heads, recipe = load_medusa(MODEL_DIR / "medusa", smollm2.model)
    got = evaluate_medusa(heads.float(), heldback, smollm2.model.config.num_hidden_layers,
                          vocab_map(heads.draft_ids.cpu(), smollm2.model.config.vocab_size))["top1_by_head"]
    want = recipe["heldback"]["top1_by_head"]
    assert got[0] == pytest.approx(want[0], abs=0.12), (got, want)


@pytest.mark.slow
def test_shipped_exit_adapters_reach_their_heldback_agreement(smollm2, heldback):
    from ponder.distill.exits import agreement, load_exits, states

    adapters, recipe = load_exits(MODEL_DIR / "exits", smollm2.model)
    layers = tuple(adapters.layers)
    seqs = [states(smollm2.model, s, layers, None) for s in heldback]
    got = agreement(adapters.float(), smollm2.model, seqs, layers)
    plain = agreement(None, smollm2.model, seqs, layers)
    want = recipe["heldback"]["top1_adapted"]
    assert got[-1] == pytest.approx(want[-1], abs=0.12), (got, want)
    assert got[-1] > plain[-1]  # the adapter helps at the deepest exit layer
    assert torch.tensor(got).mean() > torch.tensor(plain).mean()


@pytest.mark.slow
def test_shipped_duo_modules_match_their_heldback_errors(smollm2, heldback):
    """The small FFNs' error is the recipe's, and the routers' predictions correlate with the errors they predict
    (first-order margin changes, from the same backward pass as in training)."""
    from ponder.distill.duo import _log_rms_of_norm, _mean_errors, ffn_io, load_duo, relative_errors

    duo, recipe = load_duo(MODEL_DIR / "duo", smollm2.model)
    target = recipe["router_target"]
    seqs = heldback[:4]  # two prompts' answers: enough positions, half the backward passes
    data = ffn_io(smollm2.model, seqs, 48, torch.Generator().manual_seed(0), False, "", target == "margin")
    got, want = _mean_errors(duo, data), recipe["heldback"]["relative_error"]
    assert got["small"] == pytest.approx(want["small"], abs=0.08), (got, want)
    assert got["small"] < got["skip"]  # the small FFN does part of the big one's work
    E = smollm2.model.config.hidden_size
    pred, true = [], []
    for layer in range(1, duo.n_layers):  # layer 0's FFN is an outlier (its output is many times the residual)
        log_rms = _log_rms_of_norm(data.a_norm[layer], E)
        pred.append(duo.predicted_error(layer, data.xn[layer].float(), log_rms))
        true.append(torch.log(torch.stack(relative_errors(duo, data, layer, target), dim=1) + 1e-6))
    pred, true = torch.cat(pred), torch.cat(true)
    corr = [float(torch.corrcoef(torch.stack([pred[:, j], true[:, j]]))[0, 1]) for j in range(2)]
    assert min(corr) > 0.3, corr
