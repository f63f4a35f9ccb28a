"""The decode loop: schedule -> (propose -> verify ->) forward -> sample -> commit -> emit.

Glossary
- **row**: one sequence in the batch. Rows are ragged (different prompt lengths) and stop independently (EOS,
  stop string, max new tokens, context window); a finished row leaves the batch and its cache row is dropped.
- **TTFT**: time to first token, from a row's admission to its first sampled token.
- **continuous batching** (``batch_size``): at most ``batch_size`` rows decode together; when one finishes, the next
  waiting prompt is prefilled and joins the running batch (its cache rows appended), so the batch stays full.
  With a KV policy, prompts are taken ``batch_size`` at a time instead (each batch cache is sized and compressed
  for its own rows).
- **speculative step**: with a ``Speculator``, each step drafts a tree per row, verifies all of them in one target
  forward (``LlamaModel.forward_tree``), keeps each row's accepted path in the cache and commits the accepted
  tokens plus the bonus token. Rows accept different numbers of tokens; greedy output equals plain decoding's.
- **KV policy** (``ponder/kv``): each prompt is prefilled into its own full-size cache, compressed by the policy,
  and copied into a batch cache sized for the compressed rows; policies that evict while decoding do so after a
  step. With speculation, drafts never cross a row's next eviction point (see ``ponder.kv.base``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ponder.cache import KVCache
from ponder.errors import PonderError
from ponder.model.llama import Interrupted
from ponder.model.loader import Loaded, eos_token_ids
from ponder.sampling import RowNoise, SamplingParams, resolve_seed, sample, top2_gap

if TYPE_CHECKING:
    from ponder.depth import DepthPolicy
    from ponder.core import EngineCore
    from ponder.kv import KVPolicy, KVState
    from ponder.prefix import PrefixCache
    from ponder.speculate import DraftTree, Proposal, RowResult, Speculator

Prompt = str | Sequence[int] | Sequence[dict[str, str]]  # text, token ids, or chat messages


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos", "stop", "length" (max new tokens or context window)
    ttft_s: float = 0.0
    seconds: float = 0.0
    top2_gaps: list[float] = field(default_factory=list)  # per output token: the target's top-1 vs top-2 logit margin
    spec: "SpecCounts | None" = None  # speculative decoding counters (None without a speculator)
    token_logprobs: list["TokenLogprob"] = field(default_factory=list)  # per output token, when params.logprobs asks


@dataclass
class TokenLogprob:
    """One output token's log-probability under the model (log-softmax of its logits: before temperature and
    top-k/top-p, as OpenAI's and vLLM's APIs report them) and the ``k`` most likely tokens' (``params.logprobs``),
    most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SpecCounts:
    """Per row: verify steps, draft nodes verified and accepted (also by depth), and the time of the batch steps
    the row took part in, split into drafting and verifying."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_by_depth: list[int] = field(default_factory=list)  # [d - 1]: steps whose tree reached depth d
    accepted_by_depth: list[int] = field(default_factory=list)  # [d - 1]: steps that accepted a node at depth d
    draft_s: float = 0.0
    verify_s: float = 0.0

    def add(self, depth_max: int, nodes: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.steps += 1
        self.drafted += nodes
        self.accepted += accepted
        for lst, n in ((self.drafted_by_depth, depth_max), (self.accepted_by_depth, accepted)):
            lst.extend([0] * (n - len(lst)))
            for d in range(n):
                lst[d] += 1
        self.draft_s += draft_s
        self.verify_s += verify_s


@dataclass
class StreamEvent:
    row: Any  # the request's id: the index of the prompt in a generate/stream call
    text: str  # new text since the previous event of this row
    token_ids: list[int]
    finished: bool
    completion: Completion


@dataclass
class _Row:
    index: int
    completion: Completion
    noise: RowNoise | None  # the row's Gumbel noise per output position (None: greedy)
    emitted: int = 0  # characters of completion.text already streamed
    detok: tuple[int, int] = (0, 0)  # incremental detokenization: (window start token, its text's chars emitted)
    draft_state: Any = None  # the drafter's per-row state (speculative decoding)
    kv_state: "KVState | None" = None  # the KV policy's per-row state
    prompt_hidden: dict[int, torch.Tensor] | None = None  # layer -> # [P, E]: prefill states a drafter asked for
    start: float = 0.0  # perf_counter() when the row was admitted (its TTFT and seconds count from here)
    params: SamplingParams = field(default_factory=SamplingParams)  # the request's own sampling and stopping
    speculate: bool = True  # False: the speculator proposes nothing for this row (its steps commit one token)
    depth_state: Any = None  # the depth policy's per-row state (``ponder.depth.DepthRow``)

    @property
    def tokens(self) -> list[int]:
        return self.completion.prompt_ids + self.completion.output_ids


class Engine:
    """Batched, KV-cached generation with one model."""

    def __init__(self, loaded: Loaded, speculator: "Speculator | None" = None, kv: "KVPolicy | None" = None,
                 depth: "DepthPolicy | str | None" = None) -> None:
        if isinstance(depth, str):  # a SPEC such as "exit:threshold=0.9:adapter=default"
            from ponder.depth import make_policy

            depth = make_policy(depth, loaded)
        if depth is not None and speculator is not None:
            raise PonderError(f"the {depth.name} depth policy changes which layers each token runs, so a verify "
                              "forward could not reproduce its tokens: use --depth without --speculate")
        if depth is not None and kv is not None and (kv.observes_decode or not kv.speculates or kv.name == "quant"):
            raise PonderError(f"the {kv.name} KV policy acts in every decode step's layers, which depth policies run "
                              "for a subset of rows; depth composes with streaming and snapkv")
        if speculator is not None and kv is not None and not kv.speculates:
            raise PonderError(f"the {kv.name} KV policy selects entries per decoded token and does not compose with "
                              "speculative decoding; use streaming, h2o or snapkv with --speculate")
        window = loaded.model.config.sliding_window
        if kv is not None and window is not None:
            raise PonderError(f"KV-cache policies do not support sliding-window models (this one attends to the last "
                              f"{window} tokens; its window mask compares cache slots); drop --kv for this model")
        self.speculator = speculator
        self.kv = kv
        self.depth = depth
        self.kv_bytes = 0  # bytes of the last call's largest batch KV cache (the tensors decoding reads and writes)
        self.peak_kv_bytes = 0  # the most KV bytes the last call held at once (a compressed prefill's full row too)
        self.prefill_seconds = 0.0  # seconds the last call spent prefilling prompts (the rest is decoding)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context_window = self.model.config.max_position_embeddings
        self.eos_ids = eos_token_ids(loaded.path, self.model.config, loaded.tokenizer)

    def warm_up(self) -> float:
        """Compile the fast path's graphs (``fast.py``) before real requests meet them: a few short generations
        that take each kind of step a server takes (one row; equal rows; ragged rows; the speculator's verify
        forwards when there is one), so a first request, or the first batch of ragged rows, does not wait seconds
        for a compile. Its speculator's statistics see scratch prompts: warm up a throwaway engine over the same
        loaded model (the graphs belong to the model). Returns the seconds it took (0 without a fast path)."""
        if self.model.fast is None:
            return 0.0
        start = time.perf_counter()
        vocab = self.model.config.vocab_size
        base = [(7 + 13 * i) % vocab for i in range(12)]
        a, b, c = base * 3, [(t + 1) % vocab for t in base] * 3, base * 4 + base[:5]  # a, b: equal lengths
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        for prompts in ([a], [a, b], [a, c]):
            self.generate(prompts, params, batch_size=len(prompts))
        return time.perf_counter() - start

    # --- input ----------------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids for a text (through the chat template when ``chat``), chat messages, or ids as given."""
        if isinstance(prompt, str):
            if chat:
                return self._chat_ids([{"role": "user", "content": prompt}])
            return list(self.tokenizer(prompt)["input_ids"])
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            return self._chat_ids(items)
        if items and all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in items):
            return items
        raise PonderError("a prompt must be a non-empty string, a list of chat messages or a list of valid token ids")

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PonderError("this model's tokenizer has no chat template; pass a plain prompt instead")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PonderError(f"a chat message needs string 'role' and 'content', got {m!r}")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

    # --- output ---------------------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, chat: bool = False,
        batch_size: int | None = None,
    ) -> list[Completion]:
        """Generate for every prompt, at most ``batch_size`` rows at a time (default: all in one batch; a finished
        row's place goes to the next prompt); returns completions in prompt order."""
        done: dict[int, Completion] = {}
        for event in self.stream(prompts, params, chat, batch_size):
            if event.finished:
                done[event.row] = event.completion
        return [done[i] for i in range(len(done))]

    def stream(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, chat: bool = False,
        batch_size: int | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield text as it is generated, one event per row per step, batched over up to ``batch_size`` rows."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or not prompts:
            raise PonderError("prompts must be a non-empty list (wrap a single prompt in a list)")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise PonderError(f"batch_size must be a positive integer, got {batch_size!r}")
        ids = [self.encode(p, chat) for p in prompts]
        for i, p in enumerate(ids):
            self.check_prompt(p, f"prompt {i}")
        size = min(batch_size or len(ids), len(ids))
        self.kv_bytes = self.peak_kv_bytes = 0
        self.prefill_seconds = 0.0
        core = self.core(size)
        for i, (p, noise) in enumerate(zip(ids, _noises(params, len(ids)))):
            core.add_request(p, params, i, noise)
        while core.has_work():
            yield from core.step()

    def core(
        self, batch_size: int, prefill_chunk: int | None = None, prefix_cache: "PrefixCache | None" = None,
        max_kv_bytes: int | None = None, prefill_seconds: float | None = None,
    ) -> "EngineCore":
        """A request-level core over this engine (``ponder.core``): ``add_request``, ``step``, ``abort``; with
        chunked prefill (``prefill_chunk`` prompt tokens per step, or ``prefill_seconds`` of prefill per step while
        rows decode), a prefix cache and a KV-memory budget if given."""
        from ponder.core import EngineCore

        return EngineCore(self, batch_size, prefill_chunk, prefix_cache, max_kv_bytes, prefill_seconds)

    def check_prompt(self, ids: list[int], name: str = "the prompt") -> None:
        """A one-line error for a prompt the model cannot take: empty, invalid ids, or longer than the context."""
        if not ids:
            raise PonderError(f"{name} is empty (it encodes to no tokens); give it some text")
        if not all(isinstance(t, int) and 0 <= t < self.model.config.vocab_size for t in ids):
            raise PonderError(f"{name} has token ids outside the vocabulary (0..{self.model.config.vocab_size - 1})")
        if len(ids) >= self.context_window:
            raise PonderError(
                f"{name} is {len(ids)} tokens, longer than the model's context window of {self.context_window} "
                "tokens; shorten it"
            )

    def _plain_step(self, rows: list[_Row], cache: KVCache) -> list[StreamEvent]:
        """One decode step of every running row: feed its newest token, pick and commit the next."""
        logits = self._decode_step(rows, cache, [r.completion.output_ids[-1] for r in rows])
        return self._pick_and_commit(logits, rows)

    def _has_room(self, rows: list[_Row], size: int) -> bool:
        """Whether waiting prompts may join now: continuous batching refills up to ``size`` rows; with a KV policy
        the next ``size`` prompts start once the running batch is done (its cache is sized for its own rows)."""
        return len(rows) < size if self.kv is None else not rows

    def _admit(
        self, waiting: deque, n: int, rows: list[_Row], cache: KVCache | None, extra: int,
        stop: Callable[[_Row], bool] | None = None,
    ) -> tuple[list[_Row], KVCache | None, list[StreamEvent]]:
        """Prefill up to n waiting rows, sample and commit their first tokens, and append those still running to
        the batch cache; returns (the new running rows, the batch cache, the rows' first events). ``stop(row)``:
        asked before each layer of a row's prefill (``LlamaModel.forward``); when it is true the prefill stops and
        every row taken goes back to the front of ``waiting``, in order (the abort on its way then takes that row
        out; the others are prefilled again by a later call), and nothing is admitted."""
        start = time.perf_counter()
        new = [waiting.popleft() for _ in range(min(n, len(waiting)))]
        for r in new:
            r.start = start
        capture = self.speculator.drafter.prefill_capture if self.speculator is not None else ()
        try:
            new_cache, logits = self._prefill(new, max(r.params.max_new_tokens for r in new), extra, capture, stop)
        except Interrupted:
            waiting.extendleft(reversed(new))
            self.prefill_seconds += time.perf_counter() - start
            return [], cache, []
        events = self._pick_and_commit(logits, new)
        alive = [i for i, e in enumerate(events) if not e.finished]
        new_cache.keep_rows(alive)
        new = [new[i] for i in alive]
        if cache is None or not rows:
            cache = new_cache
        elif new:
            cache.extend(new_cache)
        self.kv_bytes = max(self.kv_bytes, cache.nbytes())
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)
        self.prefill_seconds += time.perf_counter() - start
        return new, cache, events

    def _decode_step(self, rows: list[_Row], cache: KVCache, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (through the KV policy's hooks, at the depth policy's depth); the next logits
        # [B, V]."""
        kv = self._kv(rows)
        hook = kv.decode_hook([r.kv_state for r in rows], cache) if kv else None
        step = torch.tensor([[t] for t in tokens], device=self.model.device)
        if self.depth is not None:
            from ponder.depth import DepthRow, decode

            assert hook is None, "the engine refuses KV policies with decode hooks under a depth policy"
            for r in rows:
                if r.depth_state is None:
                    r.depth_state = DepthRow(len(r.completion.prompt_ids), policy_state=self.depth.new_row(
                        len(r.completion.prompt_ids), r.params.max_new_tokens))
            logits = decode(self.model, step, cache, self.depth, [r.depth_state for r in rows])
        else:
            logits = self.model(step, cache, kv_hook=hook)[:, -1]
        if kv:
            kv.after_step(cache, [r.kv_state for r in rows], hook)
        return logits

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """Teacher-forced log-probabilities of ``continuation`` after ``prompt``, one decode step per token, so a KV
        policy compresses, selects and evicts exactly as it does while generating (for perplexity)."""
        if not continuation or len(prompt) + len(continuation) > self.context_window:
            raise PonderError("score needs a non-empty continuation that fits the context window with the prompt")
        with torch.inference_mode():
            self.model.pack_for_rows(1)
            rows = [_Row(0, Completion(list(prompt)), None)]
            self.kv_bytes = self.peak_kv_bytes = 0
            cache, logits = self._prefill(rows, len(continuation), 0)
            out = []
            for i, tok in enumerate(continuation):
                out.append(float(torch.log_softmax(logits[0].float(), -1)[tok]))
                if i + 1 == len(continuation):
                    break
                logits = self._decode_step(rows, cache, [tok])
            return out

    def _kv(self, rows: list[_Row]) -> "KVPolicy | None":
        """The KV policy, if it compressed this call's rows (None when it is a no-op for all of them)."""
        return self.kv if self.kv is not None and rows[0].kv_state is not None else None

    def _prefill(
        self, rows: list[_Row], max_new: int, extra: int, capture: tuple[int, ...] = (),
        stop: Callable[[_Row], bool] | None = None,
    ) -> tuple[KVCache, torch.Tensor]:
        """A batch cache holding every row's prompt (compressed by the KV policy), with room for ``max_new`` more
        tokens plus ``extra`` verify slots; and each row's last logits # [B, V]. Each row's hidden states at the
        ``capture`` layers go to its ``prompt_hidden`` (a drafter that learns from them, e.g. a draft head).
        ``stop(row)``: asked before each layer of that row's prefill; true raises ``Interrupted`` (``_admit``).

        Rows are prefilled one at a time: padding ragged prompts to one width would multiply the work by up to
        B x (longest / mean length), and a prompt's own prefill is already a large matmul.
        """
        ids = [r.completion.prompt_ids for r in rows]
        if self.kv is None or all(self.kv.is_noop(len(p), max_new) for p in ids):
            cache = self.model.new_cache(len(ids), min(self.context_window, max(map(len, ids)) + max_new) + extra)
            last = []
            for b, (r, p) in enumerate(zip(rows, ids)):
                row = cache.row(b)
                last.append(self._prefill_one(r, p, row, None, capture, stop))
                cache.set_length(b, row.lengths[0])
            self.kv_bytes = max(self.kv_bytes, cache.nbytes())
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)
            return cache, torch.cat(last)
        # uneven per-layer/per-head budgets pad a row's storage by an amount known only after scoring it
        # (state.pad): then the compressed rows are held until the batch cache can be sized to them
        def size(pads: list[int]) -> int:
            return max(min(self.kv.slots(len(p), max_new) + pad, self.context_window) for p, pad in zip(ids, pads))

        cache = None if self.kv.pads else self.kv.new_cache(self.model, len(ids), size([0] * len(ids)), extra)
        last, held_rows, held, peak = [], [], 0, 0
        for b, (r, p) in enumerate(zip(rows, ids)):
            full = self.model.new_cache(1, len(p))  # the full prompt's cache exists only while this row is prefilled
            hook = self.kv.prefill_hook(len(full.k), len(p))
            last.append(self._prefill_one(r, p, full, hook, capture, stop))
            r.kv_state = self.kv.compress(full, hook)
            if cache is not None:
                cache.copy_row(b, full)
                peak = max(peak, full.nbytes() + cache.nbytes())
            else:
                held_rows.append(full.trimmed())
                held += held_rows[-1].nbytes()
                peak = max(peak, full.nbytes() + held)
        if cache is None:
            cache = self.kv.new_cache(self.model, len(ids), size([r.kv_state.pad for r in rows]), extra)
            for b, row_kv in enumerate(held_rows):
                cache.copy_row(b, row_kv)
            peak = max(peak, held + cache.nbytes())
        self.kv_bytes = max(self.kv_bytes, cache.nbytes())
        self.peak_kv_bytes = max(self.peak_kv_bytes, peak)
        return cache, torch.cat(last)

    def _prefill_one(
        self, row: _Row, prompt: list[int], cache: KVCache, hook: Any, capture: tuple[int, ...],
        stop: Callable[[_Row], bool] | None = None,
    ) -> torch.Tensor:
        """Prefill one prompt into a one-row cache; its last logits # [1, V]. Hidden states at the ``capture``
        layers go to ``row.prompt_hidden``. ``stop`` as in ``_prefill``."""
        hidden = dict.fromkeys(capture)
        ids = torch.tensor([prompt], device=self.model.device)
        asked = None if stop is None else (lambda: stop(row))
        logits = self.model(ids, cache, last_only=True, kv_hook=hook, capture=hidden, stop=asked)[:, -1]
        row.prompt_hidden = {layer: h[0] for layer, h in hidden.items()} if capture else None
        return logits

    def _pick_and_commit(self, logits: torch.Tensor, rows: list[_Row]) -> list[StreamEvent]:
        """Each row's next token from its logits # [B, V] (``_pick``), committed with its log-probability where the
        row asks for it; one event per row."""
        tokens, gaps = self._pick(logits, rows)
        lps = _logprobs(logits, rows, tokens)
        return [self._commit(r, t, g, lp) for r, t, g, lp in zip(rows, tokens, gaps, lps)]

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
        """Each row's next token from its logits # [B, V], with its own sampling parameters (sampling: with the
        noise of its next output position). Rows sharing parameters are sampled in one call (every sampling op
        works row by row, so grouping does not change a row's token)."""
        V = logits.shape[-1]
        tokens = [0] * len(rows)
        for params, members in _groups(rows).items():
            noise = None if params.greedy else [rows[b].noise.at(len(rows[b].completion.output_ids), V)
                                                for b in members]
            picked = sample(logits[members], params, noise).tolist()
            for b, t in zip(members, picked):
                tokens[b] = t
        for r in rows:
            if r.noise is not None:
                r.noise.forget_below(len(r.completion.output_ids) + 1)
        return tokens, top2_gap(logits).tolist()

    def _commit(self, row: _Row, token: int, gap: float, logprob: TokenLogprob | None = None) -> StreamEvent:
        """Append one token to a row, detokenize, and decide whether the row is finished."""
        c, params = row.completion, row.params
        cached = len(c.prompt_ids) + len(c.output_ids)  # tokens in the row's cache before this one is fed
        if not c.output_ids:
            c.ttft_s = time.perf_counter() - row.start
        c.output_ids.append(token)
        c.top2_gaps.append(gap)
        if logprob is not None:
            c.token_logprobs.append(logprob)
        c.text += self._new_text(row)
        if token in self.eos_ids and not params.ignore_eos:
            c.finish_reason = "eos"
        elif (cut := _first_stop(c.text, params.stop)) is not None:
            c.text, c.finish_reason = c.text[:cut], "stop"
        elif len(c.output_ids) >= params.max_new_tokens or cached + 1 >= self.context_window:
            c.finish_reason = "length"
        finished = c.finish_reason is not None
        if finished and c.finish_reason != "stop":  # the held-back tail too (an incomplete character at the end)
            c.text = self.tokenizer.decode(c.output_ids, skip_special_tokens=True)
        end = len(c.text) if finished else _safe_end(c.text, params.stop)
        delta, row.emitted = c.text[row.emitted : end], max(row.emitted, end)
        if finished:
            c.seconds = time.perf_counter() - row.start
        return StreamEvent(row.index, delta, [token], finished, c)


    def _new_text(self, row: _Row) -> str:
        """The text the row's newest token adds, decoding only a few tokens (decoding the whole output at every
        token is quadratic in its length). ``row.detok`` = (window start, characters of the window's text already
        emitted): the window is the last token decoded completely, as context (a token's text can depend on its
        neighbours: a leading space), plus the tokens since. An incomplete character at the window's end is held
        back until it completes; where the window's text does not continue what was emitted (a tokenizer that
        rewrites earlier text), the whole output is decoded once."""
        ids, text = row.completion.output_ids, row.completion.text
        decode = self.tokenizer.decode
        start, done = row.detok
        window = decode(ids[start:], skip_special_tokens=True)
        stable = window.rstrip("\ufffd")
        if text.endswith(stable[:done]):
            new = stable[done:]
        else:
            full = decode(ids, skip_special_tokens=True).rstrip("\ufffd")
            new = full[len(text):] if full.startswith(text) else ""
        last = decode(ids[-1:], skip_special_tokens=True) if window == stable and len(ids) - start > 1 else ""
        if last:  # all complete: the last token (one with text) is the next window's context
            row.detok = (len(ids) - 1, len(last))
        else:
            row.detok = (start, max(done, len(stable)))
        return new

    # --- speculative decoding -------------------------------------------------------------------------------------
    def _spec_step(self, rows: list[_Row], cache: KVCache) -> list[StreamEvent]:
        """Draft -> verify -> accept -> compact -> observe -> commit, for every row at once."""
        from ponder.speculate import DraftBatch, DraftRow

        spec = self.speculator
        drafting = spec.policy.drafting()
        # the gate's "off" keeps a composite's cheap drafters (pld in head+pld) drafting: it weighs the costly parts
        cheap_only = not drafting and spec.drafter.has_cheap
        budgets = [spec.policy.budget(r.params.max_new_tokens - len(r.completion.output_ids))
                   if (drafting or cheap_only) and r.speculate else 0 for r in rows]
        seq = spec.drafter.sequential_names
        if seq and drafting:  # a chain drafter: its length priced with its forwards, before it drafts
            budgets = spec.policy.plan(budgets, seq)
        kv = self._kv(rows)
        if kv:  # drafts stop at the next eviction point, so evictions happen where plain decoding has them
            rooms = [kv.room(r.kv_state, cache, b) for b, r in enumerate(rows)]
            budgets = [b if room is None else min(b, room - 1) for b, room in zip(budgets, rooms)]
        batch = DraftBatch([DraftRow(r.tokens, r.draft_state, n, r.params, r.noise, len(r.completion.output_ids))
                            for r, n in zip(rows, budgets)], self.model, cache, cheap_only)
        t0 = time.perf_counter()
        proposal = spec.drafter.propose(batch)
        trees = [t.best(n) for t, n in zip(spec.policy.shape(proposal.trees), budgets)]
        t1 = time.perf_counter()
        captured: dict[int, torch.Tensor] = dict.fromkeys(proposal.capture)  # type: ignore[arg-type]
        hook = kv.decode_hook([r.kv_state for r in rows], cache) if kv else None
        starts = list(cache.lengths)
        logits = self._verify(rows, trees, cache, proposal, captured, hook)
        results = self._accept(rows, trees, logits, cache)
        if kv:
            inputs = [[0] + [i + 1 for i in res.path] for res in results]
            kv.after_step(cache, [r.kv_state for r in rows], hook, inputs, starts)
        for b, res in enumerate(results):
            res.hidden = {layer: h[b, : len(trees[b]) + 1] for layer, h in captured.items() if h is not None}
        t2 = time.perf_counter()
        spec.drafter.observe(batch, results)
        forwards = max((d for t in proposal.trees for d, src in zip(t.depths(), t.sources) if src in seq), default=0)
        spec.policy.observe(trees, [r.path for r in results], drafting, time.perf_counter() - t0, t1 - t0, forwards,
                            t2 - t1, len(rows) * (max(len(t) for t in trees) + 1))
        events = []
        for row, tree, res in zip(rows, trees, results):
            event = self._commit_many(row, res.committed, res.gaps, res.logprobs)
            # a row that stops (EOS, stop string) inside its accepted path used only the drafts it committed
            used = min(len(res.path), len(event.token_ids))
            row.completion.spec.add(max(tree.depths(), default=0), len(tree), used, t1 - t0, t2 - t1)
            events.append(event)
        return events

    def _verify(
        self, rows: list[_Row], trees: list["DraftTree"], cache: KVCache, proposal: "Proposal",
        captured: dict[int, torch.Tensor], hook: Any = None,
    ) -> torch.Tensor:
        """One target forward over every row's pending token and tree; logits # [B, T, V]."""
        dev = self.model.device
        T = max(len(t) for t in trees) + 1
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        depth = torch.zeros(len(rows), T, dtype=torch.long)
        visible = torch.eye(T, dtype=torch.bool).repeat(len(rows), 1, 1)
        for b, (row, tree) in enumerate(zip(rows, trees)):
            n = len(tree) + 1
            ids[b, :n] = torch.tensor([row.completion.output_ids[-1]] + tree.tokens)
            depth[b, 1:n] = torch.tensor(tree.depths(), dtype=torch.long)
            for i, p in enumerate(tree.parents):
                visible[b, i + 1] |= visible[b, p + 1]
        hidden = None
        if proposal.hidden is not None and not (hook is not None and self.kv.observes_decode):
            hidden = torch.zeros(len(rows), T, proposal.hidden[0].shape[-1], dtype=self.model.dtype, device=dev)
            for b, (h, tree) in enumerate(zip(proposal.hidden, trees)):
                hidden[b, : len(tree) + 1] = h[: len(tree) + 1]
        return self.model.forward_tree(  # it moves ids, depth and visible to the model's device
            ids, cache, depth, visible, proposal.start_layer if hidden is not None else 0, hidden,
            captured, hook,
        )

    def _accept(
        self, rows: list[_Row], trees: list["DraftTree"], logits: torch.Tensor, cache: KVCache
    ) -> list["RowResult"]:
        """Each row's accepted path and bonus token; the path's K/V is compacted right after the row's prefix."""
        from ponder.speculate import RowResult
        from ponder.speculate.accept import accept

        gaps_all = top2_gap(logits.flatten(0, 1)).view(logits.shape[:2]).tolist()
        targets = self._targets(rows, trees, logits)
        results = []
        for b, (row, tree) in enumerate(zip(rows, trees)):
            n = len(tree) + 1
            path, bonus = accept(tree, targets[b][:n])
            inputs = [0] + [i + 1 for i in path]  # verify inputs whose predictions were committed
            cache.compact(b, cache.lengths[b], inputs)
            committed = [tree.tokens[i] for i in path] + [bonus]
            res = RowResult(tree, path, committed, logits[b, :n])
            res.gaps = [gaps_all[b][j] for j in inputs]
            if row.params.logprobs is not None:
                res.logprobs = _token_logprobs(logits[b, inputs], committed, row.params.logprobs)
            results.append(res)
        return results

    def _targets(self, rows: list[_Row], trees: list["DraftTree"], logits: torch.Tensor) -> list[list[int]]:
        """The token plain decoding would emit after each verify input, per row: the argmax, or when sampling the
        Gumbel-max token with the noise of the output position that input's successor takes (the row's next
        position plus the input's depth), exactly what a plain step at that position would sample."""
        greedy = logits.argmax(-1).tolist()
        V, out = logits.shape[-1], []
        for b, (row, tree) in enumerate(zip(rows, trees)):
            params = row.params
            if params.greedy:
                out.append(greedy[b])
                continue
            first = len(row.completion.output_ids)
            row.noise.forget_below(first)
            noise = [row.noise.at(first + d, V) for d in [0] + tree.depths()]
            out.append(sample(logits[b, : len(tree) + 1], params, noise).tolist())
        return out

    def _commit_many(
        self, row: _Row, tokens: list[int], gaps: list[float], logprobs: list[TokenLogprob] | None = None,
    ) -> StreamEvent:
        """Commit a verify step's tokens in order, stopping where the row finishes; one event for all of them."""
        text, taken = "", []
        for i, (tok, gap) in enumerate(zip(tokens, gaps)):
            event = self._commit(row, tok, gap, logprobs[i] if logprobs else None)
            text += event.text
            taken.append(tok)
            if event.finished:
                break
        return StreamEvent(row.index, text, taken, event.finished, row.completion)


