"""Bench methods: ponder's own and the peers users would pick instead.

A method SPEC is ``name``, ``name:arg`` or ``name:key=value:key=value``; results are keyed by the SPEC as written.

- ``baseline``: ponder greedy. Options ``dtype=fp32|bf16|fp16|int8`` and ``batch=N`` (rows decoded together).
- ``hf``: transformers ``generate``, greedy, on the same weights (the same HF directory ponder loads).
- ``hf-pld``: transformers prompt lookup decoding; option ``n`` = tokens proposed per step (default 10).
- ``llamacpp``: llama-cpp-python on the same GGUF file, greedy; an optional extra, skipped with a hint if missing.
- speculative decoding: any speculator SPEC (``pld``, ``lookahead``, ``recycling``, ``early-exit``, ``draft:MODEL``,
  combinations such as ``pld+recycling``) with its drafters' and policy's options (``recycling:k=8``); ``dtype=``
  and ``batch=`` work as for ``baseline``, anywhere in the spec (``pld:dtype=int8``).
- KV-cache compression: any KV policy SPEC (``snapkv:ratio=0.5``, ``streaming:budget=512``, ``h2o:ratio=0.75``),
  alone (plain greedy decoding with that cache) or joined to a speculator with ``+`` (``pld+snapkv:ratio=0.5``).
- adaptive depth: any depth policy SPEC (``static:layers=24``, ``skipdecode:end=22``, ``exit:threshold=0.9``,
  ``ffn-skip:skip=4``; layer lists written with ``/``), alone or joined to a KV policy with ``+``; its fidelity
  (teacher-forced top-1 agreement, KL) and compute (blocks run per token) are measured against the same model at
  full depth.

Every runner takes prompt token ids and returns, per prompt, the new token ids (EOS included, as ponder's engine
does), the wall seconds and the time to the first new token.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ponder.errors import PonderError
from ponder.model.loader import DTYPES

METHOD_OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "baseline": {"dtype": str, "batch": int, "compile": str, "native": str, "amx": str},
    "hf": {},
    "hf-pld": {"n": int},
    "llamacpp": {},
}
PONDER_METHODS = {"baseline"}


@dataclass(frozen=True)
class MethodSpec:
    text: str  # exactly as written on the command line
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    speculator: str | None = None  # the speculator SPEC (drafters and their options) for speculative methods
    kv: str | None = None  # the KV-cache policy SPEC
    depth: str | None = None  # the depth policy SPEC

    @property
    def is_ponder(self) -> bool:
        return (self.name in PONDER_METHODS or self.speculator is not None or self.kv is not None
                or self.depth is not None)

    @property
    def dtype(self) -> str:
        return str(self.options.get("dtype", "fp32"))

    @property
    def compile(self) -> bool:
        return self.options.get("compile", "false") in ("1", "true")

    @property
    def native(self) -> bool:
        """int8/q4 layers in ponder's C decoder where it runs (``native_layers.py``; ``native=false``: per operator)."""
        return self.options.get("native", "true") in ("1", "true")

    @property
    def amx(self) -> bool:
        """Every int8/q4 product on AMX (``ponder.load(..., amx=True)``; ``amx=true``)."""
        return self.options.get("amx", "false") in ("1", "true")

    @property
    def path(self) -> tuple[str, bool, bool, bool]:
        """What decides the bits of plain decoding: dtype, compiled layers, native layers, AMX products."""
        return self.dtype, self.compile, self.native and self.dtype in ("int8", "q4"), self.amx

    def batch(self, default: int) -> int:
        return int(self.options.get("batch", default)) if self.is_ponder else 1


