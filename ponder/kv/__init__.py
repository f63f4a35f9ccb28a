"""KV-cache compression policies, one per file, behind the hooks of ``ponder.kv.base``.

A policy SPEC is ``name[:key=value...]``: ``streaming:ratio=0.5``, ``snapkv:budget=1024:window=64``,
``h2o:ratio=0.75:recent=0.25``, ``quant:bits=4``. Every eviction or selection policy takes ``ratio`` (fraction of
prompt entries removed) or ``budget`` (entries kept); ``ratio=0`` is an exact no-op. ``quant`` keeps every entry
and takes ``bits``.
"""

from __future__ import annotations

from ponder import options as options_mod
from ponder.kv.base import KVHook, KVOptions, KVPolicy, KVState


def _registry() -> dict[str, options_mod.Entry]:
    from ponder.kv import h2o, quant, snapkv, streaming, tokenselect

    Entry = options_mod.Entry
    return {
        "streaming": Entry(streaming.StreamingOptions, streaming.Streaming, "attention sinks + recent window (2309.17453)"),
        "h2o": Entry(h2o.H2OOptions, h2o.H2O, "heavy hitters by accumulated attention + recent window (2306.14048)"),
        "snapkv": Entry(snapkv.SnapKVOptions, snapkv.SnapKV, "observation-window votes per KV head (2404.14469)"),
        "quant": Entry(quant.QuantOptions, quant.Quant, "int8/int4 KV, keys per channel, values per token (2402.02750)"),
        "tokenselect": Entry(tokenselect.TokenSelectOptions, tokenselect.TokenSelect,
                             "per-step per-KV-head top-k attention, no eviction (2411.02886)"),
    }


def policy_names() -> list[str]:
    return list(_registry())


def parse(text: str) -> tuple[str, dict[str, str]]:
    return options_mod.parse_spec(text, "KV-cache policy", _registry())


def make_policy(text: str, ratio: float | None = None, budget: int | None = None) -> KVPolicy:
    """Build the policy a SPEC names; ``ratio``/``budget`` (``--kv-ratio``/``--kv-budget``) fill in when the SPEC
    does not give them."""
    name, raw = parse(text)
    if ratio is not None and "ratio" not in raw and "budget" not in raw:
        raw["ratio"] = str(ratio)
    if budget is not None and "ratio" not in raw and "budget" not in raw:
        raw["budget"] = str(budget)
    entry = _registry()[name]
    return entry.build(options_mod.build(entry.options, raw, text))


__all__ = ["KVHook", "KVOptions", "KVPolicy", "KVState", "make_policy", "parse", "policy_names"]
