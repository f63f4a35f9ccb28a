"""What every trained artifact shares: reading the self-distillation shards, the target's labels, the held-back
split, the frequency-ranked draft vocabulary, the training loop (progress bar with the loss, loss curve PNG) and
the artifact files (``weights.safetensors`` + ``recipe.json``).

Glossary
- **sequence**: one prompt plus one of its answers, with the recorded hidden states (``data.py``).
- **label** ``y[t]``: the target's own greedy choice after token t, ``argmax logits(h_last[t])``: what greedy
  verification would accept at that position (for a sampled answer it may differ from the next data token).
- **held-back**: sequences never trained on (a deterministic 1 in ``HOLD_BACK`` of the prompts, by hash of the
  prompt's source), on which per-position top-1 accuracy is reported.
- **draft vocabulary** (FR-Spec, arXiv 2502.14856): the tokens the model itself emits most often in the training
  answers; draft heads score only these, because a full-vocabulary head costs a large share of a target forward on
  a CPU per draft token.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from ponder.errors import PonderError

HOLD_BACK = 20  # one prompt in HOLD_BACK is held back for evaluation


@dataclass
class Sequence:
    source: str  # the prompt's source ("specbench:81", ...)
    tokens: torch.Tensor  # [T] int64
    answer_start: int  # index of the first answer token
    hidden: dict[int, torch.Tensor]  # layer -> [T, E] bf16
    labels: torch.Tensor | None = None  # [T] int64: y[t], the target's greedy choice after token t
    loss_start: int = 0  # the first token whose position is new data (a sampled answer's prompt repeats another's)


def read_data(data_dir: Path, max_len: int = 0) -> tuple[dict[str, Any], list[Sequence]]:
    """The manifest and every sequence of a ``ponder distill data`` directory; ``max_len`` > 0 keeps only a
    sequence's last ``max_len`` tokens (the answer first, then as much prompt as fits)."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise PonderError(f"{data_dir} holds no distill data (no manifest.json): make it with `ponder distill data`")
    manifest = json.loads(path.read_text())
    seqs = []
    for shard in manifest["shards"]:
        if shard["file"] is not None:
            sources = shard.get("sources") or list(shard["prompts"]) * 2  # data made before "sources": 2 answers
            seqs += shard_sequences(load_file(str(Path(data_dir) / shard["file"])), sources, max_len)
    if not seqs:
        raise PonderError(f"{data_dir} holds no sequences yet: run `ponder distill data` to the end")
    return manifest, seqs


def shard_sequences(t: dict[str, torch.Tensor], sources: list[str], max_len: int = 0) -> list[Sequence]:
    """The sequences of one shard's tensors (``data.py``'s layout), whose sources are ``sources``."""
    seqs = []
    starts = t["starts"].tolist()
    if len(sources) != len(starts) - 1:
        raise PonderError(f"a distill shard holds {len(starts) - 1} sequences but its manifest names {len(sources)}: "
                          "make the data again")
    loss_starts = t["loss_starts"].tolist() if "loss_starts" in t else [0] * len(sources)
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        lo = max(a, b - max_len) if max_len else a
        hidden = {int(k.split(".")[1]): v[lo:b] for k, v in t.items() if k.startswith("hidden.")}
        answer = max(0, int(t["answer_starts"][i]) - (lo - a))
        seqs.append(Sequence(sources[i], t["tokens"][lo:b].long(), answer, hidden,
                             loss_start=max(0, loss_starts[i] - (lo - a))))
    return seqs


def source_kind(source: str) -> str:
    """What a sequence's prompt is: ``specbench``, ``builtin``, ``essay`` (or ``text``: teacher-forced essay text)."""
    return source.split(":", 1)[0]


def held_back(source: str) -> bool:
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=4).digest(), "little") % HOLD_BACK == 0


def _evaluated(source: str) -> bool:
    """Whether a sequence is held back: its prompt is (teacher-forced text has no answer to evaluate, and its
    passages are those of prompts not held back, ``data.text_windows``)."""
    return held_back(source) and not source.startswith("text:")


