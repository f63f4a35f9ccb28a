"""Duo-LLM's small FFNs and routers (arXiv 2410.10846), distilled from the target on its own answers.

Duo-LLM gives every layer a small FFN beside the big one and lets a router choose, per token and layer, the big
module, the small one or neither (skip), then asks how far trained routers are from the oracle routes. Here the
target stays frozen and both parts are learned from it:

- **small FFNs**: per layer a SwiGLU block of ``width`` hidden units (the target's is 1536 on SmolLM2) trained to
  reproduce that layer's FFN output ``y = FFN(norm(a))`` from the same input (``a``: the residual state after the
  layer's attention), by mean squared error relative to ``|y|^2``. Each starts as a pruned copy of the big block
  (the ``width`` units with the largest mean contribution ``|silu(g_j) u_j| |down_j|`` on the training data), which
  is already a good approximation and trains in a few epochs.
- **routers**: per layer a linear map from the FFN's normalised input and ``log rms(a)`` to the predicted log
  *relative error* each cheap option would make on the residual stream, ``|y - y_small| / |a|`` and ``|y| / |a|``
  (skip), fitted by ridge regression on the same positions after the small FFNs are trained. The depth policy
  (``ponder/depth/duo.py``) then takes, per token and layer, the cheapest option whose predicted error is below a
  threshold: one knob from "always big" (threshold 0, the full model) to "skip everything".

Data: the ``ponder distill data`` shards (only their tokens are used); the FFN inputs and outputs are recomputed by
a teacher-forced forward over each training sequence and kept at ``positions`` random answer positions (decoding
only meets answer tokens). The held-back sequences measure each small FFN's relative error, the routers' fit, and
the teacher-forced top-1 agreement and FFN compute of a sweep of thresholds. Shapes: L layers, E hidden size, w the
small width, N positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ponder.distill.train import Sequence, TrainConfig, load_artifact, plot_curve, read_data, save_artifact, split
from ponder.errors import PonderError

KIND = "duo"
SWEEPS = {"local": (0.02, 0.05, 0.1, 0.12, 0.15, 0.2),  # thresholds evaluated on the held-back sequences
          "margin": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)}
ROUTER_TARGETS = tuple(SWEEPS)
CALIBRATION = 0.95  # the recipe's default threshold: the loosest of the sweep with this held-back top-1 agreement
RIDGE = 1e-2


def log_rms(a: torch.Tensor) -> torch.Tensor:
    """log rms(a) # [..., 1] of residual states a # [..., E]."""
    return torch.log(a.float().pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)


