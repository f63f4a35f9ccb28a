"""``ponder distill data`` on the tiny model: shapes, the Spec-Bench split, determinism and resumption."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ponder.distill.data import DataOptions, default_layers, make_data, record_hidden, specbench_split
from ponder.errors import PonderError

SPECBENCH = Path(__file__).parents[1].parent / "shared" / "specbench" / "dev.jsonl"
OPTS = DataOptions(tokens=300, max_new_tokens=12, batch_size=4, essays=False, chunk=16)


def _shards(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(p)) for p in sorted(out.glob("shard-*.safetensors"))]


def test_split_keeps_every_category_on_both_sides() -> None:
    import json

    if not SPECBENCH.exists():
        pytest.skip("needs ../shared/specbench/dev.jsonl")
    rows = [json.loads(line) for line in SPECBENCH.read_text().splitlines() if line.strip()]
    for cat in {r["category"] for r in rows}:
        sides = {specbench_split(r["question_id"]) for r in rows if r["category"] == cat}
        assert sides == {"train", "heldout"}, cat


def test_data_shapes_and_hidden_states(tiny, tmp_path: Path) -> None:
    manifest = make_data(tiny, OPTS, tmp_path / "d", progress=False)
    assert manifest["answer_tokens"] >= OPTS.tokens or "note" in manifest
    layers = default_layers(tiny.model.config.num_hidden_layers)
    shard = _shards(tmp_path / "d")[0]
    starts, tokens = shard["starts"].tolist(), shard["tokens"].tolist()
    assert starts[-1] == len(tokens) and len(shard["answer_starts"]) == len(starts) - 1
    for layer in layers:
        assert shard[f"hidden.{layer}"].shape == (len(tokens), tiny.model.config.hidden_size)
    # the recorded states are the model's own: the last layer's output gives the next-token logits
    ids = tokens[starts[0] : starts[1]]
    h = record_hidden(tiny.model, ids, layers)
    assert torch.equal(h[layers[-1]].to(torch.bfloat16), shard[f"hidden.{layers[-1]}"][: len(ids)])
    with torch.inference_mode():
        ref = tiny.model(torch.tensor([ids]), tiny.model.new_cache(1, len(ids)))[0]
    assert torch.allclose(tiny.model.logits(h[layers[-1]]), ref, atol=1e-4)
    # greedy answer = what the engine generates greedily for that prompt
    a = int(shard["answer_starts"][0])
    from ponder.engine import Engine
    from ponder.sampling import SamplingParams

    greedy = Engine(tiny).generate([ids[:a]], SamplingParams(max_new_tokens=OPTS.max_new_tokens))[0].output_ids
    assert ids[a:] == greedy


def test_deterministic_and_resumable(tiny, tmp_path: Path) -> None:
    opts = DataOptions(tokens=500, max_new_tokens=12, batch_size=4, seed=3, chunk=16)  # built-in prompts, then essays
    whole = make_data(tiny, opts, tmp_path / "a", progress=False)
    assert len(whole["shards"]) >= 2
    first = make_data(tiny, DataOptions(**{**opts.__dict__, "tokens": 1}), tmp_path / "b", progress=False)
    assert len(first["shards"]) == 1  # interrupted after one shard ...
    resumed = make_data(tiny, opts, tmp_path / "b", progress=False)  # ... and resumed
    assert [s["prompts"] for s in resumed["shards"]] == [s["prompts"] for s in whole["shards"]]
    for x, y in zip(_shards(tmp_path / "a"), _shards(tmp_path / "b")):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    other = make_data(tiny, DataOptions(**{**opts.__dict__, "seed": 4}), tmp_path / "c", progress=False)
    assert not torch.equal(_shards(tmp_path / "c")[0]["tokens"], _shards(tmp_path / "a")[0]["tokens"])
    assert other["recipe"]["seed"] == 4
    with pytest.raises(PonderError, match="another recipe"):
        make_data(tiny, DataOptions(**{**opts.__dict__, "max_new_tokens": 5}), tmp_path / "a", progress=False)


def test_cli_mistakes_are_one_line_errors(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    from test_cli import assert_one_line_error, run_cli

    for args, needle in [(["--layers", "2,x"], "--layers"), (["--specbench", str(tmp_path / "none.jsonl")], "no such"),
                         (["--layers", "9"], "recorded layers")]:
        code, _, err = run_cli(capsys, "distill", "data", "--model", str(tiny_dir), "--out", str(tmp_path / "d"),
                               "--quiet", *args)
        assert_one_line_error(code, err, needle)
    code, _, err = run_cli(capsys, "distill", "train", "head", "--model", str(tiny_dir), "--data",
                           str(tmp_path / "nothing"), "--out", str(tmp_path / "h"), "--quiet")
    assert_one_line_error(code, err, "ponder distill data")


def test_bench_suite_takes_the_split(tmp_path: Path) -> None:
    import json

    from ponder.bench.suites import load_suite

    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": q, "category": "qa", "turns": ["hi"]}) for q in range(1, 9)))
    assert [c.id for c in load_suite(f"specbench:{path}:heldout")] == ["2", "3", "4", "6", "7", "8"]
    assert [c.id for c in load_suite(f"specbench:{path}:train")] == ["1", "5"]
    assert len(load_suite(f"specbench:{path}")) == 8
