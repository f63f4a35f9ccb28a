"""Per-prompt records and per-method aggregates.

Glossary
- **exact match**: a prompt's output ids equal the baseline's (ponder greedy, fp32) token for token.
- **near tie**: a divergence that begins where the baseline's top-1 and top-2 logits differ by less than
  ``NEAR_TIE``: floating-point summation order, not a logic error, decides such a token. Counted and listed per
  method (with the gap) so a real bug is never hidden among them.
- **tokens/s** of a method: all new tokens / all wall seconds; with batches, the throughput of the batches.
- **speedup**: a method's tokens/s over ``baseline``'s in the same run.
- speculative decoding (see ``ponder/speculate``): **tau** = tokens committed per verify step = 1 + accepted /
  verify steps; **alpha** = accepted / drafted nodes; **acceptance by position** = per draft depth d, the share of
  verify steps whose tree reached depth d that accepted a node at depth d; **forwards per token** = target forwards
  (prefill + verify steps) / new tokens (1.0 for plain decoding); **draft / verify seconds**: time drafting vs
  verifying (for batches, each step's time counts once per row).
- long-context suites (``niah``, ``ruler``): a case's **score** = the fraction of its expected strings found in the
  output (RULER's string match; one string for niah), **correct** = all found; **accuracy** = mean score;
  **kv_bytes** = bytes of the KV cache tensors decoding used (the batch cache, compressed for KV policies);
  **kv_peak_bytes** = the largest KV cache held at any time, which for a compressed method is the one full-size
  prompt cache it builds during each row's prefill before compressing it.
- perplexity suites (``ppl``): **ppl** = exp(mean negative log-likelihood of the scored tokens, teacher-forced).
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import mean
from typing import Any

NEAR_TIE = 1e-4


def divergence(output: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token, or None when the two are identical."""
    for i, (a, b) in enumerate(zip(output, reference)):
        if a != b:
            return i
    return None if len(output) == len(reference) else min(len(output), len(reference))


def near_tie_gap(output: list[int], reference: list[int], reference_gaps: list[float]) -> float | None:
    """The baseline's top-2 logit gap where ``output`` leaves ``reference``, if that gap makes it a near tie."""
    i = divergence(output, reference)
    if i is None or i >= len(reference_gaps):
        return None
    gap = reference_gaps[i]
    return gap if gap < NEAR_TIE else None


def record(case: Any, spec: str, out: Any, reference: Any | None) -> dict[str, Any]:
    """One results.json prompt record; ``reference`` is the baseline's Output for this case (None: this is it)."""
    ref_ids = out.ids if reference is None else reference.ids
    gap = None if reference is None else near_tie_gap(out.ids, reference.ids, reference.top2_gaps)
    return {
        "id": case.id,
        "category": case.category,
        "turn": case.turn,
        "method": spec,
        "prompt_tokens": len(case.prompt_ids),
        "new_tokens": len(out.ids),
        "seconds": out.seconds,
        "tokens_per_s": len(out.ids) / out.seconds if out.seconds > 0 else 0.0,
        "ttft_s": out.ttft_s,
        "exact_match": out.ids == ref_ids,
        "near_tie": gap is not None,
        "near_tie_gap": gap,
        "output_ids": out.ids,
    } | _spec_fields(out.spec, len(out.ids)) | _answer_fields(case, out)