class DuoModules(nn.Module):
    """Per layer a small SwiGLU FFN (``gate_up`` # [2w, E], ``down`` # [E, w]) and a router (``router`` # [2, E + 2]:
    predicted log relative error of [skip, small] from [norm(a), log rms(a), 1])."""

    def __init__(self, hidden_size: int, width: int, n_layers: int) -> None:
        super().__init__()
        self.width, self.n_layers = width, n_layers
        self.gate_up = nn.ParameterList([nn.Parameter(torch.zeros(2 * width, hidden_size)) for _ in range(n_layers)])
        self.down = nn.ParameterList([nn.Parameter(torch.zeros(hidden_size, width)) for _ in range(n_layers)])
        self.router = nn.ParameterList([nn.Parameter(torch.zeros(2, hidden_size + 2), requires_grad=False)
                                        for _ in range(n_layers)])

    def small(self, layer: int, xn: torch.Tensor) -> torch.Tensor:
        """The small FFN of ``layer`` on normalised inputs xn # [..., E] -> # [..., E]."""
        gate, up = F.linear(xn, self.gate_up[layer]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[layer])

    def predicted_error(self, layer: int, xn: torch.Tensor, log_rms: torch.Tensor) -> torch.Tensor:
        """Predicted log relative error of [skip, small] # [..., 2] for inputs xn = norm(a) # [..., E] and
        log_rms = log rms(a) # [..., 1] (``log_rms``)."""
        r = self.router[layer]
        return F.linear(xn.float(), r[:, :-2]) + log_rms.float() * r[:, -2] + r[:, -1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in range(self.n_layers):
            out[f"gate_up.{layer}"] = self.gate_up[layer]
            out[f"down.{layer}"] = self.down[layer]
            out[f"router.{layer}"] = self.router[layer]
        return out

    def round_to_stored(self) -> None:
        """Round to the artifact's bf16, so the reported figures are the loaded modules'."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.to(torch.bfloat16).float())


@dataclass
class FFNData:
    """Per layer, the FFN's normalised inputs, outputs and the residual norms at the kept positions."""

    xn: list[torch.Tensor]  # L x [N, E] bf16
    y: list[torch.Tensor]  # L x [N, E] bf16
    a_norm: list[torch.Tensor]  # L x [N] fp32: |a|, the residual state entering the FFN
    g: list[torch.Tensor] | None = None  # L x [N, E] bf16: d margin / d y over the margin (router target "margin")


def ffn_io(model: Any, seqs: list[Sequence], positions: int, generator: torch.Generator, progress: bool,
           desc: str, gradients: bool = False) -> FFNData:
    """Teacher-forced forward over each sequence, keeping each layer's FFN input/output at ``positions`` random
    answer positions per sequence (0: every answer position); with ``gradients``, also each FFN output's gradient
    of the final top-1 margin over that margin (one backward pass per sequence)."""
    from tqdm import tqdm

    L = model.config.num_hidden_layers
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(L)]
    ns: list[list[torch.Tensor]] = [[] for _ in range(L)]
    gs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    for seq in tqdm(seqs, unit="seq", desc=desc, disable=not progress):
        lo = max(0, seq.answer_start - 1)
        span = len(seq.tokens) - lo
        if span <= 0:
            continue
        keep = torch.arange(lo, len(seq.tokens))
        if 0 < positions < span:
            keep = lo + torch.randperm(span, generator=generator)[:positions].sort().values
        for layer, (a, xn, y, g) in enumerate(_layer_io(model, seq.tokens.tolist(), keep if gradients else None)):
            xs[layer].append(xn[keep].to(torch.bfloat16))
            ys[layer].append(y[keep].to(torch.bfloat16))
            ns[layer].append(a[keep].float().norm(dim=-1))
            if g is not None:
                gs[layer].append(g.to(torch.bfloat16))
    if not xs[0]:
        raise PonderError("the distill data has no answer positions to train on")
    return FFNData([torch.cat(x) for x in xs], [torch.cat(y) for y in ys], [torch.cat(n) for n in ns],
                   [torch.cat(g) for g in gs] if gradients else None)