def split(seqs: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """(training sequences, held-back sequences); both answers of a prompt fall on the same side."""
    evals = [s for s in seqs if _evaluated(s.source)]
    train = [s for s in seqs if not _evaluated(s.source)]
    if not evals or not train:  # tiny data sets: hold back the last prompt's sequences
        last = next((s.source for s in reversed(seqs) if not s.source.startswith("text:")), seqs[-1].source)
        train, evals = [s for s in seqs if s.source != last], [s for s in seqs if s.source == last]
    return train, evals


def add_labels(model: Any, seqs: list[Sequence], last_layer: int, chunk: int = 512) -> None:
    """Fill each sequence's ``labels`` from its recorded last-layer states through the target's own head."""
    with torch.inference_mode():
        for s in seqs:
            h = s.hidden[last_layer]
            s.labels = torch.cat([model.logits(h[i : i + chunk].to(model.dtype)).argmax(-1)
                                  for i in range(0, len(h), chunk)]).long().cpu()


def draft_vocabulary(seqs: list[Sequence], size: int, vocab: int) -> torch.Tensor:
    """The ``size`` tokens the target chooses most often in the answers # [size] int64, most frequent first."""
    counts = torch.zeros(vocab, dtype=torch.int64)
    for s in seqs:
        counts += torch.bincount(s.labels[max(0, s.answer_start - 1) :], minlength=vocab)
    return torch.argsort(counts, descending=True, stable=True)[: min(size, vocab)]


def vocab_coverage(seqs: list[Sequence], draft_ids: torch.Tensor) -> float:
    """Share of answer labels inside the draft vocabulary (no head can draft the others)."""
    hit = sum(int(torch.isin(s.labels[s.answer_start :], draft_ids).sum()) for s in seqs)
    return hit / max(1, sum(len(s.labels) - s.answer_start for s in seqs))


def vocab_map(draft_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary id -> draft-vocabulary index, -100 (ignored by the loss) outside it # [vocab]."""
    out = torch.full((vocab,), -100, dtype=torch.int64)
    out[draft_ids] = torch.arange(len(draft_ids))
    return out


@dataclass
class TrainConfig:
    epochs: int = 2
    lr: float = 1e-3
    accum: int = 1  # sequences per optimizer step (small data sets need many optimizer steps)
    warmup: int = 20  # optimizer steps of linear warm-up, then cosine decay to 10%
    seed: int = 0
    bf16: bool = False  # forward and backward under bf16 autocast (weights and optimizer stay fp32)


def train_loop(
    params: list[torch.nn.Parameter], loss_of: Callable[[Sequence], torch.Tensor], seqs: list[Sequence],
    cfg: TrainConfig, progress: bool = True, desc: str = "train",
) -> list[tuple[int, float]]:
    """AdamW over ``seqs`` for ``cfg.epochs`` epochs (shuffled by ``cfg.seed``); returns the loss curve as
    (optimizer step, mean loss of that step's sequences). ``cfg.bf16``: mixed precision (1.3-1.6x the positions per
    second of fp32 for the draft head on an AVX512-BF16 CPU, docs/distill.md)."""
    import warnings

    from tqdm import tqdm


    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total = math.ceil(len(seqs) * cfg.epochs / cfg.accum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_scale(i, cfg.warmup, total))
    g = torch.Generator().manual_seed(cfg.seed)
    order = [i for _ in range(cfg.epochs) for i in torch.randperm(len(seqs), generator=g).tolist()]
    curve, pending = [], []
    bar = tqdm(total=len(order), unit="seq", desc=desc, disable=not progress)
    device = params[0].device.type if params else "cpu"
    for n, i in enumerate(order, 1):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16), warnings.catch_warnings():
            # RMSNorm over bf16 inputs with fp32 weights takes the unfused kernel: right, and not worth a warning
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            loss = loss_of(seqs[i]).float()
        (loss / cfg.accum).backward()
        pending.append(float(loss.detach()))
        bar.update(1)
        if len(pending) == cfg.accum or n == len(order):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            curve.append((len(curve) + 1, sum(pending) / len(pending)))
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            pending = []
    bar.close()
    return curve


def _lr_scale(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def plot_curve(curve: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], [v for _, v in curve])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def artifact_dir(loaded: Any, kind: str) -> Path:
    """Where ``kind`` artifacts of this model go by default: under ponder's cache, one folder per model."""
    from ponder.model.loader import cache_root

    key = hashlib.blake2b(str(Path(loaded.path).resolve()).encode(), digest_size=4).hexdigest()
    return cache_root() / "distill" / f"{Path(loaded.path).name}-{key}" / kind


SHIPPED = Path(__file__).resolve().parent.parent / "artifacts"  # artifacts that ship with ponder, per model name


def trained_artifact(loaded: Any, kind: str, shipped_root: Path = SHIPPED) -> Path:
    """The ``kind`` artifact a drafter uses by default: the user's own (``artifact_dir``) when it exists, else the
    one shipped with ponder for this model (``make heads`` rebuilds those), else the user's path (whose absence the
    loader reports with the command that makes it)."""
    own = artifact_dir(loaded, kind)
    shipped = shipped_root / str(loaded.name) / kind
    if not (own / "weights.safetensors").exists() and (shipped / "weights.safetensors").exists():
        return shipped
    return own


def save_artifact(out: Path, tensors: dict[str, torch.Tensor], recipe: dict[str, Any]) -> dict[str, Any]:
    """``weights.safetensors`` (float tensors stored as bf16) and ``recipe.json``, written atomically; returns the
    recipe as written."""
    import ponder

    out.mkdir(parents=True, exist_ok=True)
    stored = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    tmp = out / "weights.tmp"
    save_file(stored, str(tmp))
    os.replace(tmp, out / "weights.safetensors")
    recipe = {"ponder_version": ponder.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"), **recipe}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return recipe


def load_artifact(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors as float32 / int64, recipe) of an artifact directory made by ``ponder distill train KIND``."""
    path = Path(path).expanduser()
    weights, recipe_path = path / "weights.safetensors", path / "recipe.json"
    if not weights.exists() or not recipe_path.exists():
        raise PonderError(f"no trained {kind} in {path}: make one with `ponder distill data` then "
                          f"`ponder distill train {kind}`")
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("kind") != kind:
        raise PonderError(f"{path} holds a {recipe.get('kind')!r} artifact, not a {kind!r}")
    tensors = {k: v.float() if v.is_floating_point() else v.long() for k, v in load_file(str(weights)).items()}
    return tensors, recipe


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
