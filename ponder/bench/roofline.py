"""The machine's limit for decoding: memory bandwidth, and how much of it each method's weight reads use.

A decode step of a small model on a CPU reads every weight once; its speed limit is the memory bandwidth divided by
the bytes of weights per step. ``memory_bandwidth`` measures that bandwidth the way STREAM's copy kernel does (read
and write a buffer far larger than the caches, count both, keep the best of a few passes), with the threads the
methods get. Each method reports its weight bytes per forward (``weight_bytes``); the bench turns them into the
achieved weight bandwidth (bytes per forward x forwards per second while decoding) and its fraction of the measured
bandwidth: the roofline fraction.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUFFER_BYTES = 512 * 2**20  # per buffer: far larger than any CPU's last-level cache


def memory_bandwidth(threads: int | None = None, passes: int = 5) -> float:
    """Bytes per second of a STREAM-like copy (read + write counted) over two ``BUFFER_BYTES`` buffers."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        src = torch.ones(BUFFER_BYTES // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch every page first
        best = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return 2 * BUFFER_BYTES / best
    finally:
        torch.set_num_threads(before)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one forward of ponder's model reads: every tensor of the decoder layers and the final norm,
    and the LM head's weights in the form its kernel reads (the embedding lookup reads one row: not counted; MKL's
    packed copies serve other row counts: not counted)."""
    total = 0
    for part in (*model.layers, model.norm):
        total += sum(t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
    head = model.lm_head
    if getattr(head, "approx", None) is not None:  # q4's head: its 4-bit copy (the re-scored rows: ~37 KB)
        total += sum(t.numel() * t.element_size() for t in head.approx.buffers())
    elif getattr(head, "qweight", None) is not None:  # its int8 copy
        total += head.qweight.numel() + head.qscale.numel() * head.qscale.element_size()
    else:
        total += head.weight.numel() * head.weight.element_size()
    return total


def hf_weight_bytes(model: Any) -> int:
    """The same count for a transformers model: every parameter but the input embedding (read one row per token)
    unless the head is tied to it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def gguf_weight_bytes(path: Path) -> int:
    """The same count for llama.cpp on a GGUF file: every tensor's stored bytes but the token embedding's, unless
    the file has no separate output matrix (then the head reads the embedding whole)."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if tied or t.name != "token_embd.weight")
