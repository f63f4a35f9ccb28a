"""Drafting with trained Medusa-1 heads (arXiv 2401.10774).

The heads (``ponder.distill.medusa``, trained by ``ponder distill train medusa``) read the target's last-layer
state at the last committed position t whose state exists: the target's own head on it gave the pending token
(t + 1), and Medusa head k guesses the token at t + 1 + k, i.e. draft depth k. That state costs no extra target
compute: for the prompt it comes from the prefill (``Drafter.prefill_capture``), later from the verify forward
(``Proposal.capture``): the last accepted node's, or the pending token's when nothing was accepted.

The tree is Medusa's cartesian product of each head's ``k`` best tokens, pruned to the nodes with the highest
product of head probabilities (best-first: a node's children are only considered once it is in the tree, and a
child's product never exceeds its parent's, so the first ``budget`` nodes taken are the best ``budget``). A node's
score is its head's probability of its token, so ``DraftTree.path_probs`` is that product; the policy calibrates
and cuts by it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from ponder.speculate.base import DraftBatch, Drafter, Proposal, RowResult
from ponder.speculate.tree import DraftTree


@dataclass(frozen=True)
class MedusaOptions:
    path: str = ""  # the heads' artifact directory ("" = the default for the loaded model)
    heads: int = 0  # heads to draft with, i.e. the tree's depth (0 = every trained head)
    k: int = 5  # candidates per head: the most children a node may have

    def __post_init__(self) -> None:
        if self.heads < 0 or self.k < 1:
            raise ValueError(f"medusa needs heads >= 0 and k >= 1, got heads={self.heads}, k={self.k}")


@dataclass
class MedusaRow:
    last: torch.Tensor | None = None  # [E]: last-layer state of the last committed position that has one


class MedusaDrafter(Drafter):
    name = "medusa"

    def __init__(self, options: MedusaOptions, heads: Any, recipe: dict[str, Any], layer: int) -> None:
        self.options = options
        self.heads = heads
        self.recipe = recipe
        self.layer = layer  # the target's layer count: capturing it gives the last layer's output
        self.depth = options.heads or heads.n_heads
        self.prefill_capture = (layer,)
        self.capture = (layer,)

    @classmethod
    def build(cls, options: MedusaOptions, loaded: Any) -> "MedusaDrafter":
        from pathlib import Path

        from ponder.distill.medusa import KIND, load_medusa
        from ponder.distill.train import trained_artifact
        from ponder.errors import PonderError

        path = Path(options.path).expanduser() if options.path else trained_artifact(loaded, KIND)
        heads, recipe = load_medusa(path, loaded.model)
        if options.heads > heads.n_heads:
            raise PonderError(f"medusa:heads={options.heads}, but {path} holds {heads.n_heads} trained heads")
        dtype = loaded.model.dtype if loaded.model.dtype in (torch.float32, torch.float16) else torch.float32
        return cls(options, heads.to(dtype), recipe, loaded.model.config.num_hidden_layers)

    def new_state(self, prompt_ids: list[int]) -> MedusaRow:
        return MedusaRow()

    def prefilled(self, state: MedusaRow, hidden: dict[int, torch.Tensor]) -> None:
        """The prompt's last-layer states # [P, E]: the last one's own prediction is the pending token."""
        state.last = hidden[self.layer][-1]

    def propose(self, batch: DraftBatch) -> Proposal:
        ready = [b for b, r in enumerate(batch.rows) if r.budget > 0 and r.state.last is not None]
        trees = [DraftTree() for _ in batch.rows]
        if ready:
            with torch.inference_mode():
                dtype = self.heads.out.dtype
                h = torch.stack([batch.rows[b].state.last.to(dtype) for b in ready])  # [R, E]
                probs = torch.softmax(self.heads.scores(h, self.depth).float(), -1)  # [R, K, N]
                top = torch.topk(probs, min(self.options.k, probs.shape[-1]), dim=-1)
                ids = self.heads.draft_ids[top.indices].tolist()  # [R, K, k] full-vocabulary ids
                for i, b in enumerate(ready):
                    trees[b] = product_tree(top.values[i].tolist(), ids[i], batch.rows[b].budget, self.name)
        return Proposal(trees, capture=self.capture)

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        """Keep the state of the last committed verify input (the last accepted node, else the pending token)."""
        for row, res in zip(batch.rows, results):
            if self.layer in res.hidden:
                row.state.last = res.hidden[self.layer][res.path[-1] + 1 if res.path else 0]

    def report(self) -> dict[str, Any]:
        return {"heldback_top1_by_head": self.recipe.get("heldback", {}).get("top1_by_head")}


def product_tree(probs: list[list[float]], tokens: list[list[int]], budget: int, source: str = "") -> DraftTree:
    """The ``budget`` nodes of the cartesian product of per-depth candidates with the highest products.

    probs[d][j], tokens[d][j]: head d + 1's j-th candidate (best first). A node at depth d + 1 is a path
    (j_1, ..., j_{d+1}); its score is probs[d][j_{d+1}], its path probability the product along the path."""
    tree = DraftTree()
    tie = itertools.count()
    heap = [(-p, next(tie), -1, 0, j) for j, p in enumerate(probs[0])]  # (-path prob, tie, parent, depth, j)
    heapq.heapify(heap)
    while heap and len(tree) < budget:
        neg, _, parent, d, j = heapq.heappop(heap)
        node = tree.add(tokens[d][j], parent, probs[d][j], source)
        if d + 1 < len(probs):
            for c, p in enumerate(probs[d + 1]):
                heapq.heappush(heap, (neg * p, next(tie), node, d + 1, c))
    return tree
