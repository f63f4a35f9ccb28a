"""``ponder analyze depth``: how many layers each token really needs, by oracle (Duo-LLM's question, arXiv
2410.10846), and how far a practical router is from it.

The model answers prompts greedily; then one teacher-forced forward over each prompt and answer records every
layer's state. Per answer token (the position whose next-token choice is an answer token):

- **earliest exit**: the first layer l whose state, read through the final norm and head (the logit lens), or
  through the trained exit adapter where one exists (``ponder distill train exits``), gives the full model's top-1;
  the share of tokens reached by each layer, with and without adapters;
- **router**: CALM-style confidence exits at the adapters' layers (softmax max through the adapter >= threshold),
  for a sweep of thresholds: top-1 agreement and mean layers, next to the oracle's;
- **skip oracles** (on ``--skip-positions`` sampled positions per answer, one forward of that token per trial):
  the most FFN blocks, and the most whole layers, that can be skipped for that token keeping the full model's
  top-1, skipping in order of the layer's saturation (cosine between its input and output states at that token,
  most saturated first) and searching the count by bisection: a greedy, ordered oracle, not the exhaustive one;
- **route oracle** (Duo-LLM's big/small/skip routes, with the trained small FFNs of ``ponder distill train duo``),
  on the same sampled positions: after the FFN-skip oracle's skips, the most remaining FFN blocks that can run
  their small FFN instead (smallest error at that token first, bisection), and the **trained router** at a sweep of
  thresholds on the same tokens (exact past): top-1 agreement and FFN compute (big blocks + small blocks weighed by
  their width), next to the oracle's;
- difficulty by Spec-Bench category and by **token class** (a heuristic stand-in for part of speech, since no
  tagger model can be downloaded here: punctuation, number, whitespace, function word, word start, word piece).

Context tokens always run the full model (teacher forcing): the oracle bounds what a policy could do for one token
given an exact past. Outputs: ``depth.json``, ``exits.png`` (cumulative share by layer), ``router.png`` (router
sweep vs oracle), ``difficulty.html`` (answers coloured by earliest exit layer), and a markdown summary."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for with from and or but not no is are was were be been being am do does did has "
    "have had it its this that these those he she they we you i me him her them us my your our their his as if "
    "so than then there here what which who whom whose when where why how all any each some such can could will "
    "would shall should may might must".split())
CLASSES = ("punctuation", "number", "whitespace", "function word", "word start", "word piece")
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def token_class(piece: str) -> str:
    """A token's class from its text (see the module doc)."""
    stripped = piece.strip()
    if not stripped:
        return "whitespace"
    if stripped.isdigit() or stripped.replace(".", "").replace(",", "").isdigit():
        return "number"
    if not any(ch.isalnum() for ch in stripped):
        return "punctuation"
    if stripped.lower() in FUNCTION_WORDS and piece[:1].isspace():
        return "function word"
    return "word start" if piece[:1].isspace() else "word piece"


@dataclass
class TokenRecord:
    category: str
    piece: str
    cls: str
    exit_lens: int  # earliest exit layer without adapters (L: only the full model)
    exit_adapter: int  # with adapters where they exist
    ffn_skippable: int | None = None  # skip oracles (sampled positions only)
    layers_skippable: int | None = None
    route_small: int | None = None  # route oracle: FFN blocks that run small (after ffn_skippable skips)
    router: dict[str, list[int]] | None = None  # duo router: threshold -> [agrees, big, small]


@dataclass
class Analysis:
    n_layers: int
    adapter_layers: tuple[int, ...]
    tokens: list[TokenRecord] = field(default_factory=list)
    router: dict[float, list[int]] = field(default_factory=dict)  # threshold -> [agree, layers, tokens]
    duo_share: float | None = None  # a small FFN's share of a big one's weights (None: no duo modules)
    note: str = ""


def analyze(loaded: Any, prompts: list[tuple[str, str]], max_new: int = 128, adapter: str = "default",
            skip_positions: int = 4, seed: int = 0, progress: bool = True, duo: str = "auto") -> Analysis:
    """Run the analysis over ``prompts`` ((category, text) pairs, chat-templated)."""
    from tqdm import tqdm

    from ponder.engine import Engine
    from ponder.sampling import SamplingParams

    model = loaded.model
    L = model.config.num_hidden_layers
    adapters = _adapters(loaded, adapter)
    engine = Engine(loaded)
    ids = [engine.encode(text, chat=True) for _, text in prompts]
    done: dict[int, Any] = {}
    bar = tqdm(total=len(prompts), desc="answer greedily", unit="prompt", disable=not progress)
    for event in engine.stream(ids, SamplingParams(max_new_tokens=max_new), batch_size=min(8, len(ids))):
        if event.finished:
            done[event.row] = event.completion
            bar.update(1)
    bar.close()
    answers = [done[i] for i in range(len(ids))]
    out = Analysis(L, tuple(adapters.layers) if adapters is not None else ())
    modules = _duo(loaded, duo, out)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(prompts), desc="analyze depth", unit="prompt", disable=not progress)
    for (category, _), prompt, answer in zip(prompts, ids, answers):
        if len(answer.output_ids) >= 2:
            _one(model, adapters, engine.tokenizer, category, prompt, answer.output_ids, out, skip_positions, gen,
                 modules)
        bar.update(1)
    bar.close()
    return out