def _layer_io(model: Any, ids: list[int], grad_at: torch.Tensor | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per layer (a, norm(a), FFN(norm(a)) # [T, E] each, g) over a full causal forward of ``ids``. With
    ``grad_at`` # [n] positions, g # [n, E] is d m / d y at those positions over m, m = the sum of the final top-1
    margins (logit of the top-1 minus the runner-up's) at them: to first order, a change d of a position's FFN
    output moves its margin by g . d times the margin, so |g . d| >= 1 may flip its top-1 (the margins of later
    positions reached through attention are in the sum too)."""
    cache = model.new_cache(1, len(ids))
    ctx = model.step_context(cache, len(ids), [len(ids)])
    with torch.inference_mode(grad_at is None), torch.enable_grad() if grad_at is not None else torch.no_grad():
        h = model.embed(torch.tensor([ids], device=model.device))
        if grad_at is not None:  # the model's weights are frozen: the graph starts at the embeddings
            h = h.detach().requires_grad_(True)
        rows = []
        for layer, block in enumerate(model.layers):
            a = h + block.attn(block.attn_norm(h), ctx, cache, layer)
            xn = block.mlp_norm(a)
            y = block.mlp(xn)
            if grad_at is not None:
                y.retain_grad()
            rows.append((a, xn, y))
            h = a + y
        margin = None
        if grad_at is not None:
            top2 = model.logits(h[0, grad_at]).topk(2, dim=-1).values
            margin = (top2[:, 0] - top2[:, 1]).detach().clamp_min(1e-3)
            (top2[:, 0] - top2[:, 1]).sum().backward()
    out = []
    for a, xn, y in rows:
        g = None if margin is None else (y.grad[0, grad_at] / margin[:, None]).cpu()
        out.append((a[0].detach().cpu(), xn[0].detach().cpu(), y[0].detach().cpu(), g))
    return out


def prune_init(duo: DuoModules, model: Any, data: FFNData) -> None:
    """Each small FFN starts as the big one restricted to its ``width`` units of largest mean contribution."""
    w = duo.width
    with torch.no_grad():
        for layer, block in enumerate(model.layers):
            gu, down = block.mlp.wgate_up.weight.float().cpu(), block.mlp.wdown.weight.float().cpu()
            inter = down.shape[1]
            score = torch.zeros(inter)
            for i in range(0, len(data.xn[layer]), 4096):
                gate, up = F.linear(data.xn[layer][i : i + 4096].float(), gu).chunk(2, dim=-1)
                score += (F.silu(gate) * up).abs().sum(0)
            score *= down.norm(dim=0)
            top = score.topk(w).indices.sort().values
            duo.gate_up[layer].copy_(torch.cat([gu[:inter][top], gu[inter:][top]]))
            duo.down[layer].copy_(down[:, top])


def relative_errors(duo: DuoModules, data: FFNData, layer: int, target: str = "local"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """What skipping, or the small FFN, changes # [N] each: ``local``, in the residual stream (|y| / |a|,
    |y - small(xn)| / |a|); ``margin``, in the final top-1 margin to first order, as a share of it (|g . y|,
    |g . (y - small(xn))|, needing ``data.g``)."""
    if target == "margin" and data.g is None:
        raise ValueError("margin errors need FFN data recorded with gradients")
    with torch.no_grad():
        skip, small = [], []
        for i in range(0, len(data.xn[layer]), 4096):
            xn, y = data.xn[layer][i : i + 4096].float(), data.y[layer][i : i + 4096].float()
            d = y - duo.small(layer, xn)
            if target == "margin":
                g = data.g[layer][i : i + 4096].float()  # type: ignore[index]
                skip.append((g * y).sum(-1).abs())
                small.append((g * d).sum(-1).abs())
            else:
                n = data.a_norm[layer][i : i + 4096]
                skip.append(y.norm(dim=-1) / n)
                small.append(d.norm(dim=-1) / n)
        return torch.cat(skip), torch.cat(small)


def train_small(duo: DuoModules, data: FFNData, cfg: TrainConfig, batch: int, progress: bool) -> list[tuple[int, float]]:
    """AdamW on every layer's small FFN at once: per layer the mean squared error over |y|^2, averaged."""
    from tqdm import tqdm

    params = list(duo.gate_up.parameters()) + list(duo.down.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    N = len(data.xn[0])
    steps = cfg.epochs * math.ceil(N / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / steps)))
    scale = [float(y.float().pow(2).sum(-1).mean()) for y in data.y]
    g = torch.Generator().manual_seed(cfg.seed)
    curve = []
    bar = tqdm(total=steps, unit="step", desc="train small FFNs", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(N, generator=g)
        for i in range(0, N, batch):
            idx = order[i : i + batch]
            loss = sum(F.mse_loss(duo.small(layer, data.xn[layer][idx].float()), data.y[layer][idx].float(),
                                  reduction="sum") / (len(idx) * scale[layer]) for layer in range(duo.n_layers))
            loss = loss / duo.n_layers
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            curve.append((len(curve) + 1, float(loss.detach())))
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
    bar.close()
    return curve


def _log_rms_of_norm(a_norm: torch.Tensor, E: int) -> torch.Tensor:
    """log rms(a) # [N, 1] from the stored norms |a| # [N] (rms = |a| / sqrt(E)), as ``log_rms`` computes it."""
    return torch.log(a_norm / math.sqrt(E) + 1e-6)[:, None]


def _features(xn: torch.Tensor, a_norm: torch.Tensor, E: int) -> torch.Tensor:
    """Router features [norm(a), log rms(a), 1] # [N, E + 2]."""
    log_rms = _log_rms_of_norm(a_norm, E)
    return torch.cat([xn.float(), log_rms, torch.ones_like(log_rms)], dim=1)


def fit_routers(duo: DuoModules, data: FFNData, target: str = "local") -> None:
    """Ridge regression, per layer, of the log errors of [skip, small] (``relative_errors``) on the router
    features."""
    E = data.xn[0].shape[1]
    with torch.no_grad():
        for layer in range(duo.n_layers):
            X = _features(data.xn[layer], data.a_norm[layer], E).double()
            skip, small = relative_errors(duo, data, layer, target)
            Y = torch.log(torch.stack([skip, small], dim=1).double() + 1e-6)
            A = X.T @ X + RIDGE * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
            A[-1, -1] -= RIDGE * len(X)  # no penalty on the bias
            duo.router[layer].copy_(torch.linalg.solve(A, X.T @ Y).T.float())


def router_fit(duo: DuoModules, data: FFNData, target: str = "local") -> dict[str, float]:
    """How well the routers predict the held-back errors: R^2 of the log errors, averaged over layers."""
    r2 = {"skip": 0.0, "small": 0.0}
    with torch.no_grad():
        for layer in range(duo.n_layers):
            skip, small = relative_errors(duo, data, layer, target)
            lr = _log_rms_of_norm(data.a_norm[layer], data.xn[layer].shape[1])
            pred = duo.predicted_error(layer, data.xn[layer].float(), lr)
            for j, (name, true) in enumerate((("skip", skip), ("small", small))):
                t = torch.log(true + 1e-6)
                r2[name] += float(1 - (pred[:, j] - t).pow(2).mean() / t.var()) / duo.n_layers
    return {k: round(v, 3) for k, v in r2.items()}


def routed_agreement(duo: DuoModules, model: Any, seqs: list[Sequence], thresholds: tuple[float, ...]
                     ) -> list[dict[str, float]]:
    """Teacher-forced over held-back sequences, per threshold: top-1 agreement with the full model on answer
    positions and the mean big / small FFN blocks run per token. Routing every position of a causal forward
    computes what decoding with the same routes computes: a token's route depends only on its own states."""
    out = []
    with torch.inference_mode():
        cases = [(s.tokens.tolist(), max(0, s.answer_start - 1)) for s in seqs]
        cases = [(ids, lo) for ids, lo in cases if lo < len(ids)]
        wants = [_forward(model, ids, None, 0.0)[0][lo:].argmax(-1) for ids, lo in cases]  # the full model's, once
        for t in thresholds:
            hits = total = big = small = 0
            for (ids, lo), want in zip(cases, wants):
                logits, nb, ns = _forward(model, ids, duo, t, lo)
                hits += int((logits[lo:].argmax(-1) == want).sum())
                total += len(want)
                big, small = big + nb, small + ns
            out.append({"threshold": t, "top1": round(hits / max(1, total), 4),
                        "big_ffn": round(big / max(1, total), 2), "small_ffn": round(small / max(1, total), 2),
                        "positions": total})
    return out


def _forward(model: Any, ids: list[int], duo: DuoModules | None, threshold: float, lo: int = 0
             ) -> tuple[torch.Tensor, int, int]:
    """Logits # [T, V] of a causal forward whose positions >= lo are routed by ``duo`` at ``threshold`` (None: the
    full model); returns the big and small FFN blocks run at those positions."""
    cache = model.new_cache(1, len(ids))
    ctx = model.step_context(cache, len(ids), [len(ids)])
    h = model.embed(torch.tensor([ids], device=model.device))
    nb = ns = 0
    for layer, block in enumerate(model.layers):
        a = h + block.attn(block.attn_norm(h), ctx, cache, layer)
        xn = block.mlp_norm(a)
        y = block.mlp(xn)
        if duo is not None:
            route = choose(duo, layer, xn[0, lo:], a[0, lo:], threshold)
            y_small = duo.small(layer, xn[0, lo:])
            routed = torch.where((route == 2)[:, None], y[0, lo:], torch.where((route == 1)[:, None], y_small, 0.0))
            y = torch.cat([y[:, :lo], routed[None]], dim=1)
            nb, ns = nb + int((route == 2).sum()), ns + int((route == 1).sum())
        else:
            nb += len(ids) - lo
        h = a + y
    return model.logits(h)[0], nb, ns


def choose(duo: DuoModules, layer: int, xn: torch.Tensor, a: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per position # [n] long: 0 skip, 1 small, 2 big: the cheapest option whose predicted relative error is at
    most ``threshold`` (threshold <= 0: always big)."""
    if threshold <= 0:
        return torch.full(xn.shape[:-1], 2, dtype=torch.long, device=xn.device)
    err = duo.predicted_error(layer, xn, log_rms(a))
    limit = math.log(threshold)
    return torch.where(err[..., 0] <= limit, 0, torch.where(err[..., 1] <= limit, 1, 2))


def train_duo(
    loaded: Any, data_dir: Any, out: Any, width: int = 64, positions: int = 48, cfg: TrainConfig | None = None,
    max_len: int = 512, batch: int = 256, progress: bool = True, router: str = "margin",
) -> dict[str, Any]:
    """Distil small FFNs and fit routers (predicting ``router`` errors, see ``relative_errors``) on ``data_dir``;
    save them to ``out``; returns the recipe."""
    cfg = cfg or TrainConfig(epochs=4, lr=1e-3)
    torch.manual_seed(cfg.seed)
    target = loaded.model
    c = target.config
    if not 1 <= width < c.intermediate_size:
        raise PonderError(f"duo needs 1 <= width < the model's FFN width {c.intermediate_size}, got {width}")
    if positions < 0:
        raise PonderError(f"duo needs positions >= 0, got {positions}")
    if router not in ROUTER_TARGETS:
        raise PonderError(f"duo routers predict one of {', '.join(ROUTER_TARGETS)} errors, got {router!r}")
    manifest, seqs = read_data(Path(data_dir), max_len)
    train, held = split(seqs)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    grads = router == "margin"
    data = ffn_io(target, train, positions, g, progress, "FFN inputs", grads)
    held_data = ffn_io(target, held, positions, g, progress, "held-back FFN inputs", grads)
    duo = DuoModules(c.hidden_size, width, c.num_hidden_layers)
    prune_init(duo, target, data)
    pruned = _mean_errors(duo, held_data)
    curve = train_small(duo, data, cfg, batch, progress)
    duo.round_to_stored()
    fit_routers(duo, data, router)
    duo.round_to_stored()
    minutes = (time.perf_counter() - start) / 60
    errors = _mean_errors(duo, held_data)
    sweep = routed_agreement(duo, target, held, SWEEPS[router])
    calibrated = max((r["threshold"] for r in sweep if r["top1"] >= CALIBRATION), default=SWEEPS[router][0])
    recipe = {"kind": KIND, "data": str(Path(data_dir).resolve()), "data_recipe": manifest["recipe"],
              "model": loaded.name, "width": width, "intermediate_size": c.intermediate_size,
              "router_target": router, "threshold": calibrated, "calibrated_to": CALIBRATION,
              "positions": positions, "train": {**cfg.__dict__, "batch": batch}, "max_len": max_len,
              "sequences": len(train), "heldback_sequences": len(held), "train_positions": len(data.xn[0]),
              "train_minutes": round(minutes, 2),
              "heldback": {"relative_error_pruned": pruned, "relative_error": errors,
                           "router_r2": router_fit(duo, held_data, router), "sweep": sweep},
              "final_loss": curve[-1][1] if curve else math.nan}
    out = Path(out)
    recipe = save_artifact(out, duo.tensors(), recipe)
    plot_curve(curve, out / "loss.png", f"small FFNs (width {width}), {len(train)} sequences")
    return recipe


def _mean_errors(duo: DuoModules, data: FFNData) -> dict[str, float]:
    """Mean relative error of skipping and of the small FFN, over positions and layers."""
    skip = small = 0.0
    for layer in range(duo.n_layers):
        s, m = relative_errors(duo, data, layer)
        skip, small = skip + float(s.mean()), small + float(m.mean())
    return {"skip": round(skip / duo.n_layers, 4), "small": round(small / duo.n_layers, 4)}


def load_duo(path: Any, target: Any) -> tuple[DuoModules, dict[str, Any]]:
    """Trained small FFNs and routers from their artifact directory, for ``target``."""
    tensors, recipe = load_artifact(Path(path), KIND)
    c = target.config
    L, E, w = c.num_hidden_layers, c.hidden_size, int(recipe.get("width", 0))
    ok = w > 0 and sum(k.startswith("gate_up.") for k in tensors) == L and all(tensors.get(f"gate_up.{i}", torch.empty(0)).shape == (2 * w, E) for i in range(L)) and \
        all(tensors.get(f"router.{i}", torch.empty(0)).shape == (2, E + 2) for i in range(L))
    if not ok:
        raise PonderError(f"the duo modules in {path} were trained for another model ({recipe.get('model')})")
    duo = DuoModules(E, w, L)
    with torch.no_grad():
        for i in range(L):
            duo.gate_up[i].copy_(tensors[f"gate_up.{i}"])
            duo.down[i].copy_(tensors[f"down.{i}"])
            duo.router[i].copy_(tensors[f"router.{i}"])
    return duo.to(target.device).eval().requires_grad_(False), recipe
