"""Self-speculation with a low-bit copy of the target that drafts over the target's own KV cache.

The target's 4-bit (or int8) copy agrees with it on ~99% of greedy tokens (the bench's top-1 agreement of
``--dtype q4``) and runs a decode step several times faster on this CPU (ponder's native decoder layers), so it
drafts long chains that are nearly always accepted; the full-precision target verifies them in one forward, which
keeps the output exactly its own. Quantized drafts of the target itself are QSpec's (arXiv 2410.11305) and
ML-SpecQD's (arXiv 2503.13565, on CPUs); like QSpec, the copy shares the target's KV cache: it writes its drafts'
K/V after the committed tokens' (computed by the target), reads the committed ones as they are, and the cache is cut
back to its lengths before the verify forward overwrites those slots. So the copy keeps no cache of its own, never
prefills the prompt and never catches up on accepted tokens: each step runs up to ``k`` forwards of the copy for
all rows of the batch at once (fewer where guesses, below, draft several tokens per forward).

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

Guesses (ML-SpecQD's levels: a cheaper drafter drafts for the copy). Where the row's last tokens (at least ``match``
of them) occurred earlier in its prompt or output, the tokens that followed are a guess of what the copy will draft
next: one copy forward over the chain's next token plus up to ``guess`` guessed tokens (a verify-shaped forward,
~1.15x the time of one token for 2 tokens and ~1.5x for 3 on the CPUs measured) drafts as many tokens as the copy
agrees with in a row, plus the copy's own token after them. The chain is the one the copy would have drafted token
by token (up to the last bits of a forward of several tokens), so acceptance does not change; only the copy's
forwards per draft token fall, on text that repeats its prompt or itself (summaries, extraction, code, RAG). Batch 1
only (every row of a batch runs each forward's tokens, and at batch 4 that cost more than it saved). ``guess=0``
turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ponder.errors import PonderError
from ponder.sampling import sample, warp
from ponder.speculate.base import DraftBatch, Drafter, DraftRow, Proposal
from ponder.speculate.pld import NgramIndex
from ponder.speculate.tree import DraftTree

WEIGHTS = ("q4", "int8")
MAX_MATCH = 3  # the longest recurring tail looked up for a guess


@dataclass(frozen=True)
class LowBitOptions:
    weights: str = "q4"  # the copy's weights: q4 (CPU) or int8
    k: int = 40  # most draft tokens per row per step (and the policy's max_nodes: 40 unless the SPEC sets it)
    threshold: float = 0.0  # stop a row's chain when the copy's probability of its draft falls below this
    couple: bool = True  # sampling rows draft the copy's draws with the target's noise (False: its argmax)
    guess: int = 2  # most tokens guessed from the row's history per copy forward (0: one token per forward)
    match: int = 2  # fewest last tokens that must recur in the history for a guess

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"lowbit weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.k < 1 or not 0 <= self.threshold < 1:
            raise ValueError(f"lowbit needs k >= 1 and threshold in [0, 1), got k={self.k}, threshold={self.threshold}")
        if self.guess < 0 or not 1 <= self.match <= MAX_MATCH:
            raise ValueError(f"lowbit needs guess >= 0 and match in [1, {MAX_MATCH}], got guess={self.guess}, "
                             f"match={self.match}")


class LowBit(Drafter):
    name = "lowbit"
    sequential = True  # a forward of the copy per draft token (fewer with guesses): the policy plans the chains' length

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

    def new_state(self, prompt_ids: list[int]) -> NgramIndex | None:
        return NgramIndex(self.options.match, MAX_MATCH) if self.options.guess else None

    def propose(self, batch: DraftBatch) -> Proposal:
        rows, cache, o = batch.rows, batch.cache, self.options
        # every row runs each forward, so the chains stop where the fullest row's cache would (a KV policy's
        # compressed cache may have less room above a row than its budget asks of the others)
        room = min(cache.max_len - n for n in cache.lengths)
        want = [min(o.k, r.budget, room) for r in rows]
        if max(want, default=0) == 0:
            return Proposal([DraftTree() for _ in rows])
        for r in rows:
            if r.state is not None:
                r.state.extend(r.tokens)
        start = list(cache.lengths)
        feed = [r.tokens[-1] for r in rows]  # each row's next token into the copy (its K/V not yet in the cache)
        drafts: list[list[int]] = [[] for _ in rows]
        active = [n > 0 for n in want]
        try:
            while any(active):
                # a row holds its committed K/V plus its drafts' but the last (``cache.lengths[b] - start[b] ==
                # len(drafts[b])``); a finished row is back at its start (a batch forward runs it anyway, writing
                # above its length, where nothing reads). Guesses at batch 1 only: every row runs a forward's
                # tokens, and at batch 4 the longer forwards cost more than the guesses saved (held-out Spec-Bench:
                # 1.54x with them, 1.77x without)
                guess = self._guess(rows[0], drafts[0], want[0] - len(drafts[0]) - 1) if len(rows) == 1 else []
                T = min(1 + len(guess), cache.max_len - cache.lengths[0])
                guess = guess[: T - 1]
                if T == 1:  # a decode step of the copy; it advances every row by one
                    logits = self.copy(torch.tensor([[t] for t in feed], device=self.copy.device), cache,
                                       last_only=True)
                else:  # the next token and the guesses as a chain: a verify forward of the copy, which advances none
                    ids = torch.tensor([[feed[0]] + guess], device=self.copy.device)
                    visible = torch.ones(T, T, dtype=torch.bool).tril()[None]
                    logits = self.copy.forward_tree(ids, cache, torch.arange(T)[None], visible)
                logits = logits[:, :, : self.vocab].float()
                tok_all = logits.argmax(-1).tolist()  # [B][T]
                conf_all = torch.softmax(logits, -1).amax(-1).tolist() if o.threshold else None
                for b, r in enumerate(rows):
                    if not active[b]:
                        if T == 1:
                            cache.truncate(b, start[b])
                        continue
                    new, goes_on = self._accept(logits[b], r, len(drafts[b]), guess, want[b] - len(drafts[b]),
                                                tok_all[b], conf_all[b] if conf_all else None)
                    drafts[b] += new
                    active[b] = goes_on and len(drafts[b]) < want[b]
                    if not active[b]:
                        cache.truncate(b, start[b])  # the last drafts are never fed: the verify tells what follows
                        continue
                    if T > 1:  # batch 1: the next token's and the agreed guesses' K/V are the chain's
                        cache.advance([len(new)])
                    feed[b] = drafts[b][-1]
        finally:
            for b, n in enumerate(start):
                cache.truncate(b, n)
        return Proposal([DraftTree.chain(d, [1.0] * len(d), self.name) for d in drafts])

    def _guess(self, r: DraftRow, drafts: list[int], most: int) -> list[int]:
        """What followed the most recent earlier occurrence of the chain's last tokens (the longest recurring tail,
        ``match`` tokens at least) in the row's prompt and output, at most ``most`` (and ``guess``) tokens."""
        index: NgramIndex | None = r.state
        most = min(most, self.options.guess)
        if index is None or most <= 0:
            return []
        tail = (r.tokens[-MAX_MATCH:] + drafts)[-MAX_MATCH:]
        for n in range(len(tail), self.options.match - 1, -1):
            if found := index.continuations(n, 1, most, tail):
                return found[0]
        return []

    def _accept(self, logits: torch.Tensor, r: DraftRow, done: int, guess: list[int], most: int, argmax: list[int],
                conf: list[float] | None) -> tuple[list[int], bool]:
        """The copy's drafts from one forward of a row's chain (``logits`` # [T, V]: after its next token, then
        after each guessed token): its token at each position while the guesses match it (at most ``most``), and
        whether the chain goes on (False: a draft's probability fell below ``threshold``)."""
        o = self.options
        out: list[int] = []
        for j in range(len(guess) + 1):
            tok, p = argmax[j], conf[j] if conf is not None else 1.0
            if o.couple and r.noise is not None and not r.params.greedy:
                # the draw the target will make at this position, with the copy's logits
                row = logits[j : j + 1]
                tok = int(sample(row, r.params, [r.noise.at(r.position + done + j, self.vocab)])[0])
                p = float(warp(row, r.params)[0, tok]) if o.threshold else 1.0
            if p < o.threshold:
                return out, False
            out.append(tok)
            if len(out) == most or j == len(guess) or guess[j] != tok:
                break
        return out, True
