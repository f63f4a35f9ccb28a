"""What runs inside a method's child process: load, warm up, run every case, measure memory."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch

from ponder.bench.methods import MethodSpec, Output, make_runner
from ponder.bench.metrics import record
from ponder.bench.suites import Case


def run_method(
    spec: MethodSpec, model: str, cases: list[Case], eos: set[int], n_ctx: int, ref: dict[str, Output] | None,
    max_new: int, batch_size: int, warmup: int, threads: int | None, ignore_eos: bool = False,
    profile: bool = False, sampling: tuple[float, int] = (0.0, 0),
) -> dict[str, Any]:
    """Per-prompt records, total wall seconds (each batch once), per-prompt time shares, peak RSS, top-1 counts."""
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    runner = make_runner(spec, model, eos, n_ctx)
    runner.ignore_eos = ignore_eos
    runner.sampling = sampling  # (temperature, seed); temperature 0: greedy
    size = spec.batch(batch_size)
    costs = runner.verify_costs(size) if spec.is_ponder and spec.kv is None and spec.depth is None else {}
    for _ in range(warmup):
        runner.run([cases[0].prompt_ids], min(8, max_new))
    prompts: list[dict[str, Any]] = []
    shares: dict[str, float] = {}
    wall, top1, decode = 0.0, [0, 0], [0.0, 0]  # decode: [seconds decoding, tokens after each row's first]
    fidelity = None
    if spec.depth is not None and spec.kv is None:  # teacher-forced through the depth policy on a plain cache
        from ponder.depth.fidelity import Fidelity

        fidelity = Fidelity()
    bar = tqdm(total=len(cases), desc=f"{spec.text:>16}", unit="prompt", file=sys.stderr, leave=True)
    perplexity = "continuation" in cases[0].meta
    # ponder decodes with continuous batching (a finished row's place goes to the next prompt) in one call; KV
    # policies and the peers take the prompts `size` at a time
    continuous = spec.is_ponder and spec.kv is None and not perplexity
    for i in range(0, len(cases), len(cases) if continuous else size):
        group = cases[i : len(cases) if continuous else i + size]
        start = time.perf_counter()
        if perplexity:  # score, one case at a time
            outs = [runner.score(c.prompt_ids, c.meta["continuation"]) for c in group]
        elif continuous:
            outs = runner.run([c.prompt_ids for c in group], max_new, size, bar.update)
        else:
            outs = runner.run([c.prompt_ids for c in group], max_new)
        seconds = time.perf_counter() - start
        wall += seconds
        if outs[0].logprobs is not None:  # perplexity: teacher-forced decode steps, prefill included
            decode = [decode[0] + seconds, decode[1] + sum(len(o.logprobs) for o in outs)]
        else:  # the seconds not spent prefilling (peers: after the batch's last first token), tokens after the first
            prefill = outs[0].prefill_s if outs[0].prefill_s is not None else max(o.ttft_s for o in outs)
            decode = [decode[0] + seconds - prefill, decode[1] + sum(max(0, len(o.ids) - 1) for o in outs)]
        for case, out, share in zip(group, outs, time_shares(outs, seconds, by_lifetime=continuous)):
            key = f"{case.id}/{case.turn}"
            rec = record(case, spec.text, out, None if ref is None else ref[key])
            if ref is None:
                rec["_gaps"] = out.top2_gaps
            prompts.append(rec)
            shares[key] = share
            if ref is not None and fidelity is not None:  # against the baseline's greedy ids; KL: same model, full
                f = runner.depth_fidelity(case.prompt_ids, ref[key].ids)
                fidelity.add(f)
                rec |= {"top1_agreement": f.agree / f.steps if f.steps else None,
                        "kl": f.kl_sum / f.steps if f.steps else None}
                top1 = [top1[0] + f.agree, top1[1] + f.steps]
            elif ref is not None and spec.is_ponder and spec.dtype != "fp32":
                agree, total = runner.top1_agreement(case.prompt_ids, ref[key].ids)
                top1 = [top1[0] + agree, top1[1] + total]
        if not continuous:
            bar.update(len(group))
    bar.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prompts": prompts, "wall_seconds": wall, "shares": shares, "peak_rss_mb": peak_mb, "top1": top1,
            "batch_size": size, "verify_cost_ms": {n: 1000 * t for n, t in sorted(costs.items())},
            "drafter": runner.report() if spec.is_ponder else {}, "decode": decode,
            "weight_bytes": runner.weight_bytes(), "profile": _profile(runner) if profile and spec.is_ponder else None,
            "depth_fidelity": fidelity.as_dict() if fidelity is not None else None}


def _profile(runner: Any) -> dict[str, Any]:
    from ponder.bench.profile import profile_steps

    return profile_steps(runner.model)


def time_shares(outs: list[Output], seconds: float, by_lifetime: bool) -> list[float]:
    """A call's ``seconds`` shared among its prompts (for per-category speed): by each row's own seconds (admission
    to last token) when the engine ran them in one call, so rows that finish sooner cost less; else (a batch of rows
    that start and end together) by tokens."""
    weights = [o.seconds for o in outs] if by_lifetime else [len(o.ids) for o in outs]
    total = sum(weights)
    return [seconds * w / total if total > 0 else seconds / len(outs) for w in weights]
