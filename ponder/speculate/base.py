"""The drafter seam: ``propose`` draft trees for a batch of rows, ``observe`` what the target accepted.

Glossary (see also ``tree.py``)
- **pending token**: the last committed token of a row, the root of its next draft tree; its K/V is written by the
  next verify forward.
- **verify step**: one target forward over the pending tokens and all draft nodes of the batch.
- **budget**: the most nodes a row's tree may have this step (the policy's cap; drafters may propose fewer).

A drafter is a plain object made from one frozen options dataclass; its per-row run-time state lives in the
object ``new_state`` returns, held by the engine next to the row (so finished rows drop their state with them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from ponder.cache import KVCache
from ponder.speculate.tree import DraftTree


@dataclass
class DraftRow:
    tokens: list[int]  # prompt + committed output; tokens[-1] is the pending token
    state: Any  # what the drafter's new_state returned for this row
    budget: int  # most nodes this row's tree may have
    params: Any = None  # the row's SamplingParams (None: greedy)
    noise: Any = None  # the row's RowNoise when it samples: the target samples a depth-d node's successor with
    # ``noise.at(position + d, V)``, so a drafter that samples with the same noise proposes what the target would draw
    position: int = 0  # output position of the pending token's successor (the row's output length)


@dataclass
class DraftBatch:
    rows: list[DraftRow]
    model: Any  # the target LlamaModel (self-speculation drafts with its first layers)
    cache: KVCache  # the target's cache: row b holds tokens[:-1]; drafters must leave lengths as they found them
    cheap_only: bool = False  # this step only ``Drafter.cheap`` drafters draft (the policy gate turned the rest off)


@dataclass
class RowResult:
    tree: DraftTree  # as verified (after the policy pruned it)
    path: list[int]  # accepted node indices, root first
    committed: list[int]  # accepted tokens then the bonus token
    logits: torch.Tensor  # [T, V] target logits per verify input (index 0: the pending token)
    gaps: list[float] = field(default_factory=list)  # per committed token: the target's top-1 vs top-2 logit margin
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> # [T, E], as Proposal.capture asked
    logprobs: list = field(default_factory=list)  # per committed token, its TokenLogprob when the row asks for them


@dataclass
class Proposal:
    """Draft trees plus, optionally, hidden states a self-speculative drafter already computed for the verify
    inputs (the pending token and every node) at layer ``start_layer``, so the verify forward skips those layers."""

    trees: list[DraftTree]
    start_layer: int = 0
    hidden: list[torch.Tensor] | None = None  # per row # [len(tree) + 1, E]
    capture: tuple[int, ...] = ()  # layers whose input hidden states the verify forward should report back


class Drafter(ABC):
    """Proposes draft trees; sees what was accepted."""

    name: str = "drafter"
    prefill_capture: tuple[int, ...] = ()  # layers whose prompt hidden states the drafter wants (``prefilled``)
    # drafting costs next to nothing (copying from the text, n-gram pools): it keeps drafting in a composite whose
    # costly parts the policy's gate has turned off (``DraftBatch.cheap_only``)
    cheap: bool = False
    # drafts chains one forward of its own network per token (a draft model, the target's low-bit copy): the policy
    # sizes its chains before it drafts, pricing each forward (``DraftPolicy.plan``), and its budget is that length
    sequential: bool = False

    @property
    def has_cheap(self) -> bool:
        """Whether some part of this drafter still drafts when only cheap drafters may."""
        return self.cheap

    @property
    def sequential_names(self) -> tuple[str, ...]:
        """The ``source`` names of this drafter's sequential parts (their chains are planned)."""
        return (self.name,) if self.sequential else ()

    def new_state(self, prompt_ids: list[int]) -> Any:
        """Per-row state for a new sequence (default: none)."""
        return None

    def prefilled(self, state: Any, hidden: dict[int, torch.Tensor]) -> None:
        """The prompt's hidden states at ``prefill_capture`` layers, layer -> # [P, E], right after ``new_state``
        (default: ignored)."""

    @abstractmethod
    def propose(self, batch: DraftBatch) -> Proposal:
        """One tree per row (possibly empty), at most ``row.budget`` nodes each."""

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        """Learn from a verify step (default: nothing). ``batch.cache`` already holds the committed tokens'
        K/V except the new pending token's."""

    def report(self) -> dict[str, Any]:
        """What the drafter learned, for the bench report (default: nothing)."""
        return {}
