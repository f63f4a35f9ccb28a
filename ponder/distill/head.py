"""An EAGLE-style draft head: one decoder layer that predicts the target's own next tokens from its hidden states.

EAGLE (arXiv 2401.15077) drafts at the feature level: the head sees the target's hidden state at position t plus
the embedding of token t + 1 and predicts what the target will choose after t + 1. EAGLE-3 (arXiv 2503.01840)
fuses a low, a middle and a high layer's states instead of only the last, and trains with **training-time test**:
at draft depth 2 and beyond the head has no target states (those tokens were never verified), so it is trained,
over ``ttt_steps`` passes, on its own outputs in their place, exactly as it runs when drafting. Its output layer is
a frozen slice of the target's (tied) embedding over a frequency-ranked draft vocabulary (FR-Spec, 2502.14856).

Shapes: T positions, E hidden size, N draft vocabulary.

At position t (step 1): ``z[t] = fc([fuse(F[t]); embed(x[t + 1])])``, ``g[t] = layer(z)[t]`` (causal attention
over the head's own earlier positions), ``logits[t] = norm(g[t]) @ W_draft^T``, trained toward ``y[t + 1]``, the
target's greedy choice after token t + 1. At step s > 1 the fused target state is replaced by the head's output of
step s - 1 at the previous position, ``g_{s-1}[t - 1]``, and position t attends to step-1 keys up to t - s + 1 and
to step r's key at t - s + r for r = 2..s: the keys a depth-s draft finds in the head's cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ponder.distill.train import (
    Sequence, TrainConfig, add_labels, draft_vocabulary, plot_curve, read_data, save_artifact, source_kind, split,
    train_loop, vocab_coverage, vocab_map,
)
from ponder.model.llama import LlamaModel
from ponder.model.rope import apply_rope, rope_tables

KIND = "head"


class DraftHead(nn.Module):
    """fuse (3E -> E) + norms + fc (2E -> E) + one Llama decoder layer + norm, scoring the draft vocabulary."""

    def __init__(self, target_cfg: Any, feature_layers: tuple[int, ...], draft_ids: torch.Tensor) -> None:
        super().__init__()
        E = target_cfg.hidden_size
        self.feature_layers = tuple(feature_layers)
        self.fuse = nn.Linear(len(feature_layers) * E, E, bias=False)
        # the target's middle layers carry a few very large dimensions: both inputs of fc are normalised first
        self.u_norm = nn.RMSNorm(E, eps=target_cfg.rms_norm_eps)
        self.e_norm = nn.RMSNorm(E, eps=target_cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * E, E, bias=False)
        cfg = dataclasses.replace(target_cfg, num_hidden_layers=1, vocab_size=len(draft_ids), tie_word_embeddings=True,
                                  sliding_window=None)
        self.inner = LlamaModel(cfg)  # its tied embedding # [N, E] is the frozen draft-vocabulary output layer
        self.register_buffer("draft_ids", draft_ids.long(), persistent=False)

    def attach(self, target: LlamaModel) -> None:
        """Take the frozen output layer from the target's output rows of the draft vocabulary (its tied embedding on
        SmolLM2, ``lm_head`` on untied models)."""
        with torch.no_grad():
            self.inner.embed_tokens.weight.copy_(target.lm_head.weight[self.draft_ids].float())
        self.inner.embed_tokens.weight.requires_grad_(False)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fused(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The target's states at ``feature_layers``, each # [..., E] -> # [..., E]."""
        return self.fuse(torch.cat(features, dim=-1))

    def inputs(self, u: torch.Tensor, next_embed: torch.Tensor) -> torch.Tensor:
        """u # [..., E] (fused target state or the head's own output) and the next token's embedding -> z."""
        return self.fc(torch.cat([self.u_norm(u), self.e_norm(next_embed)], dim=-1))

    def scores(self, g: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits # [..., N] from the layer's output g # [..., E]."""
        return self.inner.logits(g)

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k != "inner.embed_tokens.weight"
                and k != "inner.lm_head.weight" and not k.startswith("inner.inv_freq")}

    # --- training-time test ---------------------------------------------------------------------------------------
    def ttt_outputs(self, z1: torch.Tensor, next_embed: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """The layer's outputs g_s # [T, E] for s = 1..steps over one sequence, step s > 1 fed with g_{s-1} shifted
        by one position (see the module docstring for the attention pattern)."""
        T = z1.shape[0]
        block = self.inner.layers[0]
        cos, sin = self._rope(T, z1.device)
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        outs, z = [], z1
        for s in range(1, steps + 1):
            x = block.attn_norm(z)[None]  # [1, T, E]
            q, k, v = _qkv(block.attn, x, cos, sin)
            keys.append((k, v))
            K = torch.cat([k for k, _ in keys], dim=2)  # [1, Hkv, s*T, D]
            V = torch.cat([v for _, v in keys], dim=2)
            mask = _ttt_mask(T, s, z.device)  # [T, s*T]
            att = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)  # [1, H, T, D]
            h = z + block.attn.wo(att.transpose(1, 2).reshape(T, -1))
            g = h + block.mlp(block.mlp_norm(h))
            outs.append(g)
            if s < steps:
                prev = torch.cat([torch.zeros_like(g[:1]), g[:-1]])  # g_s[t - 1] feeds position t
                z = self.inputs(prev, next_embed)
        return outs

    def _rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_tables(self.inner.inv_freq.float().cpu(), T)
        return cos[:T].to(device)[None, :, None], sin[:T].to(device)[None, :, None]  # [1, T, 1, D]


