"""The request-level engine core: ``add_request`` -> ``step`` -> outputs, ``abort``, ``has_work``.

The shape vLLM's and nano-vllm's engines have (schedule -> run -> postprocess), on ponder's ``Engine``. A core owns
one running batch: a queue of waiting requests, the running rows and their batch KV cache. Each ``step`` does one
thing and returns the events it produced:

- **decode**: one plain decode step for every running row, or, with a speculator, one speculative step
  (draft -> verify -> accept -> commit) for every running row; rows that finish leave the batch;
- **prefill**: while requests wait and the batch has room (continuous batching: up to ``batch_size`` rows),
  prefill them in order, at most ``prefill_chunk`` prompt tokens' worth of work per step (**chunked prefill**,
  Sarathi-Serve arXiv 2403.02310: a long prompt is prefilled over several steps, each also decoding the running
  rows, so one 6k-token prompt does not freeze every other stream; None: whole prompts). On a CPU attention over a
  long prefix costs as much as the weights: a prompt token at position c counts ``1 + c / K`` tokens, where K
  (``parity_keys``) is the number of keys whose attention costs what the weights cost per token (weights /
  (2 x heads x head_dim x layers): ~3,900 on SmolLM2), so chunks shrink as the prefix grows and a step's time
  stays about the same from the first chunk of a prompt to its last. A prompt whose prefill completes gets its first
  token sampled and joins the running batch (its cache row appended), decoding from the next step.
  With ``prefill_seconds``, a step's prefill work is sized by time instead: while rows are decoding, as many cost
  units (tokens, counted as above) as the measured seconds per unit (an average over earlier prefill steps) fit in
  ``prefill_seconds``, so the running streams' gap between tokens is about their decode step plus that, on any
  machine; while no row is decoding there is no one to keep waiting, and a step prefills up to ``prefill_chunk``
  (large chunks prefill a long prompt faster: 7,000 SmolLM2 tokens on 2 EPYC cores took 49.6 s in 96-token chunks,
  32.8 s in 512-token chunks and 26.3 s whole).

With ``max_kv_bytes``, a request starts only when the batch cache with its row added (every row as long as the
longest: room for its prompt, its new tokens and a speculative step's verify slots) stays within that budget; until
then it waits (admission by KV memory); a request that could never fit alone is refused by ``add_request``.

With a ``PrefixCache`` (``ponder.prefix``), a prompt that begins like an earlier one copies that prefix's K/V and
prefills only the rest; every completed prefill is stored for later prompts. With a KV policy, prompts are
prefilled whole and taken ``batch_size`` at a time once the running batch is done (``Engine._has_room``: each batch
cache is sized and compressed for its own rows); chunking and prefix caching apply to the full cache only.

Requests carry their own ``SamplingParams`` (temperature, top-k/p, seed, stop strings, max new tokens) within one
running batch. A sampled request draws its Gumbel noise from the stream keyed by its seed and its noise index
(``RowNoise``), so its tokens do not depend on which other requests share its batch. ``Engine.generate`` and
``Engine.stream`` are thin wrappers: they add one request per prompt (ids 0..n-1, noise keyed by the call's seed
and the prompt index, as before) and step until the core has no work.

``abort`` takes a request out of the waiting queue or out of the running batch (its cache row is dropped at once).
A step's prefill of one long chunk takes a while (512 tokens' worth: ~0.5 s for SmolLM2 fp32 on 2 cores), and
an abort that arrives meanwhile would wait for it: with ``aborting`` set (a predicate a server keeps, true from the
moment an abort of that request is on its way until it is done), the chunk's forward asks it before each layer and
stops there (``Interrupted``; the prompt's progress is not advanced, so were the request not aborted after all, the
next step would prefill the same chunk again; a predicate that stays true for a request never aborted stalls its
prefill). With a KV policy, whose prompts are prefilled whole, a batch at a time (``Engine._admit``), the prompt's
prefill stops the same way and the batch's rows go back to the waiting queue in order: the abort takes its row
out, and the others are prefilled again at the next step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch

from ponder.errors import PonderError
from ponder.model.llama import Interrupted
from ponder.sampling import RowNoise, SamplingParams, resolve_seed

if TYPE_CHECKING:
    from typing import Iterable

    from ponder.cache import KVCache
    from ponder.engine import Engine, StreamEvent, _Row
    from ponder.prefix import PrefixCache


def parity_keys(config: Any) -> float:
    """Keys whose attention costs, per query token, what the weights cost per token: weights / (2 x query heads x
    head_dim x layers) (each key costs 4 x heads x head_dim flops per layer, each weight 2)."""
    E, L = config.hidden_size, config.num_hidden_layers
    H, D, Hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
    per_layer = E * (H * D + 2 * Hkv * D) + H * D * E + 3 * E * config.intermediate_size
    return (L * per_layer + config.vocab_size * E) / (2 * H * D * L)


@dataclass
class _Prefilling:
    """A request whose prompt is partly prefilled (chunked prefill): its own one-row cache and progress."""

    row: "_Row"
    cache: "KVCache"
    done: int  # prompt tokens in the cache
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # captured states per layer, chunk by chunk


class EngineCore:
    """One running batch of requests on an ``Engine`` (module doc)."""

    def __init__(
        self, engine: "Engine", batch_size: int, prefill_chunk: int | None = None,
        prefix_cache: "PrefixCache | None" = None, max_kv_bytes: int | None = None,
        prefill_seconds: float | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PonderError(f"batch_size must be a positive integer, got {batch_size!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise PonderError(f"prefill_chunk must be a positive integer (tokens per step), got {prefill_chunk!r}")
        if prefill_seconds is not None and not (isinstance(prefill_seconds, (int, float)) and prefill_seconds > 0):
            raise PonderError(f"prefill_seconds must be a positive number, got {prefill_seconds!r}")
        self.engine = engine
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk
        self.prefill_seconds = prefill_seconds
        self.unit_seconds: float | None = None  # measured seconds per prefill cost unit (prefill_seconds)
        self.max_kv_bytes = max_kv_bytes
        self.slot_bytes = engine.model.new_cache(1, 1).nbytes()  # one token of one row, every layer's K and V
        self.parity_keys = parity_keys(engine.model.config)
        self.prefix_cache = prefix_cache if engine.kv is None else None
        self.waiting: deque["_Row"] = deque()
        self.rows: list["_Row"] = []
        self.cache: "KVCache | None" = None
        self.partial: _Prefilling | None = None  # the request being prefilled over several steps
        # set by a server: whether an abort of this request is on its way (its prefill then stops between layers)
        self.aborting: Callable[[Hashable], bool] | None = None
        self._ids: set[Hashable] = set()
        self._next_id = 0
        self._prepared = False

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: Hashable = None,
        noise: RowNoise | None = None, speculate: bool = True,
    ) -> Hashable:
        """Queue a request (token ids; ``Engine.encode`` makes them from text or chat messages); returns its id
        (``request_id``, or the next free integer). ``noise``: its sampling noise stream (default: keyed by its
        seed, a fresh random one when unseeded, and index 0). ``speculate=False``: the engine's speculator drafts
        nothing for this request (its output is the same: speculation is lossless)."""
        from ponder.engine import Completion, SpecCounts, _Row

        params = params or SamplingParams()
        self.check_request(prompt_ids, params)
        if request_id is None:
            while self._next_id in self._ids:
                self._next_id += 1
            request_id = self._next_id
        if request_id in self._ids:
            raise PonderError(f"request id {request_id!r} is already in use")
        if noise is None and not params.greedy:
            noise = RowNoise(resolve_seed(params), 0)
        spec = SpecCounts() if self.engine.speculator is not None else None
        self.waiting.append(_Row(request_id, Completion(list(prompt_ids), spec=spec), noise, params=params,
                                 speculate=speculate))
        self._ids.add(request_id)
        return request_id

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """A one-line ``PonderError`` for a request this core can never run: a bad prompt (``Engine.check_prompt``)
        or one whose KV row alone is over the budget."""
        self.engine.check_prompt(prompt_ids)
        if self.max_kv_bytes is not None and (need := self._slots(prompt_ids, params) * self.slot_bytes) > \
                self.max_kv_bytes:
            raise PonderError(f"this request needs {need / 2**20:.1f} MiB of KV cache (prompt plus "
                              f"{params.max_new_tokens} new tokens), more than the budget of "
                              f"{self.max_kv_bytes / 2**20:.1f} MiB; shorten it or ask for fewer tokens")

    def abort(self, request_id: Hashable) -> bool:
        """Drop a waiting, prefilling or running request (its KV row is freed now); False if no such request is
        left."""
        if self.partial is not None and self.partial.row.index == request_id:
            self.partial = None
            self._ids.discard(request_id)
            return True
        for r in self.waiting:
            if r.index == request_id:
                self.waiting.remove(r)
                self._ids.discard(request_id)
                return True
        for b, r in enumerate(self.rows):
            if r.index == request_id:
                self._keep([i for i in range(len(self.rows)) if i != b])
                self._ids.discard(request_id)
                return True
        return False

    def reset(self) -> None:
        """Drop every request, waiting, prefilling or running, and the batch cache (after a failure whose state
        cannot be trusted; the prefix cache holds only completed prefills and stays)."""
        self.waiting.clear()
        self.rows = []
        self.cache = None
        self.partial = None
        self._ids.clear()

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or self.partial)

    @property
    def in_prefill(self) -> int:
        """Requests admitted but not yet decoding (the one being prefilled in chunks)."""
        return int(self.partial is not None)

    def step(self) -> list["StreamEvent"]:
        """One decode (or speculative) step of the running rows, then prefill work for waiting requests while the
        batch has room (module doc); the events produced, one per row that made progress (``finished`` on a row's
        last)."""
        e = self.engine
        if not self.has_work():
            return []
        with torch.inference_mode():
            self.prepare()
            if e.kv is not None:  # whole prompts, a batch at a time (module doc)
                if self.waiting and e._has_room(self.rows, self.batch_size):
                    return self._admit()
                return self._decode()
            events = self._decode() if self.rows else []
            if self.partial is not None or (self.waiting and len(self.rows) < self.batch_size):
                events += self._prefill()
            return events

    def _decode(self) -> list["StreamEvent"]:
        e = self.engine
        events = e._spec_step(self.rows, self.cache) if e.speculator is not None else e._plain_step(self.rows,
                                                                                                    self.cache)
        self._keep([i for i, ev in enumerate(events) if not ev.finished])
        self._forget(ev for ev in events if ev.finished)
        return events

    def prepare(self) -> None:
        """Once per core: the weights packed for its batch size, the speculator's verify-cost curve measured (a
        server calls it before it listens; else the first step does)."""
        if self._prepared:
            return
        self._prepared = True
        e = self.engine
        e.model.pack_for_rows(self.batch_size)
        if e.speculator is not None:
            e.speculator.prepare(e.model, self.batch_size)

    # --- internals ------------------------------------------------------------------------------------------------
    def _prefill(self) -> list["StreamEvent"]:
        """Prefill waiting requests in order, at most ``prefill_chunk`` prompt tokens in all; those completed get
        their first token and join the running batch."""
        e = self.engine
        spec = e.speculator
        capture = spec.drafter.prefill_capture if spec is not None else ()
        budget = self._budget()
        start = time.perf_counter()
        done: list[_Prefilling] = []
        last: list[torch.Tensor] = []
        first, units = True, 0.0
        while budget > 0:
            if self.partial is None:
                if not self.waiting or len(self.rows) + len(done) >= self.batch_size:
                    break
                if not self._fits(self.waiting[0], done):
                    break
                self.partial = self._start(self.waiting.popleft(), capture)
            p = self.partial
            prompt = p.row.completion.prompt_ids
            n = min(self._chunk(p.done, budget, first), len(prompt) - p.done)
            first = False
            if n < 1:
                break
            hidden = dict.fromkeys(capture)
            ids = torch.tensor([prompt[p.done : p.done + n]], device=e.model.device)
            stop = None if self.aborting is None else (lambda rid=p.row.index: self.aborting(rid))
            try:
                logits = e.model(ids, p.cache, last_only=True, capture=hidden, stop=stop)[:, -1]
            except Interrupted:  # its client left: the abort drops it (and its cache) before the next step
                units = 0.0  # measure no rate from a step that stopped halfway
                break
            for layer, h in hidden.items():
                p.hidden.setdefault(layer, []).append(h[0])
            cost = n + n * (p.done + n / 2) / self.parity_keys
            budget -= cost
            units += cost
            p.done += n
            if p.done == len(prompt):
                done.append(p)
                last.append(logits)
                self.partial = None
                p.row.prompt_hidden = {k: torch.cat(v) for k, v in p.hidden.items()} if capture else None
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(prompt, p.cache, p.row.prompt_hidden)
        spent = time.perf_counter() - start
        e.prefill_seconds += spent
        # seconds per unit, averaged; a tiny step's fixed costs would inflate it
        if self.prefill_seconds is not None and units >= 16:
            rate = spent / units
            self.unit_seconds = rate if self.unit_seconds is None else 0.5 * self.unit_seconds + 0.5 * rate
        if not done:
            return []
        new = [p.row for p in done]
        events = e._pick_and_commit(torch.cat(last), new)
        alive = [i for i, ev in enumerate(events) if not ev.finished]
        if alive:
            joined = e.model.new_cache(len(alive), max(done[i].cache.max_len for i in alive))
            for b, i in enumerate(alive):
                joined.copy_row(b, done[i].cache)
            if self.cache is None or not self.rows:
                self.cache = joined
            else:
                self.cache.extend(joined, self._capacity(joined.max_len))
            e.kv_bytes = max(e.kv_bytes, self.cache.nbytes())
            e.peak_kv_bytes = max(e.peak_kv_bytes, e.kv_bytes)
        self._join([new[i] for i in alive])
        self._forget(ev for ev in events if ev.finished)  # rows that finished on their first token
        return events

    def _budget(self) -> float:
        """Cost units (module doc) this step may prefill: ``prefill_chunk`` (None: whole prompts), or with
        ``prefill_seconds`` and rows decoding, what fits that time at the measured rate (at most ``prefill_chunk``;
        32 units before any measurement)."""
        most = self.prefill_chunk or math.inf
        if self.prefill_seconds is None or not self.rows:
            return most
        fits = 32.0 if self.unit_seconds is None else self.prefill_seconds / self.unit_seconds
        return max(1.0, min(most, fits))

    def _chunk(self, at: int, budget: float, first: bool) -> int:
        """Prompt tokens from position ``at`` whose cost (module doc) fits ``budget``; at least 16 (or the
        chunk, if smaller) at a step's first chunk, so that every step makes progress."""
        if math.isinf(budget):
            return 1 << 62
        K, a = self.parity_keys, 1 + at / self.parity_keys
        n = int(K * (math.sqrt(a * a + 2 * budget / K) - a))
        return max(n, min(16, self.prefill_chunk or 16)) if first else n

    def _verify_slots(self) -> int:
        """Cache slots a speculative step writes beyond a row's tokens (its tree and pending token); 0 without."""
        spec = self.engine.speculator
        return spec.max_nodes + 2 if spec is not None else 0

    def _slots(self, prompt: list[int], params: SamplingParams) -> int:
        """Cache slots a request's row needs: its prompt, its new tokens and a speculative step's verify slots."""
        return min(self.engine.context_window, len(prompt) + params.max_new_tokens) + self._verify_slots()

    def _fits(self, row: "_Row", done: list[_Prefilling]) -> bool:
        """Whether ``row`` may start under the KV budget: the batch cache with the running rows, those whose prefill
        completed this step and this one, all as long as the longest."""
        if self.max_kv_bytes is None:
            return True
        lengths = [self._slots(row.completion.prompt_ids, row.params)] + [p.cache.max_len for p in done]
        if self.cache is not None and self.rows:
            lengths.append(self.cache.max_len)
        rows = len(self.rows) + len(done) + 1
        return rows * max(lengths) * self.slot_bytes <= self.max_kv_bytes or not (self.rows or done)

    def _capacity(self, max_len: int) -> int:
        """Rows the batch cache's store may hold (``KVCache.extend``): the batch size, fewer under a KV budget."""
        cap = self.batch_size
        if self.max_kv_bytes is not None:
            cap = min(cap, self.max_kv_bytes // max(1, max(max_len, self.cache.max_len) * self.slot_bytes))
        return max(cap, len(self.rows) + 1)

    def kv_bytes(self) -> int:
        """Bytes of K/V the core holds now: the batch cache and a prompt being prefilled."""
        held = self.cache.nbytes() if self.cache is not None and self.rows else 0
        return held + (self.partial.cache.nbytes() if self.partial is not None else 0)

    def _start(self, row: "_Row", capture: tuple[int, ...]) -> _Prefilling:
        """Admit a request: its one-row cache (room for the prompt, its new tokens and the verify slots of a
        speculative step), holding whatever prefix of its prompt the prefix cache has."""
        e = self.engine
        row.start = time.perf_counter()
        prompt = row.completion.prompt_ids
        cache = e.model.new_cache(1, self._slots(prompt, row.params))
        p = _Prefilling(row, cache, 0)
        if self.prefix_cache is not None:
            entry, n = self.prefix_cache.lookup(prompt, len(prompt) - 1)  # the last token's logits are needed
            if entry is not None and (not capture or all(layer in entry.hidden for layer in capture)):
                view = entry.kv.row(0)
                view.lengths = [n]
                cache.copy_row(0, view)
                p.done = n
                p.hidden = {layer: [entry.hidden[layer][:n]] for layer in capture}
        return p

    def _join(self, new: list["_Row"]) -> None:
        """Rows whose prefill completed start decoding: the speculator's per-row state, then the running batch."""
        spec = self.engine.speculator
        if spec is not None:
            for r in new:
                r.draft_state = spec.drafter.new_state(r.completion.prompt_ids)
                if r.prompt_hidden is not None:
                    spec.drafter.prefilled(r.draft_state, r.prompt_hidden)
                    r.prompt_hidden = None
        self.rows += new

    def _admit(self) -> list["StreamEvent"]:
        stop = None if self.aborting is None else (lambda r: self.aborting(r.index))
        new, self.cache, events = self.engine._admit(self.waiting, self.batch_size - len(self.rows), self.rows,
                                                     self.cache, self._verify_slots(), stop)
        self._join(new)
        self._forget(ev for ev in events if ev.finished)  # rows that finished on their first token
        return events

    def _keep(self, alive: list[int]) -> None:
        if len(alive) == len(self.rows):
            return
        order = self.cache.keep_rows_unordered(alive) if self.cache is not None else alive
        self.rows = [self.rows[i] for i in order]

    def _forget(self, finished: "Iterable[StreamEvent]") -> None:
        for ev in finished:
            self._ids.discard(ev.row)
