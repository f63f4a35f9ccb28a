"""Drafting with a trained EAGLE-style head (EAGLE 2401.15077, EAGLE-2 2406.16858, EAGLE-3 2503.01840).

The head (``ponder.distill.head``, trained by ``ponder distill train head``) runs one decoder layer over the
target's fused hidden states. Those states cost no extra target compute: the prompt's come from the prefill and
every later position's from the verify forward that checked it (``Proposal.capture``), for the tokens it
committed. So after a verify step the head first takes in the newly committed positions, then grows a dynamic
tree (EAGLE-2): from the root it scores the draft vocabulary, and at every level expands the ``k`` nodes with the
highest cumulative probability (the product of the head's probabilities along the path) into their ``k`` best
children, for ``depth`` levels. A node's score is its cumulative probability, which the policy calibrates and cuts
by. Beyond depth 1 the head has no target states for the drafted tokens and feeds its own outputs instead, as it was
trained to (training-time test).

Glossary: **fed** positions are those whose target states the head has taken into its own KV cache (its
committed prefix); tree nodes are computed above them and never committed, so nothing needs rolling back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any

import torch

from ponder.cache import KVCache
from ponder.speculate.base import DraftBatch, Drafter, Proposal, RowResult
from ponder.speculate.tree import DraftTree


@dataclass(frozen=True)
class HeadOptions:
    path: str = ""  # the head's artifact directory ("" = the default for the loaded model)
    depth: int = 5  # tree levels
    k: int = 8  # nodes expanded per level, and children per expanded node
    stop: float = 0.02  # stop expanding when no frontier path is this likely (the policy drops such nodes)
    vocab: int = 0  # score only the head's first (most frequent) N draft tokens (0: its whole draft vocabulary)

    def __post_init__(self) -> None:
        if self.depth < 1 or self.k < 1 or not 0 <= self.stop < 1:
            raise ValueError(f"head needs depth >= 1, k >= 1 and stop in [0, 1), got depth={self.depth}, "
                             f"k={self.k}, stop={self.stop}")
        if self.vocab < 0 or 0 < self.vocab < self.k:
            raise ValueError(f"head vocab must be 0 (all) or >= k ({self.k}), got {self.vocab}")


@dataclass
class HeadRow:
    """One row's head state: its KV cache (the fed positions), the fused target states of committed positions not
    fed yet, and the head's output at the last fed position (which predicts the first draft token)."""

    cache: KVCache
    pending: list[torch.Tensor] = field(default_factory=list)  # each # [n, E]: fused target states, in order
    last: torch.Tensor | None = None  # [E]


