"""Lossless speculative decoding: drafters (one per file), the verify core's acceptance rules, the adaptive policy.

A speculator SPEC names one drafter or a ``+``-joined combination, each with ``:key=value`` options, e.g.
``pld``, ``recycling:k=8``, ``pld:max_ngram=4+recycling``, ``draft:MODEL:dtype=int8``, ``lowbit:k=12``,
``early-exit:layer=auto``.
Policy options (``max_nodes``, ``min_prob``, ``adaptive``) may be given on any part and apply to the whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ponder import options as options_mod
from ponder.errors import PonderError
from ponder.speculate.base import DraftBatch, Drafter, DraftRow, Proposal, RowResult
from ponder.speculate.policy import CostCurve, DraftPolicy, PolicyOptions
from ponder.speculate.tree import DraftTree, merge


@dataclass(frozen=True)
class Entry:
    options: type  # frozen dataclass of the drafter's hyperparameters
    build: Callable[[Any, Any], Drafter]  # (options, target Loaded) -> drafter
    positional: str | None = None  # option filled by a bare ``:value`` (``draft:MODEL``)
    help: str = ""
    policy: tuple[tuple[str, str], ...] = ()  # policy defaults this drafter wants unless the SPEC sets them


def _registry() -> dict[str, Entry]:
    from ponder.speculate import draft_model, early_exit, head, lookahead, lowbit, medusa, pld, recycling

    return {
        "pld": Entry(pld.PLDOptions, lambda o, t: pld.PLD(o), help="prompt lookup / copy (2502.08923)"),
        "lookahead": Entry(lookahead.LookaheadOptions, lambda o, t: lookahead.Lookahead(o),
                           help="n-gram pool over prompt, output and the target's guesses (2312.12728)"),
        "recycling": Entry(recycling.RecyclingOptions, lambda o, t: recycling.Recycling(o, t.model.config.vocab_size),
                           help="Token Recycling: adjacency of top-k successors (2408.08696)"),
        "draft": Entry(draft_model.DraftModelOptions, draft_model.DraftModel.build, positional="model",
                       help="a separate draft model with the same tokenizer"),
        "lowbit": Entry(lowbit.LowBitOptions, lowbit.LowBit.build,
                        help="the target's own q4/int8 copy drafting over its KV cache (2410.11305, 2503.13565)",
                        # its chains are ~96-99% accepted: up to 40 nodes (the policy plans the length from the
                        # verify costs; 40 against 24: 3.03x -> 3.28x plain fp32 decoding, held-out Spec-Bench,
                        # docs/speculation.md; an int8 target's verify forward of more than 32 tokens leaves the
                        # packed kernels, linear.py, which its cost curve prices)
                        policy=(("max_nodes", "40"),)),
        "early-exit": Entry(early_exit.EarlyExitOptions, early_exit.EarlyExit.build,
                            help="self-speculation with the first layers (2404.16710, 2404.18911; auto: 2504.05598)"),
        "head": Entry(head.HeadOptions, head.HeadDrafter.build, positional="path",
                      help="a trained EAGLE-style draft head, dynamic tree (2401.15077, 2406.16858, 2503.01840)"),
        "medusa": Entry(medusa.MedusaOptions, medusa.MedusaDrafter.build, positional="path",
                        help="trained Medusa-1 heads, cartesian-product tree (2401.10774)"),
    }


def drafter_names() -> list[str]:
    return list(_registry())


class Composite(Drafter):
    """Several drafters, their trees merged into one per row (shared prefixes become one node)."""

    def __init__(self, parts: list[Drafter]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.prefill_capture = tuple(sorted({layer for p in parts for layer in p.prefill_capture}))
        self.cheap = all(p.cheap for p in parts)

    @property
    def has_cheap(self) -> bool:
        return any(p.cheap for p in self.parts)

    @property
    def sequential_names(self) -> tuple[str, ...]:
        """Its sequential parts' names: their planned length caps every part's budget."""
        return tuple(n for p in self.parts for n in p.sequential_names)

    def new_state(self, prompt_ids: list[int]) -> list[Any]:
        return [p.new_state(prompt_ids) for p in self.parts]

    def prefilled(self, state: list[Any], hidden: dict[int, Any]) -> None:
        for p, s in zip(self.parts, state):
            if p.prefill_capture:
                p.prefilled(s, {layer: hidden[layer] for layer in p.prefill_capture})

    def _view(self, batch: DraftBatch, i: int) -> DraftBatch:
        """Part i's view of the batch: its own states, and no budget when only cheap parts draft this step (a
        costly part still sees the step, to keep its state up to date)."""
        off = batch.cheap_only and not self.parts[i].cheap
        rows = [dataclasses.replace(r, state=r.state[i], budget=0 if off else r.budget) for r in batch.rows]
        return DraftBatch(rows, batch.model, batch.cache, batch.cheap_only)

    def propose(self, batch: DraftBatch) -> Proposal:
        props = [p.propose(self._view(batch, i)) for i, p in enumerate(self.parts)]
        trees = [merge([pr.trees[b] for pr in props]) for b in range(len(batch.rows))]
        self._captured = [set(pr.capture) for pr in props]  # each part sees only the states it asked for
        capture = tuple(sorted(set().union(*self._captured)))
        return Proposal(trees, capture=capture)  # merged trees no longer match one drafter's hidden states

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        for i, p in enumerate(self.parts):
            own = [dataclasses.replace(r, hidden={k: v for k, v in r.hidden.items() if k in self._captured[i]})
                   for r in results]
            p.observe(self._view(batch, i), own)

    def report(self) -> dict[str, Any]:
        return {p.name: r for p in self.parts if (r := p.report())}


@dataclass
class Speculator:
    """A drafter and the policy that sizes its trees; built from a SPEC by ``make_speculator``."""

    drafter: Drafter
    policy: DraftPolicy
    text: str = ""
    costs: dict[int, CostCurve] = field(default_factory=dict)  # verify cost curve per batch size

    @property
    def max_nodes(self) -> int:
        return self.policy.options.max_nodes

    def prepare(self, model: Any, rows: int) -> None:
        """Pack the projections for verify-sized forwards and measure the verify cost curve (once per batch size:
        ``costs``, each as measured).

        A batch of ``rows`` also runs steps with fewer rows (a server's batch fills and drains; a run's last
        prompts), whose forwards carry fewer tokens than any the ``rows``-row curve measured. So the policy prices
        forwards by both curves' sizes, one row's and the batch's (where both measured a size, the batch's; a
        forward is priced at the smallest measured size that holds it): a forward's cost follows its total tokens
        far more than how they split into rows, and without one row's sizes a step of one row took 2-16 drafts per
        row as free because a 16-row forward costs what a 1-row one does. One row's curve is measured once, under
        the packing of the first batch size prepared."""
        # each packed size is another copy of the weights: 4, 8 and 16 tokens per row, at most 32 tokens per forward
        model.pack_for_rows(*sorted({max(4, rows)} | {n * rows for n in (4, 8, 16) if n * rows <= 32}))
        for n in sorted({rows, 1}, reverse=True):  # the batch's first, under its own packing
            if n not in self.costs:
                self.costs[n] = CostCurve.measure(model, n, self.max_nodes + 1)
        self.policy.cost = CostCurve({**self.costs[1].seconds, **self.costs[rows].seconds})


def parse(text: str) -> list[tuple[str, dict[str, str]]]:
    """``a:k=v+b`` -> [("a", {"k": "v"}), ("b", {})]; a bare ``:value`` fills the drafter's positional option."""
    reg = _registry()
    parts = []
    for chunk in text.split("+"):
        name, *opts = chunk.strip().split(":")
        if name not in reg:
            raise PonderError(f"unknown drafter {name!r} in {text!r}: choose from {', '.join(reg)}")
        options: dict[str, str] = {}
        for o in opts:
            key, eq, value = o.partition("=")
            if not eq:
                if reg[name].positional is None or reg[name].positional in options:
                    raise PonderError(f"bad option {o!r} for {name!r}: write key=value")
                key, value = reg[name].positional, o
            options[key] = value
        parts.append((name, options))
    return parts


