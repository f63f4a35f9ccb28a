"""How many tokens per verify step could copy-based drafting reach at best, on outputs ponder already produced?

Reads a ``ponder bench`` results.json (the ``baseline`` outputs) and the suite's prompts (``ponder bench --dump``),
and replays every output token by token with an *oracle* that verifies, for free, every candidate the drafter would
propose and keeps whichever agrees longest with the real continuation. This is an upper bound on the mean accepted
length tau (bonus token included) of a copy drafter on these outputs: real drafters verify only the nodes their
policy pays for, and on CPU each verified node costs time, so speed-up <= tau. Drafters replayed:

- ``pld``: the continuations (up to ``--branches``, ``--length`` tokens each) that followed earlier occurrences of the
  history's last 3, 2 or 1 tokens in the prompt and output (what ``ponder.speculate.pld`` proposes);
- ``memory``: the same over every *earlier* output of the run (a pool shared across requests, the most frequent
  continuations of the last 4..2 tokens), as a server that remembers its past answers could draft;
- ``pld+memory``: both, verified together.

    ponder bench --suite specbench:../shared/specbench/dev.jsonl --methods baseline --out bench-out/base
    ponder bench --suite specbench:../shared/specbench/dev.jsonl --dump prompts.jsonl
    python tools/copy_oracle.py bench-out/base/results.json prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

from ponder.speculate.pld import NgramIndex


class Memory:
    """Continuations of every n-gram (n = min_n..max_n) of the outputs added so far, counted."""

    def __init__(self, min_n: int = 2, max_n: int = 4, length: int = 12) -> None:
        self.min_n, self.max_n, self.length = min_n, max_n, length
        self.next: dict[tuple[int, ...], Counter] = defaultdict(Counter)

    def add(self, tokens: list[int]) -> None:
        for i in range(len(tokens)):
            cont = tuple(tokens[i + 1 : i + 1 + self.length])
            for n in range(self.min_n, min(self.max_n, i + 1) + 1):
                if cont:
                    self.next[tuple(tokens[i - n + 1 : i + 1])][cont] += 1

    def lookup(self, history: list[int], branches: int) -> list[list[int]]:
        for n in range(min(self.max_n, len(history)), self.min_n - 1, -1):
            seen = self.next.get(tuple(history[-n:]))
            if seen:
                return [list(c) for c, _ in seen.most_common(branches)]
        return []


def pld_candidates(index: NgramIndex, branches: int, length: int) -> list[list[int]]:
    """The continuations of the longest n-gram (3 down to 1) that ends the history and occurred before."""
    for n in range(min(index.max_n, len(index.tokens) - 1), index.min_n - 1, -1):
        if found := index.continuations(n, branches, length):
            return found
    return []


def agreed(candidates: list[list[int]], truth: list[int]) -> int:
    """The longest prefix any candidate shares with the real continuation."""
    best = 0
    for cand in candidates:
        k = 0
        while k < min(len(cand), len(truth)) and cand[k] == truth[k]:
            k += 1
        best = max(best, k)
    return best


def replay(records: list[dict], prompts: dict[str, list[int]], mode: str, branches: int, length: int) -> dict:
    memory = Memory(length=length)
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # tokens, steps
    for rec in records:
        tokens, out = list(prompts[f"{rec['id']}/{rec['turn']}"]), rec["output_ids"]
        index = NgramIndex(1, 3)  # pld's own index: the candidates it would propose
        t = 0
        while t < len(out):
            index.extend(tokens)
            cands = pld_candidates(index, branches, length) if "pld" in mode else []
            if "memory" in mode:
                cands += memory.lookup(tokens, branches)
            n = min(agreed(cands, out[t:]) + 1, len(out) - t)
            tokens += out[t : t + n]
            t += n
            per_cat[rec["category"]][0] += n
            per_cat[rec["category"]][1] += 1
        memory.add(out)
    tokens, steps = (sum(v[i] for v in per_cat.values()) for i in (0, 1))
    return {"tau": tokens / max(steps, 1), "categories": {c: v[0] / v[1] for c, v in sorted(per_cat.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json of a ponder bench run that includes the baseline method")
    ap.add_argument("prompts", help="the suite's prompts as written by ponder bench --dump")
    ap.add_argument("--branches", type=int, default=2, help="candidates per source per step (default 2)")
    ap.add_argument("--length", type=int, default=12, help="longest candidate (default 12)")
    args = ap.parse_args()
    results = json.load(open(args.results))
    records = [p for p in results["prompts"] if p["method"] == "baseline"]
    if not records:
        raise SystemExit(f"{args.results} holds no baseline outputs: run ponder bench with --methods baseline")
    prompts = {}
    for line in open(args.prompts):
        case = json.loads(line)
        prompts[f"{case['id']}/{case['turn']}"] = case["prompt_ids"]
    missing = [r["id"] for r in records if f"{r['id']}/{r['turn']}" not in prompts]
    if missing:
        raise SystemExit(f"{len(missing)} outputs have no prompt in {args.prompts} (same suite and options?)")
    modes = ("pld", "memory", "pld+memory")
    rows = {mode: replay(records, prompts, mode, args.branches, args.length) for mode in modes}
    cats = list(rows["pld"]["categories"])
    print(f"oracle tau over {len(records)} outputs (upper bound of mean accepted length, bonus token included)\n")
    print("| drafter | all | " + " | ".join(cats) + " |")
    print("|---|---|" + "---|" * len(cats))
    for mode, r in rows.items():
        print(f"| {mode} | {r['tau']:.2f} | " + " | ".join(f"{r['categories'][c]:.2f}" for c in cats) + " |")


if __name__ == "__main__":
    main()
