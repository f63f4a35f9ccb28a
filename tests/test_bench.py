"""``ponder bench``: method specs, suites, near-tie logic and a full run on a tiny model."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ponder
from ponder import bench
from ponder.bench.methods import parse_methods, parse_spec
from ponder.bench.metrics import divergence, near_tie_gap
from ponder.bench.suites import BUILTIN, load_suite
from ponder.errors import PonderError


def test_spec_parsing() -> None:
    s = parse_spec("baseline:dtype=int8:batch=4")
    assert (s.name, s.dtype, s.batch(1), s.text) == ("baseline", "int8", 4, "baseline:dtype=int8:batch=4")
    assert parse_spec("hf").batch(8) == 1  # peers run one prompt at a time
    assert parse_spec("hf-pld:n=5").options == {"n": 5}
    assert [m.text for m in parse_methods("baseline, hf")] == ["baseline", "hf"]


def test_speculative_spec_parsing() -> None:
    s = parse_spec("pld:max_ngram=4:dtype=int8+recycling:k=8:batch=4")
    assert (s.speculator, s.dtype, s.batch(1), s.is_ponder) == ("pld:max_ngram=4+recycling:k=8", "int8", 4, True)
    assert parse_spec("draft:some/model:k=3").speculator == "draft:some/model:k=3"
    assert parse_spec("early-exit").batch(3) == 3


@pytest.mark.parametrize(
    "text, needle",
    [("pld:foo=1", "unknown option 'foo'"), ("recycling:k=x", "type int"), ("pld+nope", "unknown drafter"),
     ("pld:dtype=int3", "dtype"), ("pld:batch=0", "batch"), ("pld:max_ngram=0", "min_ngram"),
     ("early-exit:layer=x", "layer"), ("pld:max_nodes=-1", "max_nodes"), ("draft", "needs a model")],
)
def test_bad_speculative_specs(text: str, needle: str) -> None:
    with pytest.raises(PonderError, match=needle):
        parse_methods(text)


@pytest.mark.parametrize(
    "text, needle",
    [("nope", "unknown method"), ("baseline:dtype=int3", "dtype"), ("baseline:batch=x", "batch"),
     ("baseline:batch=0", ">= 1"), ("hf:n=3", "bad option"), ("baseline:int8", "bad option"),
     ("baseline,baseline", "twice"), (",", "empty")],
)
def test_bad_specs(text: str, needle: str) -> None:
    with pytest.raises(PonderError, match=needle):
        parse_methods(text)


def test_suites(tmp_path: Path) -> None:
    assert len(load_suite("builtin")) == len(BUILTIN)
    assert {c.category for c in load_suite("builtin")} >= {"translation", "summarization", "qa", "rag"}
    f = tmp_path / "s.jsonl"
    f.write_text('{"question_id": 1, "category": "qa", "turns": ["a", "b"]}\n\n'
                 '{"question_id": 2, "category": "rag", "turns": ["c"]}\n')
    assert [(c.id, c.turn) for c in load_suite(f"specbench:{f}")] == [("1", 1), ("2", 1)]
    both = load_suite(f"specbench:{f}", second_turns=True)
    assert [(c.id, c.turn, c.turns) for c in both][-1] == ("1", 2, ["a", "b"])
    with pytest.raises(PonderError, match="unknown suite"):
        load_suite("mmlu")
    f.write_text("")
    with pytest.raises(PonderError, match="no prompts"):
        load_suite(f"specbench:{f}")


def test_near_tie_logic() -> None:
    ref, gaps = [5, 6, 7, 8], [3.0, 5e-5, 2.0, 1.0]
    assert divergence([5, 6, 7, 8], ref) is None
    assert divergence([5, 6], ref) == 2
    assert near_tie_gap([5, 9, 7, 8], ref, gaps) == 5e-5  # diverges at a near tie
    assert near_tie_gap([5, 6, 9], ref, gaps) is None  # diverges where the baseline was sure: a real mismatch
    assert near_tie_gap(ref, ref, gaps) is None


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    argv = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return p.parse_args(argv)


def _one_prompt_run(model: Path, tmp_path: Path, prompt: str, methods: str, max_new_tokens: int,
                    profile: bool = False) -> tuple[dict, str]:
    """A bench run of ``methods`` on one Spec-Bench-style prompt: (results.json, report.md)."""
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": [prompt]}))
    out = tmp_path / "out"
    args = _args(model=model, suite=f"specbench:{suite}", methods=methods, max_new_tokens=max_new_tokens, out=out)
    args.profile = profile
    assert bench.run(args) == 0
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def _peak_mb_of_importing_torch() -> float:
    """Peak RSS (MB, from the kernel's VmHWM in kB) of a process that only imports torch: a method's child imports
    torch and then runs a model, so its peak cannot be lower. Catches a wrong unit or the wrong process's figure."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to measure a reference process")
    probe = "import torch; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    kb = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(kb) / 1024


def _physical_memory_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def test_full_run_writes_the_documented_schema(tiny_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.jsonl"
    suite.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "qa", "turns": ["the sea is", "and the sky is"]},
        {"question_id": 2, "category": "rag", "turns": ["a red car and a blue"]},
        {"question_id": 3, "category": "qa", "turns": ["one two three"]},
    ]))
    out = tmp_path / "out"
    args = _args(model=tiny_dir, suite=f"specbench:{suite}", methods="baseline,hf,baseline:batch=3",
                 max_new_tokens=8, out=out)
    args.second_turns = True
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    torch_process_mb, physical_mb = _peak_mb_of_importing_torch(), _physical_memory_mb()
    assert {"model", "suite", "machine", "date", "settings", "methods", "categories", "prompts"} <= set(r)
    assert set(r["methods"]) == {"baseline", "hf", "baseline:batch=3"}
    for figures in r["methods"].values():
        assert {"tokens_per_s", "speedup", "exact_match", "near_ties", "ttft_s", "peak_rss_mb"} <= set(figures)
        assert figures["exact_match"] == 1.0  # fp32 transformers and batched ponder match ponder greedy exactly
        assert torch_process_mb <= figures["peak_rss_mb"] < physical_mb  # the child's own peak, in MB
    assert r["methods"]["baseline"]["speedup"] == 1.0
    assert r["methods"]["baseline:batch=3"]["batch_size"] == 3
    assert len(r["prompts"]) == 3 * 4  # 3 first turns + 1 second turn, per method
    assert {p["turn"] for p in r["prompts"]} == {1, 2}
    keys = {"id", "category", "method", "new_tokens", "seconds", "tokens_per_s", "ttft_s", "exact_match",
            "output_ids", "near_tie", "near_tie_gap"}
    assert all(keys <= set(p) for p in r["prompts"])
    # batch 3 over 3 first turns + 1 second turn: continuous batching; each prompt's seconds are its own, within
    # its method's wall time, and start no earlier than its first token
    assert all(0 < p["ttft_s"] <= p["seconds"] <= r["methods"][p["method"]]["seconds"] + 1e-6 for p in r["prompts"])
    assert set(r["categories"]) == {"qa", "rag"}
    assert "| hf |" in (out / "report.md").read_text()
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"
    # roofline: the machine's bandwidth once, each method's weight bytes per forward and its fraction of it
    assert 0.5 < r["machine"]["bandwidth_gb_per_s"] < 10_000
    base, hf = r["methods"]["baseline"], r["methods"]["hf"]
    params = sum(p.numel() for p in ponder.load(str(tiny_dir)).model.parameters())
    assert base["weight_bytes"] == hf["weight_bytes"] < 4 * params  # fp32; the input embedding is not read whole
    assert 0 < base["roofline"] < 1
    assert abs(base["weight_gb_per_s"] - base["weight_bytes"] * base["decode_tokens_per_s"] / 1e9) < 1e-9
    assert "Roofline: measured memory bandwidth" in (out / "report.md").read_text()