def parse_spec(text: str) -> MethodSpec:
    """``name[:key=value...]`` -> MethodSpec; unknown names or options raise PonderError."""
    from ponder import depth, kv, speculate

    text = text.strip()
    name, *parts = text.split(":")
    heads = [chunk.split(":")[0].strip() for chunk in text.split("+")]
    if any(h in speculate.drafter_names() or h in kv.policy_names() or h in depth.policy_names() for h in heads):
        return _ponder_spec(text)
    if name not in METHOD_OPTIONS:
        choices = ", ".join(list(METHOD_OPTIONS) + speculate.drafter_names() + kv.policy_names()
                            + depth.policy_names())
        raise PonderError(f"unknown method {name!r} in {text!r}: choose from {choices}")
    allowed = METHOD_OPTIONS[name]
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            valid = ", ".join(f"{k}=..." for k in allowed) or "none"
            raise PonderError(f"bad option {part!r} for method {name!r}; valid options: {valid}")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise PonderError(f"method {text!r}: option {key} needs a {allowed[key].__name__}, got {value!r}")
    _check_common(text, options)
    if int(options.get("batch", 1)) < 1 or int(options.get("n", 1)) < 1:
        raise PonderError(f"method {text!r}: batch and n must be >= 1")
    return MethodSpec(text, name, options)


def _ponder_spec(text: str) -> MethodSpec:
    """Split ``dtype=``/``batch=``, the KV policy and the depth policy off a speculator SPEC and validate the
    rest."""
    from ponder import depth, kv, speculate

    chunks, kv_chunks, depth_chunks, options = [], [], [], {}
    for chunk in text.split("+"):
        kept = []
        # a draft model's own dtype (``draft:MODEL:dtype=q4``) is the drafter's option, not the target's
        own = ("dtype",) if chunk.split(":")[0].strip() == "draft" else ()
        for i, part in enumerate(chunk.split(":")):
            key, eq, value = part.partition("=")
            if i and eq and key in ("dtype", "batch", "compile", "native", "amx") and key not in own:
                options[key] = value
            else:
                kept.append(part)
        head = kept[0].strip()
        (kv_chunks if head in kv.policy_names() else depth_chunks if head in depth.policy_names()
         else chunks).append(":".join(kept))
    if len(kv_chunks) > 1:
        raise PonderError(f"method {text!r} names {len(kv_chunks)} KV-cache policies; use one")
    if len(depth_chunks) > 1:
        raise PonderError(f"method {text!r} names {len(depth_chunks)} depth policies; use one")
    depth_spec = depth_chunks[0] if depth_chunks else None
    if depth_spec is not None:
        depth.validate(depth_spec)
        if chunks:
            raise PonderError(f"method {text!r}: depth policies do not compose with speculative decoding")
    policy = kv_chunks[0] if kv_chunks else None
    if policy is not None:
        kv.make_policy(policy)  # validates names and options
    rest = "+".join(chunks) or None
    if rest is not None:
        speculate.validate(rest)
    _check_common(text, options)
    if not str(options.get("batch", "1")).isdigit() or int(options.get("batch", 1)) < 1:
        raise PonderError(f"method {text!r}: batch must be an integer >= 1")
    if "batch" in options:
        options["batch"] = int(options["batch"])
    name = (rest or depth_spec or policy or "").split(":")[0].split("+")[0]
    return MethodSpec(text, name, options, rest, policy, depth_spec)


def _check_common(text: str, options: dict[str, Any]) -> None:
    if options.get("dtype", "fp32") not in DTYPES:
        raise PonderError(f"method {text!r}: dtype must be one of {', '.join(DTYPES)}")
    for key in ("compile", "native", "amx"):
        if options.get(key, "false") not in ("0", "1", "false", "true"):
            raise PonderError(f"method {text!r}: {key} must be true or false")
    if options.get("amx", "false") in ("1", "true"):
        if options.get("dtype", "fp32") not in ("int8", "q4"):
            raise PonderError(f"method {text!r}: amx=true applies to dtype=int8 or dtype=q4")
        from ponder.model.loader import check_amx

        try:  # here, before any method of the run has run, rather than when this method's turn comes
            check_amx(options["dtype"], torch.device("cpu"))
        except PonderError as e:
            raise PonderError(f"method {text!r}: {e}") from None


