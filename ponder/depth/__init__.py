"""Depth policies (lossy): how many layers, and which FFN blocks, each decoded token runs. One technique per file,
behind ``ponder.depth.base``'s seam.

A policy SPEC is ``name[:key=value...]``: ``static:layers=24``, ``skipdecode:end=22:span=128``,
``exit:threshold=0.9:measure=softmax:adapter=default``, ``ffn-skip:skip=4``, ``duo:threshold=0.1``. Each has a no-op
setting that runs the full model exactly (``static`` / ``skipdecode`` with their defaults, ``exit:threshold=2``,
``ffn-skip:skip=0``, ``duo:threshold=0``).
"""

from __future__ import annotations

from typing import Any

from ponder import options as options_mod
from ponder.depth.base import DepthPolicy, DepthRow, DepthStats, decode


def _registry() -> dict[str, options_mod.Entry]:
    from ponder.depth import duo, exit, ffn_skip, skipdecode, static

    Entry = options_mod.Entry
    return {
        "static": Entry(static.StaticOptions, static.StaticExit, "every token runs the first N layers (baseline)"),
        "skipdecode": Entry(skipdecode.SkipDecodeOptions, skipdecode.SkipDecode,
                            "exit point per position, non-increasing along the sequence (2307.02628)"),
        "exit": Entry(exit.ExitOptions, exit.ConfidentExit,
                      "confidence exits at candidate layers with K/V fill (CALM, 2207.07061)"),
        "ffn-skip": Entry(ffn_skip.FFNSkipOptions, ffn_skip.FFNSkip,
                          "skip the most saturated FFN blocks after a warm-up (2404.03865)"),
        "duo": Entry(duo.DuoOptions, duo.DuoRoute,
                     "a trained router picks the big FFN, a small distilled one or none per token (2410.10846)"),
    }


def policy_names() -> list[str]:
    return list(_registry())


def validate(text: str) -> DepthPolicy:
    """The (unbound) policy a SPEC names: a one-line ``PonderError`` for unknown names or options."""
    name, raw = options_mod.parse_spec(text, "depth policy", _registry())
    entry = _registry()[name]
    policy = entry.build(options_mod.build(entry.options, raw, text))
    policy.spec = text.strip()
    return policy


def make_policy(text: str, loaded: Any) -> DepthPolicy:
    """The policy a SPEC names, bound to ``loaded`` (settings the model cannot take: a one-line ``PonderError``)."""
    policy = validate(text)
    policy.bind(loaded)
    return policy


__all__ = ["DepthPolicy", "DepthRow", "DepthStats", "decode", "make_policy", "policy_names", "validate"]