def test_speculative_methods_in_a_run(tiny_dir: Path, tmp_path: Path) -> None:
    # drafting forced on: the adaptive policy's choice follows measured verify costs, which a busy machine skews
    PLD, BOTH = "pld:adaptive=false:min_prob=0", "pld+recycling:adaptive=false:min_prob=0:batch=2"
    suite = tmp_path / "suite.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [t]} for i, (c, t) in enumerate([
        ("summarization", "one two three four one two three four one two three"),
        ("qa", "a b c a b c a b"), ("qa", "x y z"), ("rag", "red blue red blue red"),
    ])]
    suite.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    args = _args(model=tiny_dir, suite=f"specbench:{suite}", methods=f"baseline,{PLD},{BOTH},baseline:batch=2",
                 max_new_tokens=12, per_category=1, out=out)
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["prompts"] == 3  # one per category
    for spec in (PLD, BOTH):
        f = r["methods"][spec]
        assert f["exact_match"] == 1.0
        assert {"tau", "alpha", "acceptance_by_position", "forwards_per_token", "draft_s", "verify_s"} <= set(f)
        mine = [p for p in r["prompts"] if p["method"] == spec]
        drafted, accepted = sum(p["drafted"] for p in mine), sum(p["accepted"] for p in mine)
        assert drafted > 0 and accepted > 0, (spec, drafted, accepted)  # the drafters really drafted, and hit
        assert f["alpha"] == pytest.approx(accepted / drafted)  # accepted / drafted over all prompts, not a mean
        steps, tokens = f["verify_steps"], f["new_tokens"]
        assert f["forwards_per_token"] == pytest.approx((3 + steps) / tokens)
        assert f["tau"] == pytest.approx(1 + sum(p["accepted"] for p in r["prompts"] if p["method"] == spec) / steps)
        assert f["verify_cost_ms"] and all(v > 0 for v in f["verify_cost_ms"].values())
    # each speculative method is also checked against plain decoding with the same dtype and batch size
    assert r["methods"][PLD]["plain_method"] == "baseline"
    assert r["methods"][BOTH]["plain_method"] == "baseline:batch=2"
    assert r["methods"][BOTH]["exact_match_plain"] == 1.0
    assert "100% (baseline:batch=2)" in (out / "report.md").read_text()
    assert "tau" not in r["methods"]["baseline"] and r["methods"]["baseline"]["verify_cost_ms"]
    report = (out / "report.md").read_text()
    assert "Verify-cost curve" in report and f"| {PLD} |" in report
    assert (out / "categories.png").read_bytes()[:4] == b"\x89PNG"


