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

    run = MethodRun(spec, model, eos, n_ctx, max_new, batch_size, warmup, threads, ignore_eos, profile, sampling,
                    cases[0].prompt_ids, perplexity="continuation" in cases[0].meta)
    bar = tqdm(total=len(cases), desc=f"{spec.text:>16}", unit="prompt", file=sys.stderr, leave=True)
    # ponder decodes with continuous batching (a finished row's place goes to the next prompt) in one call; KV
    # policies and the peers take the prompts `size` at a time
    step = len(cases) if run.continuous else run.size
    for i in range(0, len(cases), step):
        group = cases[i : i + step]
        run.record(group, *run.generate(group, bar.update if run.continuous else None), ref)
        if not run.continuous:
            bar.update(len(group))
    bar.close()
    return run.result()


class MethodRun:
    """One method's runner and running totals in its process: ``generate`` times a group of cases, ``record``
    scores it against the baseline's outputs (untimed: fidelity passes run here), ``result`` sums up. The
    interleaved bench (``interleave.py``) calls these a prompt at a time; ``run_method`` all prompts at once."""

    def __init__(
        self, spec: MethodSpec, model: str, eos: set[int], n_ctx: int, max_new: int, batch_size: int, warmup: int,
        threads: int | None, ignore_eos: bool, profile: bool, sampling: tuple[float, int], warm_prompt: list[int],
        perplexity: bool = False,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.spec, self.max_new, self.want_profile = spec, max_new, profile
        self.runner = make_runner(spec, model, eos, n_ctx)
        self.runner.ignore_eos = ignore_eos
        self.runner.sampling = sampling  # (temperature, seed); temperature 0: greedy
        self.size = spec.batch(batch_size)
        self.costs = (self.runner.verify_costs(self.size)
                      if spec.is_ponder and spec.kv is None and spec.depth is None else {})
        for _ in range(warmup):
            self.runner.run([warm_prompt], min(8, max_new))
        self.perplexity = perplexity
        self.continuous = spec.is_ponder and spec.kv is None and not perplexity
        self.prompts: list[dict[str, Any]] = []
        self.shares: dict[str, float] = {}
        self.wall, self.top1, self.decode = 0.0, [0, 0], [0.0, 0]  # decode: [seconds decoding, tokens after
        # each row's first]
        self.fidelity = None
        if spec.depth is not None and spec.kv is None:  # teacher-forced through the depth policy on a plain cache
            from ponder.depth.fidelity import Fidelity

            self.fidelity = Fidelity()

    def generate(self, group: list[Case], progress: Any = None) -> tuple[list[Output], float]:
        """Run a group of cases (scored one at a time for perplexity, in one call with continuous batching for
        ponder methods, as one batch otherwise): their outputs and the call's wall seconds."""
        start = time.perf_counter()
        if self.perplexity:
            outs = [self.runner.score(c.prompt_ids, c.meta["continuation"]) for c in group]
        elif self.continuous:
            outs = self.runner.run([c.prompt_ids for c in group], self.max_new, self.size, progress)
        else:
            outs = self.runner.run([c.prompt_ids for c in group], self.max_new)
        return outs, time.perf_counter() - start

    def record(self, group: list[Case], outs: list[Output], seconds: float, ref: dict[str, Output] | None) -> None:
        """Add a generated group to the totals; with ``ref`` (the baseline's outputs), its fidelity too."""
        self.wall += seconds
        decode = self.decode
        if outs[0].logprobs is not None:  # perplexity: teacher-forced decode steps, prefill included
            self.decode = [decode[0] + seconds, decode[1] + sum(len(o.logprobs) for o in outs)]
        else:  # the seconds not spent prefilling (peers: after the batch's last first token), tokens after the first
            prefill = outs[0].prefill_s if outs[0].prefill_s is not None else max(o.ttft_s for o in outs)
            self.decode = [decode[0] + seconds - prefill, decode[1] + sum(max(0, len(o.ids) - 1) for o in outs)]
        for case, out, share in zip(group, outs, time_shares(outs, seconds, by_lifetime=self.continuous)):
            key = f"{case.id}/{case.turn}"
            rec = record(case, self.spec.text, out, None if ref is None else ref[key])
            if ref is None:
                rec["_gaps"] = out.top2_gaps
            self.prompts.append(rec)
            self.shares[key] = share
            if ref is not None and self.fidelity is not None:  # against the baseline's greedy ids; KL: same model
                f = self.runner.depth_fidelity(case.prompt_ids, ref[key].ids)
                self.fidelity.add(f)
                rec |= {"top1_agreement": f.agree / f.steps if f.steps else None,
                        "kl": f.kl_sum / f.steps if f.steps else None}
                self.top1 = [self.top1[0] + f.agree, self.top1[1] + f.steps]
            elif ref is not None and self.spec.is_ponder and self.spec.dtype != "fp32":
                agree, total = self.runner.top1_agreement(case.prompt_ids, ref[key].ids)
                self.top1 = [self.top1[0] + agree, self.top1[1] + total]

    def result(self) -> dict[str, Any]:
        spec, runner = self.spec, self.runner
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"prompts": self.prompts, "wall_seconds": self.wall, "shares": self.shares, "peak_rss_mb": peak_mb,
                "top1": self.top1, "batch_size": self.size,
                "verify_cost_ms": {n: 1000 * t for n, t in sorted(self.costs.items())},
                "drafter": runner.report() if spec.is_ponder else {}, "decode": self.decode,
                "weight_bytes": runner.weight_bytes(),
                "profile": _profile(runner) if self.want_profile and spec.is_ponder else None,
                "depth_fidelity": self.fidelity.as_dict() if self.fidelity is not None else None}


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