def _answer_fields(case: Any, out: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(out, "kv_bytes", 0):
        fields |= {"kv_bytes": out.kv_bytes, "kv_peak_bytes": out.kv_peak_bytes}
    if getattr(out, "logprobs", None) is not None:
        nll = -sum(out.logprobs)
        fields |= {"nll": nll, "scored_tokens": len(out.logprobs), "ppl": math.exp(nll / len(out.logprobs))}
    reference = getattr(case, "meta", {}).get("reference")
    if reference is not None and getattr(case, "turn", 1) == 1 and getattr(out, "text", ""):
        from ponder.bench.tasks import score

        if task := score(case.category, reference, out.text):
            fields["task"] = task
    if getattr(case, "expected", None) is not None:
        wanted = [case.expected] if isinstance(case.expected, str) else list(case.expected)
        found = sum(w in out.text for w in wanted) / len(wanted)
        fields |= {"expected": case.expected, "output_text": out.text, "correct": found == 1.0, "score": found,
                   **{k: v for k, v in case.meta.items() if k in ("length", "depth")}}
    return fields


def _spec_fields(c: Any, tokens: int) -> dict[str, Any]:
    if c is None:
        return {}
    return {
        "verify_steps": c.steps, "drafted": c.drafted, "accepted": c.accepted,
        "drafted_by_depth": c.drafted_by_depth, "accepted_by_depth": c.accepted_by_depth,
        "draft_s": c.draft_s, "verify_s": c.verify_s,
        "tau": 1 + c.accepted / c.steps if c.steps else 1.0,
        "alpha": c.accepted / c.drafted if c.drafted else 0.0,
        "forwards_per_token": (1 + c.steps) / tokens if tokens else 0.0,
    }


def aggregate(records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Method-level figures from its prompt records; ``wall_seconds`` counts each batch once."""
    tokens = sum(r["new_tokens"] for r in records)
    extra: dict[str, Any] = {}
    if records and "correct" in records[0]:
        extra["accuracy"] = mean(r["score"] for r in records)
    if records and "nll" in records[0]:
        extra["ppl"] = math.exp(sum(r["nll"] for r in records) / sum(r["scored_tokens"] for r in records))
    if any("kv_bytes" in r for r in records):
        extra["kv_bytes"] = max(r.get("kv_bytes", 0) for r in records)
        extra["kv_peak_bytes"] = max(r.get("kv_peak_bytes", 0) for r in records)
    return extra | _spec_aggregate(records, tokens) | {
        "tokens_per_s": tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "exact_match": mean(r["exact_match"] for r in records),
        "near_ties": sum(r["near_tie"] for r in records),
        "near_tie_gaps": [r["near_tie_gap"] for r in records if r["near_tie"]],
        "ttft_s": mean(r["ttft_s"] for r in records),
        "new_tokens": tokens,
        "seconds": wall_seconds,
        "prompts": len(records),
    }


def _spec_aggregate(records: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    if not records or "verify_steps" not in records[0]:
        return {}
    steps = sum(r["verify_steps"] for r in records)
    drafted = sum(r["drafted"] for r in records)
    accepted = sum(r["accepted"] for r in records)
    depth = max(len(r["drafted_by_depth"]) for r in records)
    reached = [sum(r["drafted_by_depth"][d] for r in records if d < len(r["drafted_by_depth"])) for d in range(depth)]
    took = [sum(r["accepted_by_depth"][d] for r in records if d < len(r["accepted_by_depth"])) for d in range(depth)]
    return {
        "tau": 1 + accepted / steps if steps else 1.0,
        "alpha": accepted / drafted if drafted else 0.0,
        "acceptance_by_position": [t / n if n else 0.0 for t, n in zip(took, reached)],
        "forwards_per_token": (len(records) + steps) / tokens if tokens else 0.0,
        "draft_s": sum(r["draft_s"] for r in records),
        "verify_s": sum(r["verify_s"] for r in records),
        "verify_steps": steps,
    }


def by_category(records: list[dict[str, Any]], batch_seconds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Aggregates per category; a batch's seconds are shared among its prompts by their token counts."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    return {cat: aggregate(rs, sum(batch_seconds[_key(r)] for r in rs)) for cat, rs in sorted(groups.items())}


def _key(r: dict[str, Any]) -> str:
    return f"{r['id']}/{r['turn']}"


def add_speedups(methods: dict[str, dict[str, Any]], reference: str = "baseline") -> None:
    base = methods.get(reference, {}).get("tokens_per_s")
    for m in methods.values():
        m["speedup"] = m["tokens_per_s"] / base if base else None
