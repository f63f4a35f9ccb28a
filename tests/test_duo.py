"""Duo-LLM routing (ponder/distill/duo.py, ponder/depth/duo.py) on a tiny 6-layer random model: training through the
CLI (pruned start, small FFNs that improve on it, routers that predict the errors), threshold 0 is exactly the full
model at batch 1 and 3, rows routed differently in one batch give their tokens alone, the compute accounting, and
one-line errors."""

from pathlib import Path

import pytest
import torch

import ponder
from ponder.cli import main
from ponder.depth import make_policy
from ponder.distill.duo import DuoModules, choose, ffn_io, fit_routers, load_duo, prune_init, relative_errors
from ponder.distill.train import read_data, split
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import SamplingParams
from tinymodel import make_model_dir

PROMPTS = [[1, 5, 9, 22, 40], [3, 8, 2], [7, 7, 7, 7, 7, 7, 7, 7, 12]]
GREEDY = SamplingParams(max_new_tokens=20)


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory):
    return ponder.load(str(make_model_dir(tmp_path_factory.mktemp("duo6"), num_hidden_layers=6)))


@pytest.fixture(scope="module")
def data_dir(deep, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ponder.distill.data import DataOptions, make_data

    out = tmp_path_factory.mktemp("duo-data") / "data"
    make_data(deep, DataOptions(tokens=600, max_new_tokens=24, batch_size=8), out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(deep, data_dir: Path) -> Path:
    out = data_dir.parent / "duo"
    assert main(["distill", "train", "duo", "--model", str(deep.path), "--data", str(data_dir), "--out", str(out),
                 "--width", "16", "--epochs", "4", "--lr", "3e-3", "--router", "local", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def trained_margin(deep, data_dir: Path) -> Path:
    out = data_dir.parent / "duo-margin"
    assert main(["distill", "train", "duo", "--model", str(deep.path), "--data", str(data_dir), "--out", str(out),
                 "--width", "16", "--epochs", "2", "--lr", "3e-3", "--quiet"]) == 0
    return out


def test_training_improves_on_the_pruned_start_and_routers_predict_the_errors(deep, data_dir, trained) -> None:
    duo, recipe = load_duo(trained, deep.model)
    assert recipe["kind"] == "duo" and recipe["width"] == 16 and duo.width == 16
    assert (trained / "loss.png").stat().st_size > 1000
    held = recipe["heldback"]
    assert held["relative_error"]["small"] < held["relative_error_pruned"]["small"] < held["relative_error"]["skip"]
    assert held["router_r2"]["skip"] > 0.2 and held["router_r2"]["small"] > 0.2
    # the sweep is monotone in compute: a looser threshold never runs more big FFN blocks
    bigs = [r["big_ffn"] for r in held["sweep"]]
    assert bigs == sorted(bigs, reverse=True) and all(0 <= r["top1"] <= 1 for r in held["sweep"])


def test_margin_router_is_the_default_and_calibrates_its_threshold(deep, trained_margin) -> None:
    """The default router predicts first-order margin changes; the recipe's threshold is the loosest of its sweep
    with 95% held-back agreement, and ``duo`` without a threshold uses it."""
    _, recipe = load_duo(trained_margin, deep.model)
    assert recipe["router_target"] == "margin" and recipe["calibrated_to"] == 0.95
    ok = [r["threshold"] for r in recipe["heldback"]["sweep"] if r["top1"] >= 0.95]
    assert recipe["threshold"] == (max(ok) if ok else recipe["heldback"]["sweep"][0]["threshold"])
    policy = make_policy(f"duo:adapter={trained_margin}", deep)
    assert policy.threshold == recipe["threshold"] and policy.report()["router_target"] == "margin"
    assert make_policy(f"duo:threshold=0.3:adapter={trained_margin}", deep).threshold == 0.3


def test_pruned_start_is_the_big_ffn_restricted_to_its_units(deep, data_dir) -> None:
    """At full width the pruned copy is the big FFN itself (every unit kept, in order)."""
    model = deep.model
    _, seqs = read_data(data_dir)
    data = ffn_io(model, split(seqs)[0][:4], 8, torch.Generator().manual_seed(0), False, "")
    full = DuoModules(model.config.hidden_size, model.config.intermediate_size - 1, 6)
    prune_init(full, model, data)
    x = data.xn[2][:5].float()
    with torch.no_grad():
        err = (full.small(2, x) - model.layers[2].mlp(x)).norm() / model.layers[2].mlp(x).norm()
    assert err < 0.2  # one unit of the big block left out
    fit_routers(full, data)
    skip, small = relative_errors(full, data, 2)
    assert bool((small < skip).all())


def test_choose_takes_the_cheapest_option_within_the_threshold(deep, trained) -> None:
    duo, _ = load_duo(trained, deep.model)
    xn, a = torch.randn(64, deep.model.config.hidden_size), torch.randn(64, deep.model.config.hidden_size)
    assert bool((choose(duo, 1, xn, a, 0.0) == 2).all())  # threshold 0: always the big block
    from ponder.distill.duo import log_rms

    err = duo.predicted_error(1, xn, log_rms(a)).exp()
    for t in (0.3, 1.0, 3.0):
        route = choose(duo, 1, xn, a, t)
        want = torch.where(err[:, 0] <= t, 0, torch.where(err[:, 1] <= t, 1, 2))
        assert torch.equal(route, want)


@pytest.mark.parametrize("batch", [1, 3])
def test_threshold_zero_is_the_full_model(deep, trained, batch: int) -> None:
    prompts = PROMPTS[:batch]
    plain = Engine(deep).generate(prompts, GREEDY)
    policy = make_policy(f"duo:threshold=0:adapter={trained}", deep)
    out = Engine(deep, depth=policy).generate(prompts, GREEDY)
    assert [c.output_ids for c in out] == [c.output_ids for c in plain]
    assert policy.stats.mean_ffn() == 6 and policy.stats.mean_small() == 0


def test_rows_routed_differently_give_their_tokens_alone(deep, trained) -> None:
    spec = f"duo:threshold=0.6:adapter={trained}"
    policy = make_policy(spec, deep)
    together = Engine(deep, depth=policy).generate(PROMPTS, GREEDY)
    alone = [Engine(deep, depth=make_policy(spec, deep)).generate([p], GREEDY)[0] for p in PROMPTS]
    assert [c.output_ids for c in together] == [c.output_ids for c in alone]
    st = policy.stats
    assert st.mean_ffn() < 6 and st.mean_small() > 0 and st.mean_ffn() + st.mean_small() < 6  # all three routes
    assert st.mean_layers() == 6  # attention always runs
    share = st.weight_share(6, policy.attn_params, policy.ffn_params)
    want = (6 * policy.attn_params + (st.mean_ffn() + st.mean_small() * 16 / deep.model.config.intermediate_size)
            * policy.ffn_params) / (6 * (policy.attn_params + policy.ffn_params))
    assert share == pytest.approx(want) and share < 1


def test_big_or_skip_only(deep, trained) -> None:
    policy = make_policy(f"duo:threshold=0.6:small=false:adapter={trained}", deep)
    Engine(deep, depth=policy).generate(PROMPTS, GREEDY)
    assert policy.stats.mean_small() == 0 and policy.stats.mean_ffn() < 6


def test_errors(deep, trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(PonderError, match="ponder distill train duo"):
        make_policy(f"duo:adapter={tmp_path / 'none'}", deep)
    with pytest.raises(PonderError, match=r"threshold must be >= 0 \(or -1"):
        make_policy("duo:threshold=-2", deep)
    other = ponder.load(str(make_model_dir(tmp_path / "three", num_hidden_layers=3)))
    with pytest.raises(PonderError, match="another model"):
        make_policy(f"duo:adapter={trained}", other)
    assert main(["distill", "train", "duo", "--model", str(deep.path), "--data", str(tmp_path), "--width", "100000",
                 "--quiet"]) != 0
    assert "duo needs 1 <= width < the model's FFN width" in capsys.readouterr().err


def test_routed_single_token_forward_matches_the_plain_ones(deep, trained) -> None:
    """The oracle's routed forward: all-big is the full model, all-skip is the FFN-skip forward, and the cache's
    entries at the routed position are restored."""
    from ponder.depth.oracle import _single

    duo, _ = load_duo(trained, deep.model)
    model = deep.model
    seq = torch.tensor([[4, 9, 13, 2, 8, 30, 31, 5]])
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model(seq, cache)
        before = [k.clone() for k in cache.k]
        for pos in (3, 6):
            full = _single(model, cache, seq, pos, [], True)
            assert _single(model, cache, seq, pos, [], True, lambda l, xn, a: 2, duo) == full
            assert _single(model, cache, seq, pos, [], True, lambda l, xn, a: 0, duo) == \
                _single(model, cache, seq, pos, list(range(6)), True)
            _single(model, cache, seq, pos, [], True, lambda l, xn, a: 1, duo)
        assert all(torch.equal(k, b) for k, b in zip(cache.k, before))


def test_analyze_depth_reports_the_route_oracle_and_the_router(deep, trained, tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    assert main(["analyze", "depth", "--model", str(deep.path), "--max-new-tokens", "8", "--limit", "3",
                 "--adapter", "none", "--duo", str(trained), "--skip-positions", "2", "--out", str(out)]) == 0
    s = json.loads((out / "depth.json").read_text())["summary"]
    r = s["routes"]
    assert r["tokens"] == 6 and r["small_share"] == 16 / deep.model.config.intermediate_size
    assert r["oracle_big"] + r["oracle_small"] + r["oracle_skip"] == pytest.approx(6)
    # the route oracle never needs more FFN compute than the skip oracle alone (it only turns big blocks small)
    assert r["oracle_ffn_compute"] <= 6 - s["skip_oracle"]["mean_ffn_skippable"] + 1e-9
    assert all(0 <= v["top1_agreement"] <= 1 and v["big"] + v["small"] <= 6 for v in r["router"].values())
    assert "Duo-LLM routes on the same 6 tokens" in (out / "report.md").read_text()
    # without modules for the model, the route oracle is off and the report says so
    assert main(["analyze", "depth", "--model", str(deep.path), "--max-new-tokens", "4", "--limit", "1",
                 "--adapter", "none", "--out", str(tmp_path / "bare")]) == 0
    assert "the route oracle is off" in (tmp_path / "bare" / "report.md").read_text()


def test_margin_gradients_are_the_first_order_change_of_the_margin(deep) -> None:
    """The router's "margin" target: g from one backward pass, through the K/V cache writes, matches a finite
    difference of the final top-1 margin when one position's FFN output at one layer moves."""
    from ponder.distill.duo import _layer_io

    model = deep.model
    ids = [4, 9, 13, 2, 8, 30, 31, 5, 17, 3]
    at = torch.tensor([5, 8])
    rows = _layer_io(model, ids, at)

    def margins(layer: int, pos: int, d: torch.Tensor) -> torch.Tensor:
        cache = model.new_cache(1, len(ids))
        ctx = model.step_context(cache, len(ids), [len(ids)])
        with torch.no_grad():
            h = model.embed(torch.tensor([ids]))
            for i, block in enumerate(model.layers):
                a = h + block.attn(block.attn_norm(h), ctx, cache, i)
                y = block.mlp(block.mlp_norm(a))
                if i == layer:
                    y = y.clone()
                    y[0, pos] += d
                h = a + y
            top2 = model.logits(h[0, at]).double().topk(2, dim=-1).values
            return top2[:, 0] - top2[:, 1]

    torch.manual_seed(0)
    base = margins(0, 0, torch.zeros(model.config.hidden_size))
    for layer, j in ((1, 0), (4, 1), (2, 1)):
        pos = int(at[j])
        d = torch.randn(model.config.hidden_size) * 1e-3
        moved = margins(layer, pos, d)
        g = rows[layer][3]  # [len(at), E]: d(sum of margins)/dy at those positions, over each one's margin
        want = float((moved - base).sum())
        got = float((g[j].double() * d.double()).sum() * base[j])
        assert got == pytest.approx(want, rel=0.05, abs=1e-6), (layer, pos, got, want)


def test_generate_cli_prints_small_blocks(deep, trained, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(deep.path), "--raw", "hello there", "--max-new-tokens", "6",
                 "--depth", f"duo:threshold=0.6:adapter={trained}", "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert "[depth duo:threshold=0.6:adapter=" in err and " small) FFN blocks per decoded token of 6]" in err
