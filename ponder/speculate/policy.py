"""Adaptive draft length and tree size, shared by every drafter (after SpecDec++, arXiv 2405.19715).

SpecDec++ stops drafting once a trained head predicts that the chance of a rejection passes a threshold. We have no
trained head, so each node's chance of acceptance comes from what the drafter reports (its ``score``: a match
length, a draft probability, a successor rank), **calibrated online** against what the target really accepted,
per drafter, depth and score bucket. A node's path probability (the product down from the root) estimates the
chance that it is accepted; the expected tokens of a verify step is 1 + the sum of its nodes' path probabilities.

On CPU a verify forward's cost grows with its token count, unevenly (MKL's GEMM kernels change at 4, 8 and 16
rows), so the policy measures that cost curve once per engine (``CostCurve.measure``) and keeps the number of
nodes per row that maximises expected tokens per second: ``sum_rows(1 + sum of kept path probs) / cost(B * T)``.
Nodes whose path probability falls below ``min_prob`` are dropped as well (the SpecDec++ stopping rule).

A sequential drafter (one forward of its own network per draft token: a draft model, the target's low-bit copy)
is sized before it drafts instead, so that its forwards are priced too (``plan``): the chain length n with the most
expected tokens per second of ``n`` timed draft forwards plus the verify forward, from each depth's observed
acceptance.

Beyond that, drafting has its own cost, large for drafters that run a network (a draft
model, a trained head): whether it pays is measured, not modelled. ``DraftGate`` times whole steps (committed tokens
per wall second, drafting included) with and without drafting, keeps whichever is faster, and retries the other
every ``explore`` steps; a step without drafting gives every row a budget of 0 (drafters still see it, so those
that follow the target's states keep up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ponder.speculate.tree import DraftTree

MEASURED_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64)


@dataclass(frozen=True)
class PolicyOptions:
    max_nodes: int = 15  # most draft nodes per row per verify step
    min_prob: float = 0.02  # drop nodes whose estimated chance of acceptance is lower
    adaptive: bool = True  # size trees by expected tokens per second, draft only when it pays (False: always
    # draft and keep the best max_nodes nodes)
    explore: int = 16  # adaptive: retry the slower of drafting / not drafting every `explore` steps (0: always
    # draft, at least each row's best node)

    def __post_init__(self) -> None:
        if not 0 <= self.max_nodes <= 64:
            raise ValueError(f"max_nodes must be in [0, 64], got {self.max_nodes}")
        if not 0 <= self.min_prob < 1:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        if self.explore == 1 or self.explore < 0:
            raise ValueError(f"explore must be 0 (always draft) or >= 2, got {self.explore}")


@dataclass
class CostCurve:
    """Seconds of one verify forward by total token count (rows x tokens per row)."""

    seconds: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sizes, self._fit = isotonic(self.seconds)

    def __call__(self, n: int) -> float:
        """The seconds of a forward of n tokens: the smallest measured size that holds it, on the measurements'
        least-squares non-decreasing fit (a forward of more tokens costs no less; a noisy point is pooled with its
        neighbours rather than believed: a dip must not make longer chains look free, and a spike at a small
        size must not price every larger size, which stopped drafting on a loaded 3-worker test machine); past
        the measured range, growing by the last two sizes' fitted slope (0 at least)."""
        if not self._sizes:
            return 1.0
        for s, c in zip(self._sizes, self._fit):
            if s >= n:
                return c
        big, top = self._sizes[-1], self._fit[-1]
        prev, low = (self._sizes[-2], self._fit[-2]) if len(self._sizes) > 1 else (0, 0.0)
        return top + max(0.0, (top - low) / max(big - prev, 1)) * (n - big)

    @classmethod
    def measure(cls, model: object, rows: int, max_tokens: int, prefix: int = 64, reps: int = 3,
                most: int = 256) -> "CostCurve":
        """Time ``model.forward_tree`` on scratch data for ``rows`` rows and each measured size up to max_tokens
        per row and ``most`` in all (past it the curve extrapolates: a batch's long forwards are compute-bound,
        and measuring 8 rows x 40 tokens added ~3 s to a start): the best of ``reps`` rounds after a warm-up
        round, each round timing every size once (so a slow moment of a shared machine hits all sizes alike rather
        than one)."""
        # the largest forward the policy will price is measured too, not extrapolated: the kernel can change between
        # two sizes (fp32 routes end at 32 rows; with routes padding 41 rows to 48 a 41-token verify cost 114 ms
        # against 85 ms for 40 where the curve said 78, AMD EPYC), and lowbit's chains stop right there
        sizes = sorted({t for t in (*MEASURED_SIZES, max_tokens) if t <= max_tokens and (rows * t <= most or t == 1)}) \
            or [1]
        cache = model.new_cache(rows, prefix + max(sizes))
        out: dict[int, float] = {rows * t: float("inf") for t in sizes}
        with torch.inference_mode():
            model(torch.zeros(rows, prefix, dtype=torch.long, device=model.device), cache)
            inputs = []
            for t in sizes:
                ids = torch.zeros(rows, t, dtype=torch.long, device=model.device)
                depth = torch.arange(t, device=model.device)[None].expand(rows, t)
                visible = torch.ones(t, t, dtype=torch.bool, device=model.device).tril()[None].expand(rows, t, t)
                inputs.append((t, ids, depth, visible))
            for rep in range(reps + 1):  # round 0 warms up
                for t, ids, depth, visible in inputs:
                    start = time.perf_counter()
                    model.forward_tree(ids, cache, depth, visible)
                    if rep:
                        out[rows * t] = min(out[rows * t], time.perf_counter() - start)
        return cls(out)


