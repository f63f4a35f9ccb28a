"""Lookahead-style n-gram pool drafting (after Lookahead decoding, arXiv 2312.12728).

Lookahead decoding keeps a pool of n-grams keyed by their first token and verifies several pool entries that start
with the current token at once, as branches of one tree. Its pool is filled by a Jacobi "lookahead branch" that runs
inside the verify forward. Here the pool is filled from two free sources instead:

- every n-gram of the row's prompt and output (as prompt lookup would find them, but all of them, counted);
- the target's own guesses: after each verify forward, each input's argmax continues that input's branch,
  giving an n-gram the model itself predicts (``guesses=true``), including on rejected branches.

A pool entry is a continuation of up to ``n - 1`` tokens keyed by the ``key`` tokens before it (2, falling back to
1); proposals are the ``branches`` entries seen most often for the current key, merged into one tree. This skips
Lookahead's Jacobi branch: on CPU every extra token in the verify forward costs real time (see ``policy.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ponder.speculate.base import DraftBatch, Drafter, Proposal, RowResult
from ponder.speculate.tree import DraftTree, merge


@dataclass(frozen=True)
class LookaheadOptions:
    n: int = 6  # n-gram size: key + continuation
    branches: int = 3
    guesses: bool = True

    def __post_init__(self) -> None:
        if self.n < 3 or self.branches < 1:
            raise ValueError(f"lookahead needs n >= 3 and branches >= 1, got n={self.n}, branches={self.branches}")


@dataclass
class Pool:
    seen: int = 0  # history tokens already added
    entries: dict[tuple[int, ...], Counter] = field(default_factory=dict)  # key -> continuation -> count

    def add(self, key: tuple[int, ...], cont: tuple[int, ...]) -> None:
        if cont:
            self.entries.setdefault(key, Counter())[cont] += 1


class Lookahead(Drafter):
    name = "lookahead"
    cheap = True

    def __init__(self, options: LookaheadOptions | None = None) -> None:
        self.options = options or LookaheadOptions()

    def new_state(self, prompt_ids: list[int]) -> Pool:
        return Pool()

    def _index(self, pool: Pool, tokens: list[int]) -> None:
        """Add the n-grams that end in history tokens not added yet (continuations of n - 1 - k tokens)."""
        n = self.options.n
        for end in range(max(pool.seen, 1), len(tokens)):
            for k in (1, 2):
                start = end - n + 1
                if start >= 0:
                    pool.add(tuple(tokens[start : start + k]), tuple(tokens[start + k : end + 1]))
        pool.seen = len(tokens)

    def propose(self, batch: DraftBatch) -> Proposal:
        return Proposal([self._draft(r.state, r.tokens, r.budget) for r in batch.rows])

    def _draft(self, pool: Pool, tokens: list[int], budget: int) -> DraftTree:
        self._index(pool, tokens)
        for k in (2, 1):
            found = pool.entries.get(tuple(tokens[-k:]))
            if found:
                best = found.most_common(self.options.branches)
                total = sum(found.values())
                chains = [DraftTree.chain(list(c[:budget]), [min(1.0, cnt / total + 0.2 * k)] * min(len(c), budget),
                                          self.name) for c, cnt in best]
                return merge(chains)
        return DraftTree()

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        if not self.options.guesses:
            return
        keep = self.options.n - 1
        for row, res in zip(batch.rows, results):
            guess = res.logits.argmax(-1).tolist()  # [T]: the target's next token after each verify input
            inputs = [row.tokens[-1]] + res.tree.tokens
            parents = [-2] + [p + 1 for p in res.tree.parents]  # verify-input indexing; -2: before the root
            for j in range(len(inputs)):
                seq, a = [guess[j]], j  # walk up from input j: its branch, then the row's history
                while a >= 0 and len(seq) < keep + 1:
                    seq.append(inputs[a])
                    a = parents[a]
                seq.extend(reversed(row.tokens[-1 - (keep + 1 - len(seq)) : -1]) if len(seq) < keep + 1 else [])
                seq.reverse()
                if len(seq) > 2:
                    row.state.add((seq[0],), tuple(seq[1:]))
                    row.state.add(tuple(seq[:2]), tuple(seq[2:]))
