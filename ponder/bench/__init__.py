"""``ponder bench``: speed and fidelity of ponder's methods and of the peers, side by side, in one run.

Every method runs in its own child process (so its peak memory is its own) on the same prompt token ids.
``baseline`` (ponder greedy, fp32) always runs first: every other method is compared with its output ids.
Writes ``results.json`` (schema in docs/bench.md), ``report.md`` and ``speed.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ponder.bench.methods import MethodSpec, Output, llamacpp_available, parse_methods, parse_spec
from ponder.bench.suites import Case, load_suite
from ponder.errors import PonderError

LLAMACPP_CRASH_HINT = (
    " llama-cpp-python built with -march=native uses AMX kernels on CPUs that report AMX, and these crash where a"
    " VM does not enable AMX: rebuild it without them, see docs/bench.md (Peers: llama.cpp)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ponder import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model for every method (default {DEFAULT_MODEL})")
    p.add_argument("--suite", default="builtin",
                   help="builtin (default), specbench:PATH, niah[:lengths=1024-2048-4096-8192][:depths=5] or "
                        "ruler[:lengths=1024-2048-4096][:tasks=mk-mv-vt-cwe][:n=2], ppl[:length=4096][:eval=256][:texts=4], "
                        "or serve[:PROMPTS] (servers under load: docs/serve.md)")
    p.add_argument("--methods", default="baseline,hf", help="comma-separated method specs (default baseline,hf)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of the suite (default: all)")
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="first N prompts of each category (a quick representative sample; applied before --limit)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens per prompt (default 128; niah 16 and ruler 48, whose answers are short)")
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together by ponder methods (default 1)")
    p.add_argument("--second-turns", action="store_true", help="also run second turns (Spec-Bench MT-Bench rows)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ponder methods generate exactly --max-new-tokens tokens (for throughput; peers cannot)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="ponder methods only: sample at this temperature (default 0: greedy); seeded, so every "
                        "method draws the same noise and a lossless one must still match plain sampling exactly")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed with --temperature (default 0)")
    p.add_argument("--interleave", action="store_true",
                   help="every method in its own process at once, each prompt run by every method in turn (a "
                        "rotating order): per-category ratios that a machine's drifting speed cannot skew "
                        "(batch size 1; docs/bench.md)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per method (default: torch's choice)")
    p.add_argument("--profile", action="store_true",
                   help="also time a decode and a verify step of each ponder method by operator category "
                        "(matmuls, attention, head, other ops, python) into the report")
    p.add_argument("--concurrency", default=",".join(map(str, (1, 4, 8, 16, 64))),
                   help="serve suite: concurrent clients per load level (default 1,4,8,16,64)")
    p.add_argument("--requests", type=int, default=None,
                   help="serve suite: requests per load level (default max(16, 2 x concurrency))")
    p.add_argument("--level-timeout", type=float, default=600.0,
                   help="serve suite: seconds a load level may run; unfinished requests are cancelled (default 600)")
    p.add_argument("--no-prefix-probe", dest="prefix_probe", action="store_false",
                   help="serve suite: skip the prefix-cache probe (a ~1,000-token system prompt, five questions)")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--dump", metavar="FILE", default=None,
                   help="write the suite's exact prompts (text and token ids) and expected answers as JSONL, then stop")


def run(args: argparse.Namespace) -> int:
    from ponder.bench.report import write_outputs

    if args.max_new_tokens is None:
        args.max_new_tokens = {"niah": 16, "ruler": 48}.get(args.suite.split(":")[0], 128)
    specs = _check(args)
    if args.suite.split(":")[0] == "serve":
        from ponder.bench.serve import run_serve

        if bad := [s.text for s in specs if not s.is_ponder and s.name != "llamacpp"]:
            raise PonderError(f"the serve suite runs ponder methods and llamacpp (a server each); drop {', '.join(bad)}")
        return run_serve(args, specs)
    cases, tokenizer, eos, n_ctx = _prepare(args)
    if args.dump:
        return _dump(Path(args.dump), cases, tokenizer)
    baseline = MethodSpec("baseline", "baseline")
    results: dict[str, dict[str, Any]] = {}
    args.bandwidth = _bandwidth_in_child(args.threads)  # before any method runs, with the methods' threads
    others = []
    for spec in specs:
        if spec.text == "baseline":
            continue
        if not spec.is_ponder and args.suite.split(":")[0] == "ppl":
            print(f"{spec.text}: skipped (the ppl suite scores ponder methods only)", file=sys.stderr)
            continue
        if spec.name == "llamacpp" and not llamacpp_available():
            print(f"{spec.text}: skipped (pip install 'ponder[llamacpp]')",
                  file=sys.stderr)
            continue
        others.append(spec)
    if getattr(args, "interleave", False):
        from ponder.bench.interleave import run_interleaved

        results = run_interleaved(args, [baseline, *others], cases, tokenizer, eos, n_ctx)
    else:
        ref = _run_baseline(args, baseline, cases, tokenizer, eos, n_ctx, results)
        for spec in others:
            results[spec.text] = _in_child(spec, args, cases, eos, n_ctx, ref)
    write_outputs(Path(args.out), args, cases, results)
    return 0


def _check(args: argparse.Namespace) -> list[MethodSpec]:
    if args.limit is not None and args.limit < 1:
        raise PonderError(f"--limit must be >= 1, got {args.limit}")
    if getattr(args, "per_category", None) is not None and args.per_category < 1:
        raise PonderError(f"--per-category must be >= 1, got {args.per_category}")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.warmup < 0:
        raise PonderError("--max-new-tokens and --batch-size must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise PonderError(f"--threads must be >= 1, got {args.threads}")
    specs = parse_methods(args.methods)
    if getattr(args, "interleave", False):
        suite = args.suite.split(":")[0]
        if suite in ("serve", "ppl"):
            raise PonderError(f"--interleave runs generation suites; the {suite} suite has its own schedule")
        if args.batch_size != 1 or (wide := [s.text for s in specs if s.batch(1) != 1]):
            raise PonderError("--interleave runs a prompt at a time: use --batch-size 1"
                              + (f" and drop the methods' own batch sizes ({', '.join(wide)})" if args.batch_size == 1
                                 else ""))
    peers = [s.text for s in specs if not s.is_ponder]
    if getattr(args, "ignore_eos", False) and peers:
        raise PonderError(f"--ignore-eos applies to ponder methods only; drop {', '.join(peers)}")
    temperature = getattr(args, "temperature", 0.0)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise PonderError(f"--temperature must be a finite number >= 0, got {temperature}")
    if getattr(args, "seed", 0) < 0:
        raise PonderError(f"--seed must be >= 0, got {args.seed}")
    if temperature and args.suite.split(":")[0] not in ("builtin", "specbench"):
        raise PonderError("--temperature applies to the builtin and specbench suites (the others score greedy "
                          "answers or serve their own requests)")
    if temperature and peers:
        raise PonderError(f"--temperature applies to ponder methods only (peers sample with their own random "
                          f"streams); drop {', '.join(peers)}")
    return specs


def _prepare(args: argparse.Namespace) -> tuple[list[Case], Any, set[int], int]:
    """Load the suite and tokenize every first turn through the chat template; also return the tokenizer, the
    EOS ids and llama.cpp's context size."""
    from ponder.model.loader import eos_token_ids, load_tokenizer, read_config, resolve

    path = resolve(args.model)
    tokenizer, cfg = load_tokenizer(path), read_config(path)
    cases = load_suite(args.suite, args.second_turns, tokenizer, cfg.max_position_embeddings, args.max_new_tokens)
    firsts = [c for c in cases if c.turn == 1]
    if getattr(args, "per_category", None):
        firsts = _per_category(firsts, args.per_category)
    firsts = firsts[: args.limit]
    keep = {c.id for c in firsts}
    cases = firsts + [c for c in cases if c.turn == 2 and c.id in keep]
    for c in firsts:
        if not c.prompt_ids:
            c.prompt_ids = encode_turns(tokenizer, c.turns, [])
    longest = max(len(c.prompt_ids) for c in firsts)
    if longest + args.max_new_tokens > cfg.max_position_embeddings:
        raise PonderError(
            f"a prompt of {longest} tokens plus --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context window of {cfg.max_position_embeddings}"
        )
    n_ctx = min(cfg.max_position_embeddings, 2 * longest + 3 * args.max_new_tokens + 64)  # room for second turns
    return cases, tokenizer, eos_token_ids(path, cfg, tokenizer), n_ctx


