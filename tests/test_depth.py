"""Depth policies (ponder/depth): no-op settings are exact, K/V fill matches its definition, SkipDecode's exits never
deepen, rows exiting at different layers in one batch give each row's tokens alone, and bad settings are one-line
errors. Tiny random models (a 6-layer one so that exits have room)."""

from pathlib import Path

import pytest
import torch

import ponder
from ponder.depth import DepthPolicy, DepthRow, decode, make_policy
from ponder.depth.base import layer_kv
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import SamplingParams
from tinymodel import make_model_dir

PROMPTS = [[1, 5, 9, 22, 40], [3, 8, 2], [7, 7, 7, 7, 7, 7, 7, 7, 12]]
GREEDY = SamplingParams(max_new_tokens=20)
NOOPS = ["static", "static:layers=6", "skipdecode", "skipdecode:start=6:end=6", "exit:threshold=2",
         "exit:threshold=1.5:measure=state", "ffn-skip", "ffn-skip:skip=0:warmup=2"]
LOSSY = ["static:layers=4", "skipdecode:end=2:span=6", "exit:threshold=0.2:layers=2/3/4",
         "exit:threshold=0.3:measure=margin:layers=3", "exit:threshold=0.6:measure=state:layers=2/4",
         "ffn-skip:skip=2:warmup=2"]


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory):
    return ponder.load(str(make_model_dir(tmp_path_factory.mktemp("tiny6"), num_hidden_layers=6)))


@pytest.mark.parametrize("spec", NOOPS)
@pytest.mark.parametrize("batch", [1, 3])
def test_settings_that_never_skip_are_exact(deep, spec: str, batch: int) -> None:
    prompts = PROMPTS[:batch]
    plain = Engine(deep).generate(prompts, GREEDY)
    policy = make_policy(spec, deep)
    out = Engine(deep, depth=policy).generate(prompts, GREEDY)
    assert [c.output_ids for c in out] == [c.output_ids for c in plain]
    assert policy.stats.mean_layers() == 6 and policy.stats.mean_ffn() == 6


@pytest.mark.parametrize("spec", LOSSY)
def test_rows_in_one_batch_give_their_tokens_alone(deep, spec: str) -> None:
    policy = make_policy(spec, deep)
    together = Engine(deep, depth=policy).generate(PROMPTS, GREEDY)
    alone = [Engine(deep, depth=make_policy(spec, deep)).generate([p], GREEDY)[0] for p in PROMPTS]
    assert [c.output_ids for c in together] == [c.output_ids for c in alone]
    assert policy.stats.mean_layers() < 6 or policy.stats.mean_ffn() < 6  # it did skip something


def test_exits_differ_between_rows_of_one_batch(deep) -> None:
    """The batch test above means something only if rows of one step left at different layers."""
    policy = make_policy("exit:threshold=0.6:measure=state:layers=2/4", deep)
    engine = Engine(deep, depth=policy)
    core = engine.core(3)
    for i, p in enumerate(PROMPTS):
        core.add_request(p, GREEDY, i)
    while core.has_work():
        core.step()
    assert len(policy.stats.exits) >= 2, policy.stats.exits


def test_filled_kv_is_the_exit_state_through_each_skipped_layer(deep) -> None:
    """CALM's propagation by definition: after a token exits after layer l, layer j >= l holds at its slot the K/V
    that layer's norm, QKV projection and rotation make of the state after l layers."""
    model = deep.model
    prompt = torch.tensor([[4, 9, 13, 2, 8]])
    cache = model.new_cache(1, 16)
    model(prompt, cache)
    ref = model.new_cache(1, 16)
    model(prompt, ref)
    token = torch.tensor([[17]])
    states: dict[int, torch.Tensor] = {2: None}
    ctx = model.step_context(ref, 1, [1])
    model(token, ref, capture=states)  # the plain step: its state entering layer 2 and its layers' K/V
    policy = make_policy("exit:threshold=-1:measure=state:layers=2", deep)  # every token exits after layer 2
    rows = [DepthRow(5)]
    decode(model, token, cache, policy, rows)
    assert rows[0].exits == [2]
    slot = 5
    for layer in range(6):
        if layer < 2:  # layers that ran: the plain step's K/V
            want_k, want_v = ref.k[layer][0, :, slot], ref.v[layer][0, :, slot]
        else:
            k, v = layer_kv(model.layers[layer], states[2], ctx)
            want_k, want_v = k[0, 0], v[0, 0]
        torch.testing.assert_close(cache.k[layer][0, :, slot], want_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache.v[layer][0, :, slot], want_v, rtol=1e-5, atol=1e-6)
    assert cache.lengths == [6]


