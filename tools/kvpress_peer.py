"""Run NVIDIA kvpress (a peer, not part of ponder) on the exact cases ``ponder bench --dump`` wrote, and score its
answers the way ``ponder bench`` does, so the two can be compared case for case.

Each case's whole prompt (question included, as ponder's ``niah`` and ``ruler`` suites build it) is prefilled
inside the press, so the press compresses it knowing the question; then greedy decoding runs on the compressed
cache with the true positions. kvpress needs transformers < 5.3, so it gets its own venv (see the README,
"Peers: kvpress"):

    python -m venv --system-site-packages .venv-kvpress
    .venv-kvpress/bin/pip install "transformers<5.3" kvpress==0.5.5
    ponder bench --suite niah:lengths=1024-2048-4096 --dump cases.jsonl
    .venv-kvpress/bin/python tools/kvpress_peer.py --cases cases.jsonl \\
        --model-dir "$(python -c 'from ponder.model.loader import resolve; print(resolve("smollm2-135m"))')" \\
        --presses none,snapkv:0.5,ada-snapkv:0.5,streaming:0.5,knorm:0.5 --out kvpress.json

A press is ``NAME:RATIO`` (the fraction of the prompt's entries removed, the same convention as ponder's
``ratio``); ``none`` is the full cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path


def build_press(spec: str):  # noqa: ANN201 - kvpress types exist only in the peer's venv
    import kvpress

    name, _, ratio_text = spec.partition(":")
    if name == "none":
        return None
    ratio = float(ratio_text or 0.5)
    simple = {
        "snapkv": kvpress.SnapKVPress, "streaming": kvpress.StreamingLLMPress, "knorm": kvpress.KnormPress,
        "pyramidkv": kvpress.PyramidKVPress, "expected": kvpress.ExpectedAttentionPress, "tova": kvpress.TOVAPress,
    }
    if name in simple:
        return simple[name](compression_ratio=ratio)
    if name == "ada-snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    raise SystemExit(f"unknown press {name!r}: choose none, {', '.join(simple)}, ada-snapkv")


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