def _dump(path: Path, cases: list[Case], tokenizer: Any) -> int:
    """Write one JSON object per case: what any other tool needs to run exactly these prompts."""
    import json

    try:
        with path.open("w", encoding="utf-8") as f:
            for c in cases:
                row = {"id": c.id, "category": c.category, "turn": c.turn,
                       "prompt": tokenizer.decode(c.prompt_ids), "prompt_ids": c.prompt_ids,
                       "expected": c.expected, **c.meta}
                f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise PonderError(f"cannot write {path}: {e}")
    print(f"wrote {len(cases)} cases to {path}")
    return 0


def _per_category(cases: list[Case], n: int) -> list[Case]:
    """The first n cases of each category, in suite order."""
    seen: dict[str, int] = {}
    kept = []
    for c in cases:
        seen[c.category] = seen.get(c.category, 0) + 1
        if seen[c.category] <= n:
            kept.append(c)
    return kept


def encode_turns(tokenizer: Any, turns: list[str], answers: list[str]) -> list[int]:
    """Prompt ids of a conversation: user turns interleaved with the assistant's earlier answers."""
    messages: list[dict[str, str]] = []
    for i, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    return list(tokenizer("\n\n".join(turns))["input_ids"])


def _run_baseline(
    args: argparse.Namespace, spec: MethodSpec, cases: list[Case], tokenizer: Any, eos: set[int], n_ctx: int,
    results: dict[str, dict[str, Any]],
) -> dict[str, Output]:
    """Run ponder greedy fp32 on first turns, then on second turns built from its own answers. It is always
    reported (every speedup is relative to it), listed in --methods or not."""
    firsts = [c for c in cases if c.turn == 1]
    res = _in_child(spec, args, firsts, eos, n_ctx, None)
    seconds = [c for c in cases if c.turn == 2]
    if seconds:
        answers = {r["id"]: tokenizer.decode(r["output_ids"], skip_special_tokens=True) for r in res["prompts"]}
        for c in seconds:
            c.prompt_ids = encode_turns(tokenizer, c.turns, [answers[c.id]])
        more = _in_child(spec, args, seconds, eos, n_ctx, None)
        res = _merge(res, more)
    results["baseline"] = res
    return {f"{r['id']}/{r['turn']}": Output(r["output_ids"], 0, 0, r.pop("_gaps")) for r in res["prompts"]}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    prompts = a["prompts"] + b["prompts"]
    return {
        "prompts": prompts,
        "wall_seconds": a["wall_seconds"] + b["wall_seconds"],
        "shares": {**a["shares"], **b["shares"]},
        "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]),
        "top1": [x + y for x, y in zip(a["top1"], b["top1"])],
        "batch_size": a["batch_size"],
        "verify_cost_ms": a.get("verify_cost_ms", {}),
        "drafter": a.get("drafter", {}),
        "decode": [x + y for x, y in zip(a["decode"], b["decode"])],
        "weight_bytes": a.get("weight_bytes"),
        "profile": a.get("profile"),
    }