def _adapters(loaded: Any, adapter: str) -> Any:
    if not adapter or adapter == "none":
        return None
    from ponder.speculate.early_exit import _load_adapters

    return _load_adapters(adapter, loaded)


def _duo(loaded: Any, duo: str, out: Analysis) -> Any:
    """Duo-LLM's modules for the route oracle: ``auto`` (the model's own or shipped ones, if any), ``none``, or a
    directory."""
    from ponder.distill.duo import KIND, load_duo
    from ponder.distill.train import trained_artifact

    if duo == "none":
        return None
    path = trained_artifact(loaded, KIND) if duo in ("auto", "default") else Path(duo).expanduser()
    if duo == "auto" and not (path / "weights.safetensors").exists():
        out.note = "no duo modules for this model (`ponder distill train duo`): the route oracle is off"
        return None
    modules, recipe = load_duo(path, loaded.model)
    out.duo_share = recipe["width"] / recipe["intermediate_size"]
    return modules


def _one(model: Any, adapters: Any, tokenizer: Any, category: str, prompt: list[int], answer: list[int],
         out: Analysis, skip_positions: int, gen: torch.Generator, duo: Any = None) -> None:
    L = out.n_layers
    seq = torch.tensor([prompt + answer], device=model.device)
    P = len(prompt)
    capture: dict[int, torch.Tensor | None] = {layer: None for layer in range(L + 1)}
    with torch.inference_mode():
        cache = model.new_cache(1, seq.shape[1] + 1)
        model(seq, cache, capture=capture)
        sl = slice(P - 1, seq.shape[1] - 1)  # positions whose next token is an answer token
        states = [capture[layer][0, sl] for layer in range(L + 1)]  # each # [n, E]
        final = model.logits(states[L]).argmax(-1)
        n = final.shape[0]
        lens_ok = torch.zeros(L + 1, n, dtype=torch.bool, device=final.device)
        adapt_ok = torch.zeros(L + 1, n, dtype=torch.bool, device=final.device)
        lens_ok[L] = adapt_ok[L] = True
        conf: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(1, L):
            lens_ok[layer] = model.logits(states[layer]).argmax(-1) == final
            if adapters is not None and layer in adapters.layers:
                probs = torch.softmax(model.logits(adapters(layer, states[layer])).float(), -1)
                top, arg = probs.max(-1)
                adapt_ok[layer] = arg == final
                conf[layer] = (top, arg == final)
            else:
                adapt_ok[layer] = lens_ok[layer]
        exit_lens = _first(lens_ok)
        exit_adapt = _first(adapt_ok)
        # the router: confidence exits at the adapter layers from the middle up
        router_layers = [layer for layer in sorted(conf) if layer >= L // 2]
        for t in THRESHOLDS if router_layers else ():
            done = torch.zeros(n, dtype=torch.bool, device=final.device)
            layers = torch.full((n,), L, device=final.device)
            agree = torch.ones(n, dtype=torch.bool, device=final.device)
            for layer in router_layers:
                top, right = conf[layer]
                go = (top >= t) & ~done
                layers[go], agree[go] = layer, right[go]
                done |= go
            acc = out.router.setdefault(t, [0, 0, 0])
            acc[0] += int(agree.sum())
            acc[1] += int(layers.sum())
            acc[2] += n
        pieces = [tokenizer.decode([tok]) for tok in answer]
        records = [TokenRecord(category, pieces[i], token_class(pieces[i]), int(exit_lens[i]), int(exit_adapt[i]))
                   for i in range(n)]
        if skip_positions > 0:
            picks = torch.randperm(n, generator=gen)[:skip_positions].tolist()
            for i in picks:
                pos = P - 1 + i
                order = _saturation_order([s[i] for s in states])
                rec = records[i]
                rec.ffn_skippable = _bisect(lambda k: _single(model, cache, seq, pos, order[:k], ffn_only=True)
                                            == int(final[i]), len(order))
                rec.layers_skippable = _bisect(lambda k: _single(model, cache, seq, pos, order[:k], ffn_only=False)
                                               == int(final[i]), len(order))
                if duo is not None:
                    _routes(model, duo, cache, seq, pos, order[: rec.ffn_skippable], int(final[i]), rec)
        out.tokens += records


def _first(ok: torch.Tensor) -> torch.Tensor:
    """Per column, the first row index that is True (row L always is)."""
    return ok.float().argmax(0)


def _saturation_order(states: list[torch.Tensor]) -> list[int]:
    """Layers 1..L-2 (the first and last always run) ordered by the cosine between their input and output states
    at this token, most saturated first."""
    L = len(states) - 1
    cos = {layer: float(torch.nn.functional.cosine_similarity(states[layer], states[layer + 1], dim=0))
           for layer in range(1, L - 1)}
    return sorted(cos, key=lambda layer: -cos[layer])


def _bisect(keeps: Any, most: int) -> int:
    """The largest k in [0, most] with keeps(k), assuming keeps is monotone (k = 0 always keeps)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if keeps(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


ROUTER_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def _routes(model: Any, duo: Any, cache: Any, seq: torch.Tensor, pos: int, skipped: list[int], want: int,
            rec: TokenRecord) -> None:
    """The route oracle and the duo router for token ``pos`` (see the module doc); ``skipped``: the FFN-skip
    oracle's blocks, which stay skipped."""
    from ponder.distill.duo import choose

    errors: dict[int, float] = {}  # per layer, the small FFN's error at this token (measured on the full route)

    def measure(layer: int, xn: torch.Tensor, a: torch.Tensor) -> int:
        errors[layer] = float((model.layers[layer].mlp(xn) - duo.small(layer, xn)).norm() / a.norm())
        return 2

    _single(model, cache, seq, pos, [], True, measure, duo)
    rest = sorted((layer for layer in range(len(model.layers)) if layer not in skipped), key=lambda l: errors[l])
    drop = set(skipped)

    def routed(k: int) -> int:
        small = set(rest[:k])
        return _single(model, cache, seq, pos, [], True, lambda l, xn, a: 0 if l in drop else 1 if l in small else 2,
                       duo)

    rec.route_small = _bisect(lambda k: routed(k) == want, len(rest))
    rec.router = {}
    for t in ROUTER_THRESHOLDS:
        counts = [0, 0, 0]

        def route(layer: int, xn: torch.Tensor, a: torch.Tensor) -> int:
            r = int(choose(duo, layer, xn[0, -1:], a[0, -1:], t)[0])
            counts[r] += 1
            return r

        agrees = _single(model, cache, seq, pos, [], True, route, duo) == want
        rec.router[str(t)] = [int(agrees), counts[2], counts[1]]


def _single(model: Any, cache: Any, seq: torch.Tensor, pos: int, skipped: list[int], ffn_only: bool,
            route: Any = None, duo: Any = None) -> int:
    """The top-1 after token ``pos`` of ``seq`` when it skips the FFN blocks (or whole layers) ``skipped``, or
    routes each FFN block by ``route(layer, norm(a), a) -> 0 skip | 1 small | 2 big`` (the small FFNs of ``duo``),
    attending to the full model's K/V of the tokens before it; the cache's own entries at ``pos``
    are restored."""
    saved = [(k[:, :, pos].clone(), v[:, :, pos].clone()) for k, v in zip(cache.k, cache.v)]
    lengths = list(cache.lengths)
    cache.lengths = [pos]
    try:
        ctx = model.step_context(cache, 1, [1])
        h = model.embed(seq[:, pos : pos + 1])
        drop = set(skipped)
        for layer, block in enumerate(model.layers):
            if layer in drop and not ffn_only:
                continue
            h = h + block.attn(block.attn_norm(h), ctx, cache, layer)
            if route is not None:
                xn = block.mlp_norm(h)
                r = route(layer, xn, h)
                h = h + (block.mlp(xn) if r == 2 else duo.small(layer, xn) if r == 1 else 0)
            elif layer not in drop:
                h = h + block.mlp(block.mlp_norm(h))
        return int(model.logits(h)[0, -1].argmax())
    finally:
        cache.lengths = lengths
        for (k, v), (sk, sv) in zip(zip(cache.k, cache.v), saved):
            k[:, :, pos], v[:, :, pos] = sk, sv


# --- summaries ----------------------------------------------------------------------------------------------------------
def summary(a: Analysis) -> dict[str, Any]:
    L, toks = a.n_layers, a.tokens
    n = len(toks)
    if not n:
        return {"tokens": 0}

    def share_by_layer(key: str) -> list[float]:
        counts = [0] * (L + 1)
        for t in toks:
            counts[getattr(t, key)] += 1
        run, out = 0, []
        for c in counts:
            run += c
            out.append(run / n)
        return out  # index l: share of tokens whose top-1 is reached by layer l

    def mean(key: str, items: list[TokenRecord]) -> float:
        return sum(getattr(t, key) for t in items) / len(items) if items else math.nan

    groups: dict[str, dict[str, Any]] = {}
    for name, key in (("category", "category"), ("token class", "cls")):
        per: dict[str, list[TokenRecord]] = {}
        for t in toks:
            per.setdefault(getattr(t, key), []).append(t)
        groups[name] = {g: {"tokens": len(items), "exit_lens": mean("exit_lens", items),
                            "exit_adapter": mean("exit_adapter", items)} for g, items in sorted(per.items())}
    sampled = [t for t in toks if t.ffn_skippable is not None]
    router = {str(t): {"top1_agreement": v[0] / v[2], "mean_layers": v[1] / v[2]} for t, v in a.router.items()
              if v[2]}
    best = None  # the cheapest router setting that keeps 95% agreement
    for t, v in router.items():
        if v["top1_agreement"] >= 0.95 and (best is None or v["mean_layers"] < router[best]["mean_layers"]):
            best = t
    return {
        "tokens": n, "layers": L, "adapter_layers": list(a.adapter_layers), "note": a.note,
        "routes": _route_summary(a, sampled),
        "share_by_layer_lens": share_by_layer("exit_lens"),
        "share_by_layer_adapter": share_by_layer("exit_adapter") if a.adapter_layers else None,
        "oracle_mean_layers_lens": mean("exit_lens", toks),
        "oracle_mean_layers_adapter": mean("exit_adapter", toks) if a.adapter_layers else None,
        "router": router, "router_best_at_95": best,
        "skip_oracle": {"tokens": len(sampled),
                        "mean_ffn_skippable": mean("ffn_skippable", sampled) if sampled else None,
                        "mean_layers_skippable": mean("layers_skippable", sampled) if sampled else None,
                        "share_with_a_skippable_ffn": (sum(t.ffn_skippable > 0 for t in sampled) / len(sampled)
                                                       if sampled else None)},
        "by": groups,
    }


def _route_summary(a: Analysis, sampled: list[TokenRecord]) -> dict[str, Any] | None:
    """The route oracle against the duo router (FFN compute: big blocks + small blocks x their weight share)."""
    routed = [t for t in sampled if t.route_small is not None]
    if a.duo_share is None or not routed:
        return None
    L, share, n = a.n_layers, a.duo_share, len(routed)
    big = sum(L - t.ffn_skippable - t.route_small for t in routed) / n
    small = sum(t.route_small for t in routed) / n
    router = {}
    for th in routed[0].router:
        agree = sum(t.router[th][0] for t in routed) / n
        rb = sum(t.router[th][1] for t in routed) / n
        rs = sum(t.router[th][2] for t in routed) / n
        router[th] = {"top1_agreement": agree, "big": rb, "small": rs, "ffn_compute": rb + rs * share}
    return {"tokens": n, "small_share": share, "oracle_big": big, "oracle_small": small,
            "oracle_skip": sum(t.ffn_skippable for t in routed) / n, "oracle_ffn_compute": big + small * share,
            "router": router}


def markdown(s: dict[str, Any]) -> str:
    if not s.get("tokens"):
        return "No answer tokens to analyze.\n"
    L = s["layers"]
    lines = [f"# Depth oracle: {s['tokens']} answer tokens, {L} layers", ""]
    marks = sorted({round(L * f) for f in (0.25, 0.5, 0.6, 0.7, 0.8, 0.9)} | {L - 1})
    lines += ["Share of tokens whose full-model top-1 is reached by layer l (earliest exit):", "",
              "| layer | " + " | ".join(map(str, marks)) + " | oracle mean layers |",
              "|---" * (len(marks) + 2) + "|",
              "| logit lens | " + " | ".join(f"{s['share_by_layer_lens'][m]:.1%}" for m in marks)
              + f" | {s['oracle_mean_layers_lens']:.2f} |"]
    if s["share_by_layer_adapter"] is not None:
        lines.append("| exit adapters | " + " | ".join(f"{s['share_by_layer_adapter'][m]:.1%}" for m in marks)
                     + f" | {s['oracle_mean_layers_adapter']:.2f} |")
    if s["router"]:
        lines += ["", f"Router (softmax confidence through the adapters at layers >= {L // 2}) vs the oracle:", "",
                  "| threshold | top-1 agreement | mean layers |", "|---|---|---|"]
        for t, v in s["router"].items():
            lines.append(f"| {t} | {v['top1_agreement']:.1%} | {v['mean_layers']:.2f} |")
        best = s["router_best_at_95"]
        lines += ["", "Cheapest router setting at >= 95% agreement: "
                      + (f"threshold {best}, {s['router'][best]['mean_layers']:.2f} layers" if best else "none")
                      + f"; oracle (adapters): {s['oracle_mean_layers_adapter']:.2f} layers at 100%."]
    so = s["skip_oracle"]
    if so["tokens"]:
        lines += ["", f"Skip oracles on {so['tokens']} sampled tokens (most saturated first, bisection): "
                      f"{so['mean_ffn_skippable']:.2f} FFN blocks or {so['mean_layers_skippable']:.2f} whole layers "
                      f"of {L} can be skipped on average keeping top-1; {so['share_with_a_skippable_ffn']:.0%} of "
                      "tokens can skip at least one FFN block."]
    r = s.get("routes")
    if r:
        lines += ["", f"Duo-LLM routes on the same {r['tokens']} tokens (FFN compute: big blocks + small blocks x "
                      f"{r['small_share']:.3f}, of {L}): the oracle runs {r['oracle_big']:.2f} big, "
                      f"{r['oracle_small']:.2f} small and skips {r['oracle_skip']:.2f} FFN blocks "
                      f"({r['oracle_ffn_compute']:.2f}) keeping top-1; the trained router:", "",
                  "| threshold | top-1 agreement | big | small | FFN compute |", "|---|---|---|---|---|"]
        for t, v in r["router"].items():
            lines.append(f"| {t} | {v['top1_agreement']:.1%} | {v['big']:.2f} | {v['small']:.2f} | "
                         f"{v['ffn_compute']:.2f} |")
    if s.get("note"):
        lines += ["", f"Note: {s['note']}."]
    for name, per in s["by"].items():
        lines += ["", f"Difficulty by {name} (mean earliest exit layer):", "",
                  f"| {name} | tokens | logit lens | adapters |", "|---|---|---|---|"]
        for g, v in per.items():
            adapted = f"{v['exit_adapter']:.1f}" if s["adapter_layers"] else "-"
            lines.append(f"| {g} | {v['tokens']} | {v['exit_lens']:.1f} | {adapted} |")
    return "\n".join(lines) + "\n"


def write(a: Analysis, out: Path) -> list[str]:
    """depth.json, report.md, exits.png, router.png and difficulty.html under ``out``; returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    s = summary(a)
    tokens = [t.__dict__ for t in a.tokens]
    (out / "depth.json").write_text(json.dumps({"summary": s, "tokens": tokens}, indent=1))
    (out / "report.md").write_text(markdown(s))
    written = ["depth.json", "report.md"]
    if not s.get("tokens"):
        return written
    L = s["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(range(L + 1), s["share_by_layer_lens"], label="logit lens")
    if s["share_by_layer_adapter"] is not None:
        ax.plot(range(L + 1), s["share_by_layer_adapter"], label="exit adapters")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens whose top-1 is reached")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "exits.png", dpi=120)
    plt.close(fig)
    written.append("exits.png")
    if s["router"]:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        pts = sorted((v["mean_layers"], v["top1_agreement"], t) for t, v in s["router"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="confidence router (thresholds)")
        for x, y, t in pts:
            ax.annotate(t, (x, y), fontsize=7)
        ax.scatter([s["oracle_mean_layers_adapter"]], [1.0], marker="*", s=90, color="black", label="oracle")
        ax.scatter([L], [1.0], marker="s", color="grey", label="full model")
        ax.set_xlabel("mean layers per token")
        ax.set_ylabel("top-1 agreement with the full model")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "router.png", dpi=120)
        plt.close(fig)
        written.append("router.png")
    spans = []
    for t in a.tokens:
        hue = int(120 * (1 - t.exit_adapter / L))  # green: early, red: needs every layer
        spans.append(f'<span title="exit {t.exit_adapter} ({t.cls})" style="background:hsl({hue},70%,80%)">'
                     f"{html.escape(t.piece)}</span>")
    (out / "difficulty.html").write_text(
        "<html><body style='font-family:sans-serif;white-space:pre-wrap'><p>Answer tokens coloured by the earliest "
        "layer whose exit (through the adapters where they exist) gives the full model's top-1: green early, red "
        "late.</p>" + "".join(spans) + "</body></html>")
    written.append("difficulty.html")
    return written
