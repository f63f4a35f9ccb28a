"""Draft trees: what every drafter proposes and what the verify core checks.

Glossary
- **root**: the row's pending token, the last committed token whose K/V is not in the cache yet. It is not part of
  the tree's node lists; node parents point at other nodes or at the root (-1).
- **node**: one draft token. ``parents[i] < i`` always, so nodes are in topological order and a prefix of the
  node list is itself a tree. A chain is a tree whose node i has parent i - 1.
- **depth**: 1 for a child of the root; a node's position is the row's cache length plus its depth.
- **score**: a drafter's estimate of the chance that the target accepts this node given that its parent was
  accepted (draft confidence, SpecDec++ arXiv 2405.19715 uses a trained head for this; we use what each drafter
  knows). The adaptive policy calibrates scores against real acceptance and prunes the tree with them.
- **source**: which drafter proposed a node; merged trees keep it so acceptance is reported per drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1: child of the root
    scores: list[float] = field(default_factory=list)  # per node, in [0, 1]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.parents) == n and len(self.scores) in (0, n) and len(self.sources) in (0, n)):
            raise ValueError("a DraftTree needs one parent (and optionally one score and source) per token")
        if not self.scores:
            self.scores = [1.0] * n
        if not self.sources:
            self.sources = [""] * n
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before their children")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], scores: list[float] | None = None, source: str = "") -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), list(scores or []), [source] * len(tokens))

    def add(self, token: int, parent: int, score: float = 1.0, source: str = "") -> int:
        """Append a node (its parent must exist); returns its index."""
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} does not exist")
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.sources.append(source)
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def children(self) -> list[list[int]]:
        """children[0] lists the root's children; children[i + 1] lists node i's (verify-input indexing)."""
        out: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def path_probs(self) -> list[float]:
        """Per node, the product of scores from the root: the estimated chance that the node is accepted."""
        out: list[float] = []
        for s, p in zip(self.scores, self.parents):
            out.append(s if p < 0 else out[p] * s)
        return out

    def keep(self, nodes: list[int]) -> "DraftTree":
        """The subtree made of ``nodes`` (ascending; each node's parent must be kept too), re-indexed."""
        where = {-1: -1}
        out = DraftTree()
        for i in nodes:
            if self.parents[i] not in where:
                raise ValueError(f"node {i} kept without its parent {self.parents[i]}")
            where[i] = out.add(self.tokens[i], where[self.parents[i]], self.scores[i], self.sources[i])
        return out

    def best(self, n: int) -> "DraftTree":
        """The n nodes with the highest path probability, kept as a tree (ties: earlier nodes first)."""
        if n >= len(self.tokens):
            return self
        probs = self.path_probs()
        # a child never beats its parent (scores <= 1), and ties prefer the lower index, so parents come first
        order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[: max(n, 0)]
        return self.keep(sorted(order))


def merge(trees: list[DraftTree]) -> DraftTree:
    """One tree holding every tree's paths; a token path proposed twice becomes one node with the higher score."""
    out = DraftTree()
    index: dict[tuple[int, int], int] = {}  # (parent in out, token) -> node in out
    for tree in trees:
        where = {-1: -1}
        for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
            parent = where[p]
            key = (parent, tok)
            if key in index:
                j = index[key]
                out.scores[j] = max(out.scores[j], tree.scores[i])
            else:
                j = index[key] = out.add(tok, parent, tree.scores[i], tree.sources[i])
            where[i] = j
    return out
