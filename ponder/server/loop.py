"""The engine loop: one thread owns an ``EngineCore`` and steps it; everything else talks to it through a queue.

PyTorch work and tokenization never run on the HTTP event loop, so ``/health`` and new connections stay responsive while a batch
decodes. A handler ``submit``s a request with a callback (``sink``) that the loop thread calls with each of the
request's ``StreamEvent``s (the app forwards them to the handler's asyncio queue with ``call_soon_threadsafe``), and
``abort``s it when the client goes away: the loop removes the row from the running batch before its next step, so
its KV row is freed (a prefill of it under way stops at its next layer: ``EngineCore.aborting``). Admission is
bounded: at most ``batch_size`` requests run and ``max_queue`` more wait (``submit`` raises ``QueueFull``). A server
counts a request from its arrival: ``reserve`` takes its places before its body is read or its prompt encoded
(encoding waits for the loop thread's current step), so a burst is refused at once, and the places a request did
not submit are given back by ``release`` when its HTTP exchange ends.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from ponder.sampling import RowNoise, SamplingParams

Sink = Callable[[Any], None]  # called on the loop thread with a StreamEvent, or with an Exception (then no more)


class QueueFull(Exception):
    """More requests are waiting than the server admits (``--max-queue``)."""


@dataclass
class Ticket:
    """Places a request holds in the admission count before it submits (``EngineLoop.reserve``): ``left`` places
    are counted as in flight until ``submit`` takes them one by one or ``release`` gives the rest back."""

    left: int


@dataclass
class _Submit:
    request_id: Hashable
    prompt_ids: list[int]
    params: SamplingParams
    noise: RowNoise | None
    sink: Sink
    speculate: bool = True


class EngineLoop:
    """The thread that steps one ``EngineCore`` (module doc)."""

    def __init__(self, engine: Any, batch_size: int, max_queue: int, prefill_chunk: int | None = None,
                 prefix_cache_bytes: int = 0, max_kv_bytes: int | None = None,
                 prefill_seconds: float | None = None) -> None:
        from ponder.prefix import PrefixCache

        self.engine = engine
        prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.core = engine.core(batch_size, prefill_chunk, prefix, max_kv_bytes, prefill_seconds)
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[Hashable, Sink] = {}
        self._pending = 0  # reserved (arrived) or submitted, not yet finished or aborted (guarded by _lock)
        self._lock = threading.Lock()
        self._aborting: set[Hashable] = set()  # aborts on their way to the loop thread (guarded by _lock)
        self.core.aborting = self._is_aborting  # a prefill of such a request stops between two layers
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ponder-engine", daemon=True)
        self.steps = 0

    def start(self) -> None:
        """Run the loop on a thread of its own (``run`` runs it on the caller's)."""
        self._thread.start()

    def run(self, until: Callable[[], bool]) -> None:
        """Run the loop on the calling thread until ``until()`` or ``stop``. ``ponder serve`` runs it on the
        process's main thread: oneDNN's kernels run ~2x slower from any other thread on the CPUs measured
        (docs/serve.md), and decoding is what the process is for."""
        if self._thread.is_alive():
            raise RuntimeError("the engine loop already runs on its own thread (start): one loop at a time")
        self._run(until)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._pending

    def reserve(self, n: int = 1) -> Ticket:
        """Count ``n`` requests as in flight now, before they are ready to submit; raises ``QueueFull`` when they
        do not fit. The caller must ``release`` the ticket when it is done with it (what was submitted stays)."""
        with self._lock:
            self._take(n)
        return Ticket(n)

    def grow(self, ticket: Ticket, n: int) -> None:
        """``n`` more places on ``ticket`` (a request with several choices); raises ``QueueFull``."""
        with self._lock:
            self._take(n)
            ticket.left += n

    def release(self, ticket: Ticket) -> None:
        """Give back the places ``ticket`` holds and did not submit (idempotent)."""
        with self._lock:
            self._pending -= ticket.left
            ticket.left = 0

    def _take(self, n: int) -> None:  # under _lock
        # in flight: the batch's places (running or about to) plus the queue's, counted from the request's arrival,
        # so a burst is admitted the same way whatever the engine thread has got to
        if self._pending + n > self.core.batch_size + self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting")
        self._pending += n

    def submit(self, request_id: Hashable, prompt_ids: list[int], params: SamplingParams, noise: RowNoise | None,
               sink: Sink, speculate: bool = True, ticket: Ticket | None = None) -> None:
        """Queue a request; its events go to ``sink`` on the loop thread. It takes one of ``ticket``'s places when
        it has any; else it needs a free one, or raises ``QueueFull``."""
        with self._lock:
            if ticket is not None and ticket.left > 0:
                ticket.left -= 1
            else:
                self._take(1)
        self._inbox.put(_Submit(request_id, prompt_ids, params, noise, sink, speculate))
        self._wake.set()

    def abort(self, request_id: Hashable) -> None:
        with self._lock:
            self._aborting.add(request_id)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _is_aborting(self, request_id: Hashable) -> bool:  # on the loop thread, between two layers of a prefill
        with self._lock:
            return request_id in self._aborting

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the loop thread between two steps (the tokenizer is not safe to share between threads:
        handlers encode prompts here); its result or exception in the returned future."""
        future: Future = Future()
        self._inbox.put(("call", fn, future))
        self._wake.set()
        return future

    # --- the loop thread ------------------------------------------------------------------------------------------
    def _run(self, until: Callable[[], bool] | None = None) -> None:
        while not self._stopping and not (until is not None and until()):
            self._drain()
            if not self.core.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.core.step()
            except Exception as e:  # an engine failure fails the requests in flight, not the server
                self._fail_all(e)
                continue
            self.steps += 1
            for ev in events:
                sink = self._sinks.get(ev.row)
                if sink is not None:
                    _deliver(sink, ev)
                if ev.finished:
                    self._done(ev.row)

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Submit):
                try:
                    self.core.add_request(item.prompt_ids, item.params, item.request_id, item.noise, item.speculate)
                except Exception as e:
                    _deliver(item.sink, e)
                    with self._lock:
                        self._pending -= 1
                    continue
                self._sinks[item.request_id] = item.sink
            elif item[0] == "call":
                _, fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who decides what the client sees
                    future.set_exception(e)
            else:
                _, rid = item
                with self._lock:
                    self._aborting.discard(rid)
                try:
                    if self.core.abort(rid):
                        self._done(rid)
                except Exception as e:  # as a failed step: the requests in flight fail, the server goes on
                    self._fail_all(e)

    def _done(self, rid: Hashable) -> None:
        if self._sinks.pop(rid, None) is not None:
            with self._lock:
                self._pending -= 1

    def _fail_all(self, error: Exception) -> None:
        """Every request in flight gets ``error``; the core starts over empty (its state may be what failed)."""
        for rid, sink in list(self._sinks.items()):
            _deliver(sink, error)
            self._done(rid)
        self.core.reset()


def _deliver(sink: Sink, item: Any) -> None:
    """Hand an event to a request's handler; a handler that is gone (its event loop closed) must not stop the
    loop thread."""
    try:
        sink(item)
    except Exception:
        pass