def parse_methods(text: str) -> list[MethodSpec]:
    specs = [parse_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise PonderError("--methods is empty: give e.g. baseline,hf")
    if len({s.text for s in specs}) != len(specs):
        raise PonderError(f"--methods lists a method twice: {text}")
    return specs


@dataclass
class Output:
    ids: list[int]
    seconds: float  # this prompt's: from its admission (or the call) to its last token
    ttft_s: float
    top2_gaps: list[float] = field(default_factory=list)
    spec: Any = None  # engine.SpecCounts for speculative methods
    text: str = ""  # the decoded output (ponder methods; suites with expected answers score it)
    kv_bytes: int = 0  # bytes of the batch KV cache decoding used (ponder methods)
    kv_peak_bytes: int = 0  # the largest KV cache held, a full prompt's during a compressed prefill included
    logprobs: list[float] | None = None  # perplexity suites: the scored tokens' log-probabilities
    prefill_s: float | None = None  # seconds the call spent prefilling (ponder methods; the rest was decoding)


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# --- runners: each is built in the child process that runs its method ---------------------------------------------
class PonderRunner:
    def __init__(self, model: str, spec: MethodSpec, eos: set[int]) -> None:
        import ponder
        from ponder.engine import Engine
        from ponder.kv import make_policy
        from ponder.speculate import make_speculator

        loaded = ponder.load(model, spec.dtype, compile=spec.compile, native=spec.native, amx=spec.amx)
        self.loaded, self.spec = loaded, spec
        self.speculator = make_speculator(spec.speculator, loaded) if spec.speculator else None
        self.depth = None
        if spec.depth:
            from ponder.depth import make_policy as make_depth

            self.depth = make_depth(spec.depth, loaded)
        self.engine = Engine(loaded, self.speculator, make_policy(spec.kv) if spec.kv else None, self.depth)
        self.model = self.engine.model

    def weight_bytes(self) -> int:
        from ponder.bench.roofline import weight_bytes

        return weight_bytes(self.model)

    def report(self) -> dict[str, Any]:
        """What a speculative method's drafter learned during the run (e.g. early-exit's per-layer acceptance), and
        on the fast path how many forwards ran compiled and which ran eagerly, by reason (``fast_path``)."""
        out = self.speculator.drafter.report() if self.speculator is not None else {}
        if self.depth is not None:
            out = out | {"depth": self.depth.report()}
        if getattr(self.model, "fast", None) is not None:
            out = out | {"fast_path": self.model.fast.report()}
        if getattr(self.model, "native_layers", None) is not None:
            out = out | {"native_layers": self.model.native_layers.report()}
        return out

    def verify_costs(self, rows: int, max_tokens: int = 32) -> dict[int, float]:
        """Seconds of one target forward by total tokens (the verify-cost curve), for this method's dtype."""
        from ponder.speculate.policy import CostCurve

        if self.speculator is not None:
            self.speculator.prepare(self.model, rows)
            return dict(self.speculator.costs[rows].seconds)
        return CostCurve.measure(self.model, rows, max_tokens).seconds

    def score(self, prompt: list[int], continuation: list[int]) -> Output:
        """Teacher-forced log-probabilities of the continuation (perplexity suites)."""
        start = time.perf_counter()
        logprobs = self.engine.score(prompt, continuation)
        return Output([], time.perf_counter() - start, 0.0, kv_bytes=self.engine.kv_bytes,
                      kv_peak_bytes=self.engine.peak_kv_bytes, logprobs=logprobs)

    def run(self, batch: list[list[int]], max_new: int, batch_size: int | None = None,
            progress: Callable[[int], Any] | None = None) -> list[Output]:
        """Generate for every prompt, ``batch_size`` rows at a time with continuous batching (default: one batch);
        ``progress(1)`` as each row finishes."""
        from ponder.sampling import SamplingParams

        temperature, seed = getattr(self, "sampling", (0.0, 0))
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=getattr(self, "ignore_eos", False),
                                temperature=temperature, seed=seed if temperature else None)
        done: dict[int, Any] = {}
        for event in self.engine.stream(batch, params, batch_size=batch_size):
            if event.finished:
                done[event.row] = event.completion
                if progress is not None:
                    progress(1)
        kv, peak, prefill = self.engine.kv_bytes, self.engine.peak_kv_bytes, self.engine.prefill_seconds
        # each row's own seconds: from its admission to its last token
        return [Output(c.output_ids, c.seconds, c.ttft_s, c.top2_gaps, c.spec, c.text, kv, peak, prefill_s=prefill)
                for c in (done[i] for i in range(len(batch)))]

    def depth_fidelity(self, prompt: list[int], reference: list[int]) -> Any:
        """Teacher-forced fidelity of this method's depth policy to the same model at full depth
        (``ponder.depth.fidelity``), scored with a policy of its own (the generation's statistics stay apart)."""
        from ponder.depth import make_policy as make_depth
        from ponder.depth.fidelity import teacher_forced

        if not hasattr(self, "_scoring"):
            self._scoring = make_depth(self.spec.depth, self.loaded)
        return teacher_forced(self.model, self._scoring, prompt, reference)

    def top1_agreement(self, prompt: list[int], reference: list[int]) -> tuple[int, int]:
        """(agreeing, total) argmax predictions of the reference continuation, teacher-forced in one forward."""
        if not reference:
            return 0, 0
        ids = torch.tensor([prompt + reference])
        with torch.inference_mode():
            logits = self.model(ids, self.model.new_cache(1, ids.shape[1]))
        predicted = logits[0, len(prompt) - 1 : -1].argmax(-1)
        return int((predicted == torch.tensor(reference)).sum()), len(reference)


