"""The ``ponder`` command: ``generate``, ``info``, ``bench`` and ``distill``.

A user mistake (``PonderError``) prints one line, ``ponder: error: ...``, and exits 1; never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ponder.errors import PonderError
from ponder.model import native
from ponder.model.loader import DTYPES

if TYPE_CHECKING:
    from ponder.engine import Completion, Engine, Prompt
    from ponder.kv import KVPolicy
    from ponder.model.config import ModelConfig
    from ponder.model.loader import Loaded
    from ponder.sampling import SamplingParams



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except PonderError as e:
        print(f"ponder: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ponder: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ponder generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    from ponder import DEFAULT_MODEL, __version__

    parser = argparse.ArgumentParser(prog="ponder", description="Token-adaptive inference for decoder-only LLMs.")
    parser.add_argument("--version", action="version", version=f"ponder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt (streams)")
    gen.add_argument("prompt", nargs="+", help="prompt text; several prompts run as one batch")
    _model_args(gen, DEFAULT_MODEL)
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument("--system", help="system message (chat mode)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--no-stream", action="store_true", help="print the text only when done")
    gen.add_argument("--batch-size", type=int, default=None, metavar="N",
                     help="decode at most N prompts together; a finished one's place goes to the next (default: all)")
    gen.add_argument("--speculate", metavar="SPEC", default=None,
                     help="lossless speculative decoding: lowbit (the model's own 4-bit copy drafts; the fastest), "
                          "pld, lookahead, recycling, early-exit, draft:MODEL, head, medusa, or a combination such as "
                          "lowbit+pld, with options (recycling:k=8)")
    gen.add_argument("--kv", metavar="POLICY", default=None,
                     help="KV-cache compression (lossy): streaming, h2o or snapkv, with options (snapkv:window=64)")
    gen.add_argument("--kv-ratio", type=float, default=None, help="fraction of prompt KV entries the policy removes")
    gen.add_argument("--kv-budget", type=int, default=None, help="KV entries per row the policy keeps")
    gen.add_argument("--depth", metavar="POLICY", default=None,
                     help="adaptive depth (lossy): static, skipdecode, exit or ffn-skip, with options "
                          "(exit:threshold=0.9:adapter=default); prints the mean layers run per token")
    gen.add_argument("--compile", action="store_true",
                     help="fast path: decode and verify steps run compiled groups of layers (~15 s to compile the "
                          "first time on a machine, cached after; int8/q4 run ponder's native layers without it)")
    gen.add_argument("--no-native", action="store_true",
                     help="int8/q4: run the layers operator by operator instead of ponder's native decoder layers")
    gen.add_argument("--amx", action="store_true",
                     help="int8/q4: every product on AMX (CPUs with AMX-BF16): batches of 8 rows ~25%% faster, one "
                          "row ~27%% slower, other last bits than without (docs/performance.md)")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat completions)")
    _model_args(serve, DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one, "
                       "which the start-up line names)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    serve.add_argument("--batch-size", type=int, default=8, metavar="N", help="requests decoded together (default 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429 (default 64)")
    serve.add_argument("--max-body-kb", type=int, default=1024, help="request body cap in KiB; more get 413")
    serve.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                       help="most prompt tokens prefilled per step (chunked prefill; default 512; 0: whole prompts)")
    serve.add_argument("--prefill-ms", type=int, default=200, metavar="MS",
                       help="while requests are decoding, prefill only what fits this many milliseconds per step, "
                            "by the measured prefill rate, so their tokens keep coming (default 200; 0: off, "
                            "--prefill-chunk tokens every step)")
    serve.add_argument("--prefix-cache-mb", type=int, default=512, metavar="MB",
                       help="memory for prompts' K/V reused by later prompts with the same prefix (default 512; "
                            "0: off)")
    serve.add_argument("--max-kv-mb", type=int, default=None, metavar="MB",
                       help="KV-cache budget of the running batch: requests wait until theirs fits (default: no "
                            "budget beyond --batch-size)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: $PONDER_API_KEY if set, else none)")
    serve.add_argument("--speculate", metavar="SPEC", default=None, help="lossless speculative decoding, as generate")
    serve.add_argument("--kv", metavar="POLICY", default=None, help="KV-cache compression (lossy), as generate")
    serve.add_argument("--kv-ratio", type=float, default=None)
    serve.add_argument("--kv-budget", type=int, default=None)
    serve.add_argument("--compile", action="store_true", help="fast path, as generate")
    serve.add_argument("--no-native", action="store_true", help="int8/q4 layers operator by operator, as generate")
    serve.add_argument("--amx", action="store_true",
                       help="int8/q4: every product on AMX, as generate (more throughput from concurrent requests, "
                            "a little more latency for a lone one)")
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="summary of a model: architecture, layers, heads, parameters, memory")
    _model_args(info, DEFAULT_MODEL)
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="measure speed and fidelity of methods and peers side by side")
    from ponder import bench as bench_mod

    bench_mod.add_arguments(bench)
    bench.set_defaults(func=bench_mod.run)

    distill = sub.add_parser("distill", help="self-distillation: data from the model's own answers, trained heads")
    from ponder.distill import cli as distill_cli

    distill_cli.add_arguments(distill, DEFAULT_MODEL)
    distill.set_defaults(func=distill_cli.run)

    analyze = sub.add_parser("analyze", help="analyses of a model's computation (depth: an oracle of token difficulty)")
    what = analyze.add_subparsers(dest="what", required=True)
    depth = what.add_parser("depth", help="how many layers each token needs: oracle exits and skips vs a router")
    _model_args(depth, DEFAULT_MODEL)
    depth.add_argument("--suite", default="builtin",
                       help="prompts: builtin, or specbench:PATH[:train|:heldout] (default builtin)")
    depth.add_argument("--per-category", type=int, default=None, metavar="N", help="at most N prompts per category")
    depth.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    depth.add_argument("--max-new-tokens", type=int, default=128)
    depth.add_argument("--adapter", default="default",
                       help="exit adapters: default (the model's trained or shipped ones), none, or a directory")
    depth.add_argument("--duo", default="auto",
                       help="Duo-LLM modules for the route oracle: auto (the model's trained or shipped ones, if any), "
                            "none, or a directory")
    depth.add_argument("--skip-positions", type=int, default=4, metavar="N",
                       help="sampled tokens per answer for the FFN- and layer-skip oracles (0: off)")
    depth.add_argument("--seed", type=int, default=0)
    depth.add_argument("--out", default="analyze-depth", help="output directory (default analyze-depth)")
    depth.set_defaults(func=cmd_analyze_depth)
    return parser


def cmd_analyze_depth(args: argparse.Namespace) -> int:
    """``ponder analyze depth`` (``ponder.depth.oracle``)."""
    from pathlib import Path

    import ponder
    from ponder.bench.suites import load_suite
    from ponder.depth import oracle

    for name in ("per_category", "limit", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PonderError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.skip_positions < 0:
        raise PonderError("--skip-positions must be >= 0")
    cases = load_suite(args.suite)
    if args.per_category:
        seen: dict[str, int] = {}
        cases = [c for c in cases if seen.setdefault(c.category, 0) < args.per_category
                 and not seen.__setitem__(c.category, seen[c.category] + 1)]
    cases = cases[: args.limit] if args.limit else cases
    loaded = ponder.load(args.model, args.dtype, device=args.device)
    prompts = [(c.category, c.turns[0]) for c in cases]
    analysis = oracle.analyze(loaded, prompts, args.max_new_tokens, args.adapter, args.skip_positions, args.seed,
                              duo=args.duo)
    out = Path(args.out)
    try:
        written = oracle.write(analysis, out)
    except OSError as e:
        raise PonderError(f"cannot write the analysis to {out}: {e}")
    print((out / "report.md").read_text())
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


def _model_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", default=default, help=f"model name, HF dir, .gguf file or hub id (default {default})")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="weight dtype (int8 and q4 are lossy)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")


def _kv_policy(args: argparse.Namespace) -> "KVPolicy | None":
    """The --kv policy with --kv-ratio / --kv-budget filled in (they default the ratio or budget of --kv)."""
    if args.kv is None:
        if args.kv_ratio is not None or args.kv_budget is not None:
            raise PonderError("--kv-ratio and --kv-budget need a policy: add --kv streaming, h2o or snapkv")
        return None
    if args.kv_ratio is not None and args.kv_budget is not None:
        raise PonderError("give --kv-ratio or --kv-budget, not both")
    from ponder.kv import make_policy

    return make_policy(args.kv, args.kv_ratio, args.kv_budget)


def cmd_generate(args: argparse.Namespace) -> int:
    import ponder
    from ponder.engine import Engine
    from ponder.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    if args.batch_size is not None and args.batch_size < 1:
        raise PonderError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.system is not None and args.raw:
        raise PonderError("--system needs chat mode, but --raw sends the prompt as is: drop one of them")
    loaded = ponder.load(args.model, args.dtype, compile=args.compile, device=args.device,
                         native=not args.no_native, amx=args.amx)
    chat = not args.raw and _has_chat_template(loaded, args)  # before the set-up below: a mistake fails fast
    speculator = None
    if args.speculate:
        from ponder.speculate import make_speculator

        speculator = make_speculator(args.speculate, loaded)
        # one-time set-up, kept out of the timing below
        speculator.prepare(loaded.model, min(args.batch_size or len(args.prompt), len(args.prompt)))
    depth = None
    if args.depth:
        from ponder.depth import make_policy as make_depth

        depth = make_depth(args.depth, loaded)
    engine = Engine(loaded, speculator, _kv_policy(args), depth)
    prompts = [_as_prompt(p, args) for p in args.prompt] if chat else list(args.prompt)
    start = time.perf_counter()
    if len(prompts) == 1 and not args.no_stream:
        completions = _stream_one(engine, prompts[0], params, chat)
    else:
        completions = engine.generate(prompts, params, chat=chat, batch_size=args.batch_size)
        for i, c in enumerate(completions):
            header = f"--- [{i}] " if len(completions) > 1 else ""
            print(f"{header}{c.text}" if not header else f"{header}\n{c.text}")
    _print_stats(completions, time.perf_counter() - start)
    if depth is not None:
        st = depth.stats
        small = f" (+{st.mean_small():.1f} small)" if st.small_share else ""
        print(f"[depth {depth.spec}: {st.mean_layers():.1f} attention and {st.mean_ffn():.1f}{small} FFN blocks per "
              f"decoded token of {depth.n_layers}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from ponder.server.app import bind
    except ImportError as e:
        raise PonderError(f"ponder serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'ponder[serve]'") from None
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-body-kb", args.max_body_kb, 1), ("--port", args.port, 0),
                             ("--prefill-chunk", args.prefill_chunk, 0), ("--prefill-ms", args.prefill_ms, 0),
                             ("--prefix-cache-mb", args.prefix_cache_mb, 0),
                             ("--max-kv-mb", args.max_kv_mb if args.max_kv_mb is not None else 1, 1)):
        if value < low:
            raise PonderError(f"{name} must be >= {low}, got {value}")
    if args.port > 65535:
        raise PonderError(f"--port must be <= 65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("PONDER_API_KEY") or None
    socks = bind(args.host, args.port)  # before the model loads: a port in use is said at once
    try:
        return _serve_on(args, socks, api_key)
    finally:
        for sock in socks:
            sock.close()


def _serve_on(args: argparse.Namespace, socks: list, api_key: str | None) -> int:
    import ponder
    from ponder.engine import Engine
    from ponder.server.app import create_app, listen, port_of, serve
    from ponder.server.loop import EngineLoop

    loaded = ponder.load(args.model, args.dtype, compile=args.compile, device=args.device,
                         native=not args.no_native, amx=args.amx)
    from ponder.speculate import make_speculator

    def speculator() -> Any:  # a fresh one per engine: drafters keep statistics
        return make_speculator(args.speculate, loaded) if args.speculate else None

    engine = Engine(loaded, speculator(), _kv_policy(args))
    if args.compile:  # compile before serving (on a throwaway engine: the speculator's statistics stay clean)
        print("ponder serve: compiling the fast path (a minute or two in the first process on a machine, seconds "
              "after) ...", file=sys.stderr, flush=True)
        scratch = Engine(loaded, speculator())
        print(f"ponder serve: compiled in {scratch.warm_up():.0f} s", file=sys.stderr, flush=True)
    loop = EngineLoop(engine, args.batch_size, args.max_queue, args.prefill_chunk or None,
                      args.prefix_cache_mb << 20, args.max_kv_mb << 20 if args.max_kv_mb is not None else None,
                      args.prefill_ms / 1000 if args.prefill_ms else None)
    app = create_app(loop, args.served_model_name or args.model, api_key, args.max_body_kb * 1024, args.speculate,
                     args.kv)
    # the weights packed for the batch and the verify costs measured now, not in the first request's time
    # (a few seconds with --speculate: ``Speculator.prepare``)
    start = time.perf_counter()
    loop.core.prepare()
    if args.speculate:
        print(f"ponder serve: verify costs measured in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
    # what exists now (the model, the tokenizer's tables, the modules: ~350k objects for SmolLM2) lives as long as
    # the server: out of the collector's sight, a full collection takes ~1 ms instead of ~150 ms, which would stall
    # every thread (HTTP answers included) whenever it ran
    gc.collect()
    gc.freeze()
    listen(socks, args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"ponder serve: {args.served_model_name or args.model} on http://{host}:{port_of(socks)}/v1 "
          f"(batch {args.batch_size}{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    try:
        serve(app, socks)
    finally:
        loop.stop()
    return 0


def _spec_stats(completions: list[Completion]) -> str:
    steps = sum(c.spec.steps for c in completions if c.spec)
    accepted = sum(c.spec.accepted for c in completions if c.spec)
    drafted = sum(c.spec.drafted for c in completions if c.spec)
    if not steps:
        return ""
    return f", tau {1 + accepted / steps:.2f}, alpha {accepted / max(drafted, 1):.2f}"


def _has_chat_template(loaded: Loaded, args: argparse.Namespace) -> bool:
    """Without a template prompts go in raw; a --system message would then be lost, so that is an error."""
    if getattr(loaded.tokenizer, "chat_template", None):
        return True
    if args.system is not None:
        raise PonderError(f"--system needs a chat template, and {args.model}'s tokenizer has none: "
                          "drop --system, or put the instruction in the prompt")
    return False


def _as_prompt(text: str, args: argparse.Namespace) -> Prompt:
    """One prompt as chat messages (the caller sends raw text itself when not in chat mode)."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": text}]


