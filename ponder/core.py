"""The request-level engine core: ``add_request`` -> ``step`` -> outputs, ``abort``, ``has_work``.

The shape vLLM's and nano-vllm's engines have (schedule -> run -> postprocess), on ponder's ``Engine``. A core owns
one running batch: a queue of waiting requests, the running rows and their batch KV cache. Each ``step`` does one
thing and returns the events it produced:

- **admit**: when requests wait and the batch has room (continuous batching: up to ``batch_size`` rows; with a KV
  policy only when the batch is empty, as ``Engine._has_room`` says), prefill them, sample their first tokens and
  append the still-running rows to the batch cache;
- otherwise **decode**: one plain decode step for every running row, or, with a speculator, one speculative step
  (draft -> verify -> accept -> commit) for every running row; rows that finish leave the batch.

Requests carry their own ``SamplingParams`` (temperature, top-k/p, seed, stop strings, max new tokens) within one
running batch. A sampled request draws its Gumbel noise from the stream keyed by its seed and its noise index
(``RowNoise``), so its tokens do not depend on which other requests share its batch. ``Engine.generate`` and
``Engine.stream`` are thin wrappers: they add one request per prompt (ids 0..n-1, noise keyed by the call's seed
and the prompt index, as before) and step until the core has no work.

``abort`` takes a request out of the waiting queue or out of the running batch (its cache row is dropped at once).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Hashable

import torch

from ponder.errors import PonderError
from ponder.sampling import RowNoise, SamplingParams, resolve_seed

if TYPE_CHECKING:
    from typing import Iterable

    from ponder.cache import KVCache
    from ponder.engine import Engine, StreamEvent, _Row


class EngineCore:
    """One running batch of requests on an ``Engine`` (module doc)."""

    def __init__(self, engine: "Engine", batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PonderError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.engine = engine
        self.batch_size = batch_size
        self.waiting: deque["_Row"] = deque()
        self.rows: list["_Row"] = []
        self.cache: "KVCache | None" = None
        self._ids: set[Hashable] = set()
        self._next_id = 0
        self._prepared = False

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: Hashable = None,
        noise: RowNoise | None = None,
    ) -> Hashable:
        """Queue a request (token ids; ``Engine.encode`` makes them from text or chat messages); returns its id
        (``request_id``, or the next free integer). ``noise``: its sampling noise stream (default: keyed by its
        seed, a fresh random one when unseeded, and index 0)."""
        from ponder.engine import Completion, SpecCounts, _Row

        params = params or SamplingParams()
        self.engine.check_prompt(prompt_ids)
        if request_id is None:
            while self._next_id in self._ids:
                self._next_id += 1
            request_id = self._next_id
        if request_id in self._ids:
            raise PonderError(f"request id {request_id!r} is already in use")
        if noise is None and not params.greedy:
            noise = RowNoise(resolve_seed(params), 0)
        spec = SpecCounts() if self.engine.speculator is not None else None
        self.waiting.append(_Row(request_id, Completion(list(prompt_ids), spec=spec), noise, params=params))
        self._ids.add(request_id)
        return request_id

    def abort(self, request_id: Hashable) -> bool:
        """Drop a waiting or running request (its KV row is freed now); False if no such request is left."""
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

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def step(self) -> list["StreamEvent"]:
        """Admit waiting requests if there is room, else one decode (or speculative) step of the running rows; the
        events produced, one per row that made progress (``finished`` on a row's last)."""
        e = self.engine
        if not self.has_work():
            return []
        with torch.inference_mode():
            self._prepare()
            if self.waiting and e._has_room(self.rows, self.batch_size):
                return self._admit()
            events = e._spec_step(self.rows, self.cache) if e.speculator is not None else e._plain_step(self.rows,
                                                                                                        self.cache)
            self._keep([i for i, ev in enumerate(events) if not ev.finished])
            self._forget(ev for ev in events if ev.finished)
            return events

    # --- internals ------------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Once per core: the weights packed for its batch size, the speculator's verify-cost curve measured."""
        if self._prepared:
            return
        self._prepared = True
        e = self.engine
        e.model.pack_for_rows(self.batch_size)
        if e.speculator is not None:
            e.speculator.prepare(e.model, self.batch_size)

    def _admit(self) -> list["StreamEvent"]:
        e = self.engine
        spec = e.speculator
        extra = spec.max_nodes + 2 if spec is not None else 0
        new, self.cache, events = e._admit(self.waiting, self.batch_size - len(self.rows), self.rows, self.cache,
                                           extra)
        if spec is not None:
            for r in new:
                r.draft_state = spec.drafter.new_state(r.completion.prompt_ids)
                if r.prompt_hidden is not None:
                    spec.drafter.prefilled(r.draft_state, r.prompt_hidden)
                    r.prompt_hidden = None
        self.rows += new
        self._forget(ev for ev in events if ev.finished)  # rows that finished on their first token
        return events

    def _keep(self, alive: list[int]) -> None:
        if len(alive) == len(self.rows):
            return
        if self.cache is not None:
            self.cache.keep_rows(alive)
        self.rows = [self.rows[i] for i in alive]

    def _forget(self, finished: "Iterable[StreamEvent]") -> None:
        for ev in finished:
            self._ids.discard(ev.row)
