"""Medusa-1 heads: K small heads on the target's last hidden state, head k guessing the token k places further on.

Medusa (arXiv 2401.10774) adds heads to a frozen model: at position t the model's own head gives the token at
t + 1 (head 0), and Medusa head k (k = 1..K) guesses the token at t + 1 + k from the same last-layer state h[t].
The heads are independent of each other and of the draft tokens, so drafting costs K small matrix products per
step whatever the tree, and the tree is the cartesian product of each head's top candidates (``speculate/medusa.py``).

Each head here is Medusa-1's: one residual block ``x + SiLU(W x + b)`` (W and b start at zero, so an untrained
head k repeats the target's own prediction), then the target's final norm and a frozen slice of the target's output
layer over the frequency-ranked draft vocabulary (FR-Spec, 2502.14856), the one the EAGLE-style head uses: on a CPU
a full-vocabulary output layer per head would cost a large share of a target forward. The target's output layer is
its tied embedding on SmolLM2; on untied models it is ``lm_head``.

Training (Medusa-1: the target frozen): cross-entropy of head k at position t against the label ``y[t + k]``
(``train.py``: the target's greedy choice after token t + k) on answer positions, weighted 0.8^(k-1) as Medusa
weighs later heads less; labels outside the draft vocabulary are skipped. Shapes: T positions, E hidden size,
N draft vocabulary, K heads.
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

from ponder.distill.train import (
    Sequence, TrainConfig, add_labels, draft_vocabulary, load_artifact, plot_curve, read_data, save_artifact, split,
    train_loop, vocab_coverage, vocab_map,
)
from ponder.errors import PonderError

KIND = "medusa"
HEAD_DECAY = 0.8  # loss weight of head k: HEAD_DECAY ** (k - 1)


class MedusaHeads(nn.Module):
    """K residual blocks, each followed by the target's final norm and the frozen draft-vocabulary output layer."""

    def __init__(self, target_cfg: Any, n_heads: int, draft_ids: torch.Tensor) -> None:
        super().__init__()
        E = target_cfg.hidden_size
        self.blocks = nn.ModuleList(nn.Linear(E, E) for _ in range(n_heads))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.norm = nn.RMSNorm(E, eps=target_cfg.rms_norm_eps)  # the target's, frozen (``attach``)
        self.register_buffer("draft_ids", draft_ids.long(), persistent=False)
        self.register_buffer("out", torch.zeros(len(draft_ids), E), persistent=False)  # [N, E]

    @property
    def n_heads(self) -> int:
        return len(self.blocks)

    def attach(self, target: Any) -> None:
        """Take the final norm and the output layer's draft-vocabulary rows from the target, frozen."""
        with torch.no_grad():
            self.norm.load_state_dict(target.norm.state_dict())
            self.out = target.lm_head.weight[self.draft_ids].detach().float().clone()
        self.norm.requires_grad_(False)

    def trainable(self) -> list[nn.Parameter]:
        return list(self.blocks.parameters())

    def scores(self, h: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """Draft-vocabulary logits of the first ``heads`` heads, h # [..., E] -> # [..., heads, N]."""
        outs = [self.head_scores(i, h) for i in range(heads or self.n_heads)]
        return torch.stack(outs, dim=-2)

    def head_scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Head i + 1's draft-vocabulary logits, h # [..., E] -> # [..., N]."""
        x = h + F.silu(self.blocks[i](h))
        return F.linear(self.norm(x), self.out.to(x.dtype))

    def round_to_stored(self) -> None:
        """Round the trained weights as the artifact stores them (bf16), so the reported figures are the loaded
        heads'."""
        with torch.no_grad():
            for p in self.trainable():
                p.copy_(p.to(torch.bfloat16).float())


# --- training ---------------------------------------------------------------------------------------------------------
def _first(seq: Sequence, k: int) -> int:
    """The first position whose head-k label ``y[t + k]`` predicts an answer token."""
    return max(0, seq.answer_start - 1 - k)


def head_losses(heads: MedusaHeads, seq: Sequence, last_layer: int, vmap: torch.Tensor) -> list[torch.Tensor]:
    """Per head, the mean cross-entropy on the sequence's answer positions (labels outside the draft vocabulary are
    skipped)."""
    T = len(seq.tokens)
    h = seq.hidden[last_layer].float()  # [T, E]
    want = vmap[seq.labels]  # [T]
    losses = []
    for i in range(heads.n_heads):
        k = i + 1
        lo = _first(seq, k)
        if lo >= T - k or not bool((want[lo + k :] >= 0).any()):
            losses.append(heads.blocks[i].weight.sum() * 0)
            continue
        losses.append(F.cross_entropy(heads.head_scores(i, h[lo : T - k]), want[lo + k :], ignore_index=-100))
    return losses


def evaluate(heads: MedusaHeads, seqs: list[Sequence], last_layer: int, vmap: torch.Tensor) -> dict[str, Any]:
    """Top-1 accuracy per head on answer positions: the share where head k's top draft-vocabulary token is the
    target's greedy choice k tokens later (a label outside the draft vocabulary counts as a miss)."""
    hits, total = [0] * heads.n_heads, [0] * heads.n_heads
    with torch.no_grad():
        for seq in seqs:
            T = len(seq.tokens)
            h = seq.hidden[last_layer].float()
            want = vmap[seq.labels]
            for i in range(heads.n_heads):
                k = i + 1
                lo = _first(seq, k)
                if lo >= T - k:
                    continue
                pred = heads.head_scores(i, h[lo : T - k]).argmax(-1)
                hits[i] += int((pred == want[lo + k :]).sum())
                total[i] += T - k - lo
    return {"top1_by_head": [h / t if t else 0.0 for h, t in zip(hits, total)], "positions": total}


def train_medusa(
    loaded: Any, data_dir: Any, out: Any, n_heads: int = 4, vocab: int = 8192, cfg: TrainConfig | None = None,
    max_len: int = 1024, progress: bool = True,
) -> dict[str, Any]:
    """Train ``n_heads`` Medusa heads on ``data_dir`` and save them to ``out``; returns the recipe (with the
    held-back eval)."""
    if n_heads < 1:
        raise PonderError(f"medusa needs --heads >= 1, got {n_heads}")
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    target = loaded.model
    manifest, seqs = read_data(Path(data_dir), max_len)
    last = target.config.num_hidden_layers
    if last not in manifest["recipe"]["layers"]:
        raise PonderError(f"medusa heads learn from the last layer ({last}), which {data_dir} did not record "
                          f"(layers {manifest['recipe']['layers']}): rerun `ponder distill data` with it")
    add_labels(target, seqs, last)
    train, held = split(seqs)
    draft_ids = draft_vocabulary(train, vocab, target.config.vocab_size)
    vmap = vocab_map(draft_ids, target.config.vocab_size)
    heads = MedusaHeads(target.config, n_heads, draft_ids)
    heads.attach(target)
    weights = [HEAD_DECAY**i for i in range(n_heads)]
    start = time.perf_counter()

    def loss_of(seq: Sequence) -> torch.Tensor:
        return sum(w * l for w, l in zip(weights, head_losses(heads, seq, last, vmap)))

    curve = train_loop(heads.trainable(), loss_of, train, cfg, progress, desc="train medusa")
    minutes = (time.perf_counter() - start) / 60
    heads.round_to_stored()
    out = Path(out)
    recipe = {"kind": KIND, "data": str(Path(data_dir).resolve()), "data_recipe": manifest["recipe"],
              "model": loaded.name, "layer": last, "heads": n_heads, "vocab": len(draft_ids),
              "train": dataclasses.asdict(cfg), "max_len": max_len, "sequences": len(train),
              "heldback_sequences": len(held), "train_minutes": round(minutes, 2),
              "vocab_coverage": vocab_coverage(train, draft_ids), "heldback": evaluate(heads, held, last, vmap),
              "final_loss": curve[-1][1] if curve else math.nan}
    tensors = {k: v for k, v in heads.state_dict().items() if k.startswith("blocks.")}
    recipe = save_artifact(out, {**tensors, "draft_ids": draft_ids}, recipe)
    plot_curve(curve, out / "loss.png", f"Medusa heads: {n_heads} heads, {len(train)} sequences")
    return recipe


def load_medusa(path: Any, target: Any) -> tuple[MedusaHeads, dict[str, Any]]:
    """Trained heads from their artifact directory, attached to ``target`` (the model they were trained for)."""
    tensors, recipe = load_artifact(Path(path), KIND)
    draft_ids = tensors.pop("draft_ids")
    E = target.config.hidden_size
    first = tensors.get("blocks.0.weight")
    if int(draft_ids.max()) >= target.config.vocab_size or first is None or first.shape != (E, E):
        raise PonderError(f"the Medusa heads in {path} were trained for another model ({recipe.get('model')})")
    heads = MedusaHeads(target.config, int(recipe["heads"]), draft_ids)
    try:
        heads.load_state_dict(tensors, strict=False)
    except RuntimeError:
        raise PonderError(f"the Medusa heads in {path} do not match this version of ponder: retrain them")
    if set(tensors) != {k for k in heads.state_dict() if k.startswith("blocks.")}:
        raise PonderError(f"the Medusa heads in {path} do not match this version of ponder: retrain them")
    heads.attach(target)
    return heads.to(target.device).eval().requires_grad_(False), recipe
