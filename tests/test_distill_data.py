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
    h = record_hidden(tiny.model, ids, layers)  # one forward; the shard's ran the prompt, then the answer
    assert torch.allclose(h[layers[-1]].to(torch.bfloat16).float(), shard[f"hidden.{layers[-1]}"][: len(ids)].float(),
                          rtol=2e-2, atol=2e-2)
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


def test_answers_share_their_prompt_and_count_its_positions_once(tiny, tmp_path: Path) -> None:
    from ponder.distill.data import record_continuations
    from ponder.distill.train import read_data

    manifest, seqs = read_data(make_data(tiny, OPTS, tmp_path / "d", progress=False) and tmp_path / "d")
    shard = manifest["shards"][0]
    n = len(shard["prompts"])
    assert shard["sources"] == shard["prompts"] * 2 and len(seqs) >= 2 * n
    for greedy, sampled in zip(seqs[:n], seqs[n : 2 * n]):
        a = greedy.answer_start
        assert greedy.loss_start == 0 and sampled.loss_start == sampled.answer_start == a
        assert torch.equal(greedy.tokens[:a], sampled.tokens[:a])  # the same prompt ...
        for layer, h in greedy.hidden.items():  # ... recorded once
            assert torch.equal(h[:a], sampled.hidden[layer][:a])
    # a continuation over the prompt's K/V gives the states one forward over prompt + answer gives
    ids = seqs[0].tokens.tolist()
    layers = tuple(sorted(seqs[0].hidden))
    a = seqs[0].answer_start
    whole = record_hidden(tiny.model, ids, layers)
    parts = record_continuations(tiny.model, ids[:a], [ids[a:], ids[a:][:2]], layers)
    for layer in layers:
        assert torch.allclose(parts[0][layer], whole[layer], atol=1e-4)
        assert torch.allclose(parts[1][layer], whole[layer][: a + 2], atol=1e-4)


def test_teacher_forced_text_skips_heldback_passages(tiny, tmp_path: Path) -> None:
    from ponder.distill.data import text_windows
    from ponder.distill.train import held_back, read_data, split

    opts = DataOptions(tokens=40, max_new_tokens=8, batch_size=4, chunk=4, text_tokens=3000)
    manifest = make_data(tiny, opts, tmp_path / "d", progress=False)
    assert 3000 <= manifest["text_tokens"] < 3000 + 1024
    text = [s for s in manifest["shards"] if str(s["chunk"]).startswith("text-")]
    assert text and all(s["answer_tokens"] == 0 and s["sources"] for s in text)
    _, seqs = read_data(tmp_path / "d")
    windows = [s for s in seqs if s.source.startswith("text:")]
    assert sum(len(s.tokens) for s in windows) == manifest["text_tokens"]
    assert all(s.answer_start == len(s.tokens) and s.loss_start == 0 and len(s.tokens) <= 1024 for s in windows)
    train, held = split(seqs)
    assert {id(s) for s in windows} <= {id(s) for s in train} and held and all(s.answer_start < len(s.tokens) for s in held)
    # a window's text comes only from passages whose prompts are not held back: a held-back passage never appears
    from ponder.distill.data import _essay_prompts

    heldback_text = [p.text.split("\n\n", 1)[1] for p in _essay_prompts() if held_back(p.source)]
    assert heldback_text
    decoded = [tiny.tokenizer.decode(ids) for _, ids in text_windows(tiny.tokenizer)]
    for passage in heldback_text[:5]:
        probe = " ".join(passage.split(" ")[40:60])  # 20 words from its middle
        assert not any(probe in d for d in decoded)
    # resuming asks for nothing new
    again = make_data(tiny, opts, tmp_path / "d", progress=False)
    assert again["text_tokens"] == manifest["text_tokens"] and len(again["shards"]) == len(manifest["shards"])
    with pytest.raises(PonderError, match="essays"):
        DataOptions(essays=False, text_tokens=10)


def test_answers_from_another_dtype_keep_the_targets_states(tiny, tiny_dir: Path, tmp_path: Path) -> None:
    import ponder
    from ponder.distill.train import read_data

    int8 = ponder.load(str(tiny_dir), "int8")
    opts = DataOptions(**{**OPTS.__dict__, "answer_dtype": "int8"})
    manifest = make_data(tiny, opts, tmp_path / "d", progress=False, answer_loaded=int8)
    assert manifest["recipe"]["answer_dtype"] == "int8"
    _, seqs = read_data(tmp_path / "d")
    s = seqs[0]
    layers = tuple(sorted(s.hidden))
    h = record_hidden(tiny.model, s.tokens.tolist(), layers)  # the fp32 target's states of that text
    for layer in layers:
        assert torch.allclose(h[layer].to(torch.bfloat16).float(), s.hidden[layer].float(), rtol=2e-2, atol=2e-2)
    from ponder.engine import Engine
    from ponder.sampling import SamplingParams

    a = s.answer_start  # the answer is the int8 copy's greedy output
    want = Engine(int8).generate([s.tokens[:a].tolist()], SamplingParams(max_new_tokens=OPTS.max_new_tokens))
    assert s.tokens[a:].tolist() == want[0].output_ids