def validate(text: str) -> None:
    """Check a SPEC's drafter names and options without building anything (PonderError when wrong)."""
    reg = _registry()
    parsed = parse(text)
    policy_kw: dict[str, str] = {}
    for name, options in parsed:
        own = {k: v for k, v in options.items() if k not in _fields(PolicyOptions)}
        policy_kw.update({k: v for k, v in options.items() if k in _fields(PolicyOptions)})
        _options(reg[name].options, own, name)
    _options(PolicyOptions, policy_kw, text)


# Target dtypes whose speculation cannot reproduce plain decoding, and why. Greedy speculation is lossless only if a
# token's logits come out the same in a 1-token decode step and inside a many-token verify forward; a dtype that
# rounds activations below fp32 needs identical bits for that (tests/test_kernels.py checks the dtypes allowed).
REFUSED_DTYPES = {
    "bf16": "speculative decoding is not lossless with --dtype bf16: CPU bf16 matmuls round a row differently when "
            "it is computed among 8 or more rows than alone; use fp32, fp16 or int8 to speculate",
}


def make_speculator(text: str, target: Any) -> Speculator:
    """Build the drafters and policy a SPEC describes for the ``target`` (a ``ponder.load`` result)."""
    if (reason := REFUSED_DTYPES.get(getattr(target, "dtype", "fp32"))) is not None:
        raise PonderError(reason)
    reg = _registry()
    parsed = parse(text)
    # drafters' policy defaults (the largest where parts differ), then what the SPEC says
    policy_kw: dict[str, str] = {}
    for name, _ in parsed:
        for key, value in reg[name].policy:
            policy_kw[key] = max(policy_kw.get(key, value), value, key=float)
    drafters = []
    for name, options in parsed:
        entry = reg[name]
        own = {k: v for k, v in options.items() if k not in _fields(PolicyOptions)}
        policy_kw.update({k: v for k, v in options.items() if k in _fields(PolicyOptions)})
        drafters.append(entry.build(_options(entry.options, own, name), target))
    policy = DraftPolicy(_options(PolicyOptions, policy_kw, text))
    drafter = drafters[0] if len(drafters) == 1 else Composite(drafters)
    return Speculator(drafter, policy, text)


def _fields(cls: type) -> dict[str, Any]:
    return options_mod.fields(cls)


def _options(cls: type, raw: dict[str, str], where: str) -> Any:
    return options_mod.build(cls, raw, where, tuple(_fields(PolicyOptions)))


__all__ = [
    "Drafter", "DraftBatch", "DraftRow", "DraftTree", "Proposal", "RowResult", "Speculator", "make_speculator",
    "parse", "validate", "drafter_names", "merge",
]
