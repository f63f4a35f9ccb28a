"""A separate draft model (speculative decoding as in Leviathan et al., arXiv 2211.17192).

Any model ``ponder.load`` takes can draft for a target with the same tokenizer, e.g. a smaller model of the same
family or an int8 copy of the target itself (``draft:smollm2-135m:dtype=int8``). The draft model decodes greedily
with its own KV cache per row, up to ``k`` tokens or until its confidence (top-1 probability) falls below
``threshold``; its top-1 probabilities are the nodes' scores. After a verify step its cache is rolled back to the
accepted prefix, and the next step first feeds it the tokens it has not seen (the bonus token).

Drafts are deterministic (a point mass at the draft's argmax), which the sampling acceptance rule handles exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ponder.cache import KVCache
from ponder.errors import PonderError
from ponder.speculate.base import DraftBatch, Drafter, Proposal, RowResult
from ponder.speculate.tree import DraftTree


@dataclass(frozen=True)
class DraftModelOptions:
    model: str = ""
    dtype: str = "fp32"
    k: int = 8  # most draft tokens per step
    threshold: float = 0.0  # stop drafting when the draft's top-1 probability falls below this

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("draft needs a model: draft:MODEL (anything ponder.load takes)")
        if self.k < 1 or not 0 <= self.threshold < 1:
            raise ValueError(f"draft needs k >= 1 and threshold in [0, 1), got k={self.k}, threshold={self.threshold}")


@dataclass
class DraftState:
    cache: KVCache  # the draft model's cache for this row
    fed: int = 0  # tokens of the row's history the cache holds
    extra: int = 0  # drafts the last step fed after the history


class DraftModel(Drafter):
    name = "draft"
    sequential = True  # one forward of the draft model per draft token: the policy plans the chains' length

    def __init__(self, options: DraftModelOptions, loaded: Any, target_vocab: int | None = None) -> None:
        self.options = options
        self.loaded = loaded
        self.model = loaded.model
        # a draft embedding padded past the target's vocabulary could propose ids the target cannot embed
        self.vocab = min(self.model.config.vocab_size, target_vocab or self.model.config.vocab_size)

    @classmethod
    def build(cls, options: DraftModelOptions, target: Any) -> "DraftModel":
        import ponder

        draft = ponder.load(options.model, options.dtype, device=str(target.model.device))
        if not _same_vocabulary(draft.tokenizer, target.tokenizer):
            raise PonderError(f"draft model {options.model!r} has a different tokenizer from the target; "
                              "a draft model must share the target's vocabulary")
        return cls(options, draft, target.model.config.vocab_size)

    def new_state(self, prompt_ids: list[int]) -> DraftState:
        return DraftState(self.model.new_cache(1, len(prompt_ids) + 256))

    def propose(self, batch: DraftBatch) -> Proposal:
        return Proposal([self._draft(r.state, r.tokens, r.budget) for r in batch.rows])

    def _draft(self, st: DraftState, tokens: list[int], budget: int) -> DraftTree:
        n = min(self.options.k, budget)
        if n == 0:
            return DraftTree()
        st.cache.ensure(len(tokens) + n + 1)
        new = torch.tensor([tokens[st.fed :]], device=self.model.device)
        drafts: list[int] = []
        scores: list[float] = []
        while len(drafts) < n:
            probs = torch.softmax(self.model(new, st.cache, last_only=True)[0, -1, : self.vocab].float(), -1)
            conf, tok = probs.max(-1)
            if float(conf) < self.options.threshold:
                break
            drafts.append(int(tok))
            scores.append(float(conf))
            if len(drafts) < n:  # the last draft is never fed: the verify step will tell what follows it
                new = tok.view(1, 1)
        st.fed = len(tokens)
        st.extra = st.cache.lengths[0] - len(tokens)  # drafts fed after the history
        return DraftTree.chain(drafts, scores, self.name)

    def observe(self, batch: DraftBatch, results: list[RowResult]) -> None:
        for row, res in zip(batch.rows, results):
            st: DraftState = row.state
            # the draft cache holds the history then `extra` drafts; keep the drafts the target accepted
            keep = len(row.tokens) + min(len(res.path), st.extra)
            st.cache.truncate(0, min(keep, st.cache.lengths[0]))
            st.fed = st.cache.lengths[0]


def _same_vocabulary(a: Any, b: Any) -> bool:
    try:
        return a.get_vocab() == b.get_vocab()
    except AttributeError:
        return len(a) == len(b)
