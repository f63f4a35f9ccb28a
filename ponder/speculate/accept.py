"""Acceptance: which draft nodes the target agrees with. A pure function of a tree and the target's choices.

Verify-input index 0 is the root (the pending token), index i + 1 is node i; ``targets[j]`` is the token plain
decoding emits after input j: the argmax when greedy; when sampling, the Gumbel-max token
``argmax(log-weights + noise)`` with the noise of the output position it would take (``ponder.sampling``). The walk
follows, from the root, the child whose token equals the target's choice; the choice after the last accepted node is
the bonus token. The committed tokens are then exactly what plain decoding would produce, in both modes, for any
tree: a position's noise is fixed by (seed, row, position), so whether a draft is accepted does not depend on the
tree's shape or on anything else the step did.

Why this is exact under sampling: with i.i.d. standard Gumbel noise per position, ``argmax(log w + g)`` is an exact
draw from ``w`` (the Gumbel-max trick), so plain decoding samples each token from the model's warped distribution;
speculation commits the same tokens, hence the same distribution. Compared with speculative sampling's rejection
rule (Leviathan et al., arXiv 2211.17192; recursive rejection over several candidates, arXiv 2402.14160), it accepts
a point-mass draft with the same probability ``w(x)`` (the chance that x wins the Gumbel argmax), so drafts pay off
as before, and it also makes seeded outputs reproducible token for token.
"""

from __future__ import annotations

from ponder.speculate.tree import DraftTree


def accept(tree: DraftTree, targets: list[int]) -> tuple[list[int], int]:
    """(accepted node indices root-first, bonus token) given the target's choice after each verify input."""
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