def test_llamacpp_needs_a_gguf_model(tiny_dir: Path, tmp_path: Path) -> None:
    from ponder.bench.methods import gguf_path

    with pytest.raises(PonderError, match="GGUF"):
        gguf_path(str(tiny_dir))


def test_user_mistakes_fail_before_any_work(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PonderError, match="--limit"):
        bench.run(_args(model=tiny_dir, limit=0, out=tmp_path))
    with pytest.raises(PonderError, match="context window"):
        bench.run(_args(model=tiny_dir, max_new_tokens=5000, out=tmp_path))


def test_a_calls_seconds_are_shared_by_row_lifetimes_or_tokens() -> None:
    """Per-category speed needs each prompt's share of a call's time: in one continuous-batching call a row that
    finishes sooner costs less (by its own seconds), whatever its token count; a peer's batch splits by tokens."""
    from ponder.bench.methods import Output
    from ponder.bench.worker import time_shares

    outs = [Output([1] * 8, 1.0, 0.1), Output([1] * 8, 3.0, 0.1), Output([1] * 16, 4.0, 0.1)]
    assert time_shares(outs, 4.0, by_lifetime=True) == pytest.approx([0.5, 1.5, 2.0])
    assert time_shares(outs, 4.0, by_lifetime=False) == pytest.approx([1.0, 1.0, 2.0])


def test_exact_match_against_plain_decoding_of_the_same_dtype() -> None:
    from ponder.bench.report import add_exact_match_plain

    methods = {m: {} for m in ("baseline", "baseline:dtype=int8", "pld:dtype=int8", "pld:dtype=bf16")}
    out = {"baseline": [[1, 2], [3]], "baseline:dtype=int8": [[1, 5], [3]], "pld:dtype=int8": [[1, 5], [4]],
           "pld:dtype=bf16": [[1, 2], [3]]}
    prompts = [{"method": m, "id": str(i), "turn": 1, "output_ids": ids} for m, outs in out.items()
               for i, ids in enumerate(outs)]
    add_exact_match_plain(methods, prompts, 1)
    assert methods["pld:dtype=int8"] == {"exact_match_plain": 0.5, "plain_method": "baseline:dtype=int8"}
    assert methods["pld:dtype=bf16"] == {}  # no plain bf16 method in the run