def _stream_one(engine: Engine, prompt: Prompt, params: SamplingParams, chat: bool) -> list[Completion]:
    last = None
    for event in engine.stream([prompt], params, chat=chat):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event.completion
    sys.stdout.write("\n")
    assert last is not None  # stream() yields at least one event per prompt
    return [last]


def _print_stats(completions: list[Completion], seconds: float) -> None:
    tokens = sum(len(c.output_ids) for c in completions)
    ttft = min(c.ttft_s for c in completions)
    reasons = ",".join(sorted({c.finish_reason for c in completions}))
    print(
        f"[{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s, TTFT {ttft * 1000:.0f} ms, "
        f"finished: {reasons}{_spec_stats(completions)}]",
        file=sys.stderr,
    )


def cmd_info(args: argparse.Namespace) -> int:
    import ponder

    loaded = ponder.load(args.model, args.dtype, device=args.device)
    for key, value in model_summary(loaded).items():
        print(f"{key:<22} {value}")
    return 0


def model_summary(loaded: Loaded) -> dict[str, str]:
    """Human-readable facts about a loaded model, in display order."""
    model, cfg = loaded.model, loaded.model.config
    params = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    params += sum(_layer_params(cfg) for _ in range(cfg.num_hidden_layers)) + cfg.hidden_size
    kv_per_token = _kv_bytes_per_token(model)
    rope = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) if cfg.rope_scaling else "default"
    return {
        "model": loaded.name,
        "path": str(loaded.path),
        "architecture": cfg.model_type,
        "layers": str(cfg.num_hidden_layers),
        "hidden size": str(cfg.hidden_size),
        "intermediate size": str(cfg.intermediate_size),
        "attention heads": f"{cfg.num_attention_heads} (KV heads {cfg.num_key_value_heads}, head dim {cfg.head_dim})",
        "vocabulary": str(cfg.vocab_size),
        "parameters": f"{params / 1e6:.1f} M" + (" (tied embeddings)" if cfg.tie_word_embeddings else ""),
        "context length": str(cfg.max_position_embeddings)
        + (f" (sliding window {cfg.sliding_window})" if cfg.sliding_window else ""),
        "rope": f"theta {cfg.rope_theta:g}, scaling {rope}",
        "dtype": loaded.dtype,
        "device": str(model.device),
        "weight memory": f"{_weight_bytes(model) / 2**20:.1f} MiB",
        "KV cache per token": f"{kv_per_token / 1024:.1f} KiB ({str(model.kv_dtype).removeprefix('torch.')})",
        "invariant attention": _invariant_attention(model),
    } | ({"weight kernel": _weight_kernel(model), "decoder layers": _decoder_layers(model)}
         if loaded.dtype in ("int8", "q4") else {})


