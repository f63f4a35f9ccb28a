"""Run NVIDIA kvpress (a peer, not part of ponder) on the exact cases ``ponder bench --dump`` wrote, and score its
answers the way ``ponder bench`` does, so the two can be compared case for case.

Each case's whole prompt (question included, as ponder's ``niah`` and ``ruler`` suites build it) is prefilled
inside the press, so the press compresses it knowing the question; then greedy decoding runs on the compressed
cache with the true positions. kvpress needs transformers < 5.3, so it gets its own venv (see docs/bench.md,
"Peers: kvpress"):

    python -m venv --system-site-packages .venv-kvpress
    .venv-kvpress/bin/pip install "transformers<5.3" kvpress==0.5.5
    ponder bench --suite niah:lengths=1024-2048-4096 --dump cases.jsonl
    .venv-kvpress/bin/python tools/kvpress_peer.py --cases cases.jsonl \\
        --model-dir "$(python -c 'from ponder.model.loader import resolve; print(resolve("smollm2-135m"))')" \\
        --presses none,snapkv:0.5,ada-snapkv:0.5,streaming:0.5,knorm:0.5 --out kvpress.json

A press is ``NAME:RATIO`` (the fraction of the prompt's entries removed, the same convention as ponder's
``ratio``); ``none`` is the full cache. ``snapkv`` also takes ponder's snapkv options, to compare the two with the
same settings: ``snapkv:0.5:window=32:kernel=31:pool=max:gqa=max:sinks=4`` is ponder's default snapkv. ``window``
and ``kernel`` are kvpress's own ``window_size`` and ``kernel_size`` (defaults 64 and 5). kvpress's SnapKVPress
always averages along the sequence (zero-padded ``avg_pool1d``), averages the query heads of a KV head, and has
no sinks; ``pool=max``, ``gqa=max`` or ``sinks=N`` switch to ``MatchedSnapKVPress`` below, a subclass whose
``score`` pools the query heads first and then the sequence, as ponder does (``pool=max`` pads with -inf).

What still differs from ponder with every option matched: kvpress scores only the keys before the observation
window (the window is kept by a top score), while ponder pools along the whole prompt, so with ``pool=max`` the
window's own votes also reach the ``kernel // 2`` keys just before it; and kvpress averages the window's queries
where ponder sums them (the same ranking).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path


SIMPLE = ("snapkv", "streaming", "knorm", "pyramidkv", "expected", "tova")
SNAPKV_OPTIONS = {"window": int, "kernel": int, "pool": str, "gqa": str, "sinks": int}


def parse_press(spec: str) -> tuple[str, float, dict[str, int | str]]:
    """``NAME[:RATIO][:key=value...]`` -> (name, ratio, options); SystemExit saying what to write when malformed."""
    name, *parts = spec.split(":")
    if name not in ("none", "ada-snapkv", *SIMPLE):
        raise SystemExit(f"unknown press {name!r}: choose none, {', '.join(SIMPLE)}, ada-snapkv")
    ratio, options = 0.5, {}
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if i == 0 and not eq:
            ratio = _number(spec, part)
        elif eq and name == "snapkv" and key in SNAPKV_OPTIONS:
            options[key] = _integer(spec, value) if SNAPKV_OPTIONS[key] is int else value
        else:
            raise SystemExit(f"bad press option {part!r} in {spec!r}: write NAME:RATIO, and for snapkv "
                             f"optionally {':'.join(k + '=...' for k in SNAPKV_OPTIONS)}")
    _check_snapkv(spec, options)
    return name, ratio, options


def _number(spec: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"{text!r} in press {spec!r} is not a number: write e.g. snapkv:0.5:kernel=31")


def _integer(spec: str, text: str) -> int:
    if not text.isdigit():
        raise SystemExit(f"{text!r} in press {spec!r} is not a whole number: write e.g. snapkv:0.5:kernel=31")
    return int(text)


def _check_snapkv(spec: str, options: dict[str, int | str]) -> None:
    if options.get("pool", "avg") not in ("avg", "max") or options.get("gqa", "mean") not in ("mean", "max"):
        raise SystemExit(f"{spec!r}: pool must be avg or max, gqa mean or max")
    if int(options.get("kernel", 5)) % 2 == 0 or int(options.get("window", 64)) < 1 or int(options.get("sinks", 0)) < 0:
        raise SystemExit(f"{spec!r}: kernel must be odd (kvpress pads it by kernel // 2 on each side), window >= 1, "
                         "sinks >= 0")


def build_press(spec: str):  # noqa: ANN201 - kvpress types exist only in the peer's venv
    import kvpress

    name, ratio, options = parse_press(spec)
    if name == "none":
        return None
    if name == "snapkv":
        return snapkv_press(ratio, options)
    if name == "ada-snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    simple = {"streaming": kvpress.StreamingLLMPress, "knorm": kvpress.KnormPress, "pyramidkv": kvpress.PyramidKVPress,
              "expected": kvpress.ExpectedAttentionPress, "tova": kvpress.TOVAPress}
    return simple[name](compression_ratio=ratio)


def snapkv_press(ratio: float, options: dict[str, int | str]):  # noqa: ANN201
    """kvpress's own SnapKVPress when only its fields (window, kernel) are set, else ``MatchedSnapKVPress``."""
    import kvpress

    sizes = {"window_size": int(options.get("window", 64)), "kernel_size": int(options.get("kernel", 5))}
    extra = {k: options[k] for k in ("pool", "gqa", "sinks") if k in options}
    if not extra:
        return kvpress.SnapKVPress(compression_ratio=ratio, **sizes)
    return matched_press_type()(compression_ratio=ratio, **sizes, **extra)