@pytest.mark.serial  # compiles
def test_profile_splits_decode_and_verify_steps_into_categories(tiny_dir: Path, tmp_path: Path) -> None:
    from ponder.bench.profile import CATEGORIES, category

    assert [category(n) for n in ("aten::_weight_int4pack_mm_for_cpu", "aten::linear", "mkl::_mkl_linear",
                                  "aten::scaled_dot_product_attention", "ponder::invariant_attention",
                                  "ponder::native_attention", "aten::rms_norm", "ponder::native_decoder")] == [
        "matmuls", "matmuls", "matmuls", "attention", "attention", "attention", "other ops", "native layers"]
    methods = ("baseline,baseline:dtype=q4,baseline:dtype=q4:native=false,baseline:dtype=q4:compile=true:native=false,"
               "hf")
    r, report = _one_prompt_run(tiny_dir, tmp_path, "the sea is", methods, 4, profile=True)
    assert "profile" not in r["methods"]["hf"]  # ponder methods only
    for spec in ("baseline", "baseline:dtype=q4:native=false", "baseline:dtype=q4:compile=true:native=false",
                 "baseline:dtype=q4"):
        p = r["methods"][spec]["profile"]
        for kind in ("decode", "verify"):
            assert set(p[kind]) == set(CATEGORIES) | {"step_ms"}
            if spec == "baseline:dtype=q4":  # the C decoder: its layers are one call
                assert p[kind]["native layers"] > 0 and p[kind]["head"] > 0 and p[kind]["matmuls"] == 0, p[kind]
                continue
            assert all(p[kind][c] > 0 for c in ("matmuls", "attention", "head", "other ops")), (spec, kind, p[kind])
            assert p[kind]["native layers"] == 0
    assert "Per-op breakdown" in report and "| baseline:dtype=q4 | verify |" in report


@pytest.mark.serial  # compiles
def test_the_report_says_what_ran_on_the_fast_path(tiny_dir: Path, tmp_path: Path) -> None:
    """compile=true: the drafter report carries the fast path's counts, and the report says them in one line (the
    eager fallbacks of a KV policy's forwards: tests/test_fast.py)."""
    plain = "baseline:compile=true"
    r, report = _one_prompt_run(tiny_dir, tmp_path, "a b c a b c a b", plain, 8)
    fast = r["methods"][plain]["drafter"]["fast_path"]
    assert fast["compiled_forwards"] >= 7 and fast["eager_fallbacks"] == {}
    assert f"{plain}: fast path ran {fast['compiled_forwards']} decode/verify forwards compiled; eager fallbacks: none" \
        in report
    q4 = "baseline:dtype=q4"
    (tmp_path / "q4").mkdir()
    r, report = _one_prompt_run(tiny_dir, tmp_path / "q4", "a b c a b c a b", q4, 8)
    nat = r["methods"][q4]["drafter"]["native_layers"]
    assert nat["native_forwards"] >= 7 and nat["eager_fallbacks"] == {}
    assert f"{q4}: native decoder layers ran {nat['native_forwards']} decode/verify forwards; per-operator " \
           "fallbacks: none" in report


def test_serve_suite_loads_each_methods_server_and_reports(tiny_dir: Path, tmp_path: Path) -> None:
    """``--suite serve``: a ``ponder serve`` child per method on loopback, closed-loop streaming clients per level,
    the prefix-cache probe; every request completes, tokens and latencies are reported, the servers are gone."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    out = tmp_path / "serve"
    args = _args(model=tiny_dir, suite="serve", methods="baseline,pld", concurrency="1,3", requests=4,
                 max_new_tokens=6, out=out)
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert set(r["methods"]) == {"baseline", "pld"} and r["concurrency"] == [1, 3]
    for name, entry in r["methods"].items():
        assert "--speculate pld" in entry["command"] if name == "pld" else "--speculate" not in entry["command"]
        for level in entry["levels"]:
            assert level["completed"] == 4 and level["failed"] == level["unfinished"] == 0, level
            assert 4 <= level["tokens"] <= 4 * 6 and level["throughput_tok_s"] > 0
            assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"] <= level["e2e_p99_s"]
        probe = entry["prefix"]
        assert probe["first_ttft_s"] > 0 and len(probe["ttfts_s"]) == 5
    report = (out / "report.md").read_text()
    assert "| baseline | 3 | 4/4 |" in report and "Prefix cache" in report
    with pytest.raises(PonderError, match="serve suite runs ponder methods and llamacpp"):
        bench.run(_args(model=tiny_dir, suite="serve", methods="baseline,hf", out=tmp_path / "x"))
    with pytest.raises(PonderError, match="--concurrency"):
        bench.run(_args(model=tiny_dir, suite="serve", methods="baseline", concurrency="0", out=tmp_path / "y"))


def test_the_serve_suite_gives_llamacpp_as_many_threads_as_ponder(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-cpp-python's server decodes on half the cores unless told otherwise: the peer gets ponder's count."""
    import torch

    from ponder.bench import methods, serve

    monkeypatch.setattr(methods, "gguf_path", lambda model: Path("/models/m.gguf"))
    spec = methods.parse_spec("llamacpp")

    def threads(cmd: list[str]) -> tuple[str, str]:
        return cmd[cmd.index("--n_threads") + 1], cmd[cmd.index("--n_threads_batch") + 1]

    n = str(torch.get_num_threads())
    assert threads(serve.server_command(spec, "m", 8000, None, 16, 72, 4096)) == (n, n)
    assert threads(serve.server_command(spec, "m", 8000, 3, 16, 72, 4096)) == ("3", "3")
    ponder_cmd = serve.server_command(methods.parse_spec("baseline"), "m", 8000, 3, 16, 72, 0)
    assert ponder_cmd[ponder_cmd.index("--threads") + 1] == "3"


