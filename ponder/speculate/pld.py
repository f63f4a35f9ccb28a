"""Prompt lookup / copy drafting (PLD; CopySpec, arXiv 2502.08923).

The last few tokens of a row are looked up in everything the row has seen (prompt and generated text); the tokens
that followed earlier occurrences are proposed as drafts. Long matches are tried first (``max_ngram`` down to
``min_ngram``); the ``branches`` most recent distinct continuations of the longest matching n-gram become the
branches of one tree. Costs no model forward: summarisation, RAG and code editing copy long spans from the prompt.

The per-row state is an index from every n-gram to the positions where it ends, extended as tokens are committed,
so a lookup costs O(1) instead of a scan of the history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ponder.speculate.base import DraftBatch, Drafter, Proposal
from ponder.speculate.tree import DraftTree, merge


@dataclass(frozen=True)
class PLDOptions:
    max_ngram: int = 3
    min_ngram: int = 1
    branches: int = 2  # distinct continuations per tree
    length: int = 12  # longest continuation copied

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"pld needs 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")
        if self.branches < 1 or self.length < 1:
            raise ValueError("pld needs branches >= 1 and length >= 1")


@dataclass
class NgramIndex:
    """Positions where each n-gram (n in [min_n, max_n]) ends in ``tokens``."""

    min_n: int
    max_n: int
    tokens: list[int] = field(default_factory=list)
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def extend(self, tokens: list[int]) -> None:
        """Index the part of ``tokens`` (the row's full history) not seen yet."""
        for i in range(len(self.tokens), len(tokens)):
            self.tokens.append(tokens[i])
            for n in range(self.min_n, min(self.max_n, i + 1) + 1):
                self.ends.setdefault(tuple(self.tokens[i - n + 1 : i + 1]), []).append(i)

    def continuations(self, n: int, branches: int, length: int, tail: list[int] | None = None) -> list[list[int]]:
        """Up to ``branches`` distinct continuations of the history's last n tokens (or of ``tail``'s, tokens that
        would follow the history, such as drafts), most recent match first."""
        last = len(self.tokens) - 1
        found: list[list[int]] = []
        for end in reversed(self.ends.get(tuple((self.tokens if tail is None else tail)[-n:]), [])):
            if end == last:
                continue
            cont = self.tokens[end + 1 : end + 1 + length]
            if cont and cont not in found:
                found.append(cont)
                if len(found) == branches:
                    break
        return found


class PLD(Drafter):
    name = "pld"
    cheap = True

    def __init__(self, options: PLDOptions | None = None) -> None:
        self.options = options or PLDOptions()

    def new_state(self, prompt_ids: list[int]) -> NgramIndex:
        return NgramIndex(self.options.min_ngram, self.options.max_ngram)

    def propose(self, batch: DraftBatch) -> Proposal:
        return Proposal([self.draft(r.state, r.tokens, r.budget) for r in batch.rows])

    def draft(self, index: NgramIndex, tokens: list[int], budget: int) -> DraftTree:
        index.extend(tokens)
        o = self.options
        for n in range(min(o.max_ngram, len(tokens) - 1), o.min_ngram - 1, -1):
            conts = index.continuations(n, o.branches, min(o.length, budget))
            if conts:
                score = n / o.max_ngram  # raw match strength; the policy calibrates it against real acceptance
                return merge([DraftTree.chain(c, [score] * len(c), self.name) for c in conts])
        return DraftTree()