class HFRunner:
    def __init__(self, model: str, spec: MethodSpec, eos: set[int]) -> None:
        from transformers import AutoModelForCausalLM

        from ponder.model.loader import resolve

        self.hf = AutoModelForCausalLM.from_pretrained(str(resolve(model)), dtype=torch.float32).eval()
        self.eos = sorted(eos)
        self.extra = {"prompt_lookup_num_tokens": int(spec.options.get("n", 10))} if spec.name == "hf-pld" else {}

    def weight_bytes(self) -> int:
        from ponder.bench.roofline import hf_weight_bytes

        return hf_weight_bytes(self.hf)

    def run(self, batch: list[list[int]], max_new: int) -> list[Output]:
        (prompt,) = batch
        streamer = _FirstTokenTimer()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        streamer.start = start
        with torch.inference_mode():
            out = self.hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                eos_token_id=self.eos, pad_token_id=self.eos[0], streamer=streamer, **self.extra,
            )
        seconds = time.perf_counter() - start
        new = out[0, len(prompt) :].tolist()
        return [Output(_cut_after_eos(new, set(self.eos)), seconds, streamer.ttft or seconds)]


class _FirstTokenTimer:
    """A transformers streamer that notes when the first generated token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.calls = 0
        self.ttft: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.ttft = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class LlamaCppRunner:
    def __init__(self, model: str, spec: MethodSpec, eos: set[int], n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path(model)), n_ctx=n_ctx, n_threads=torch.get_num_threads(),
            n_batch=512, verbose=False,
        )
        self.eos = eos
        self.path = gguf_path(model)

    def weight_bytes(self) -> int:
        from ponder.bench.roofline import gguf_weight_bytes

        return gguf_weight_bytes(self.path)

    def run(self, batch: list[list[int]], max_new: int) -> list[Output]:
        (prompt,) = batch
        self.llm.reset()  # no prefix reuse between prompts: every method prefills every prompt
        new: list[int] = []
        start = time.perf_counter()
        ttft = 0.0
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not new:
                ttft = time.perf_counter() - start
            new.append(int(tok))
            if tok in self.eos or len(new) >= max_new:
                break
        return [Output(new, time.perf_counter() - start, ttft)]


def gguf_path(model: str) -> Path:
    """The GGUF file behind ``model`` (the builtin default or a .gguf path); PonderError for HF directories."""
    from ponder.model import loader

    if model in loader.BUILTIN_MODELS:
        return loader.builtin_gguf(model)
    if model.endswith(".gguf") and Path(model).is_file():
        return Path(model)
    raise PonderError(f"llamacpp needs a GGUF model (the default or a .gguf file), not {model!r}")


def make_runner(spec: MethodSpec, model: str, eos: set[int], n_ctx: int) -> Any:
    if spec.is_ponder:
        return PonderRunner(model, spec, eos)
    if spec.name in ("hf", "hf-pld"):
        return HFRunner(model, spec, eos)
    return LlamaCppRunner(model, spec, eos, n_ctx)


def _cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids
