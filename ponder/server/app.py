"""The FastAPI application of ``ponder serve`` (package doc): OpenAI's completions and chat completions, streamed as
server-sent events or not, over the engine loop."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Iterator

from starlette.requests import Request  # FastAPI injects it by this annotation (resolved at module level)

from ponder.errors import PonderError
from ponder.sampling import RowNoise, SamplingParams, resolve_seed
from ponder.server.logprobs import TokenPieces, chat_logprobs, completion_logprobs, pieces_of
from ponder.server.loop import EngineLoop, QueueFull, Ticket
from ponder.server.metrics import Metrics
from ponder.server.openapi import describe
from ponder.server.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                    check_supported)

# paths that need no API key (the schema says what the API is, not what it holds)
PUBLIC = ("/health", "/openapi.json")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
DISCONNECT_POLL_S = 0.05  # how often a non-streamed request checks that its client is still there


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None, max_body: int = 1 << 20,
               speculate: str | None = None, kv: str | None = None) -> Any:
    """The application serving ``loop``'s engine as ``model_name``; ``speculate`` and ``kv``: the server's
    ``--speculate`` and ``--kv`` settings (what a request's ``ponder`` options are checked against)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="ponder", version="1")
    app.state.draining = False  # set on SIGTERM (``serve``): new requests get 503 while running ones finish
    app.state.loop = loop
    engine = loop.engine
    metrics = Metrics()
    created = int(time.time())
    pieces = TokenPieces(engine.tokenizer)  # used on the loop thread only, like the tokenizer

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        return error(APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{message}", param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if request.scope.get("ponder.body_too_large"):
            return error(too_large())
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(APIError(e.status_code, str(e.detail), kind, headers=dict(e.headers or {})))  # 405: Allow

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:  # a bug of ours: still OpenAI's shape
        if request.scope.get("ponder.body_too_large"):
            return error(too_large())
        return error(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    class Guard:
        """Every request passes here first (a plain ASGI middleware: it leaves the endpoints' view of the connection
        intact, so a handler can tell that its client went away): 503 while draining, the API key, and the body
        cap, on the declared length and on the bytes actually received (a chunked body has no declared length)."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope.get("path", "")
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            refusal = None
            if app.state.draining and path not in PUBLIC:
                refusal = APIError(503, "the server is shutting down; retry on another instance", "server_error",
                                   code="shutting_down")
            elif api_key is not None and path not in PUBLIC:
                given = headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    refusal = APIError(401, "a valid API key is needed (Authorization: Bearer ...)",
                                       "authentication_error", code="invalid_api_key")
            length = headers.get("content-length")
            if refusal is None and length is not None and length.isdigit() and int(length) > max_body:
                refusal = too_large()
            if refusal is not None:
                return await error(refusal)(scope, receive, send)
            received = 0

            async def counted() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > max_body:
                        scope["ponder.body_too_large"] = True  # FastAPI turns the error into its own 400
                        raise _BodyTooLarge()
                return message

            ticket = None
            inner_receive = counted
            if path in GENERATION_PATHS and scope.get("method") == "POST":
                # the request holds its place from the moment its body has arrived (not before: a client that
                # stalls its upload must not hold a place), before it is parsed or its prompt encoded (which waits
                # for the engine thread's step in progress): a burst beyond the places is refused at once
                chunks: list[bytes] = []
                try:
                    while True:
                        message = await counted()
                        if message["type"] != "http.request":
                            return  # the client went away while sending: nobody to answer
                        chunks.append(message.get("body", b""))
                        if not message.get("more_body", False):
                            break
                except _BodyTooLarge:
                    return await error(too_large())(scope, receive, send)
                try:
                    ticket = scope["ponder.ticket"] = loop.reserve(1)
                except QueueFull as e:
                    return await error(busy(str(e)))(scope, receive, send)
                replayed = False

                async def inner_receive() -> dict:  # the body once, as read; then the connection's own events
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                    return await receive()

            started = False

            async def tracked(message: dict) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self.inner(scope, inner_receive, tracked)
            except _BodyTooLarge:
                if not started:
                    await error(too_large())(scope, receive, send)
            finally:
                if ticket is not None:  # the places it did not submit (a refused or failed request, fewer choices)
                    loop.release(ticket)

    def too_large() -> APIError:
        return APIError(413, f"the request body is over {max_body} bytes", code="request_too_large")

    app.add_middleware(Guard)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "draining" if app.state.draining else "ok", "running": len(loop.core.rows),
                "in_flight": loop.in_flight}

    @app.get("/metrics")
    async def prometheus() -> Any:
        from fastapi.responses import PlainTextResponse

        core = loop.core
        running = len(core.rows)
        kv = core.kv_bytes()
        extra = [("kv_cache_bytes", "gauge", "Bytes of K/V held by running and prefilling requests.", kv)]
        if core.max_kv_bytes:
            extra.append(("kv_cache_usage_perc", "gauge", "Fraction of the KV budget (--max-kv-mb) in use.",
                          kv / core.max_kv_bytes))
        if core.prefix_cache is not None:
            stats = core.prefix_cache.stats
            extra += [("prefix_cache_queries_total", "counter", "Prompts looked up in the prefix cache.",
                       stats.lookups),
                      ("prefix_cache_hits_total", "counter", "Lookups that reused a cached prefix.", stats.hits),
                      ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens reused instead of prefilled.",
                       stats.reused_tokens),
                      ("prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", core.prefix_cache.bytes)]
        return PlainTextResponse(metrics.render(running, max(0, loop.in_flight - running), extra),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model)
        prompt: Any = req.prompt if req.prompt is not None else [m.model_dump(exclude_none=True)
                                                                 for m in req.messages or []]
        try:
            ids = await asyncio.wrap_future(loop.call(lambda: engine.encode(prompt)))
        except PonderError as e:
            raise APIError(400, str(e), param="prompt" if req.prompt is not None else "messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_window}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in 0..{vocab - 1}", param="tokens")
        text = await asyncio.wrap_future(loop.call(lambda: engine.tokenizer.decode(req.tokens)))
        return {"prompt": text}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "ponder"}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           "not_found_error", "model", "model_not_found")

    def busy(why: str) -> APIError:
        """A refusal for a full queue (429 with Retry-After), counted."""
        metrics.counters["request_rejected_total"] += 1
        return APIError(429, f"the server is busy: {why}; retry later", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})

    def admit_or_refuse(http: Request, n: int) -> Ticket:
        """The places of a request's ``n`` choices: the one its arrival reserved (``Guard``) and ``n - 1`` more, or
        a 429 now, before the prompt is encoded (which waits for the engine thread's current step)."""
        ticket = http.scope["ponder.ticket"]
        places = loop.core.batch_size + loop.max_queue
        if n > places:  # would never fit, however idle the server: the client's mistake, not a busy server
            raise APIError(400, f"n={n} choices need {n} places and this server holds {places} requests at most "
                                f"(--batch-size plus --max-queue)", param="n")
        if n > 1:
            try:
                loop.grow(ticket, n - 1)
            except QueueFull as e:
                raise busy(str(e)) from None
        return ticket

    async def prompt_ids(prompt: Any, chat: bool) -> list[int]:
        def encode() -> list[int]:
            ids = engine.encode(prompt)  # text, token ids, or chat messages through the template
            engine.check_prompt(ids)
            return ids

        try:
            return await asyncio.wrap_future(loop.call(encode))
        except PonderError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None

    def sampling(req: Any, ids: list[int], max_tokens: int | None) -> SamplingParams:
        room = engine.context_window - len(ids)
        try:
            params = SamplingParams(max_new_tokens=max(1, min(max_tokens or room, room)),
                                    temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                    stop=tuple(req.stop or ()), logprobs=req.top_logprobs_asked(),
                                    ignore_eos=req.ignore_eos)
            loop.core.check_request(ids, params)  # arithmetic only: safe off the loop thread
        except PonderError as e:
            raise APIError(400, str(e)) from None
        return params

    def speculates(req: Any) -> bool:
        """Whether the engine's speculator drafts for this request: a request's ``ponder`` options may turn the
        server's speculation off, or name the server's own settings; anything else is a 400 that says why."""
        opts = req.ponder
        if opts is None:
            return True
        if opts.kv is not None and opts.kv != kv:
            raise APIError(400, f"the KV policy is set per server (now: {kv or 'none'}, --kv); one batch shares one "
                                "cache, so a request cannot choose another", param="ponder.kv")
        value = opts.speculate
        if value is None or value is True or value == speculate:
            if value is True and speculate is None:
                raise APIError(400, "this server does not speculate; start it with --speculate SPEC",
                               param="ponder.speculate")
            return True
        if value is False or value in ("off", "none"):
            return False
        raise APIError(400, f"this server speculates with {speculate or 'nothing'} (--speculate) for every request; "
                            "a request may only turn it off (\"speculate\": \"off\")", param="ponder.speculate")

    async def run(ids: list[int], params: SamplingParams, n: int, prefix: str, arrival: float, ticket: Ticket,
                  speculate: bool = True) -> AsyncIterator[tuple[int, Any, Any]]:
        """Submit n choices and yield (choice index, event, logprobs) as they come; abort what is left if the
        consumer stops (a client that went away). Latencies count from ``arrival`` (perf_counter). logprobs: None,
        or (the event's ``TokenLogprob`` entries, their tokens' text and bytes), made on the loop thread."""
        aio = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seed = None if params.greedy else resolve_seed(params)
        rids = [f"{prefix}-{i}" for i in range(n)]
        left = set(range(n))
        def sink(i: int, ev: Any) -> None:  # on the loop thread
            lp = None
            if params.logprobs is not None and not isinstance(ev, Exception) and ev.token_ids:
                c = ev.completion
                entries = c.token_logprobs[len(c.output_ids) - len(ev.token_ids) : len(c.output_ids)]
                lp = (entries, pieces_of(pieces, entries))
            aio.call_soon_threadsafe(events.put_nowait, (i, ev, lp))

        try:
            for i, rid in enumerate(rids):
                noise = None if seed is None else RowNoise(seed, i)
                loop.submit(rid, ids, params, noise, lambda ev, i=i: sink(i, ev), speculate, ticket)
        except QueueFull as e:
            for rid in rids:
                loop.abort(rid)
            raise busy(str(e)) from None
        last: dict[int, float] = {}
        latest: dict[int, Any] = {}
        try:
            while left:
                i, ev, lp = await events.get()
                if isinstance(ev, PonderError):  # refused by the engine when queued: the request's own fault
                    left.discard(i)
                    raise APIError(400, str(ev))
                if isinstance(ev, Exception):
                    left.discard(i)
                    raise APIError(500, f"generation failed: {ev}", "server_error")
                now = time.perf_counter()
                if i not in last:
                    metrics.histograms["time_to_first_token_seconds"].observe(now - arrival)
                    metrics.histograms["request_queue_time_seconds"].observe(
                        max(0.0, now - arrival - ev.completion.ttft_s))
                elif ev.token_ids:
                    for _ in ev.token_ids:
                        metrics.histograms["inter_token_latency_seconds"].observe((now - last[i]) / len(ev.token_ids))
                last[i], latest[i] = now, ev.completion
                if ev.finished:
                    left.discard(i)
                    metrics.finished(ev.completion, arrival, now)
                yield i, ev, lp
        except (asyncio.CancelledError, GeneratorExit):
            for i in left:
                metrics.cancelled(latest.get(i), len(ids))
            raise
        finally:
            for i in left:
                loop.abort(rids[i])

    def finish(c: Any) -> str:
        return "length" if c.finish_reason == "length" else "stop"

    def usage(ids: list[int], completions: list[Any]) -> dict[str, int]:
        out = sum(len(c.output_ids) for c in completions)
        return {"prompt_tokens": len(ids), "completion_tokens": out, "total_tokens": len(ids) + out}

    async def respond(req: Any, ids: list[int], params: SamplingParams, chat: bool, arrival: float,
                      http: Request, ticket: Ticket) -> Any:
        kind = "chatcmpl" if chat else "cmpl"
        rid = f"{kind}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        want_lp = params.logprobs is not None
        spec_on = speculates(req)  # before any response starts: a bad option is a 400, not an error event
        if not req.stream:
            done: dict[int, Any] = {}
            entries: dict[int, list[Any]] = {i: [] for i in range(req.n)}
            known: dict[int, Any] = {}

            async def collect() -> None:
                async for i, ev, lp in run(ids, params, req.n, rid, arrival, ticket, spec_on):
                    if lp is not None:
                        entries[i] += lp[0]
                        known.update(lp[1])
                    if ev.finished:
                        done[i] = ev.completion

            # a client that goes away before a non-streamed answer is ready: nothing else would notice until the
            # answer is complete, so watch for it and cancel (run() then aborts the requests and frees their rows)
            task = asyncio.ensure_future(collect())
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                    if not task.done() and await http.is_disconnected():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        return Response(status_code=499)  # nobody reads it
            finally:  # the handler itself cancelled (shutdown): its rows must not go on generating for nobody
                if not task.done():
                    task.cancel()
            task.result()  # an APIError raised while generating reaches its handler
            comps = [done[i] for i in range(req.n)]

            def logprobs(i: int) -> Any:
                if not want_lp:
                    return None
                return chat_logprobs(entries[i], known) if chat else completion_logprobs(entries[i], known, 0)

            choices = [
                {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish(c),
                 "logprobs": logprobs(i)} if chat else
                {"index": i, "text": c.text, "finish_reason": finish(c), "logprobs": logprobs(i)}
                for i, c in enumerate(comps)
            ]
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices,
                    "usage": usage(ids, comps)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
            body = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                    "choices": choices} | (extra or {})
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> AsyncIterator[str]:
            finals: dict[int, Any] = {}
            offsets = [0] * req.n  # characters of each choice's token texts already sent (completions' text_offset)
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(req.n)])
            try:
                async for i, ev, lp in run(ids, params, req.n, rid, arrival, ticket, spec_on):
                    reason = finish(ev.completion) if ev.finished else None
                    if ev.finished:
                        finals[i] = ev.completion
                    if not ev.text and reason is None and lp is None:
                        continue
                    logprobs = None
                    if lp is not None:
                        logprobs = chat_logprobs(*lp) if chat else completion_logprobs(*lp, offsets[i])
                        offsets[i] += sum(len(lp[1][e.token][0]) for e in lp[0])
                    elif want_lp and not chat:
                        logprobs = completion_logprobs([], {}, offsets[i])
                    if chat:
                        delta = {"content": ev.text} if ev.text else {}
                        yield chunk([{"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}])
                    else:
                        yield chunk([{"index": i, "text": ev.text, "finish_reason": reason, "logprobs": logprobs}])
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            if include_usage:
                yield chunk([], {"usage": usage(ids, [finals[i] for i in range(req.n)])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request) -> Any:
        arrival = time.perf_counter()
        check_supported(req)
        check_model(req.model)
        ticket = admit_or_refuse(http, req.n)
        ids = await prompt_ids(req.prompt, chat=False)
        return await respond(req, ids, sampling(req, ids, req.max_tokens), False, arrival, http, ticket)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http: Request) -> Any:
        arrival = time.perf_counter()
        check_supported(req)
        check_model(req.model)
        ticket = admit_or_refuse(http, req.n)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        ids = await prompt_ids(messages, chat=True)
        return await respond(req, ids, sampling(req, ids, req.max_completion_tokens or req.max_tokens), True,
                             arrival, http, ticket)

    def openapi() -> dict[str, Any]:  # FastAPI's documented way to extend its generated document
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = describe(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                          model_name, engine.model.config.vocab_size, engine.context_window,
                                          speculate, kv, api_key is not None, PUBLIC)
        return app.openapi_schema

    app.openapi = openapi
    return app


class _BodyTooLarge(Exception):
    """Raised from the body reader when a request's bytes pass the cap."""


def bind(host: str, port: int) -> list[Any]:
    """Sockets bound to every address ``host`` names (``localhost`` may name 127.0.0.1 and ::1; "" or ``0.0.0.0``
    every interface), all on ``port`` (0: a free one the system picks for the first, ``port_of`` tells which), not
    yet listening (``listen``); a PonderError in one line where they cannot be bound (a port in use, an address
    this machine does not have)."""
    import socket

    socks: list[Any] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses a port in TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has sockets of its own
            if len(socks) > 1:  # the others on the first one's port (port 0: the one the system picked)
                address = (address[0], port_of(socks), *address[2:])
            sock.bind(address)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise PonderError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return socks


def port_of(socks: list[Any]) -> int:
    """The port ``bind``'s sockets are on."""
    return socks[0].getsockname()[1]


def listen(socks: list[Any], host: str) -> None:
    """Start listening (the port is taken for good only now: two sockets bound with SO_REUSEADDR may share a port
    until one listens), or a PonderError in one line."""
    port = port_of(socks)
    try:
        for sock in socks:
            sock.listen(2048)  # uvicorn's backlog
    except OSError as e:
        for sock in socks:
            sock.close()
        raise PonderError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(app: Any, socks: list[Any], grace_s: float = 30.0) -> None:
    """Run ``app`` with uvicorn on the listening sockets ``socks`` (``bind``, ``listen``) until SIGINT/SIGTERM;
    then new requests get 503 while the running ones finish (at most ``grace_s``), and the process exits with code
    0. A second signal stops at once. Call it on the main thread: the engine loop runs there (``EngineLoop.run``),
    uvicorn's event loop on a thread of its own."""
    import contextlib
    import signal
    import threading

    import uvicorn

    loop: EngineLoop = app.state.loop

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # the handlers are serve's, set on the main thread (uvicorn's own closes the listener at once and
            # re-raises the signal after shutdown)
            yield

        def drain(self, sig: int, frame: Any) -> None:
            if app.state.draining:
                self.handle_exit(sig, frame)
                return
            app.state.draining = True

            def wait() -> None:
                deadline = time.monotonic() + grace_s
                while loop.in_flight and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.should_exit = True

            threading.Thread(target=wait, name="ponder-drain", daemon=True).start()

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace_s)
    server = Server(config)
    old = {sig: signal.signal(sig, server.drain) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=server.run, kwargs={"sockets": socks}, name="ponder-http", daemon=True)
    http.start()
    try:
        loop.run(until=lambda: not http.is_alive())
    finally:
        server.should_exit = True
        http.join(grace_s + 5)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not server.started:  # its thread failed before serving (its traceback is above): not a clean exit
        raise PonderError("the HTTP server stopped before it served a request (the lines above say why)")