def _bandwidth_in_child(threads: int | None) -> float:
    """``roofline.memory_bandwidth`` in its own process: its 1 GB of buffers must not raise the peak RSS that the
    methods' processes (started from this one) report, since Linux carries a process's peak RSS across exec."""
    from ponder.bench.roofline import memory_bandwidth

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(memory_bandwidth, threads).result()


def crash_error(spec: MethodSpec, exitcode: int | None = None) -> PonderError:
    """The one-line error for a method whose process died (with llama.cpp's AMX hint for ``llamacpp``)."""
    code = f"exit code {exitcode}, " if exitcode is not None else ""
    hint = LLAMACPP_CRASH_HINT if spec.name == "llamacpp" else ""
    return PonderError(f"method {spec.text} crashed: its process died ({code}e.g. a segmentation fault).{hint}")


def _in_child(
    spec: MethodSpec, args: argparse.Namespace, cases: list[Case], eos: set[int], n_ctx: int,
    ref: dict[str, Output] | None,
) -> dict[str, Any]:
    from ponder.bench.worker import run_method

    job = (spec, args.model, cases, eos, n_ctx, ref, args.max_new_tokens, args.batch_size, args.warmup, args.threads,
           getattr(args, "ignore_eos", False), getattr(args, "profile", False),
           (getattr(args, "temperature", 0.0), getattr(args, "seed", 0)))
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(run_method, *job).result()
        except PonderError:
            raise
        except BrokenProcessPool:
            raise crash_error(spec)
        except Exception as e:  # a peer library failing is reported, not a traceback
            raise PonderError(f"method {spec.text} failed: {type(e).__name__}: {e}")


__all__ = ["add_arguments", "run", "parse_spec", "encode_turns"]
