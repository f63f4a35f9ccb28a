"""results.json, report.md and speed.png from the methods' raw results."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ponder.bench import profile, report_longctx, tasks
from ponder.bench.metrics import add_speedups, aggregate, by_category
from ponder.bench.suites import Case
from ponder.errors import PonderError

SCHEMA_VERSION = 1


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def build_results(args: argparse.Namespace, cases: list[Case], raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    methods: dict[str, dict[str, Any]] = {}
    categories: dict[str, dict[str, Any]] = {}
    prompts: list[dict[str, Any]] = []
    for spec, res in raw.items():
        recs = [{k: v for k, v in r.items() if not k.startswith("_")} for r in res["prompts"]]
        agree, total = res["top1"]
        methods[spec] = aggregate(recs, res["wall_seconds"]) | {
            "peak_rss_mb": res["peak_rss_mb"],
            "top1_agreement": agree / total if total else None,
            "batch_size": res["batch_size"],
            "verify_cost_ms": res.get("verify_cost_ms", {}),
        } | ({"drafter": res["drafter"]} if res.get("drafter") else {}) | (
            {"profile": res["profile"]} if res.get("profile") else {})
        if task := tasks.aggregate(recs):
            methods[spec]["task"] = task
        if (gen := res.get("drafter", {}).get("depth")) is not None:  # the generation's compute, and the
            # teacher-forced fidelity (depth alone: not measured when a KV policy is joined to it)
            empty = {"top1_agreement": None, "kl": None}
            methods[spec]["depth"] = {"fidelity": res.get("depth_fidelity") or empty, "generation": gen}
        seconds, tokens = res.get("decode", (0.0, 0))
        if seconds > 0:  # tokens after each row's first / seconds decoding (worker.run_method)
            methods[spec]["decode_tokens_per_s"] = tokens / seconds
            add_roofline(methods[spec], res.get("weight_bytes"), getattr(args, "bandwidth", None))
        for cat, figures in by_category(recs, res["shares"]).items():
            categories.setdefault(cat, {})[spec] = figures
        prompts.extend(recs)
    add_exact_match_plain(methods, prompts, args.batch_size)
    add_speedups(methods)
    for per_method in categories.values():
        add_speedups(per_method)
    return {
        "schema": SCHEMA_VERSION,
        "model": args.model,
        "suite": args.suite,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine() | ({"bandwidth_gb_per_s": args.bandwidth / 1e9} if getattr(args, "bandwidth", None)
                                else {}),
        "settings": {"max_new_tokens": args.max_new_tokens, "limit": args.limit,
                     "per_category": getattr(args, "per_category", None), "batch_size": args.batch_size,
                     "second_turns": args.second_turns, "warmup": args.warmup,
                     "greedy": not getattr(args, "temperature", 0.0), "temperature": getattr(args, "temperature", 0.0),
                     "seed": getattr(args, "seed", 0), "interleave": getattr(args, "interleave", False),
                     "prompts": len(cases)},
        "methods": methods,
        "categories": categories,
        "prompts": prompts,
    }


def add_roofline(figures: dict[str, Any], weight_bytes: int | None, bandwidth: float | None) -> None:
    """Achieved weight bandwidth while decoding (weight bytes per forward x forwards per second) and its fraction
    of the measured memory bandwidth (``roofline.py``). A batch's forward serves all its rows: forwards per second
    are decode tokens per second / rows x forwards per token."""
    if not weight_bytes or not bandwidth:
        return
    forwards = figures["decode_tokens_per_s"] * figures.get("forwards_per_token", 1.0) / figures["batch_size"]
    figures["weight_bytes"] = weight_bytes
    figures["weight_gb_per_s"] = weight_bytes * forwards / 1e9
    figures["roofline"] = weight_bytes * forwards / bandwidth


def add_exact_match_plain(methods: dict[str, dict[str, Any]], prompts: list[dict[str, Any]], batch: int) -> None:
    """A speculative method's exact-match rate against plain decoding with the same dtype and batch size, when the
    run has that method too (``pld:dtype=int8`` against ``baseline:dtype=int8``): the lossless claim for dtypes
    whose output differs from the fp32 baseline."""
    from ponder.bench.methods import parse_spec

    specs = {text: parse_spec(text) for text in methods}
    plain = {(s.path, s.batch(batch)): text for text, s in specs.items() if s.name == "baseline" and not s.kv}
    outputs: dict[str, dict[str, list[int]]] = {}
    for p in prompts:
        outputs.setdefault(p["method"], {})[f"{p['id']}/{p['turn']}"] = p["output_ids"]
    for text, s in specs.items():
        twin = plain.get((s.path, s.batch(batch)))
        if s.speculator and not s.kv and twin:
            ref = outputs[twin]
            same = sum(ids == ref.get(key) for key, ids in outputs[text].items())
            methods[text] |= {"exact_match_plain": same / max(len(ref), 1), "plain_method": twin}


def _decoding(settings: dict[str, Any]) -> str:
    """``greedy``, or the sampling settings every ponder method ran with."""
    if settings.get("greedy", True):
        return "greedy"
    return f"sampling at temperature {settings['temperature']:g} with seed {settings['seed']}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# ponder bench: {results['model']} on {results['suite']}",
        "",
        f"{results['date']}, {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
        f"{results['settings']['prompts']} prompts, {_decoding(results['settings'])}, "
        f"max {results['settings']['max_new_tokens']} new tokens"
        + ("; interleaved (every method ran each prompt in turn, in a rotating order)."
           if results["settings"].get("interleave") else "."),
        "",
        "| method | batch | tokens/s | speedup | exact match | near ties | TTFT (s) | peak RSS (MB) | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, f in results["methods"].items():
        top1 = "-" if f["top1_agreement"] is None else f"{f['top1_agreement']:.1%}"
        lines.append(
            f"| {spec} | {f['batch_size']} | {f['tokens_per_s']:.1f} | {_x(f['speedup'])} | {f['exact_match']:.0%} "
            f"| {f['near_ties']} | {f['ttft_s']:.3f} | {f['peak_rss_mb']:.0f} | {top1} |"
        )
    lines += roofline_lines(results)
    lines += profile.markdown(results)
    for s, f in results["methods"].items():
        if (fast := f.get("drafter", {}).get("fast_path")) is not None:
            eager = ", ".join(f"{n} {why}" for why, n in fast["eager_fallbacks"].items()) or "none"
            lines += ["", f"{s}: fast path ran {fast['compiled_forwards']} decode/verify forwards compiled; eager "
                          f"fallbacks: {eager} (prefills always run eagerly)"]
        if (nat := f.get("drafter", {}).get("native_layers")) is not None:
            eager = ", ".join(f"{n} {why}" for why, n in nat["eager_fallbacks"].items()) or "none"
            lines += ["", f"{s}: native decoder layers ran {nat['native_forwards']} decode/verify forwards; "
                          f"per-operator fallbacks: {eager} (prefills always run per operator)"]
    spec_rows = [(s, f) for s, f in results["methods"].items() if "tau" in f]
    if spec_rows:
        lines += ["", "Speculative decoding (tau: tokens per verify step; alpha: accepted / drafted):", "",
                  "| method | tau | alpha | forwards/token | draft s | verify s | acceptance by draft position "
                  "| exact match vs plain, same dtype and batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for s, f in spec_rows:
            pos = " ".join(f"{a:.2f}" for a in f["acceptance_by_position"][:8])
            plain = f"{f['exact_match_plain']:.0%} ({f['plain_method']})" if "plain_method" in f else "-"
            lines.append(f"| {s} | {f['tau']:.2f} | {f['alpha']:.2f} | {f['forwards_per_token']:.2f} "
                         f"| {f['draft_s']:.1f} | {f['verify_s']:.1f} | {pos} | {plain} |")
    for s, f in spec_rows:
        if learned := {k: v for k, v in f.get("drafter", {}).items() if k not in ("fast_path", "native_layers")}:
            lines += ["", f"{s}, what the drafter learned: `{json.dumps(learned)}`"]
    curves = {s: f["verify_cost_ms"] for s, f in results["methods"].items() if f.get("verify_cost_ms")}
    if curves:
        sizes = sorted({int(n) for c in curves.values() for n in c})
        lines += ["", "Verify-cost curve: ms per target forward by tokens in the forward (rows x tokens per row):", "",
                  "| method | " + " | ".join(map(str, sizes)) + " |", "|---" * (len(sizes) + 1) + "|"]
        for s, c in curves.items():
            c = {int(n): v for n, v in c.items()}
            lines.append(f"| {s} | " + " | ".join(f"{c[n]:.1f}" if n in c else "-" for n in sizes) + " |")
    specs = list(results["methods"])
    lines += ["", "Tokens/s (speedup) per category:", "", "| category | " + " | ".join(specs) + " |",
              "|---" * (len(specs) + 1) + "|"]
    for cat, per in results["categories"].items():
        cells = [f"{per[s]['tokens_per_s']:.1f} ({_x(per[s]['speedup'])})" if s in per else "-" for s in specs]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines += task_lines(results)
    lines += depth_lines(results)
    lines += report_longctx.markdown(results)
    return "\n".join(lines) + "\n"


TASK_SCORES = {"gsm8k": ("GSM8K accuracy", "{:.1%}"), "containment": ("RAG containment", "{:.1%}"),
               "chrf": ("translation chrF", "{:.1f}"), "rougeL": ("summarization ROUGE-L", "{:.3f}")}


def task_lines(results: dict[str, Any]) -> list[str]:
    """Task accuracy per method on the prompts with Spec-Bench references (``tasks.py``)."""
    rows = {s: f["task"] for s, f in results["methods"].items() if f.get("task")}
    names = [n for n in TASK_SCORES if any(n in t for t in rows.values())]
    if not names:
        return []
    lines = ["", "Task accuracy on the prompts with references (first turns; ponder methods):", "",
             "| method | " + " | ".join(f"{TASK_SCORES[n][0]} (n)" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for s, t in rows.items():
        cells = [TASK_SCORES[n][1].format(t[n]["mean"]) + f" ({t[n]['n']})" if n in t else "-" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def depth_lines(results: dict[str, Any]) -> list[str]:
    """Adaptive depth: compute per decoded token and fidelity to the same model at full depth."""
    rows = {s: f for s, f in results["methods"].items() if f.get("depth")}
    if not rows:
        return []
    lines = ["", "Adaptive depth (compute: blocks run per decoded token in the generation; fidelity teacher-forced "
                 "on the baseline's greedy tokens; KL(full || policy) in nats):", "",
             "| method | attention blocks | FFN blocks | of layers | weights run | top-1 agreement | KL | perplexity "
             "(full) | exact match | tokens/s | speedup |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, f in rows.items():
        gen, fid = f["depth"]["generation"], f["depth"]["fidelity"]
        top1 = "-" if fid["top1_agreement"] is None else f"{fid['top1_agreement']:.1%}"
        kl = "-" if fid["kl"] is None else f"{fid['kl']:.3f}"
        ppl = "-" if fid.get("ppl") is None else f"{fid['ppl']:.3f} ({fid['ppl_full']:.3f})"
        ffn = f"{gen.get('mean_ffn_blocks', 0):.2f}"
        if gen.get("mean_small_ffn_blocks"):  # Duo-LLM's small FFNs, counted apart
            ffn += f" (+{gen['mean_small_ffn_blocks']:.2f} small)"
        lines.append(f"| {s} | {gen.get('mean_attention_blocks', 0):.2f} | {ffn} "
                     f"| {gen.get('layers', '-')} | {gen.get('weight_share', 0):.1%} | {top1} | {kl} | {ppl} | {f['exact_match']:.0%} | {f['tokens_per_s']:.1f} "
                     f"| {_x(f['speedup'])} |")
    return lines


def plot_depth(results: dict[str, Any], path: Path) -> bool:
    """The fidelity-compute frontier: teacher-forced top-1 agreement against blocks run per token (left) and
    against tokens/s (right), one series per depth policy, the full model as the reference point."""
    rows = {s: f for s, f in results["methods"].items() if f.get("depth")
            and f["depth"]["fidelity"]["top1_agreement"] is not None}
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    families: dict[str, list[tuple[float, float, float]]] = {}
    for s, f in rows.items():
        gen, fid = f["depth"]["generation"], f["depth"]["fidelity"]
        families.setdefault(gen.get("policy", s), []).append(
            (gen.get("weight_share", 0.0), fid["top1_agreement"], f["tokens_per_s"]))
    for name, pts in sorted(families.items()):
        pts.sort()
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        right.scatter([p[2] for p in pts], [p[1] for p in pts], label=name)
    base = results["methods"].get("baseline")
    if base is not None:
        left.scatter([1.0], [1.0], color="black", marker="*", s=80, label="full model")
        right.scatter([base["tokens_per_s"]], [1.0], color="black", marker="*", s=80, label="baseline")
    left.set_xlabel("share of the layers' weights run per decoded token")
    right.set_xlabel("tokens/s")
    for ax in (left, right):
        ax.set_ylabel("teacher-forced top-1 agreement")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']}, {results['suite']}: fidelity vs compute", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def roofline_lines(results: dict[str, Any]) -> list[str]:
    bw = results["machine"].get("bandwidth_gb_per_s")
    rows = [(s, f) for s, f in results["methods"].items() if "roofline" in f]
    if not bw or not rows:
        return []
    lines = ["", f"Roofline: measured memory bandwidth {bw:.1f} GB/s (STREAM-like copy, read + write); per method the "
             "weight bytes one forward reads and the bandwidth its decoding achieves with them:", "",
             "| method | weights per forward (MB) | decode tokens/s | weight GB/s | roofline fraction |", "|---|---|---|---|---|"]
    for s, f in rows:
        lines.append(f"| {s} | {f['weight_bytes'] / 1e6:.0f} | {f['decode_tokens_per_s']:.1f} "
                     f"| {f['weight_gb_per_s']:.1f} | {f['roofline']:.0%} |")
    return lines


def _x(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def plot_speed(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(results["methods"])
    speeds = [results["methods"][s]["tokens_per_s"] for s in specs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(specs)), 3.6))
    bars = ax.bar(specs, speeds, color=["#4c72b0" if s.startswith("baseline") else "#999999" for s in specs])
    for bar, s in zip(bars, specs):
        ax.annotate(_x(results["methods"][s]["speedup"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{results['model']}, {results['suite']}", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_categories(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: speedup over baseline per category, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(results["categories"])
    specs = [s for s in results["methods"] if s != "baseline"]
    if not cats or not specs:
        return
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cats) * max(1, len(specs)) ** 0.5), 3.8))
    width = 0.8 / len(specs)
    for i, s in enumerate(specs):
        ys = [results["categories"][c].get(s, {}).get("speedup") or 0.0 for c in cats]
        ax.bar([j + i * width for j in range(len(cats))], ys, width, label=s)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=20)
    ax.set_ylabel("speedup over baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, args: argparse.Namespace, cases: list[Case], raw: dict[str, dict[str, Any]]) -> None:
    results = build_results(args, cases, raw)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        report = markdown(results)
        (out / "report.md").write_text(report)
        plot_speed(results, out / "speed.png")
        plot_categories(results, out / "categories.png")
        written = ["results.json", "report.md", "speed.png", "categories.png"]
        if report_longctx.plot_heatmaps(results, out / "heatmap.png"):
            written.append("heatmap.png")
        if report_longctx.plot_accuracy_vs_ratio(results, out / "accuracy_vs_ratio.png"):
            written.append("accuracy_vs_ratio.png")
        if plot_depth(results, out / "depth.png"):
            written.append("depth.png")
    except OSError as e:
        raise PonderError(f"cannot write bench results to {out}: {e}")
    print(report)
    print("wrote " + ", ".join(str(out / w) for w in written))