def test_a_server_that_dies_during_the_serve_suite_is_said_so_with_its_signal(tmp_path: Path) -> None:
    """A peer's server that dies mid-run (llama.cpp built for instructions this CPU lacks: SIGILL) would otherwise
    leave only refused connections in the table: the report names the death, its signal and the log."""
    import signal
    import subprocess
    import sys

    from ponder.bench import serve

    server = serve.ServerProcess.__new__(serve.ServerProcess)
    server.log = tmp_path / "server-llamacpp.log"
    server.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert server.died() is None  # running
    finally:
        server.proc.send_signal(signal.SIGILL)
        server.proc.wait(10)
    why = server.died()
    assert why == f"the server died (killed by SIGILL) while the bench ran; its log: {server.log}"
    server.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    server.proc.wait(10)
    assert "(exit code 3)" in server.died()
    level = {"concurrency": 1, "requests": 2, "completed": 0, "failed": 2, "unfinished": 0, "tokens": 0,
             "throughput_tok_s": 0.0, "ttft_p50_s": None, "ttft_p99_s": None, "itl_p50_s": None, "itl_p99_s": None,
             "e2e_p50_s": None, "errors": ["ConnectError: All connection attempts failed"]}
    report = serve.markdown({"date": "today", "cpu": "cpu", "n_prompts": 2, "prompts": "p", "max_new_tokens": 4,
                             "methods": {"llamacpp": {"levels": [level], "error": why}}})
    assert f"- llamacpp (the levels it did not finish are not comparable): {why}" in report


def test_depth_methods_in_a_run(tiny_dir: Path, tmp_path: Path) -> None:
    """Depth policies as bench methods: the no-op setting is exact with full agreement and zero KL, a lossy one
    reports its compute and fidelity, a KV policy joins one, and the frontier plot is written."""
    from ponder.bench.methods import parse_spec

    NOOP, LOSSY, BOTH = "exit:threshold=2", "static:layers=2", "snapkv:ratio=0.5+static:layers=2"
    assert parse_spec("exit:layers=1/2:threshold=0.5").depth == "exit:layers=1/2:threshold=0.5"
    assert (parse_spec(BOTH).kv, parse_spec(BOTH).depth) == ("snapkv:ratio=0.5", "static:layers=2")
    with pytest.raises(PonderError, match="do not compose with speculative"):
        parse_spec("pld+static:layers=2")
    with pytest.raises(PonderError, match="unknown option"):
        parse_spec("skipdecode:bogus=1")
    suite = tmp_path / "suite.jsonl"
    rows = [{"question_id": 1, "category": "math_reasoning", "turns": ["two plus two is"],
             "reference": ["2+2=<<2+2=4>>4\n#### 4"]},
            {"question_id": 2, "category": "translation", "turns": ["Translate: guten tag"], "reference": ["good day"]},
            {"question_id": 3, "category": "qa", "turns": ["who is it"]}]
    suite.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    args = _args(model=tiny_dir, suite=f"specbench:{suite}", methods=f"baseline,{NOOP},{LOSSY},{BOTH}",
                 max_new_tokens=10, out=out)
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    noop, lossy = r["methods"][NOOP], r["methods"][LOSSY]
    assert noop["exact_match"] == 1.0
    assert noop["depth"]["fidelity"]["top1_agreement"] == 1.0 and abs(noop["depth"]["fidelity"]["kl"]) < 1e-4
    assert noop["depth"]["generation"]["mean_attention_blocks"] == 3 and noop["depth"]["generation"]["weight_share"] == 1
    assert lossy["depth"]["generation"]["mean_attention_blocks"] == 2
    assert lossy["depth"]["generation"]["weight_share"] == pytest.approx(2 / 3, abs=1e-3)
    fid = lossy["depth"]["fidelity"]
    assert 0 <= fid["top1_agreement"] < 1 and fid["kl"] > 0 and fid["ppl"] > fid["ppl_full"] >= 1
    assert noop["depth"]["fidelity"]["ppl"] == pytest.approx(noop["depth"]["fidelity"]["ppl_full"], rel=1e-4)
    assert r["methods"][BOTH]["depth"]["fidelity"]["top1_agreement"] is None  # not measured with a KV policy
    # task scores on the prompts with references, for every ponder method
    assert set(r["methods"]["baseline"]["task"]) == {"gsm8k", "chrf"}
    assert r["methods"]["baseline"]["task"]["gsm8k"]["n"] == 1
    report = (out / "report.md").read_text()
    assert "Adaptive depth" in report and f"| {LOSSY} | 2.00 | 2.00 | 3 | 66.7% |" in report
    assert "Task accuracy" in report and "GSM8K accuracy" in report
    assert (out / "depth.png").read_bytes()[:4] == b"\x89PNG"


