"""Long-context parts of the bench report: accuracy and KV bytes per method, a depth x length accuracy heatmap
per method, and accuracy against compression ratio per policy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def ratio_of(spec: str) -> float | None:
    """The compression ratio a method SPEC asks for (0 for methods without a KV policy; None for budgets)."""
    if "budget=" in spec:
        return None
    m = re.search(r"ratio=([0-9.]+)", spec)
    return float(m.group(1)) if m else 0.0


def policy_of(spec: str) -> str:
    """The KV policy (with its options, without the ratio) a SPEC uses, or ``full cache``."""
    from ponder.kv import policy_names

    for chunk in spec.split("+"):
        if chunk.split(":")[0] in policy_names():
            return ":".join(p for p in chunk.split(":") if not p.startswith("ratio="))
    return "full cache"


def markdown(results: dict[str, Any]) -> list[str]:
    methods = {s: f for s, f in results["methods"].items() if "accuracy" in f or "kv_bytes" in f}
    if not methods:
        return []
    lines = ["", "Long context (accuracy: mean share of expected answers found in the output; KV MB: the cache decoding used, and "
             "the peak with one full prompt cache during prefill; decode tokens/s excludes prefill):", "",
             "| method | accuracy | ppl | KV MB | peak KV MB | TTFT (s) | decode tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for s, f in methods.items():
        acc = f"{f['accuracy']:.0%}" if "accuracy" in f else "-"
        ppl = f"{f['ppl']:.3f}" if "ppl" in f else "-"
        kv = f"{f['kv_bytes'] / 2**20:.1f}" if "kv_bytes" in f else "-"
        peak = f"{f['kv_peak_bytes'] / 2**20:.1f}" if "kv_peak_bytes" in f else "-"
        lines.append(f"| {s} | {acc} | {ppl} | {kv} | {peak} | {f['ttft_s']:.2f} | {f.get('decode_tokens_per_s', 0):.1f} |")
    grid = _grids(results)
    if grid:
        lengths = sorted({n for g in grid.values() for n, _ in g})
        lines += ["", "Accuracy per context length:", "", "| method | " + " | ".join(map(str, lengths)) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for s, g in grid.items():
            cells = []
            for n in lengths:
                hits = [v for (ln, _), v in g.items() if ln == n]
                cells.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _grids(results: dict[str, Any]) -> dict[str, dict[tuple[int, float], bool]]:
    """Per method, correct or not per (length, depth)."""
    grids: dict[str, dict[tuple[int, float], bool]] = {}
    for r in results["prompts"]:
        if "correct" in r and "length" in r and "depth" in r:
            grids.setdefault(r["method"], {})[(r["length"], r["depth"])] = r["correct"]
    return grids


def plot_heatmaps(results: dict[str, Any], path: Path) -> bool:
    """One depth x length accuracy panel per method; False when the suite has no such grid."""
    grids = _grids(results)
    if not grids:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for g in grids.values() for n, _ in g})
    depths = sorted({d for g in grids.values() for _, d in g})
    cols = min(4, len(grids))
    rows = (len(grids) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1, 2.3 * rows + 0.5), squeeze=False)
    for ax, (spec, g) in zip(axes.flat, grids.items()):
        data = [[float(g.get((n, d), float("nan"))) for n in lengths] for d in depths]
        ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0f}%" for d in depths], fontsize=7)
        ax.set_title(spec, fontsize=7)
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    fig.supxlabel("context length (tokens)", fontsize=8)
    fig.supylabel("needle depth", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_ratio(results: dict[str, Any], path: Path) -> bool:
    """Accuracy against compression ratio, one line per policy (the full cache is ratio 0 for every line)."""
    points: dict[str, list[tuple[float, float]]] = {}
    full = None
    for spec, f in results["methods"].items():
        if "accuracy" not in f or (r := ratio_of(spec)) is None:
            continue
        pol = policy_of(spec)
        if pol == "full cache":
            full = f["accuracy"]
        else:
            points.setdefault(pol, []).append((r, f["accuracy"]))
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for pol, pts in sorted(points.items()):
        pts = sorted(([(0.0, full)] if full is not None else []) + pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
    ax.set_xlabel("compression ratio (fraction of KV entries removed)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"{results['model']}, {results['suite']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