def _qkv(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q # [1, H, T, D], k, v # [1, Hkv, T, D] of the head's attention, rotated."""
    B, T, _ = x.shape
    qkv = attn.wqkv(x).view(B, T, attn.n_heads + 2 * attn.n_kv, attn.head_dim)
    qk = apply_rope(qkv[:, :, : attn.n_heads + attn.n_kv], cos, sin)
    q, k = qk.split([attn.n_heads, attn.n_kv], dim=2)
    v = qkv[:, :, attn.n_heads + attn.n_kv :]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _ttt_mask(T: int, s: int, device: torch.device) -> torch.Tensor:
    """# [T, s*T] bool: query t of step s sees step-1 keys j <= t - s + 1 and step r's key at t - s + r."""
    t = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    parts = [j <= t - s + 1] + [j == t - s + r for r in range(2, s + 1)]
    mask = torch.cat(parts, dim=1)
    mask[:, 0] |= ~mask.any(dim=1)  # positions with no visible key (t < s - 1, never trained on) see key 0
    return mask


# --- training ---------------------------------------------------------------------------------------------------------
def ttt_loss(
    head: DraftHead, target: LlamaModel, seq: Sequence, steps: int, vmap: torch.Tensor, prompts: bool = False,
    soft: bool = False, last_layer: int = 0, feature: float = 0.0,
) -> list[torch.Tensor]:
    """Per step, the mean cross-entropy of the head's draft-vocabulary scores against the target's labels on the
    answer positions, and on the prompt's too when ``prompts`` (labels outside the draft vocabulary are skipped).
    ``soft``: against the target's whole next-token distribution over the draft vocabulary instead of its top-1
    (knowledge distillation: KL to the target up to its entropy), from the recorded ``last_layer`` states.
    ``feature`` > 0 adds that weight of EAGLE's feature regression: the smooth-L1 distance of the head's layer output
    from the target's last-layer state at t + 1, each dimension in units of that state's RMS."""
    T = len(seq.tokens)
    feats = [seq.hidden[layer][: T - 1].float() for layer in head.feature_layers]
    with torch.no_grad():
        emb = target.embed_tokens(seq.tokens[1:]).float()  # [T-1, E]: token t + 1 for position t
        h_next = seq.hidden[last_layer][1:].float() if soft or feature else None  # [T-1, E]
        if soft:  # [T-1, N]: the target's distribution after token t + 1, renormalised over the draft vocabulary
            want = F.softmax(F.linear(target.norm(h_next.to(target.dtype)).float(), head.inner.embed_tokens.weight),
                             dim=-1)
    z1 = head.inputs(head.fused(feats), emb)
    outs = head.ttt_outputs(z1, emb, steps)
    if not soft:
        want = vmap[seq.labels[1:]]  # [T-1]: y[t + 1] in draft-vocabulary indices
    # positions predicting answer tokens, or all new ones: a sampled answer's prompt positions repeat the greedy's
    first = max(0, (seq.loss_start if prompts else seq.answer_start) - 2)
    losses = []
    for s, g in enumerate(outs, 1):
        lo = max(first, s - 1)
        if lo >= T - 1:
            losses.append(g.sum() * 0)
            continue
        scores = head.scores(g[lo:])
        loss = F.cross_entropy(scores, want[lo:]) if soft else F.cross_entropy(scores, want[lo:], ignore_index=-100)
        if feature:
            ref = h_next[lo:]
            gap = (g[lo:] - ref) / ref.pow(2).mean(-1, keepdim=True).sqrt()
            loss = loss + feature * F.smooth_l1_loss(gap, torch.zeros_like(gap))
        losses.append(loss)
    return losses


def evaluate(head: DraftHead, target: LlamaModel, seqs: list[Sequence], steps: int, vmap: torch.Tensor) -> dict:
    """Top-1 accuracy per draft depth on answer positions: the share where the head's top draft-vocabulary token is
    the target's greedy choice (a label outside the draft vocabulary counts as a miss)."""
    hits, total = [0] * steps, [0] * steps
    with torch.no_grad():
        for seq in seqs:
            T = len(seq.tokens)
            feats = [seq.hidden[layer][: T - 1].float() for layer in head.feature_layers]
            emb = target.embed_tokens(seq.tokens[1:]).float()
            outs = head.ttt_outputs(head.inputs(head.fused(feats), emb), emb, steps)
            want = vmap[seq.labels[1:]]
            for s, g in enumerate(outs):
                lo = max(max(0, seq.answer_start - 2), s)
                if lo >= T - 1:
                    continue
                pred = head.scores(g[lo:]).argmax(-1)
                hits[s] += int((pred == want[lo:]).sum())
                total[s] += T - 1 - lo
    return {"top1_by_depth": [h / t if t else 0.0 for h, t in zip(hits, total)], "positions": total}


def _pooled(evaluations: list[dict]) -> dict:
    """One ``evaluate`` result over the union of the sequences several were computed on."""
    total = [sum(e["positions"][s] for e in evaluations) for s in range(len(evaluations[0]["positions"]))]
    hits = [sum(e["top1_by_depth"][s] * e["positions"][s] for e in evaluations) for s in range(len(total))]
    return {"top1_by_depth": [h / t if t else 0.0 for h, t in zip(hits, total)], "positions": total}


def train_head(
    loaded: Any, data_dir: Any, out: Any, vocab: int = 8192, steps: int = 3, cfg: TrainConfig | None = None,
    max_len: int = 1024, progress: bool = True, prompts: bool = True, soft: bool = True, feature: float = 0.1,
) -> dict[str, Any]:
    """Train a draft head on ``data_dir`` and save it to ``out``; returns the recipe (with the held-back eval).
    ``prompts``: also train on prompt positions (the target's labels there are as valid as on its answers; the
    inputs are human text instead of the model's own, which is the data EAGLE itself trained on). ``soft``: train
    toward the target's distribution over the draft vocabulary, not only its top-1; ``feature``: the weight of the
    feature regression (``ttt_loss``; on the make-heads data each raised held-back top-1, docs/distill.md)."""
    import time
    from pathlib import Path

    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    target = loaded.model
    manifest, seqs = read_data(Path(data_dir), max_len)
    layers = sorted(manifest["recipe"]["layers"])
    last, feature_layers = layers[-1], feature_choice(layers, target.config.num_hidden_layers)
    if last != target.config.num_hidden_layers or not feature_layers:
        raise ValueError(f"the data must record the last layer and at least one other, got layers {layers}")
    add_labels(target, seqs, last)
    train, held = split(seqs)
    draft_ids = draft_vocabulary(train, vocab, target.config.vocab_size)
    vmap = vocab_map(draft_ids, target.config.vocab_size)
    head = DraftHead(target.config, feature_layers, draft_ids)
    _init_from_target(head, target)
    head.attach(target)
    start = time.perf_counter()

    def loss_of(seq: Sequence) -> torch.Tensor:
        losses = ttt_loss(head, target, seq, steps, vmap, prompts, soft, last, feature)
        return sum(w * l for w, l in zip(_step_weights(steps), losses))

    curve = train_loop(head.trainable(), loss_of, train, cfg, progress, desc="train head")
    minutes = (time.perf_counter() - start) / 60
    out = Path(out)
    kinds = sorted({source_kind(s.source) for s in held})  # the held-back mix depends on --tokens: say it per kind
    by_kind = {kind: evaluate(head, target, [s for s in held if source_kind(s.source) == kind], steps, vmap)
               for kind in kinds}
    evaluation = _pooled(list(by_kind.values()))
    coverage = vocab_coverage(train, draft_ids)
    recipe = {"kind": KIND, "data": str(Path(data_dir).resolve()), "data_recipe": manifest["recipe"],
              "model": loaded.name, "feature_layers": list(feature_layers), "vocab": len(draft_ids), "ttt_steps": steps,
              "prompt_positions": prompts, "target": "soft" if soft else "hard",
              "feature_weight": feature,
              "train": dataclasses.asdict(cfg), "max_len": max_len, "sequences": len(train),
              "heldback_sequences": len(held), "train_minutes": round(minutes, 2), "vocab_coverage": coverage,
              "heldback": evaluation, "heldback_by_kind": by_kind, "final_loss": curve[-1][1] if curve else math.nan}
    recipe = save_artifact(out, {**head.state_dict_to_save(), "draft_ids": draft_ids}, recipe)
    plot_curve(curve, out / "loss.png", f"draft head: {len(train)} sequences, {steps} TTT steps")
    return recipe


def feature_choice(recorded: list[int], n_layers: int) -> tuple[int, ...]:
    """The layers the head fuses: the data's default low, middle and high layer when recorded (data made for exit
    adapters records more), else the last three recorded below the last."""
    from ponder.distill.data import default_layers

    low_mid_high = tuple(x for x in default_layers(n_layers) if x != n_layers)
    if set(low_mid_high) <= set(recorded):
        return low_mid_high
    return tuple(x for x in recorded if x != n_layers)[-3:]


def _step_weights(steps: int) -> list[float]:
    return [0.8 ** s for s in range(steps)]  # later steps count a little less, as in EAGLE-3's decayed weights


def _init_from_target(head: DraftHead, target: LlamaModel) -> None:
    """Start the layer from the target's last decoder layer and its final norm (a warm start that keeps the
    output scale the frozen output layer expects); fuse/fc start near 'take the last fused state'."""
    with torch.no_grad():
        head.inner.layers[0].load_state_dict(target.layers[-1].state_dict())
        head.inner.norm.load_state_dict(target.norm.state_dict())


def load_head(path: Any, target: LlamaModel) -> tuple[DraftHead, dict[str, Any]]:
    """A trained head from its artifact directory, attached to ``target`` (which must be the model it was trained
    for: same hidden size and vocabulary)."""
    from pathlib import Path

    from ponder.distill.train import load_artifact
    from ponder.errors import PonderError

    tensors, recipe = load_artifact(Path(path), KIND)
    draft_ids = tensors.pop("draft_ids")
    if int(draft_ids.max()) >= target.config.vocab_size or tensors["fc.weight"].shape[0] != target.config.hidden_size:
        raise PonderError(f"the head in {path} was trained for another model ({recipe.get('model')})")
    head = DraftHead(target.config, tuple(recipe["feature_layers"]), draft_ids)
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if k not in ("inner.embed_tokens.weight", "inner.lm_head.weight")]:
        raise PonderError(f"the head in {path} does not match this version of ponder: retrain it")
    head.attach(target)
    return head.to(target.device).eval(), recipe