@functools.cache
def matched_press_type() -> type:
    """A SnapKVPress whose scores pool like ponder's snapkv (defined on first use: kvpress is only in its venv)."""
    import kvpress

    @dataclasses.dataclass
    class MatchedSnapKVPress(kvpress.SnapKVPress):
        pool: str = "avg"  # avg | max, along the sequence
        gqa: str = "mean"  # mean | max, over the query heads of a KV head
        sinks: int = 0  # first entries always kept

        def score(self, module, hidden_states, keys, values, attentions, kwargs):  # noqa: ANN001, ANN201
            probs = self.compute_window_attention(module, hidden_states, keys, self.window_size,
                                                  kwargs["position_embeddings"])  # [B, H, w, S - w]
            return window_scores(probs, keys.shape[1], self.window_size, self.kernel_size, self.pool, self.gqa,
                                 self.sinks)

    return MatchedSnapKVPress


def window_scores(probs, n_kv: int, window: int, kernel: int, pool: str, gqa: str, sinks: int):  # noqa: ANN001, ANN201
    """Scores of every key, as ponder's snapkv ranks them: the window's attention averaged over its queries, pooled
    over each KV head's query heads, then along the sequence; sinks and the window on top.

    probs # [B, H, w, S - w] (the window's attention to the keys before it) -> # [B, Hkv, S]."""
    import torch.nn.functional as F

    B, H, _, n = probs.shape
    s = probs.mean(2).view(B, n_kv, H // n_kv, n)
    s = s.amax(2) if gqa == "max" else s.mean(2)  # [B, Hkv, S - w]
    if pool == "max":
        pad = kernel // 2
        s = F.max_pool1d(F.pad(s, (pad, kernel - 1 - pad), value=float("-inf")), kernel, stride=1)
    else:
        s = F.avg_pool1d(s, kernel, stride=1, padding=kernel // 2)
    top = s.max().item() + 1
    s[..., : min(sinks, n)] = top
    return F.pad(s, (0, window), value=top)


def answer(model, tokenizer, prompt_ids: list[int], press, max_new: int, eos: set[int]) -> str:  # noqa: ANN001
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        new = [int(out.logits[0, -1].argmax())]
        pos = len(prompt_ids)  # the next token's true position: the cache is shorter after compression
        while len(new) < max_new and new[-1] not in eos:
            out = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[pos]]), cache_position=torch.tensor([cache.get_seq_length()]))
            new.append(int(out.logits[0, -1].argmax()))
            pos += 1
    return tokenizer.decode(new, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True, help="JSONL written by `ponder bench --suite S --dump FILE`")
    p.add_argument("--model-dir", required=True, help="Hugging Face model directory (the same weights ponder ran)")
    p.add_argument("--presses", default="none,snapkv:0.5,snapkv:0.75,streaming:0.5,streaming:0.75")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default="kvpress.json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cases = [json.loads(line) for line in Path(args.cases).read_text().splitlines() if line.strip()]
    if not cases or any("expected" not in c or not c["expected"] for c in cases):
        raise SystemExit(f"{args.cases}: no cases with expected answers (dump a niah or ruler suite)")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    results: dict = {"cases": args.cases, "model_dir": args.model_dir, "presses": {}, "answers": []}
    for spec in args.presses.split(","):
        press = build_press(spec)
        scores, start = [], time.perf_counter()
        for c in cases:
            text = answer(model, tokenizer, c["prompt_ids"], press, args.max_new_tokens, eos)
            wanted = [c["expected"]] if isinstance(c["expected"], str) else c["expected"]
            scores.append(sum(w in text for w in wanted) / len(wanted))  # as ponder bench scores a case
            results["answers"].append({"press": spec, "id": c["id"], "output": text, "score": scores[-1],
                                       **{k: c[k] for k in ("length", "depth") if k in c}})
        correct = sum(s == 1.0 for s in scores)
        results["presses"][spec] = {"accuracy": sum(scores) / len(scores), "correct": correct, "cases": len(cases),
                                    "seconds": time.perf_counter() - start}
        print(f"{spec:>16}: {correct}/{len(cases)} correct, accuracy {sum(scores) / len(scores):.2f}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
