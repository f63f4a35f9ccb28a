"""Acceptance rules: which draft nodes the target agrees with. Pure functions of a tree and the target's output.

Both rules walk the tree from the root. Verify-input index 0 is the root (pending token), index i + 1 is node i;
``targets``/``probs`` are indexed the same way, so row j holds the target's prediction *after* input j.

- **greedy**: follow the child whose token equals the target's argmax; the argmax after the last accepted node is
  the bonus token. The committed tokens are exactly what greedy decoding without drafts would produce.
- **sampling**: speculative sampling (Leviathan et al., arXiv 2211.17192) generalised to several candidates per
  node as recursive rejection sampling without replacement (RSD, arXiv 2402.14160). Our drafters propose
  deterministic candidates (a point mass ``q = delta(x)``), so at a node with target distribution ``p`` the
  candidate ``x`` is accepted with probability ``min(1, p(x) / q(x)) = p(x)``; on rejection the residual
  ``norm(max(p - q, 0))`` is ``p`` with ``x`` removed, and the next sibling is tried against it. When every
  sibling is rejected, the bonus token is sampled from the last residual. Summed over the branches, each emitted
  token has exactly probability ``p``: ``p(x1) + (1 - p(x1)) * p(x2) / (1 - p(x1)) + ...``.
"""

from __future__ import annotations

import torch

from ponder.speculate.tree import DraftTree


def accept_greedy(tree: DraftTree, targets: list[int]) -> tuple[list[int], int]:
    """(accepted node indices root-first, bonus token) given the target's argmax per verify input."""
    children = tree.children()
    path: list[int] = []
    node = -1
    while True:
        want = targets[node + 1]
        nxt = next((c for c in children[node + 1] if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def accept_sampling(
    tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """(accepted node indices, bonus token) by recursive rejection sampling; probs # [T, V] are the target's
    sampling distributions (after temperature / top-k / top-p) per verify input."""
    children = tree.children()
    path: list[int] = []
    node = -1
    while True:
        p = probs[node + 1].double()  # residuals are renormalised repeatedly: keep them in float64
        nxt = None
        for c in children[node + 1]:
            x = tree.tokens[c]
            u = torch.rand((), generator=generator, dtype=torch.float64)
            if u * p.sum() < p[x]:
                nxt = c
                break
            p = p.clone()
            p[x] = 0.0
        if nxt is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(nxt)
        node = nxt


def first_token_distribution(p: torch.Tensor, candidates: list[int]) -> torch.Tensor:
    """Exact distribution # [V] of the first token the sampling rule emits at a node with target distribution
    p # [V] and the given candidate children (ignoring what happens below them). Used by the tests to check, in
    closed form, that the rule reproduces p."""
    p = p.double()
    out = torch.zeros_like(p)
    residual = p.clone()
    reach = 1.0  # probability that every earlier candidate was rejected
    for x in candidates:
        total = float(residual.sum())
        if total <= 0:
            return out
        take = float(residual[x]) / total
        out[x] += reach * take
        reach *= 1 - take
        residual[x] = 0.0
    total = float(residual.sum())
    if total > 0:
        out += reach * residual / total
    return out