def test_skipdecode_exits_never_deepen_along_a_row(deep) -> None:
    policy = make_policy("skipdecode:start=6:end=2:span=10", deep)
    assert [policy.layers_at(s) for s in range(14)] == sorted((policy.layers_at(s) for s in range(14)), reverse=True)
    engine = Engine(deep, depth=policy)
    core = engine.core(2)  # three requests through two places: the third joins a running batch
    for i, p in enumerate(PROMPTS):
        core.add_request(p, GREEDY, i)
    seen = {}
    while core.has_work():
        core.step()
        for r in core.rows:
            seen[r.index] = r.depth_state
    assert len(seen) == 3
    for row in seen.values():
        assert row.exits == sorted(row.exits, reverse=True) and row.exits[0] == 6 and row.exits[-1] < 6


def test_a_non_filling_policy_that_deepens_is_refused(deep) -> None:
    class Deepening(DepthPolicy):
        name = "deepening"

        def budgets(self, rows):
            return [2 if r.step == 0 else 6 for r in rows]

    policy = Deepening()
    policy.bind(deep)
    with pytest.raises(RuntimeError, match="without filling"):
        Engine(deep, depth=policy).generate(PROMPTS[:1], GREEDY)


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown depth policy"),
    ("static:layers=9", "has 6 layers"),
    ("skipdecode:start=2:end=4", "non-increasing"),
    ("exit:measure=entropy", "measure must be one of"),
    ("exit:layers=0/9", "must lie in"),
    ("exit:layers=a/b", "separated by"),
    ("ffn-skip:skip=9", "candidates"),
    ("ffn-skip:bogus=1", "unknown option"),
])
def test_bad_settings_are_one_line_errors(deep, spec: str, message: str) -> None:
    with pytest.raises(PonderError, match=message):
        make_policy(spec, deep)


def test_depth_refuses_speculation_and_kv_policies_that_act_per_layer(deep) -> None:
    from ponder.kv import make_policy as make_kv
    from ponder.speculate import make_speculator

    policy = make_policy("static:layers=4", deep)
    with pytest.raises(PonderError, match="without --speculate"):
        Engine(deep, make_speculator("pld", deep), depth=policy)
    with pytest.raises(PonderError, match="composes with streaming and snapkv"):
        Engine(deep, kv=make_kv("h2o:ratio=0.5"), depth=policy)


def test_depth_composes_with_snapkv(deep) -> None:
    from ponder.kv import make_policy as make_kv

    prompts = [list(range(1, 40)), list(range(5, 60))]
    kv_only = Engine(deep, kv=make_kv("snapkv:ratio=0.5")).generate(prompts, GREEDY)
    noop = Engine(deep, kv=make_kv("snapkv:ratio=0.5"), depth=make_policy("exit:threshold=2", deep)).generate(
        prompts, GREEDY)
    assert [c.output_ids for c in noop] == [c.output_ids for c in kv_only]
    lossy = make_policy("static:layers=4", deep)
    out = Engine(deep, kv=make_kv("snapkv:ratio=0.5"), depth=lossy).generate(prompts, GREEDY)
    assert all(len(c.output_ids) == 20 for c in out) and lossy.stats.mean_layers() == 4


