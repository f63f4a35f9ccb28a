"""Exit adapters: a per-layer affine map (and optionally an MLP) that makes an early layer's state read well through
the target's own head.

Early-exit drafting (``speculate/early_exit.py``) reads an intermediate state h_l with the target's final norm and
head, ``model.logits(h_l)``, which the model was never trained for (the "logit lens"): on SmolLM2 layer 24's top-1
agrees with the full model on 35-45% of tokens. The tuned lens (arXiv 2303.08112) learns, per layer, an affine
translator ``A_l(h) = h + D_l h + b_l`` (D_l and b_l start at zero: the identity, i.e. the plain early exit) trained
so that ``logits(A_l h_l)`` matches the final distribution, by KL(final || exit); Kangaroo (arXiv 2404.18911)
trains an adapter at its exit layer for the same purpose. These adapters are the tuned lens' maps, one per
candidate exit layer; the target stays frozen. Storing the difference D_l rather than the whole matrix keeps the
learned change intact in the bf16 artifact (bf16 cannot hold 1 + 0.003). At the ``mlp`` layers a residual MLP
follows the map (``ExitMLP``, also the identity at start): the non-linear part a map lacks, where an extra point
of agreement is worth 2 E x W multiply-adds per exit (Kangaroo's adapter is an attention layer instead; on
SmolLM2's layer 24 one gained a third of what the MLP did, docs/distill.md).

Data: the states entering the candidate layers and the last layer's output. Data recorded with those layers
(``ponder distill data --layers``) is used as stored; otherwise each sequence is run through the target once more
(``data.record_hidden``, one inference-mode forward per sequence, about what recording cost). ``positions`` random
positions per sequence (prompt and answer alike: drafting meets both kinds of context) are kept for training. The held-back sequences' answer positions measure top-1 agreement with the target's greedy
choice per layer, with the identity map and with the trained one. Shapes: T positions, E hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ponder.distill.data import record_hidden
from ponder.distill.train import (
    Sequence, TrainConfig, load_artifact, plot_curve, read_data, save_artifact, split, train_loop,
)
from ponder.errors import PonderError

KIND = "exits"
DEFAULT_FRACTIONS = (8 / 30, 12 / 30, 16 / 30, 20 / 30, 24 / 30)  # 8,12,16,20,24 of SmolLM2's 30 layers


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Candidate exit layers: 8, 12, 16, 20 and 24 of 30, scaled to the model's depth (distinct, in [1, n - 1])."""
    return tuple(sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in DEFAULT_FRACTIONS}))