class HeadDrafter(Drafter):
    name = "head"

    def __init__(self, options: HeadOptions, target: Any, head: Any, recipe: dict[str, Any]) -> None:
        self.options = options
        self.target = target  # the target LlamaModel: its token embedding feeds the head
        self.head = head
        self.recipe = recipe
        self.prefill_capture = tuple(head.feature_layers)
        self.capture = tuple(head.feature_layers)

    @classmethod
    def build(cls, options: HeadOptions, loaded: Any) -> "HeadDrafter":
        from pathlib import Path

        from ponder.distill.head import KIND, load_head
        from ponder.distill.train import trained_artifact

        path = Path(options.path).expanduser() if options.path else trained_artifact(loaded, KIND)
        head, recipe = load_head(path, loaded.model)
        if 0 < options.vocab < len(head.draft_ids):
            _shrink_vocabulary(head, options.vocab)
        head = head.to(loaded.model.dtype if loaded.model.dtype in (torch.float32, torch.float16) else torch.float32)
        if loaded.dtype in ("int8", "q4"):
            _quantize_head(head)
        else:
            from ponder.model.kernels import tune
            from ponder.model.loader import cache_root

            # the head's layer and its 8k-row output go through the machine's fastest fp32 kernel per row count,
            # as the target's do (a tree level scores up to k rows at once: MKL's slow small-M path otherwise)
            tune(head.inner, cache_root() / "kernels")
        return cls(options, loaded.model, head, recipe)

    def new_state(self, prompt_ids: list[int]) -> HeadRow:
        return HeadRow(self.head.inner.new_cache(1, len(prompt_ids) + 64))

    def prefilled(self, state: HeadRow, hidden: dict[int, torch.Tensor]) -> None:
        """The prompt's target states, layer -> # [T, E], from the prefill (``prefill_capture``)."""
        state.pending.append(self._fuse(hidden, slice(None)))

    def _fuse(self, hidden: dict[int, torch.Tensor], rows: Any) -> torch.Tensor:
        with torch.inference_mode():
            feats = [hidden[layer][rows].to(self._dtype) for layer in self.head.feature_layers]
            return self.head.fused(feats)

    @property
    def _dtype(self) -> torch.dtype:
        return self.head.u_norm.weight.dtype  # (its linears may be int8: _quantize_head)

    # --- drafting ---------------------------------------------------------------------------------------------------
    def propose(self, batch: DraftBatch) -> Proposal:
        with torch.inference_mode():
            drafting = [row for row in batch.rows if row.budget > 0]
            for row in drafting:  # a row that does not draft this step keeps its states pending: fed in one pass
                self._feed(row.state, row.tokens)  # when it drafts next (the gate's off steps cost no head layer)
            grown = iter(self._trees([row.state for row in drafting]))
            trees = [next(grown).best(row.budget) if row.budget > 0 else DraftTree([], []) for row in batch.rows]
        return Proposal(trees, capture=self.capture)

    def _feed(self, state: HeadRow, tokens: list[int]) -> None:
        """Take the pending target states into the head's cache; position t pairs with token t + 1."""
        if not state.pending:
            return
        u = torch.cat(state.pending)  # [n, E]
        state.pending = []
        cache = state.cache
        start = cache.lengths[0]
        nxt = torch.tensor(tokens[start + 1 : start + 1 + len(u)], device=u.device)
        z = self.head.inputs(u, self._embed(nxt))[None]  # [1, n, E]
        cache.ensure(start + len(u) + self.options.depth * self.options.k + 8)
        ctx = self.head.inner.step_context(cache, z.shape[1], [z.shape[1]])
        g = self.head.inner.run_layers(z, ctx, cache)
        cache.advance([z.shape[1]])
        state.last = g[0, -1]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_tokens(ids).to(self._dtype)

    def _trees(self, states: list[HeadRow]) -> list[DraftTree]:
        """EAGLE-2's dynamic tree for every row at once: per level, expand each row's k most probable nodes into
        their k best children.

        Rows grow level by level together, so each level scores every row's expanded nodes in one matrix product
        over the draft vocabulary and runs one layer pass for all rows (the head's weights are read once per level,
        not once per row). A node's tree score is the head's probability of its token given its parent
        (``DraftTree.path_probs`` multiplies them into the cumulative probability that ranks nodes). A row stops
        growing when none of its frontier nodes' cumulative probability reaches ``stop``: deeper nodes would not be
        verified anyway."""
        if not states:
            return []
        k, head = self.options.k, self.head
        grows = [_Growth(outs={-1: state.last}) for state in states]
        cache = states[0].cache if len(states) == 1 else self._tree_cache(states)
        active = list(range(len(states)))
        outs = torch.stack([state.last for state in states])  # the active rows' frontier outputs, in order # [F, E]
        for level in range(self.options.depth):
            logp = torch.log_softmax(head.scores(outs).float(), -1)  # [F, N]
            top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            values, indices = top.values.tolist(), head.draft_ids[top.indices].tolist()
            at, going = 0, []
            for r in active:
                g = grows[r]
                new = []
                for node in g.frontier:
                    base = 0.0 if node < 0 else g.cum[node]
                    for lp, tok in zip(values[at], indices[at]):
                        g.tokens.append(tok)
                        g.parents.append(node)
                        g.probs.append(math.exp(lp))
                        g.cum.append(base + lp)
                        new.append(len(g.tokens) - 1)
                    at += 1
                g.frontier = sorted(new, key=lambda i, g=g: -g.cum[i])[:k]
                if level + 1 < self.options.depth and math.exp(g.cum[g.frontier[0]]) >= self.options.stop:
                    going.append(r)
            if not going:
                break
            active = going
            outs = self._expand(cache, [grows[r] for r in active], active)
        return [DraftTree(g.tokens, g.parents, g.probs) for g in grows]

    def _tree_cache(self, states: list[HeadRow]) -> KVCache:
        """A scratch cache whose row b copies row b's fed prefix (tree nodes are written above it and dropped)."""
        need = max(state.cache.lengths[0] for state in states) + self.options.depth * self.options.k + 8
        cache = self.head.inner.new_cache(len(states), need)
        for b, state in enumerate(states):
            cache.copy_row(b, state.cache)
        return cache

    def _expand(self, cache: KVCache, grows: list["_Growth"], rows: list[int]) -> torch.Tensor:
        """Head outputs of the frontier nodes of ``grows`` (in ``cache`` rows ``rows``), from one forward over the
        frontier nodes alone (EAGLE-2's tree attention): each node's K/V is written to a slot above its row's fed
        prefix and stays there, so a deeper node attends to the fed prefix, its ancestors' kept slots and itself,
        and no ancestor is computed twice. A node at draft depth d sits at position fed - 1 + d and takes (its
        parent's output, its own token). Rows not expanding, and the padding of shorter frontiers, get a token
        seeing only itself, written past every kept slot (those rows grow no further: their slots are free).
        Returns # [sum of frontier sizes, E], row by row in frontier order; each node's output is also kept."""
        B, T = cache.batch, max(len(g.frontier) for g in grows)
        lengths, positions = cache.lengths, cache.positions
        first = list(lengths)  # per cache row: the first slot this forward writes
        for g, r in zip(grows, rows):
            first[r] += g.used
        slots = torch.tensor(first)[:, None] + torch.arange(T)[None, :]  # [B, T]
        pos = torch.tensor(positions)[:, None].repeat(1, T)  # [B, T]
        S = int(slots.max()) + 1
        mask = torch.zeros(B, T, S, dtype=torch.bool)
        mask[torch.arange(B)[:, None], torch.arange(T)[None, :], slots] = True  # every token sees itself
        dev = grows[0].outs[-1].device
        u = torch.zeros(B, T, grows[0].outs[-1].shape[-1], dtype=self._dtype, device=dev)
        ids = torch.zeros(B, T, dtype=torch.long)
        window = self.head.inner.config.sliding_window
        seen_r, seen_i, seen_s = [], [], []  # the kept ancestor slots each node attends to
        for g, r in zip(grows, rows):
            for i, n in enumerate(g.frontier):
                g.slot[n] = g.used + i
                d, a = 0, g.parents[n]
                while a >= 0:
                    seen_r.append(r)
                    seen_i.append(i)
                    seen_s.append(lengths[r] + g.slot[a])
                    a, d = g.parents[a], d + 1
                pos[r, i] += d  # d ancestors below the root: draft depth d + 1
                low = 0 if window is None else max(0, positions[r] + d - window + 1)
                mask[r, i, low : lengths[r]] = True  # the fed prefix (no eviction in the head's cache: slot = position)
            u[r, : len(g.frontier)] = torch.stack([g.outs[g.parents[n]] for n in g.frontier])
            ids[r, : len(g.frontier)] = torch.tensor([g.tokens[n] for n in g.frontier])
            g.used += len(g.frontier)
        if seen_r:
            mask[seen_r, seen_i, seen_s] = True
        z = self.head.inputs(u, self._embed(ids.to(dev)))  # [B, T, E]
        ctx = self.head.inner.slot_context(cache, slots.to(dev), pos.to(dev), mask.to(dev))
        out = self.head.inner.run_layers(z, ctx, cache)  # [B, T, E]
        picked = []
        for g, r in zip(grows, rows):
            sel = out[r, : len(g.frontier)]  # [len(frontier), E]
            g.outs.update(zip(g.frontier, sel))
            picked.append(sel)
        return torch.cat(picked)

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        """Queue the target states of the committed verify inputs (the pending token and the accepted nodes)."""
        for row, res in zip(batch.rows, results):
            if res.hidden:
                inputs = torch.tensor([0] + [i + 1 for i in res.path], device=res.logits.device)
                row.state.pending.append(self._fuse(res.hidden, inputs))

    def report(self) -> dict[str, Any]:
        return {"heldback_top1_by_depth": self.recipe.get("heldback", {}).get("top1_by_depth")}


