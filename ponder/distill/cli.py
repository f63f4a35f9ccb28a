"""``ponder distill data`` and ``ponder distill train head``: self-distillation data, then trained artifacts, by
default under ponder's cache in a folder per model (``ponder.distill.train.artifact_dir``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ponder.errors import PonderError


def add_arguments(p: argparse.ArgumentParser, default_model: str) -> None:
    sub = p.add_subparsers(dest="distill_command", metavar="STEP", required=True)
    data = sub.add_parser("data", help="generate the model's own answers with their hidden states (resumable)")
    _common(data, default_model)
    data.add_argument("--tokens", type=int, default=100_000, help="answer tokens to generate (default 100000)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--max-new-tokens", type=int, default=256)
    data.add_argument("--batch-size", type=int, default=8, help="rows decoding together (default 8)")
    data.add_argument("--specbench", metavar="FILE", default="",
                      help="a Spec-Bench .jsonl: its training split (question_id %% 4 == 1) is used")
    data.add_argument("--no-essays", action="store_true", help="do not use the Paul Graham essay passages")
    data.add_argument("--layers", default="", help="recorded layers, e.g. 2,15,27,30 (default: low, mid, high, last)")
    data.set_defaults(distill_func=cmd_data)

    train = sub.add_parser("train", help="train an artifact on distill data")
    train.add_argument("kind", choices=["head"], help="head: an EAGLE-style draft head")
    _common(train, default_model)
    train.add_argument("--data", default="", help="distill data directory (default: the model's)")
    train.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size (default 8192)")
    train.add_argument("--steps", type=int, default=3, help="training-time test steps (default 3)")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--accum", type=int, default=8, help="sequences per optimizer step (default 8)")
    train.add_argument("--max-len", type=int, default=1024, help="tokens kept per sequence, answer first")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(distill_func=cmd_train)


def _common(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--model", default=default_model, help=f"model (default {default_model})")
    p.add_argument("--dtype", default="fp32", choices=["fp32"], help="the target's dtype for data and labels")
    p.add_argument("--out", default="", help="output directory (default: under ponder's cache, per model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    return int(args.distill_func(args) or 0)


def cmd_data(args: argparse.Namespace) -> int:
    import ponder
    from ponder.distill.data import DataOptions, make_data
    from ponder.distill.train import artifact_dir

    try:
        layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else ()
    except ValueError:
        raise PonderError(f"--layers takes comma-separated layer numbers, got {args.layers!r}")
    if args.specbench and not Path(args.specbench).expanduser().exists():
        raise PonderError(f"--specbench {args.specbench}: no such file")
    options = DataOptions(tokens=args.tokens, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, layers=layers, specbench=args.specbench,
                          essays=not args.no_essays)
    loaded = ponder.load(args.model, args.dtype)
    out = Path(args.out).expanduser() if args.out else artifact_dir(loaded, "data")
    manifest = make_data(loaded, options, out, progress=not args.quiet)
    print(f"{manifest['answer_tokens']} answer tokens in {len(manifest['shards'])} shards: {out}")
    if "note" in manifest:
        print(f"note: {manifest['note']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import ponder
    from ponder.distill.head import KIND, train_head
    from ponder.distill.train import TrainConfig, artifact_dir

    loaded = ponder.load(args.model, args.dtype)
    data = Path(args.data).expanduser() if args.data else artifact_dir(loaded, "data")
    out = Path(args.out).expanduser() if args.out else artifact_dir(loaded, KIND)
    if args.vocab < 1 or args.steps < 1 or args.epochs < 1 or args.lr <= 0 or args.accum < 1 or args.max_len < 8:
        raise PonderError("train needs --vocab, --steps, --epochs, --accum >= 1, --lr > 0 and --max-len >= 8")
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, accum=args.accum, seed=args.seed)
    recipe = train_head(loaded, data, out, args.vocab, args.steps, cfg, args.max_len, progress=not args.quiet)
    acc = ", ".join(f"{a:.1%}" for a in recipe["heldback"]["top1_by_depth"])
    print(f"{KIND} trained in {recipe['train_minutes']:.1f} min on {recipe['sequences']} sequences; held-back top-1 by "
          f"depth: {acc}; draft vocabulary covers {recipe['vocab_coverage']:.1%} of answer tokens")
    print(f"saved to {out} (recipe.json, weights.safetensors, loss.png)")
    print(json.dumps({"heldback": recipe["heldback"]}))
    return 0