def test_task_scores() -> None:
    from ponder.bench.tasks import aggregate, gsm8k_answer, score

    assert gsm8k_answer("so 3+4=<<3+4=7>>7\n#### 1,000") == 1000
    assert score("math_reasoning", ["#### 72"], "The answer is 72.") == {"gsm8k": 1.0}
    assert score("math_reasoning", ["#### 72"], "It is 72, no, 71") == {"gsm8k": 0.0}  # the last number counts
    assert score("math_reasoning", ["no final answer"], "72") == {}
    assert score("rag", [["Blue Sky", "green"]], "the blue sky is there") == {"containment": 0.5}
    assert score("translation", ["good day"], "good day")["chrf"] == pytest.approx(100.0)
    assert score("summarization", ["the cat sat"], "the cat sat")["rougeL"] == pytest.approx(1.0)
    assert score("summarization", ["the cat sat"], "dogs run")["rougeL"] == 0.0
    assert score("qa", ["x"], "x") == {}
    assert aggregate([{"task": {"gsm8k": 1.0}}, {"task": {"gsm8k": 0.0}}, {}]) == {"gsm8k": {"mean": 0.5, "n": 2}}


def test_sampling_runs_compare_seeded_samples(cyclic_dir: Path, tmp_path: Path) -> None:
    """``--temperature``: every ponder method samples with the same seed, so a lossless method still matches the
    baseline token for token (on the cyclic model, where lowbit's coupled draws get accepted)."""
    out = tmp_path / "out"
    args = _args(model=cyclic_dir, methods="baseline,lowbit:explore=0", max_new_tokens=16, limit=3, out=out,
                 temperature=1.0, seed=7)
    assert bench.run(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["greedy"] is False and r["settings"]["temperature"] == 1.0 and r["settings"]["seed"] == 7
    assert r["methods"]["lowbit:explore=0"]["exact_match"] == 1.0
    assert sum(p["accepted"] for p in r["prompts"] if p["method"] == "lowbit:explore=0") > 0
    assert "sampling at temperature 1 with seed 7" in (out / "report.md").read_text()
    # sampled, not greedy: the same run at temperature 0 gives other baseline tokens
    greedy = tmp_path / "greedy"
    assert bench.run(_args(model=cyclic_dir, methods="baseline", max_new_tokens=16, limit=3, out=greedy)) == 0
    ids = lambda res: [p["output_ids"] for p in res["prompts"] if p["method"] == "baseline"]  # noqa: E731
    assert ids(json.loads((greedy / "results.json").read_text())) != ids(r)


@pytest.mark.parametrize("extra,needle", [
    ({"temperature": -1.0}, "--temperature must be"), ({"temperature": float("nan")}, "--temperature must be"),
    ({"temperature": 0.5, "seed": -2}, "--seed must be"),
    ({"temperature": 0.5, "methods": "baseline,hf"}, "ponder methods only"),
    ({"temperature": 0.5, "suite": "niah"}, "builtin and specbench"),
])
def test_bad_sampling_options(tiny_dir: Path, tmp_path: Path, extra: dict, needle: str) -> None:
    with pytest.raises(PonderError, match=needle):
        bench.run(_args(**{"model": tiny_dir, "out": tmp_path, **extra}))


def test_interleave_runs_each_prompt_by_every_method_in_turn(cyclic_dir: Path, tmp_path: Path) -> None:
    """``--interleave``: the same records as a plain run (the baseline's ids, exact match of a lossless method,
    top-1 agreement of int8, second turns built from the baseline's answers), measured a prompt at a time."""
    suite = tmp_path / "suite.jsonl"
    rows = [{"question_id": 1, "category": "qa", "turns": ["hello there", "and then?"]},
            {"question_id": 2, "category": "rag", "turns": ["one two three one two three"]},
            {"question_id": 3, "category": "qa", "turns": ["a b c a b c"]}]
    suite.write_text("\n".join(json.dumps(r) for r in rows))
    methods = "baseline,pld:explore=0,baseline:dtype=int8"
    out, plain = tmp_path / "inter", tmp_path / "plain"
    args = _args(model=cyclic_dir, suite=f"specbench:{suite}", methods=methods, max_new_tokens=12, out=out)
    args.interleave = args.second_turns = True
    assert bench.run(args) == 0
    args = _args(model=cyclic_dir, suite=f"specbench:{suite}", methods=methods, max_new_tokens=12, out=plain)
    args.second_turns = True
    assert bench.run(args) == 0
    r, p = (json.loads((d / "results.json").read_text()) for d in (out, plain))
    assert r["settings"]["interleave"] is True and p["settings"]["interleave"] is False
    assert "interleaved" in (out / "report.md").read_text()
    key = lambda res: sorted((x["method"], x["id"], x["turn"], x["output_ids"]) for x in res["prompts"])  # noqa: E731
    assert len(r["prompts"]) == 3 * 4 and key(r) == key(p)  # 4 cases (one second turn) x 3 methods, same outputs
    assert r["methods"]["pld:explore=0"]["exact_match"] == 1.0
    assert r["methods"]["baseline:dtype=int8"]["top1_agreement"] == p["methods"]["baseline:dtype=int8"]["top1_agreement"]
    assert set(r["categories"]) == {"qa", "rag"} and r["methods"]["baseline"]["speedup"] == 1.0


def test_interleave_rotates_the_methods_order_and_scores_after_each_prompt() -> None:
    from ponder.bench.interleave import _rounds
    from ponder.bench.methods import Output
    from ponder.bench.suites import Case

    calls: list[tuple[str, str, object]] = []

    class Fake:
        def __init__(self, text: str) -> None:
            self.text = text

        def call(self, command: str, payload=None):
            calls.append((self.text, command, payload))
            return [Output([len(calls)], 0.1, 0.0, [1.0])] if command == "generate" else None

    children = {t: Fake(t) for t in ("baseline", "a", "b")}
    cases = [Case(id=str(i), category="qa", turn=1, prompt_ids=[1, 2], turns=["x"]) for i in range(4)]
    answers = _rounds(children, cases, type("Bar", (), {"update": lambda self, n: None})())
    runs = [t for t, c, _ in calls if c == "generate"]
    assert runs == ["baseline", "a", "b", "a", "b", "baseline", "b", "baseline", "a", "baseline", "a", "b"]
    # after each prompt's three runs, three records: the baseline's without a reference, the others with its ids
    assert [c for _, c, _ in calls[:6]] == ["generate"] * 3 + ["record"] * 3
    refs = {t: p for t, c, p in calls[3:6]}
    assert refs["baseline"] is None and refs["a"]["0/1"].ids == [1] == answers["0"]


@pytest.mark.parametrize("extra,needle", [({"batch_size": 2}, "--batch-size 1"),
                                          ({"methods": "baseline,pld:batch=4"}, "pld:batch=4"),
                                          ({"suite": "ppl"}, "ppl suite")])
def test_interleave_refuses_what_it_cannot_interleave(tiny_dir: Path, tmp_path: Path, extra, needle) -> None:
    args = _args(**({"model": tiny_dir, "methods": "baseline", "out": tmp_path} | extra))
    args.interleave = True
    with pytest.raises(PonderError, match=re.escape(needle)):
        bench.run(args)