def _invariant_attention(model: nn.Module) -> str:
    """How batch-invariant attention (fp32 on the CPU, int8, q4, fp16) runs for this model, if it is on."""
    if not getattr(model, "invariant_attention", False):
        return "off (verify forwards attend in one masked call: bf16, or fp32 where the native kernel does not run)"
    if model.native_plan(torch.tensor([[[0, -1, 0]]])) is not None:
        return "native kernel (one call per layer)"
    why = native.reason() or f"{str(model.kv_dtype).removeprefix('torch.')} on {model.device.type}"
    return f"one PyTorch call per token (native kernel not used: {why})"


def _decoder_layers(model: nn.Module) -> str:
    """How an int8 or q4 model's decode and verify steps run their layers."""
    if getattr(model, "native_layers", None) is not None:
        return "native (decoder.c: one call per forward; prefills per operator)"
    from ponder.model.native_layers import unsupported

    why = unsupported(model) or "turned off (--no-native)"
    how = "compiled groups of layers" if getattr(model, "fast", None) is not None else "per operator"
    return f"{how} (native layers not used: {why})"


def _weight_kernel(model: nn.Module) -> str:
    """Which kernel multiplies an int8 or q4 model's projections."""
    from ponder.model.q4 import Q4Linear
    from ponder.model.quant import Int8BlockLinear, Int8Linear

    mods = list(model.modules())
    if any(isinstance(m, Q4Linear) and m.native or isinstance(m, Int8BlockLinear) for m in mods):
        two_planes = any(isinstance(m, Int8BlockLinear) for m in mods)
        blocks = "int8 blocks of 32 as two 4-bit planes, " if two_planes else ""
        every = any(getattr(m, "bulk_always", False) for m in mods)
        prefill = "; every product on AMX (--amx)" if every else "; prefills on AMX" if native.q4_amx() else ""
        return f"ponder's 4-bit GEMM ({blocks}q4mm.c, AVX512-BF16{prefill})"
    why = native.q4_reason() or ("the model is not on the CPU" if model.device.type != "cpu"
                                 else "shapes outside its tiles")
    if any(isinstance(m, Int8Linear) for m in mods):
        return f"PyTorch's _weight_int8pack_mm, one scale per output channel (ponder's GEMM not used: {why})"
    return f"PyTorch's int4 kernel (ponder's not used: {why})"


def _layer_params(c: ModelConfig) -> int:
    qkv = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    bias = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim if c.attention_bias else 0
    out = c.num_attention_heads * c.head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    return qkv + bias + out + mlp + 2 * c.hidden_size


def _kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one token adds to the cache the engine allocates.

    Asked of a one-slot cache rather than derived from the weights' dtype: int8 and q4 weights keep K/V in fp32
    (``LlamaModel.kv_dtype``), so the weights' element size would give a quarter or an eighth of the real figure.
    """
    return model.new_cache(1, 1).nbytes()


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight and buffer the model holds (int8 weights and their scales too), shared ones once."""
    unique = {t.data_ptr(): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in unique.values())


if __name__ == "__main__":
    raise SystemExit(main())
