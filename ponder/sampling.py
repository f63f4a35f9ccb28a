"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus, arXiv 1904.09751).

Sampling uses the Gumbel-max trick (Gumbel 1954; as a sampler e.g. Maddison et al., arXiv 1411.0030): a token drawn
as ``argmax_x(log w(x) + g_x)``, with ``g_x`` independent standard Gumbel noise and ``w`` the warped distribution,
follows ``w`` exactly. The noise of each output position comes from its own stream keyed by
(seed, row, position) (``gumbel_noise``), so a seeded output is a pure function of (seed, prompt index in the call,
prompt, params): it does not depend on the batch size, on what else ran, or on how many tokens a speculative step
verified. That is also what makes speculative sampling reproduce plain sampling token for token: with the noise
fixed, the token a position samples is a deterministic function of its logits, so a verify step accepts a draft
exactly when plain sampling would have produced it (``ponder.speculate.accept``), as greedy verification does.
Unseeded calls draw a random base seed per call.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import torch

from ponder.errors import PonderError


class InvalidParameter(PonderError, ValueError):
    """A sampling or generation parameter outside its valid range."""


MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: each output token's log-probability and the k most likely
    # tokens' (the model's own distribution, before temperature and cuts; at most MAX_LOGPROBS)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter("stop must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in 0..{MAX_LOGPROBS} (top alternatives per token), got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidParameter(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def resolve_seed(params: SamplingParams) -> int:
    """The call's base seed: ``params.seed``, or a fresh random one when sampling unseeded."""
    return params.seed if params.seed is not None else secrets.randbits(62)


_TINY = 1e-300  # torch.rand may return exactly 0, and -log(-log(0)) = -inf: clamp so every token stays possible


def gumbel_noise(seed: int, row: int, position: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise # [V] float64 for one output position of one row, a pure function of its arguments.

    The key is hashed (BLAKE2b) into the seed of a fresh CPU generator, so positions are independent streams and the
    noise does not depend on which other positions were drawn, in what order, or on which device the model runs."""
    key = hashlib.blake2b(f"{seed}/{row}/{position}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    u = torch.rand(vocab, generator=g, dtype=torch.float64).clamp_(min=_TINY)
    return -torch.log(-torch.log(u))


@dataclass
class RowNoise:
    """One row's Gumbel noise per output position (``gumbel_noise``), kept from when a verify step first needs a
    position until the row commits past it, so each position's noise is drawn once."""

    seed: int
    row: int  # the prompt's index in the call
    drawn: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> # [V]

    def at(self, position: int, vocab: int) -> torch.Tensor:
        """Noise # [V] for output position ``position`` (0: the row's first generated token)."""
        if position not in self.drawn:
            self.drawn[position] = gumbel_noise(self.seed, self.row, position, vocab)
        return self.drawn[position]

    def forget_below(self, position: int) -> None:
        """Drop positions already committed (their noise is never needed again)."""
        for p in [p for p in self.drawn if p < position]:
            del self.drawn[p]


def warped_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-weights # [B, V] float64 of the sampling distribution from logits # [B, V]: temperature, then top-k and
    top-p cuts as -inf. Every op works row by row, so a row's result does not depend on the other rows."""
    scaled = logits.double() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling probabilities # [B, V] (float64) from logits # [B, V] after temperature, top-k and top-p."""
    return torch.softmax(warped_logits(logits, params), dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Next token per row # [B] from logits # [B, V]: argmax when greedy, else the Gumbel-max trick,
    ``argmax(log-weights + noise)``, with each row's noise # [V] for the position it samples (``RowNoise.at``)."""
    if params.greedy:
        return logits.argmax(-1)
    if noise is None or len(noise) != logits.shape[0]:
        raise ValueError("sampling needs one noise vector per row (RowNoise.at)")
    g = torch.stack(noise).to(logits.device)
    return (warped_logits(logits, params) + g).argmax(-1)


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Margin between the best and second-best logit per row # [B]: tiny margins are floating-point near-ties."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[:, 0] - top[:, 1]