@dataclass
class _Growth:
    """One row's tree while it grows: nodes (token, parent, the head's probability given the parent, cumulative
    log-probability), the head output and K/V slot of every expanded node (-1: the root, whose output is the fed
    prefix's last) and the nodes to expand next."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    cum: list[float] = field(default_factory=list)
    outs: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> its head output # [E]
    frontier: list[int] = field(default_factory=lambda: [-1])
    slot: dict[int, int] = field(default_factory=dict)  # expanded node -> its K/V's slot above the fed prefix
    used: int = 0  # slots above the fed prefix holding expanded nodes' K/V


def _shrink_vocabulary(head: Any, n: int) -> None:
    """Keep the head's first ``n`` draft tokens (the vocabulary is ranked by how often the target chose each token in
    the training answers, FR-Spec arXiv 2502.14856): every tree level's scoring product reads n rows instead of all.
    The head's probabilities renormalise over the n tokens; drafts only propose, so the output is unchanged."""
    inner = head.inner
    rows = torch.nn.Parameter(inner.embed_tokens.weight[:n].detach().clone(), requires_grad=False)
    inner.embed_tokens.weight = rows
    inner.lm_head.weight = rows
    inner.lm_head.out_features = inner.embed_tokens.num_embeddings = n
    head.draft_ids = head.draft_ids[:n].clone()


def _quantize_head(head: Any) -> None:
    """With an int8 or q4 target, the head drafts through int8 weights too (bf16 activations, as the target's
    projections): its fp32 layer and 8192-row output cost a quarter of a q4 run's time when drafting (docs/distill.md).
    Drafts only propose tokens, so this changes which drafts are offered, never the output (lossless either way)."""
    from ponder.model.quant import int8_linears

    int8_linears(head, skip_unsupported=True)