class ExitAdapters(nn.Module):
    """One affine map ``h + D h + b`` per exit layer, and at the ``mlp`` layers a residual MLP after it, identity at
    initialisation."""

    def __init__(self, hidden_size: int, layers: tuple[int, ...], mlp: dict[int, int] | None = None,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.layers = tuple(sorted(layers))
        self.mlp_widths = {int(k): int(v) for k, v in (mlp or {}).items()}
        if not set(self.mlp_widths) <= set(self.layers) or any(w < 1 for w in self.mlp_widths.values()):
            raise PonderError(f"exit MLPs go on exit layers ({', '.join(map(str, self.layers))}) with widths >= 1, "
                              f"got {self.mlp_widths}")
        self.maps = nn.ModuleDict({str(layer): nn.Linear(hidden_size, hidden_size) for layer in self.layers})
        self.mlps = nn.ModuleDict({str(layer): ExitMLP(hidden_size, w, eps) for layer, w in self.mlp_widths.items()})
        for m in self.maps.values():
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """A_l(h) for h # [..., E], the state entering layer ``layer`` (the output of layers [0, layer)), in h's
        dtype (the map computes in its own: bf16 states meet fp32 maps)."""
        m = self.maps[str(layer)]
        z = h.to(m.weight.dtype)
        z = z + m(z)
        if str(layer) in self.mlps:
            z = self.mlps[str(layer)](z)
        return z.to(h.dtype)

    def extra_macs(self, layer: int) -> int:
        """Multiply-adds per position of the adapter at ``layer``."""
        E = self.maps[str(layer)].weight.shape[0]
        return E * E + 2 * E * self.mlp_widths.get(layer, 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the artifact stores: ``delta.L`` # [E, E] and ``bias.L`` # [E] per exit layer L, and at the MLP
        layers ``mlp.L.norm`` # [E], ``mlp.L.up`` # [W, E], ``mlp.L.up_bias`` # [W], ``mlp.L.down`` # [E, W],
        ``mlp.L.down_bias`` # [E]."""
        out = {}
        for layer in self.layers:
            m = self.maps[str(layer)]
            out[f"delta.{layer}"], out[f"bias.{layer}"] = m.weight, m.bias
        for layer in self.mlp_widths:
            for name, t in self.mlps[str(layer)].named_tensors().items():
                out[f"mlp.{layer}.{name}"] = t
        return out

    def round_to_stored(self) -> None:
        """Round the maps as the artifact stores them (bf16), so the reported figures are the loaded adapters'."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.to(torch.bfloat16).float())


class ExitMLP(nn.Module):
    """``z + down(SiLU(up(norm(z))))``, ``down`` starting at zero (the identity): the non-linear part an affine map
    lacks. SmolLM2's layer 24 trained alone, 192 positions per sequence, held back: the map 68.9% (2 epochs) and
    71.0% (4), a 512-wide MLP after it 70.4% and 72.0%; an attention layer after it instead (Kangaroo's adapter)
    69.4% (2 epochs)."""

    def __init__(self, hidden_size: int, width: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, width)
        self.down = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.down(F.silu(self.up(self.norm(z))))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {"norm": self.norm.weight, "up": self.up.weight, "up_bias": self.up.bias, "down": self.down.weight,
                "down_bias": self.down.bias}


# --- data -------------------------------------------------------------------------------------------------------------
def states(model: Any, seq: Sequence, layers: tuple[int, ...], keep: torch.Tensor | None) -> Sequence:
    """The sequence's states entering each of ``layers`` and the last layer's output (as recorded when the data has
    them all, else recomputed by the target) at the positions ``keep`` # [n] (None: all); returned as a Sequence of
    those positions (``answer_start`` is relative to them; the states are bf16 like the distill data's)."""
    need = tuple(layers) + (model.config.num_hidden_layers,)
    got = seq.hidden if recorded(seq, need) else record_hidden(model, seq.tokens.tolist(), need)
    idx = torch.arange(len(seq.tokens)) if keep is None else keep
    hidden = {layer: got[layer][idx.to(got[layer].device)].to(torch.bfloat16).cpu() for layer in need}
    answer = int((idx < seq.answer_start).sum())  # the first kept answer position
    return Sequence(seq.source, seq.tokens[idx], answer, hidden)


def recorded(seq: Sequence, layers: tuple[int, ...]) -> bool:
    return all(layer in seq.hidden for layer in layers)


def sample_positions(n: int, count: int, generator: torch.Generator) -> torch.Tensor | None:
    """``count`` distinct random positions of n, ascending # [count] (None: all, when count is 0 or >= n)."""
    if count == 0 or count >= n:
        return None
    return torch.randperm(n, generator=generator)[:count].sort().values


# --- training ---------------------------------------------------------------------------------------------------------
def kl_loss(adapters: ExitAdapters, model: Any, seq: Sequence) -> list[torch.Tensor]:
    """Per exit layer, the mean KL(final || exit) over the sequence's positions."""
    last = model.config.num_hidden_layers
    with torch.no_grad():
        p_log = torch.log_softmax(model.logits(seq.hidden[last].float()), -1)  # [T, V]
    out = []
    for layer in adapters.layers:
        q_log = torch.log_softmax(model.logits(adapters(layer, seq.hidden[layer].float())), -1)
        out.append(F.kl_div(q_log, p_log, log_target=True, reduction="batchmean"))
    return out


def agreement(
    adapters: ExitAdapters | None, model: Any, seqs: list[Sequence], layers: tuple[int, ...], answers_only: bool = True,
) -> list[float]:
    """Per layer, the share of positions (answer positions with ``answers_only``: those predicting an answer token)
    where the exit's top-1 (through the adapter, or the identity when ``adapters`` is None) is the target's."""
    last = model.config.num_hidden_layers
    hits, total = [0] * len(layers), 0
    with torch.no_grad():
        for seq in seqs:
            lo = max(0, seq.answer_start - 1) if answers_only else 0
            want = model.logits(seq.hidden[last][lo:].float()).argmax(-1)
            total += len(want)
            for i, layer in enumerate(layers):
                h = seq.hidden[layer][lo:].float()
                guess = model.logits(h if adapters is None else adapters(layer, h)).argmax(-1)
                hits[i] += int((guess == want).sum())
    return [h / total if total else 0.0 for h in hits]


def train_exits(
    loaded: Any, data_dir: Any, out: Any, layers: tuple[int, ...] = (), positions: int = 64,
    cfg: TrainConfig | None = None, max_len: int = 1024, progress: bool = True, mlp_layers: tuple[int, ...] = (),
    mlp_width: int = 512,
) -> dict[str, Any]:
    """Train exit adapters on ``data_dir`` and save them to ``out``; returns the recipe with the held-back agreement
    per layer before and after. ``mlp_layers``: exit layers whose map is followed by a residual MLP of
    ``mlp_width``."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    target = loaded.model
    n = target.config.num_hidden_layers
    layers = tuple(sorted(set(layers))) or default_layers(n)
    if not all(1 <= layer < n for layer in layers):
        raise PonderError(f"exit layers must lie in [1, {n - 1}] for this {n}-layer model, got {list(layers)}")
    if positions < 0:
        raise PonderError(f"exits needs positions >= 0, got {positions}")
    mlp = {layer: mlp_width for layer in sorted(set(mlp_layers))}
    adapters = ExitAdapters(target.config.hidden_size, layers, mlp, target.config.rms_norm_eps).to(target.device)
    manifest, seqs = read_data(Path(data_dir), max_len)
    train, held = split(seqs)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    train = [states(target, s, layers, sample_positions(len(s.tokens), positions, g)) for s in _bar(train, progress)]
    held = [states(target, s, layers, None) for s in held]
    before = agreement(None, target, held, layers)
    curve = train_loop(list(adapters.parameters()), lambda s: sum(kl_loss(adapters, target, s)) / len(layers),
                       train, cfg, progress, desc="train exits")
    minutes = (time.perf_counter() - start) / 60
    adapters.round_to_stored()
    after = agreement(adapters, target, held, layers)
    recipe = {"kind": KIND, "data": str(Path(data_dir).resolve()), "data_recipe": manifest["recipe"],
              "model": loaded.name, "layers": list(layers), "mlp": {str(k): v for k, v in mlp.items()},
              "positions": positions, "train": dataclasses.asdict(cfg),
              "max_len": max_len, "sequences": len(train), "heldback_sequences": len(held),
              "states": "recorded" if recorded(seqs[0], layers + (n,)) else "recomputed",
              "train_minutes": round(minutes, 2),
              "heldback": {"top1_identity": before, "top1_adapted": after,
                           "positions": sum(len(s.tokens) - max(0, s.answer_start - 1) for s in held)},
              "final_loss": curve[-1][1] if curve else math.nan}
    out = Path(out)
    recipe = save_artifact(out, adapters.tensors(), recipe)
    plot_curve(curve, out / "loss.png", f"exit adapters: layers {','.join(map(str, layers))}, {len(train)} sequences")
    return recipe


def _bar(seqs: list[Sequence], progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(seqs, unit="seq", desc="exit states", disable=not progress)


def load_exits(path: Any, target: Any) -> tuple[ExitAdapters, dict[str, Any]]:
    """Trained adapters from their artifact directory, for ``target`` (the model they were trained for)."""
    tensors, recipe = load_artifact(Path(path), KIND)
    layers = tuple(int(x) for x in recipe["layers"])
    mlp = {int(k): int(v) for k, v in recipe.get("mlp", {}).items()}  # (artifacts before the MLPs have none)
    E, n = target.config.hidden_size, target.config.num_hidden_layers
    shapes_ok = all(tensors.get(f"delta.{layer}", torch.empty(0)).shape == (E, E) for layer in layers)
    if not shapes_ok or not all(1 <= layer < n for layer in layers):
        raise PonderError(f"the exit adapters in {path} were trained for another model ({recipe.get('model')})")
    adapters = ExitAdapters(E, layers, mlp, target.config.rms_norm_eps)
    with torch.no_grad():
        for key, t in adapters.tensors().items():  # the parameters themselves, by their stored names
            if key not in tensors or tensors[key].shape != t.shape:
                raise PonderError(f"the exit adapters in {path} lack {key} (or it has the wrong shape): retrain "
                                  "them with ponder distill train exits")
            t.copy_(tensors[key])
    return adapters.to(target.device).eval().requires_grad_(False), recipe
