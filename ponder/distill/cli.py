"""``ponder distill data`` and ``ponder distill train head|medusa|exits``: self-distillation data, then trained
artifacts, by default under ponder's cache in a folder per model (``ponder.distill.train.artifact_dir``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ponder.errors import PonderError


def add_arguments(p: argparse.ArgumentParser, default_model: str) -> None:
    sub = p.add_subparsers(dest="distill_command", metavar="STEP", required=True)
    data = sub.add_parser("data", help="generate the model's own answers with their hidden states (resumable)")
    _common(data, default_model)
    data.add_argument("--tokens", type=int, default=100_000, help="answer tokens to generate (default 100000)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--max-new-tokens", type=int, default=256)
    data.add_argument("--batch-size", type=int, default=16, help="rows decoding together (default 16)")
    data.add_argument("--specbench", metavar="FILE", default="",
                      help="a Spec-Bench .jsonl: its training split (question_id %% 4 == 1) is used")
    data.add_argument("--no-essays", action="store_true", help="do not use the Paul Graham essay passages")
    data.add_argument("--layers", default="", help="recorded layers, e.g. 2,15,27,30 (default: low, mid, high, last)")
    data.add_argument("--answer-dtype", default="fp32", choices=["fp32", "int8", "q4"],
                      help="weights that generate the answers; the hidden states and labels are always the fp32 "
                           "target's (q4: about twice the answers per minute; default fp32)")
    data.add_argument("--answer-compile", action="store_true",
                      help="generate the answers on the compiled fast path (worth it with q4)")
    data.add_argument("--text-tokens", type=int, default=0,
                      help="also record this many tokens of teacher-forced essay text (default 0: none)")
    data.set_defaults(distill_func=cmd_data)

    train = sub.add_parser("train", help="train an artifact on distill data")
    train.add_argument("kind", choices=["head", "medusa", "exits", "duo"],
                       help="head: an EAGLE-style draft head; medusa: Medusa-1 heads; exits: exit adapters; "
                            "duo: small FFNs and routers for --depth duo")
    _common(train, default_model)
    train.add_argument("--data", default="", help="distill data directory (default: the model's)")
    train.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size (default 8192)")
    train.add_argument("--steps", type=int, default=3, help="head: training-time test steps (default 3)")
    train.add_argument("--heads", type=int, default=4, help="medusa: heads, i.e. draft depth (default 4)")
    train.add_argument("--layers", default="",
                       help="exits: candidate exit layers, e.g. 8,12,16,20,24 (default: those, scaled to the depth)")
    train.add_argument("--positions", type=int, default=None,
                       help="exits, duo: positions per sequence trained on, drawn at random (0: all; default 64 for "
                            "exits, 48 answer positions for duo)")
    train.add_argument("--width", type=int, default=None,
                       help="duo: the small FFNs' width (default 64); exits: the MLPs' width (default 512)")
    train.add_argument("--mlp-layers", default="",
                       help="exits: exit layers whose affine map is followed by a residual MLP, e.g. 24 (default: "
                            "none)")
    train.add_argument("--batch", type=int, default=256, help="duo: positions per optimizer step (default 256)")
    train.add_argument("--router", default="margin", choices=["margin", "local"],
                       help="duo: what the routers predict: margin (each option's first-order change of the final "
                            "top-1 margin, as a share of it; default) or local (its change of the residual stream)")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--accum", type=int, default=1,
                       help="sequences per optimizer step (default 1: small data needs many optimizer steps)")
    train.add_argument("--answers-only", action="store_true",
                       help="head: train on answer positions only (default: prompt positions too)")
    train.add_argument("--target", default="soft", choices=["hard", "soft"],
                       help="head: train toward the target's whole distribution over the draft vocabulary (soft, "
                            "knowledge distillation; default) or only its top-1 (hard)")
    train.add_argument("--feature-weight", type=float, default=0.1,
                       help="head: weight of the feature regression toward the target's last-layer state (default "
                            "0.1; 0: none)")
    train.add_argument("--max-len", type=int, default=1024, help="tokens kept per sequence, answer first")
    train.add_argument("--bf16", action="store_true",
                       help="train under bf16 autocast (faster on CPUs with native bf16; weights stay fp32)")
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

    layers = _layers(args.layers)
    if args.specbench and not Path(args.specbench).expanduser().exists():
        raise PonderError(f"--specbench {args.specbench}: no such file")
    options = DataOptions(tokens=args.tokens, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, layers=layers, specbench=args.specbench,
                          essays=not args.no_essays, answer_dtype=args.answer_dtype,
                          answer_compile=args.answer_compile, text_tokens=args.text_tokens)
    loaded = ponder.load(args.model, args.dtype)
    answer_loaded = None
    if args.answer_dtype != args.dtype or args.answer_compile:
        answer_loaded = ponder.load(args.model, args.answer_dtype, compile=args.answer_compile)
    out = Path(args.out).expanduser() if args.out else artifact_dir(loaded, "data")
    manifest = make_data(loaded, options, out, progress=not args.quiet, answer_loaded=answer_loaded)
    text = f" and {manifest['text_tokens']} text tokens" if manifest.get("text_tokens") else ""
    print(f"{manifest['answer_tokens']} answer tokens{text} in {len(manifest['shards'])} shards: {out}")
    if "note" in manifest:
        print(f"note: {manifest['note']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import ponder
    from ponder.distill.train import TrainConfig, artifact_dir

    if args.vocab < 1 or args.steps < 1 or args.epochs < 1 or args.lr <= 0 or args.accum < 1 or args.max_len < 8:
        raise PonderError("train needs --vocab, --steps, --epochs, --accum >= 1, --lr > 0 and --max-len >= 8")
    if not args.feature_weight >= 0:  # NaN too
        raise PonderError("train needs --feature-weight >= 0")
    if args.heads < 1 or (args.positions or 0) < 0 or (args.width is not None and args.width < 1) or args.batch < 1:
        raise PonderError("train needs --heads >= 1, --width >= 1, --batch >= 1 and --positions >= 0")
    _layers(args.layers), _layers(args.mlp_layers, "--mlp-layers")  # a malformed list fails before the model loads
    loaded = ponder.load(args.model, args.dtype)
    data = Path(args.data).expanduser() if args.data else artifact_dir(loaded, "data")
    out = Path(args.out).expanduser() if args.out else artifact_dir(loaded, args.kind)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, accum=args.accum, seed=args.seed, bf16=args.bf16)
    recipe, summary = _TRAIN[args.kind](loaded, data, out, cfg, args)
    print(f"{args.kind} trained in {recipe['train_minutes']:.1f} min on {recipe['sequences']} sequences; {summary}")
    print(f"saved to {out} (recipe.json, weights.safetensors, loss.png)")
    print(json.dumps({"heldback": recipe["heldback"]}))
    return 0


def _train_head(loaded: Any, data: Path, out: Path, cfg: Any, args: argparse.Namespace) -> tuple[dict, str]:
    from ponder.distill.head import train_head

    recipe = train_head(loaded, data, out, args.vocab, args.steps, cfg, args.max_len, progress=not args.quiet,
                        prompts=not args.answers_only, soft=args.target == "soft",
                        feature=args.feature_weight)
    acc = ", ".join(f"{a:.1%}" for a in recipe["heldback"]["top1_by_depth"])
    return recipe, (f"held-back top-1 by depth: {acc}; draft vocabulary covers {recipe['vocab_coverage']:.1%} of "
                    "answer tokens")


def _train_medusa(loaded: Any, data: Path, out: Path, cfg: Any, args: argparse.Namespace) -> tuple[dict, str]:
    from ponder.distill.medusa import train_medusa

    recipe = train_medusa(loaded, data, out, args.heads, args.vocab, cfg, args.max_len, progress=not args.quiet)
    acc = ", ".join(f"{a:.1%}" for a in recipe["heldback"]["top1_by_head"])
    return recipe, (f"held-back top-1 by head: {acc}; draft vocabulary covers {recipe['vocab_coverage']:.1%} of "
                    "answer tokens")


def _train_exits(loaded: Any, data: Path, out: Path, cfg: Any, args: argparse.Namespace) -> tuple[dict, str]:
    from ponder.distill.exits import train_exits

    positions = 64 if args.positions is None else args.positions
    recipe = train_exits(loaded, data, out, _layers(args.layers), positions, cfg, args.max_len,
                         progress=not args.quiet, mlp_layers=_layers(args.mlp_layers, "--mlp-layers"),
                         mlp_width=512 if args.width is None else args.width)
    ev = recipe["heldback"]
    acc = ", ".join(f"{layer}: {b:.1%} -> {a:.1%}"
                    for layer, b, a in zip(recipe["layers"], ev["top1_identity"], ev["top1_adapted"]))
    return recipe, f"held-back top-1 agreement with the full model by exit layer (identity -> adapter): {acc}"


def _train_duo(loaded: Any, data: Path, out: Path, cfg: Any, args: argparse.Namespace) -> tuple[dict, str]:
    from ponder.distill.duo import train_duo

    positions = 48 if args.positions is None else args.positions
    width = 64 if args.width is None else args.width
    recipe = train_duo(loaded, data, out, width, positions, cfg, min(args.max_len, 1024), args.batch,
                       progress=not args.quiet, router=args.router)
    ev = recipe["heldback"]
    sweep = ", ".join(f"{r['threshold']}: {r['top1']:.1%} at {r['big_ffn']:.1f} big + {r['small_ffn']:.1f} small"
                      for r in ev["sweep"])
    return recipe, (f"threshold calibrated to {recipe['calibrated_to']:.0%} held-back top-1: {recipe['threshold']}; "
                    f"held-back relative error, skip {ev['relative_error']['skip']:.3f}, small FFN "
                    f"{ev['relative_error']['small']:.3f} (pruned start {ev['relative_error_pruned']['small']:.3f}); "
                    f"router R^2 {ev['router_r2']}; top-1 agreement by threshold: {sweep}")


_TRAIN = {"head": _train_head, "medusa": _train_medusa, "exits": _train_exits, "duo": _train_duo}


def _layers(text: str, flag: str = "--layers") -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",")) if text else ()
    except ValueError:
        raise PonderError(f"{flag} takes comma-separated layer numbers, got {text!r}")