def test_generate_cli_prints_the_compute(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from ponder.cli import main

    assert main(["generate", "--model", str(tiny_dir), "--raw", "hello there", "--max-new-tokens", "6",
                 "--depth", "static:layers=2", "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert "[depth static:layers=2: 2.0 attention and 2.0 FFN blocks per decoded token of 3]" in err


def test_token_classes() -> None:
    from ponder.depth.oracle import token_class

    assert [token_class(p) for p in [" the", " cat", "ting", ",", " 42", "\n", "3.5", " Of"]] == [
        "function word", "word start", "word piece", "punctuation", "number", "whitespace", "number",
        "function word"]


def test_skip_oracle_restores_the_cache_and_matches_the_full_model_without_skips(deep) -> None:
    from ponder.depth.oracle import _bisect, _single

    model = deep.model
    seq = torch.tensor([[4, 9, 13, 2, 8, 30, 31]])
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        logits = model(seq, cache)
        before = [t.clone() for t in cache.k + cache.v]
        for pos in (3, 6):
            assert _single(model, cache, seq, pos, [], ffn_only=True) == int(logits[0, pos].argmax())
            _single(model, cache, seq, pos, [1, 2, 3], ffn_only=False)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v)) and cache.lengths == [7]
    assert _bisect(lambda k: k <= 3, 10) == 3 and _bisect(lambda k: k == 0, 5) == 0


def test_analyze_depth_cli(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The oracle report end to end on the tiny model: shares by layer are cumulative and end at 100%, and every
    file is written; with the tiny model's (identity) exit adapters the router sweep is reported too."""
    import json

    from ponder.cli import main
    from ponder.distill.exits import ExitAdapters
    from ponder.distill.train import save_artifact

    adapters = ExitAdapters(64, (1, 2))
    save_artifact(tmp_path / "exits", adapters.tensors(), {"kind": "exits", "layers": [1, 2], "model": "tiny"})
    out = tmp_path / "out"
    assert main(["analyze", "depth", "--model", str(tiny_dir), "--max-new-tokens", "8", "--limit", "3",
                 "--adapter", str(tmp_path / "exits"), "--skip-positions", "2", "--out", str(out)]) == 0
    s = json.loads((out / "depth.json").read_text())["summary"]
    shares = s["share_by_layer_lens"]
    assert shares == sorted(shares) and shares[-1] == 1.0 and s["tokens"] == 24
    assert s["share_by_layer_adapter"] == shares  # identity adapters: the logit lens
    assert s["router"] and s["skip_oracle"]["tokens"] == 6
    assert {p.name for p in out.iterdir()} == {"depth.json", "report.md", "exits.png", "router.png",
                                               "difficulty.html"}
    assert "Depth oracle: 24 answer tokens, 3 layers" in capsys.readouterr().out
    assert main(["analyze", "depth", "--model", str(tiny_dir), "--limit", "0"]) == 1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exit_adapters_in_any_float_dtype(tmp_path: Path, dtype: str) -> None:
    """Exits read through trained adapters whatever the model's dtype (bf16 states meet fp32 maps); identity maps
    with a threshold above 1 leave the output as it was."""
    from ponder.distill.exits import ExitAdapters
    from ponder.distill.train import save_artifact

    loaded = ponder.load(str(make_model_dir(tmp_path / "m", num_hidden_layers=6)), dtype)
    save_artifact(tmp_path / "exits", ExitAdapters(64, (2, 4)).tensors(), {"kind": "exits", "layers": [2, 4]})
    adapter = str(tmp_path / "exits")
    lossy = make_policy(f"exit:threshold=0.1:adapter={adapter}", loaded)
    out = Engine(loaded, depth=lossy).generate(PROMPTS, GREEDY)
    assert all(len(c.output_ids) == 20 for c in out) and lossy.stats.mean_layers() < 6
    plain = Engine(loaded).generate(PROMPTS, GREEDY)
    noop = Engine(loaded, depth=make_policy(f"exit:threshold=2:adapter={adapter}", loaded)).generate(PROMPTS, GREEDY)
    assert [c.output_ids for c in noop] == [c.output_ids for c in plain]
    with pytest.raises(PonderError, match="no map for layers"):
        make_policy(f"exit:layers=3:adapter={adapter}", loaded)


def test_engine_takes_a_depth_spec(deep) -> None:
    engine = Engine(deep, depth="static:layers=4")
    assert engine.depth.name == "static" and engine.depth.spec == "static:layers=4"
    out = engine.generate(PROMPTS[:1], GREEDY)
    assert len(out[0].output_ids) == 20 and engine.depth.stats.mean_layers() == 4
    with pytest.raises(PonderError, match="unknown depth policy"):
        Engine(deep, depth="deepest")
