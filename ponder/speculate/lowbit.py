"""Self-speculation with a low-bit copy of the target that drafts over the target's own KV cache.

The target's 4-bit (or int8) copy agrees with it on ~99% of greedy tokens (the bench's top-1 agreement of
``--dtype q4``) and runs a decode step several times faster on this CPU (ponder's native decoder layers), so it
drafts long chains that are nearly always accepted; the full-precision target verifies them in one forward, which
keeps the output exactly its own. Quantized drafts of the target itself are QSpec's (arXiv 2410.11305) and
ML-SpecQD's (arXiv 2503.13565, on CPUs); like QSpec, the copy shares the target's KV cache: it writes its drafts'
K/V after the committed tokens' (computed by the target), reads the committed ones as they are, and the cache is cut
back to its lengths before the verify forward overwrites those slots. So the copy keeps no cache of its own, never
prefills the prompt and never catches up on accepted tokens: each step runs ``k`` one-token forwards of the copy
for all rows of the batch at once.

A greedy row's drafts are the copy's argmax. A sampling row's are the copy's own Gumbel-max draws with the very
noise the target will use at each position (``DraftRow.noise``; ponder samples ``argmax(log w + g)`` with noise
``g`` fixed per seed, row and position, ``ponder/sampling.py``): where the copy's distribution is close to the
target's, it draws the token the target will draw, so sampled chains are accepted far more often than argmax drafts
would be (coupled drafting; ``couple=false`` drafts the argmax instead). Drafts are point masses and the acceptance
rule checks each against the target's own draw, so the output is plain seeded sampling's, token for token, whatever
the drafts. ``threshold`` stops a row's chain when the copy's probability of its draft (top-1 when greedy, of the
draw after temperature, top-k and top-p when sampling) falls below it (default 0: never).

A node's score is 1, not that probability: the copy's confidence hardly tells which of its tokens the target
rejects (SmolLM2's q4 copy on Spec-Bench: 96-100% of drafts accepted in every confidence bucket), and as the
calibration's prior a low confidence made the policy cut chains the target would have accepted; the policy
calibrates the nodes by depth. The chains' length is the policy's plan (``k`` at most): the one with the most
expected tokens per second of drafting plus verifying (``DraftPolicy.plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ponder.errors import PonderError
from ponder.sampling import sample, warp
from ponder.speculate.base import DraftBatch, Drafter, Proposal
from ponder.speculate.tree import DraftTree

WEIGHTS = ("q4", "int8")


@dataclass(frozen=True)
class LowBitOptions:
    weights: str = "q4"  # the copy's weights: q4 (CPU) or int8
    k: int = 24  # most draft tokens per row per step (and the policy's max_nodes: 24 unless the SPEC sets it)
    threshold: float = 0.0  # stop a row's chain when the copy's probability of its draft falls below this
    couple: bool = True  # sampling rows draft the copy's draws with the target's noise (False: its argmax)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"lowbit weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.k < 1 or not 0 <= self.threshold < 1:
            raise ValueError(f"lowbit needs k >= 1 and threshold in [0, 1), got k={self.k}, threshold={self.threshold}")


class LowBit(Drafter):
    name = "lowbit"
    sequential = True  # one forward of the copy per draft token: the policy plans the chains' length

    def __init__(self, options: LowBitOptions, copy: Any, target_vocab: int) -> None:
        self.options = options
        self.copy = copy  # the low-bit LlamaModel
        self.vocab = target_vocab  # the copy's too (``build`` checks): a sampling row's noise spans it

    @classmethod
    def build(cls, options: LowBitOptions, target: Any) -> "LowBit":
        import ponder

        if target.dtype == options.weights:
            raise PonderError(f"lowbit drafts with a {options.weights} copy of the target, and the target already runs "
                              f"with {options.weights} weights: speculate with another drafter, or load the target in "
                              "a wider dtype (fp32)")
        if options.weights == "q4" and target.model.device.type != "cpu":
            raise PonderError("lowbit's q4 copy runs on the CPU only; on a GPU use lowbit:weights=int8")
        copy = ponder.load(str(target.path), options.weights, device=str(target.model.device)).model
        if copy.kv_dtype != target.model.kv_dtype:
            raise PonderError(f"lowbit's {options.weights} copy keeps its K/V in {copy.kv_dtype} and the "
                              f"{target.dtype} target in {target.model.kv_dtype}; they must share the cache: load the "
                              f"target with K/V in {copy.kv_dtype} (on the CPU: fp32 or int8)")
        if copy.config.vocab_size != target.model.config.vocab_size:  # a sampling row's noise spans the vocabulary
            raise PonderError(f"lowbit's copy of {target.name} has {copy.config.vocab_size} tokens, the target "
                              f"{target.model.config.vocab_size}")
        return cls(options, copy, target.model.config.vocab_size)

    def propose(self, batch: DraftBatch) -> Proposal:
        rows, cache = batch.rows, batch.cache
        # every row runs each forward, so the chains stop where the fullest row's cache would (a KV policy's
        # compressed cache may have less room above a row than its budget asks of the others)
        room = min(cache.max_len - n for n in cache.lengths)
        want = [min(self.options.k, r.budget, room) for r in rows]
        if max(want, default=0) == 0:
            return Proposal([DraftTree() for _ in rows])
        start = list(cache.lengths)
        feed = torch.tensor([[r.tokens[-1]] for r in rows], device=self.copy.device)
        drafts: list[list[int]] = [[] for _ in rows]
        active = [n > 0 for n in want]
        try:
            for step in range(max(want)):
                # every row runs (a batch forward cannot skip rows); a finished row's extra K/V is cut below
                logits = self.copy(feed, cache, last_only=True)[:, 0, : self.vocab].float()
                if self.options.threshold:
                    conf, tok = torch.softmax(logits, -1).max(-1)
                    conf_l, tok_l = conf.tolist(), tok.tolist()
                else:  # no confidence needed: the argmax alone (a 49k softmax is ~5% of a draft step)
                    tok_l = logits.argmax(-1).tolist()
                    conf_l = [1.0] * len(tok_l)
                for b, r in enumerate(rows):
                    if not active[b]:
                        continue
                    if self.options.couple and r.noise is not None and not r.params.greedy:
                        # the draw the target will make at this position, with the copy's logits
                        row = logits[b : b + 1]
                        tok_l[b] = int(sample(row, r.params, [r.noise.at(r.position + step, self.vocab)])[0])
                        conf_l[b] = float(warp(row, r.params)[0, tok_l[b]]) if self.options.threshold else 1.0
                    if conf_l[b] < self.options.threshold:
                        active[b] = False
                        continue
                    drafts[b].append(tok_l[b])
                    active[b] = len(drafts[b]) < want[b]
                if not any(active):
                    break  # the last drafts are never fed: the verify forward tells what follows them
                feed = torch.tensor(tok_l, device=self.copy.device).view(-1, 1)
        finally:
            for b, n in enumerate(start):
                cache.truncate(b, n)
        return Proposal([DraftTree.chain(d, [1.0] * len(d), self.name) for d in drafts])
