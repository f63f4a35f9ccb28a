"""A tiny Llama checkpoint whose greedy continuation is mostly periodic, so every drafter has something to get right.

On the random tiny model (``tinymodel.py``) greedy text is noise: prompt lookup finds nothing to copy and the first
layers' exit head never agrees with the full model, so the lossless matrix would compare runs in which nothing was
drafted or accepted. Here the head maps each token's embedding to a fixed successor ``NEXT[t]`` (a permutation made
of short cycles, some of them the test prompts' own patterns), and the layers' output projections are scaled down,
so the residual stream stays close to the current token's embedding and:

- the continuation follows the cycles (prompt lookup, lookahead and recycling find and copy them),
- an exit after the first layer predicts what the full model predicts, confidently (early exit drafts and is
  accepted),
- attention still moves the logits (``LAYER_SCALE``), so some tokens leave the cycle depending on the context and
  the verify path's cache, masks and positions still decide the output.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinymodel import BASE_CONFIG, make_model_dir

CYCLES = [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42], [3, 1, 4]]  # the test prompts' own patterns continue
HEAD_GAIN = 0.3  # successor logit ~ HEAD_GAIN * |normed embedding|^2: confident (early exit drafts past 0.4)
LAYER_SCALE = 0.06  # damps every layer's output projection: 0.03 follows the cycles always, 0.1 rarely


def successors(vocab: int, seed: int = 0) -> list[int]:
    """NEXT[t] for every token: CYCLES, then the other tokens in random cycles of length 2-6."""
    nxt = list(range(vocab))
    for cyc in CYCLES:
        for a, b in zip(cyc, cyc[1:] + cyc[:1]):
            nxt[a] = b
    rest = [t for t in range(vocab) if not any(t in c for c in CYCLES)]
    random.Random(seed).shuffle(rest)
    while rest:
        n = min(len(rest), random.Random(len(rest)).randint(2, 6))
        cyc, rest = rest[:n], rest[n:]
        for a, b in zip(cyc, cyc[1:] + cyc[:1]):
            nxt[a] = b
    return nxt


def make_cyclic_dir(path: Path, seed: int = 0) -> Path:
    """Write the tiny random checkpoint, then rewire its head and damp its layers (see the module doc)."""
    make_model_dir(path, seed=seed)
    file = path / "model.safetensors"
    sd = load_file(str(file))
    emb = sd["model.embed_tokens.weight"]  # [V, E]
    normed = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()  # what the final RMSNorm makes of a bare embedding
    head = torch.zeros_like(sd["lm_head.weight"])  # [V, E]
    for t, n in enumerate(successors(BASE_CONFIG["vocab_size"], seed)):
        head[n] += HEAD_GAIN * normed[t]
    sd["lm_head.weight"] = head
    for name in sd:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            sd[name] = sd[name] * LAYER_SCALE
    save_file(sd, str(file), metadata={"format": "pt"})
    return path
