"""``ponder bench --profile``: where one decode step and one verify step of a ponder method spend their time.

On scratch data (a ``PROMPT``-token prefix, token ids 0), ``torch.profiler`` records ``STEPS`` decode steps (1 token
per row) and as many verify forwards (``VERIFY_TOKENS`` tokens in a chain, as ``forward_tree`` runs them), after a
warm-up. The outermost operators (those called by the model's code, or by a compiled graph of the fast path) are
put in categories by name; their inclusive times add up per category:

- ``matmuls``: the projections' kernels (fp32 BLAS, int8 and int4 weight-only kernels, MKL's packed GEMM);
- ``attention``: scaled-dot-product attention (and ponder's attention operators that call it);
- ``head``: the final norm and LM head (timed as one block: ``LlamaModel.logits``);
- ``native layers``: int8/q4 layers run by ponder's C decoder (``native_layers.py``), one call per forward whose
  GEMMs, attention and elementwise work the profiler cannot see apart;
- ``other ops``: everything else the layers call (norms, rotary embedding, activations, residual adds, dtype
  casts, KV-cache writes, views); on the fast path, the compiled graphs' time outside the matmul and attention
  kernels they call (their fused kernels, which the profiler does not name, and their wrappers and guards);
- ``python``: the step's wall time under the profiler minus all of the above, i.e. the interpreter between
  operators (and the profiler's own per-operator cost, which inflates it).

``step_ms`` is the same step timed without the profiler, the figure that matters; the categories are shares of the
profiled step.
"""

from __future__ import annotations

import time
from typing import Any

import torch

PROMPT = 256
STEPS = 8
VERIFY_TOKENS = 4
MATMULS = ("linear", "mm", "addmm", "matmul", "bmm", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm",
           "_weight_int4pack_mm", "_mkl_linear", "int4mm_packed_weight_cpu", "q4_mm")
# SDPA and ponder's own attention operators (the fast path's ragged and batch-invariant attention, ``fast.py``; the
# native kernel, ``native.py``)
ATTENTION = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "ragged_decode_attention",
             "invariant_attention", "native_attention")
COMPILED = ("Torch-Compiled Region", "TorchDynamo Cache Lookup")  # the fast path's graphs and their guards
NATIVE = ("native_decoder",)  # ponder's C decoder layers (``native_layers.py``)
CATEGORIES = ("matmuls", "attention", "native layers", "head", "other ops", "python")


def category(name: str) -> str:
    base = name.split("::")[-1]
    if base in MATMULS:
        return "matmuls"
    if base in ATTENTION:
        return "attention"
    if base in NATIVE:
        return "native layers"
    return "other ops"


def profile_steps(model: Any) -> dict[str, Any]:
    """{"decode": {category: ms, "step_ms": ms}, "verify": {...}, "verify_tokens": n, "prompt": n} for one row."""
    cache = model.new_cache(1, PROMPT + STEPS * 2 + VERIFY_TOKENS + 8)
    dev = model.device
    with torch.inference_mode():
        model(torch.zeros(1, PROMPT, dtype=torch.long, device=dev), cache)
        tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        ids = torch.zeros(1, VERIFY_TOKENS, dtype=torch.long, device=dev)
        depth = torch.arange(VERIFY_TOKENS, device=dev)[None]
        visible = torch.ones(VERIFY_TOKENS, VERIFY_TOKENS, dtype=torch.bool, device=dev).tril()[None]

        def decode() -> None:
            ctx = model.step_context(cache, 1, [1])
            h = model.run_layers(model.embed(tok), ctx, cache)
            cache.advance([1])
            with torch.profiler.record_function("ponder.head"):
                model.logits(h)

        def verify() -> None:
            ctx = model.tree_context(cache, depth, visible)
            h = model.run_layers(model.embed(ids), ctx, cache)
            with torch.profiler.record_function("ponder.head"):
                model.logits(h)

        out: dict[str, Any] = {"verify_tokens": VERIFY_TOKENS, "prompt": PROMPT}
        for name, step in (("decode", decode), ("verify", verify)):
            for _ in range(2):
                step()
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            step_ms = 1000 * (time.perf_counter() - start) / STEPS
            out[name] = _profiled(step) | {"step_ms": step_ms}
            if name == "decode":
                cache.set_length(0, PROMPT)  # the profiled decode steps appended tokens: back to the prefix
    return out


def _profiled(step: Any) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        wall = time.perf_counter() - start
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for ev in prof.events():
        if ev.name == "ponder.head":
            totals["head"] += ev.cpu_time_total
        elif ev.cpu_parent is None and ev.name.startswith(COMPILED):
            totals["other ops"] += ev.cpu_time_total  # less the operators inside it, counted below
        elif _is_op(ev.name):
            above = _ancestors(ev)
            if "ponder.head" in above or any(_is_op(a) for a in above):
                continue  # timed as the head, or inside an operator counted already
            totals[category(ev.name)] += ev.cpu_time_total
            if any(a.startswith(COMPILED) for a in above):
                totals["other ops"] -= ev.cpu_time_total
    ms = {k: v / 1000 / STEPS for k, v in totals.items()}  # profiler times are microseconds
    ms["python"] = max(0.0, 1000 * wall / STEPS - sum(ms.values()))
    return ms


def _is_op(name: str) -> bool:
    return "::" in name and not name.startswith("#")


def _ancestors(ev: Any) -> list[str]:
    """The names of the events that enclose ev, innermost first."""
    names = []
    p = ev.cpu_parent
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    return names


def markdown(results: dict[str, Any]) -> list[str]:
    rows = [(s, f["profile"]) for s, f in results["methods"].items() if f.get("profile")]
    if not rows:
        return []
    p0 = rows[0][1]
    lines = ["", f"Per-op breakdown (`--profile`; ms per step under the profiler, one row, a {p0['prompt']}-token "
             f"prefix; verify = {p0['verify_tokens']} tokens; step = the same step without the profiler):", "",
             "| method | step | step ms | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 3) + "|"]
    for s, p in rows:
        for kind in ("decode", "verify"):
            cells = " | ".join(f"{p[kind][c]:.2f}" for c in CATEGORIES)
            lines.append(f"| {s} | {kind} | {p[kind]['step_ms']:.2f} | {cells} |")
    return lines
