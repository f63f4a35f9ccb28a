"""Fidelity of a depth policy to the full model, teacher-forced: the policy decodes the full model's own greedy
continuation token by token (so its exits, fills and skips happen as in generation, over the same context), and each
step's prediction is compared with the full model's.

- **top-1 agreement**: the share of decode steps whose argmax is the full model's greedy token;
- **KL**: mean KL(full || policy) of the next-token distributions, in nats;
- **perplexity**: exp of the mean negative log-likelihood of the full model's greedy tokens, under the policy and
  under the full model (their difference: the perplexity delta);
- **compute**: attention and FFN blocks the policy ran per decoded token, and the share of the layers' weights
  that is (``DepthStats.weight_share``).

The first new token comes from the prompt's prefill, which always runs at full depth: only the decode steps after
it are counted. Shapes: V vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ponder.depth.base import DepthPolicy, DepthRow, decode


@dataclass
class Fidelity:
    agree: int = 0
    steps: int = 0
    kl_sum: float = 0.0
    nll_sum: float = 0.0  # under the policy
    nll_full_sum: float = 0.0  # under the full model
    attention_blocks: int = 0
    ffn_blocks: int = 0

    def add(self, other: "Fidelity") -> None:
        self.agree += other.agree
        self.steps += other.steps
        self.kl_sum += other.kl_sum
        self.nll_sum += other.nll_sum
        self.nll_full_sum += other.nll_full_sum
        self.attention_blocks += other.attention_blocks
        self.ffn_blocks += other.ffn_blocks

    def as_dict(self) -> dict[str, float | int | None]:
        n = self.steps
        return {"top1_agreement": self.agree / n if n else None, "kl": self.kl_sum / n if n else None,
                "ppl": math.exp(self.nll_sum / n) if n else None,
                "ppl_full": math.exp(self.nll_full_sum / n) if n else None, "steps": n, "mean_attention_blocks": self.attention_blocks / n if n else None,
                "mean_ffn_blocks": self.ffn_blocks / n if n else None}


def teacher_forced(model: torch.nn.Module, policy: DepthPolicy, prompt: list[int], reference: list[int]) -> Fidelity:
    """Decode ``reference`` (the full model's greedy continuation of ``prompt``) under ``policy``; see the module
    doc. The policy's statistics count these steps too: give it a policy made for scoring."""
    out = Fidelity()
    if len(reference) < 2:
        return out
    ids = torch.tensor([prompt + reference], device=model.device)
    P = len(prompt)
    with torch.inference_mode():
        full = model(ids, model.new_cache(1, ids.shape[1]))[0, P:-1].float()  # [n, V]: after reference[0..n-1]
        cache = model.new_cache(1, ids.shape[1])
        model(ids[:, :P], cache, last_only=True)
        row = DepthRow(P, policy_state=policy.new_row(P, len(reference)))
        before = (policy.stats.attention_blocks, policy.stats.ffn_blocks)
        logits = []
        for t in reference[:-1]:
            logits.append(decode(model, torch.tensor([[t]], device=ids.device), cache, policy, [row])[0].float())
        got = torch.stack(logits)  # [n, V]
    want = torch.tensor(reference[1:], device=got.device)
    out.agree = int((got.argmax(-1) == want).sum())
    out.steps = len(want)
    logp_full, logp = torch.log_softmax(full, -1), torch.log_softmax(got, -1)
    out.kl_sum = float((logp_full.exp() * (logp_full - logp)).sum())
    out.nll_sum = -float(logp.gather(1, want[:, None]).sum())
    out.nll_full_sum = -float(logp_full.gather(1, want[:, None]).sum())
    out.attention_blocks = policy.stats.attention_blocks - before[0]
    out.ffn_blocks = policy.stats.ffn_blocks - before[1]
    return out