def isotonic(values: dict[int, float]) -> tuple[list[int], list[float]]:
    """The sorted keys of ``values`` and the least-squares non-decreasing fit of their values (pool adjacent
    violators: a run of points that falls is replaced by its mean, repeatedly)."""
    sizes = sorted(values)
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for s in sizes:
        blocks.append([values[s], 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fit = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return sizes, fit


@dataclass
class Calibration:
    """Observed acceptance of tested nodes (parent accepted) per (source, depth, score bucket), with the drafter's
    own score as a prior worth ``prior`` observations."""

    prior: float = 2.0
    counts: dict[tuple[str, int, int], list[float]] = field(default_factory=dict)

    @staticmethod
    def key(source: str, depth: int, score: float) -> tuple[str, int, int]:
        return source, min(depth, 8), min(int(score * 5), 4)

    def prob(self, source: str, depth: int, score: float) -> float:
        acc, tested = self.counts.get(self.key(source, depth, score), (0.0, 0.0))
        return (acc + self.prior * score) / (tested + self.prior)

    def depth_acceptance(self, sources: tuple[str, ...], depths: int) -> list[float]:
        """Per depth 1..``depths``: accepted / tested nodes of ``sources`` there (depths past 8 share 8's counts),
        shrunk toward their rate over all depths by ``prior`` observations (a depth not tested yet gets that rate,
        so longer chains get tried), which is add-one smoothed."""
        acc, tested = [0.0] * 9, [0.0] * 9
        for (src, d, _), (a, t) in self.counts.items():
            if src in sources:
                acc[d] += a
                tested[d] += t
        pooled = (sum(acc) + 1) / (sum(tested) + 2)
        return [(acc[min(d, 8)] + self.prior * pooled) / (tested[min(d, 8)] + self.prior) for d in range(1, depths + 1)]

    def update(self, tree: DraftTree, path: list[int]) -> None:
        accepted = set(path)
        reached = accepted | {-1}
        for i, (p, d) in enumerate(zip(tree.parents, tree.depths())):
            if p in reached:
                c = self.counts.setdefault(self.key(tree.sources[i], d, tree.scores[i]), [0.0, 0.0])
                c[0] += i in accepted
                c[1] += 1


@dataclass
class DraftGate:
    """Drafting or not, by measured committed tokens per second of whole steps (an exponential moving average per
    mode, weight ``1 - decay`` per step). The mode with the higher rate runs; every ``explore`` steps the other one
    runs once, so a change in the text (a passage that can be copied) is noticed. Both modes start unmeasured:
    drafting runs first, then one step without. Drafting that costs under ``free`` of its steps' time (copying,
    n-gram pools) always runs: the verify cost curve already prices its nodes, and one unlucky exploration step
    would otherwise switch it off for ``explore`` steps."""

    explore: int = 16
    decay: float = 0.7
    free: float = 0.05
    rate: dict[bool, float] = field(default_factory=dict)  # drafting? -> committed tokens per second
    draft_share: float | None = None  # drafting steps: the share of their time spent drafting
    steps: int = 0

    def drafting(self) -> bool:
        if True not in self.rate or (self.draft_share is not None and self.draft_share < self.free):
            return True
        if False not in self.rate:
            return self.steps < 4  # 4 steps of drafting, then one without
        best = self.rate[True] >= self.rate[False]
        return best if self.steps % self.explore else not best

    def observe(self, drafted: bool, tokens: int, seconds: float, draft_seconds: float = 0.0) -> None:
        self.steps += 1
        seconds = max(seconds, 1e-9)
        if drafted:
            self.draft_share = self._average(self.draft_share, draft_seconds / seconds)
        self.rate[drafted] = self._average(self.rate.get(drafted), tokens / seconds)

    def _average(self, old: float | None, new: float) -> float:
        return moving_average(old, new, self.decay)


def moving_average(old: float | None, new: float, decay: float = 0.7) -> float:
    """``new`` weighted ``1 - decay`` against ``old`` (``new`` alone when there is no ``old``)."""
    return new if old is None else decay * old + (1 - decay) * new


class DraftPolicy:
    def __init__(self, options: PolicyOptions | None = None, cost: CostCurve | None = None) -> None:
        self.options = options or PolicyOptions()
        self.cost = cost or CostCurve()
        self.calibration = Calibration()
        self.gate = DraftGate(max(self.options.explore, 2))
        self.forward_s: dict[int, float] = {}  # rows -> seconds per forward of a sequential drafter (moving average)
        # observed verify seconds over the curve's (moving average): the curve is measured after a 64-token prefix,
        # and after a long prompt every verify forward costs more (its attention), while ``forward_s`` is measured
        # where the drafter runs; scaling the curve keeps the two prices comparable
        self.verify_scale: float | None = None
        self.plans = 0  # plans made with a timed draft forward (every ``explore``-th one looks further: ``plan``)

    def plan(self, budgets: list[int], sources: tuple[str, ...]) -> list[int]:
        """Chain lengths for a sequential drafter whose nodes carry ``sources``, before it drafts: the n (at least 1,
        at most each row's budget) that maximises ``sum_rows(1 + sum_{d <= n} P_d) / (cost(B * (n + 1)) + n * f)``,
        with P_d the product of the observed acceptance of depths 1..d (tested nodes of those sources whose parent was
        accepted, add-one smoothed) and f the measured seconds of one draft forward for B rows. Until a drafting
        step of B rows has been timed (or without ``adaptive``): the budgets. Every ``explore``-th plan drafts
        twice that n (within the budgets): depths past the chosen n are tested only by chains that reach them, and
        without those tests a few early rejections there would keep the chains short for good (SmolLM2's q4 copy
        on held-out Spec-Bench, 2026-12-06: chains of 7 and tau 7.3 where it accepts ~98% of its drafts at every
        depth, 2.48x plain decoding instead of 3.02x)."""
        rows = len(budgets)
        per = self.forward_s.get(rows)
        top = max(budgets, default=0)
        if per is None or not self.options.adaptive or top <= 1:
            return budgets
        acc = self.calibration.depth_acceptance(sources, top)
        best_n, best_rate, path, cum = 1, -1.0, 1.0, [0.0]
        for n in range(1, top + 1):
            path *= acc[n - 1]
            cum.append(cum[-1] + path)
            tokens = sum(1 + cum[min(n, b)] for b in budgets)
            rate = tokens / (self.cost(rows * (n + 1)) * (self.verify_scale or 1.0) + n * per)
            if rate > best_rate + 1e-12:
                best_n, best_rate = n, rate
        self.plans += 1
        if self.options.explore and self.plans % self.options.explore == 0:
            best_n *= 2
        return [min(b, best_n) for b in budgets]

    def budget(self, remaining: int) -> int:
        """Most nodes for a row that may still commit ``remaining`` tokens (a verify step commits up to depth + 1)."""
        return max(0, min(self.options.max_nodes, remaining - 1))

    def drafting(self) -> bool:
        """Whether this step drafts at all (always, unless adaptive)."""
        return self.gate.drafting() if self.options.adaptive and self.options.explore else True

    def path_probs(self, tree: DraftTree) -> list[float]:
        out: list[float] = []
        for s, p, d, src in zip(tree.scores, tree.parents, tree.depths(), tree.sources):
            c = self.calibration.prob(src, d, s)
            out.append(c if p < 0 else out[p] * c)
        return out

    def shape(self, trees: list[DraftTree]) -> list[DraftTree]:
        """Prune every row's tree to the nodes worth verifying this step (a tree's best nodes form a subtree)."""
        ranked = []
        for tree in trees:
            probs = self.path_probs(tree)
            order = sorted(range(len(tree)), key=lambda i: (-probs[i], i))
            kept = [i for i in order if probs[i] >= self.options.min_prob][: self.options.max_nodes]
            if not self.options.explore and self.options.max_nodes:  # explore=0 promises never to stop drafting
                kept = kept or order[:1]
            order = kept
            ranked.append((tree, order, [probs[i] for i in order]))
        n = self._common_size(ranked) if self.options.adaptive else self.options.max_nodes
        if not self.options.explore:  # each row's best node at least
            n = max(n, 1)
        return [tree.keep(sorted(order[:n])) for tree, order, _ in ranked]

    def _common_size(self, ranked: list[tuple[DraftTree, list[int], list[float]]]) -> int:
        """Nodes per row that maximise expected committed tokens per second of verify."""
        rows = len(ranked)
        longest = max((len(o) for _, o, _ in ranked), default=0)
        best_n, best_rate = 0, -1.0
        for n in range(longest + 1):
            width = max(min(n, len(o)) for _, o, _ in ranked) + 1
            tokens = sum(1 + sum(p[:n]) for _, _, p in ranked)
            rate = tokens / self.cost(rows * width)
            if rate > best_rate + 1e-12:
                best_n, best_rate = n, rate
        return best_n

    def observe(
        self, trees: list[DraftTree], paths: list[list[int]], drafted: bool = True, seconds: float = 0.0,
        draft_seconds: float = 0.0, forwards: int = 0, verify_seconds: float = 0.0, verify_tokens: int = 0,
    ) -> None:
        """Calibrate on what was accepted; ``seconds``: the whole step's wall time (draft, verify, accept), of which
        ``draft_seconds`` drafting; ``forwards``: the sequential drafter's forwards in that drafting (its longest
        chain), which times one of them for this many rows; ``verify_seconds``: the verify forward's (and the
        acceptance's) wall time, for ``verify_tokens`` tokens in that forward (rows x tokens per row), which
        rescales the measured cost curve (``verify_scale``)."""
        for tree, path in zip(trees, paths):
            self.calibration.update(tree, path)
        if verify_tokens > 0 and verify_seconds > 0 and self.cost.seconds:
            # clamped: one forward that met a pause of the machine (or a collection) must not reprice every size
            ratio = min(4.0, max(0.25, verify_seconds / self.cost(verify_tokens)))
            self.verify_scale = moving_average(self.verify_scale, ratio)
        if forwards > 0:
            self.forward_s[len(trees)] = moving_average(self.forward_s.get(len(trees)), draft_seconds / forwards)
        if seconds > 0:
            self.gate.observe(drafted, sum(len(p) + 1 for p in paths), seconds, draft_seconds)
