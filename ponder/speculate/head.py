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

    def __post_init__(self) -> None:
        if self.depth < 1 or self.k < 1 or not 0 <= self.stop < 1:
            raise ValueError(f"head needs depth >= 1, k >= 1 and stop in [0, 1), got depth={self.depth}, "
                             f"k={self.k}, stop={self.stop}")


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
        trees = []
        with torch.inference_mode():
            for row in batch.rows:
                self._feed(row.state, row.tokens)
                trees.append(self._tree(row.state, row.budget) if row.budget > 0 else DraftTree([], []))
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

    def _tree(self, state: HeadRow, budget: int) -> DraftTree:
        """EAGLE-2's dynamic tree: expand the k most probable nodes per level into their k best children.

        Each level scores all its expanded nodes in one matrix product over the draft vocabulary. A node's tree
        score is the head's probability of its token given its parent (``DraftTree.path_probs`` multiplies them
        into the cumulative probability that ranks nodes). Expansion stops early when no frontier node's
        cumulative probability reaches ``stop``: deeper nodes would not be verified anyway."""
        k, head = self.options.k, self.head
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []  # the head's probability of each node's token given its parent
        cum: list[float] = []  # cumulative log-probability of each node's path
        expanded = {-1: state.last}  # node -> its head output # [E] (-1: the root)
        frontier, outs = [-1], state.last[None]  # this level's expanded nodes and their outputs # [F, E]
        for level in range(self.options.depth):
            logp = torch.log_softmax(head.scores(outs).float(), -1)  # [F, N]
            top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            values, indices = top.values.tolist(), head.draft_ids[top.indices].tolist()
            new = []
            for node, lps, ids in zip(frontier, values, indices):
                base = 0.0 if node < 0 else cum[node]
                for lp, tok in zip(lps, ids):
                    tokens.append(tok)
                    parents.append(node)
                    probs.append(math.exp(lp))
                    cum.append(base + lp)
                    new.append(len(tokens) - 1)
            if level + 1 == self.options.depth:
                break
            frontier = sorted(new, key=lambda i: -cum[i])[:k]
            if math.exp(cum[frontier[0]]) < self.options.stop:
                break
            outs = self._expand(state, tokens, parents, frontier, expanded)
            expanded.update(zip(frontier, outs))
        return DraftTree(tokens, parents, probs).best(budget)

    def _expand(
        self, state: HeadRow, tokens: list[int], parents: list[int], frontier: list[int],
        outs: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """Head outputs of the frontier nodes, from one forward over them and their ancestors above the fed prefix
        (the ancestors are recomputed: one small layer over a few dozen tokens costs about what one token does).
        A node at draft depth d sits at position fed - 1 + d, takes (its parent's output, its own token) and
        attends to the fed prefix, its ancestors and itself."""
        keep = _with_ancestors(frontier, parents)
        index = {n: i for i, n in enumerate(keep)}
        T = len(keep)
        visible = torch.eye(T, dtype=torch.bool)
        for i, n in enumerate(keep):  # ancestors come first in `keep`, so their rows are complete
            if parents[n] >= 0:
                visible[i] |= visible[index[parents[n]]]
        depth = torch.tensor([[_depth(n, parents) - 1 for n in keep]])
        u = torch.stack([outs[parents[n]] for n in keep])  # [T, E]
        z = self.head.inputs(u, self._embed(torch.tensor([tokens[n] for n in keep])))[None]
        ctx = self.head.inner.tree_context(state.cache, depth, visible[None])
        g = self.head.inner.run_layers(z, ctx, state.cache)[0]
        return g[[index[n] for n in frontier]]  # [len(frontier), E]

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        """Queue the target states of the committed verify inputs (the pending token and the accepted nodes)."""
        for row, res in zip(batch.rows, results):
            if res.hidden:
                inputs = torch.tensor([0] + [i + 1 for i in res.path])
                row.state.pending.append(self._fuse(res.hidden, inputs))

    def report(self) -> dict[str, Any]:
        return {"heldback_top1_by_depth": self.recipe.get("heldback", {}).get("top1_by_depth")}


def _quantize_head(head: Any) -> None:
    """With an int8 or q4 target, the head drafts through int8 weights too (bf16 activations, as the target's
    projections): its fp32 layer and 8192-row output cost a quarter of a q4 run's time when drafting (docs/distill.md).
    Drafts only propose tokens, so this changes which drafts are offered, never the output (lossless either way)."""
    from ponder.model.quant import int8_linears

    int8_linears(head, skip_unsupported=True)


def _depth(node: int, parents: list[int]) -> int:
    d = 0
    while node >= 0:
        node, d = parents[node], d + 1
    return d


def _with_ancestors(nodes: list[int], parents: list[int]) -> list[int]:
    """The nodes and all their ancestors, each after its parent (ascending index works: parents come first)."""
    out: set[int] = set()
    for n in nodes:
        while n >= 0 and n not in out:
            out.add(n)
            n = parents[n]
    return sorted(out)