def _logprobs(logits: torch.Tensor, rows: list[_Row], tokens: list[int]) -> list[TokenLogprob | None]:
    """Per row of logits # [B, V], the picked token's ``TokenLogprob`` where the row's params ask for them."""
    out: list[TokenLogprob | None] = [None] * len(rows)
    for b, r in enumerate(rows):
        if r.params.logprobs is not None:
            out[b] = _token_logprobs(logits[b : b + 1], tokens[b : b + 1], r.params.logprobs)[0]
    return out


def _token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``tokens[i]`` under logits # [n, V] row i, with its row's k most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).view(-1, 1))[:, 0].tolist()
    if k:
        values, ids = lp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def _noises(params: SamplingParams, n: int) -> list[RowNoise | None]:
    """Per prompt of a call, its noise streams keyed by (the call's seed, prompt index): None when greedy."""
    if params.greedy:
        return [None] * n
    seed = resolve_seed(params)
    return [RowNoise(seed, i) for i in range(n)]


def _groups(rows: list[_Row]) -> dict[SamplingParams, list[int]]:
    """Row indices by their sampling parameters (the ones that decide how a token is picked)."""
    groups: dict[SamplingParams, list[int]] = {}
    for b, r in enumerate(rows):
        groups.setdefault(r.params, []).append(b)
    return groups


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed: hold back a possible stop-string prefix and an incomplete character."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
