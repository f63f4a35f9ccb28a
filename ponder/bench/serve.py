"""``ponder bench --suite serve[:PROMPTS]``: servers under load, ponder's and the peer's, on loopback.

For each method the bench starts a server as a child process on 127.0.0.1 with a free port (``ponder serve`` with
the method's dtype, speculation and KV policy; for ``llamacpp``, llama-cpp-python's OpenAI server on the same GGUF
file), then a load generator (asyncio + httpx) runs closed-loop clients at each ``--concurrency`` level: ``c``
clients, each sending its next streaming chat request as soon as its previous one ends, until the level's
requests (``--requests``, default max(16, 2c)) are done or its time bound (``--level-timeout``) is reached; what
is still running then is cancelled and counted. Prompts are the first turns of ``PROMPTS`` (any text suite:
``builtin`` by default, ``specbench:PATH``), cycled; greedy, ``--max-new-tokens`` each.

Measured per level: throughput (completion tokens per second of the level's wall time), time to first token
(TTFT), inter-token latency (each request's gaps between streamed chunks, divided by the tokens a chunk holds) and
end-to-end latency percentiles, and errors. Then a prefix-cache probe: one ~1,000-token system prompt with
``PREFIX_QUESTIONS`` different questions, one request at a time: TTFT of the first (nothing cached) against the
median of the others (the prefix cached, if the server caches it). Each server is stopped (SIGTERM, then SIGKILL)
before the next starts, so no two servers share the CPU.

Results go to ``results.json`` and ``report.md`` (a table per method and level) and ``serve.png``
(throughput and TTFT against concurrency) in ``--out``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ponder.errors import PonderError

DEFAULT_CONCURRENCY = (1, 4, 8, 16, 64)
PREFIX_QUESTIONS = ("What is the main point?", "Give this a title.", "Who would enjoy reading it?",
                    "List three claims it makes.", "What does it leave out?")
START_TIMEOUT_S = 300.0  # a cold compile of the fast path can take minutes


@dataclass
class RequestStats:
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # per token, seconds between streamed chunks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(spec: Any, model: str, port: int, threads: int | None, batch: int, max_queue: int,
                   n_ctx: int) -> list[str]:
    """The command line that serves ``spec`` (a bench MethodSpec) on 127.0.0.1:port."""
    if spec.name == "llamacpp":
        from ponder.bench.methods import gguf_path

        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path(model)), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--model_alias", "bench",
               # by default a new request interrupts the running one (its answer ends early): queue them instead
               "--interrupt_requests", "False"]
        # always as many threads as ponder's servers get: llama-cpp-python's server decodes on half the cores
        # by default (n_threads = cpu_count // 2), which would measure it on one core of two
        import torch

        n = threads or torch.get_num_threads()
        return cmd + ["--n_threads", str(n), "--n_threads_batch", str(n)]
    if not spec.is_ponder:
        raise PonderError(f"the serve suite runs ponder methods and llamacpp, not {spec.text}")
    cmd = [sys.executable, "-m", "ponder", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--dtype", spec.dtype, "--batch-size", str(spec.batch(batch)),
           "--max-queue", str(max_queue)]
    if spec.compile:
        cmd.append("--compile")
    if not spec.native:
        cmd.append("--no-native")
    if spec.amx:
        cmd.append("--amx")
    if spec.speculator:
        cmd += ["--speculate", spec.speculator]
    if spec.kv:
        cmd += ["--kv", spec.kv]
    return cmd + (["--threads", str(threads)] if threads else [])


class ServerProcess:
    """A server child process on loopback, up once ``/v1/models`` answers; stopped by ``stop``."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        import httpx

        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log.open("w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PonderError(f"the server exited with code {self.proc.returncode} before serving; its log: "
                                  f"{log}\n{_tail(log)}")
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise PonderError(f"the server did not answer within {START_TIMEOUT_S:.0f} s; its log: {log}")

    def died(self) -> str | None:
        """Why the server is gone, while the bench still needs it (None while it runs)."""
        code = self.proc.poll()
        if code is None:
            return None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else \
            f"exit code {code}"
        return f"the server died ({how}) while the bench ran; its log: {self.log}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


async def _one(client: Any, base: str, messages: list[dict[str, str]], max_tokens: int) -> RequestStats:
    """One streaming chat request; its TTFT, token gaps and end-to-end latency."""
    stats = RequestStats()
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats.error = f"HTTP {r.status_code}"
                await r.aread()
                return stats
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    stats.error = str(data["error"].get("message", "error"))[:200]
                    return stats
                if data.get("usage"):
                    usage = data["usage"]
                choices = data.get("choices") or []
                if not choices or not (choices[0].get("delta") or {}).get("content"):
                    continue
                now = time.perf_counter()
                chunks += 1
                if last is None:
                    stats.ttft = now - start
                else:
                    stats.gaps.append(now - last)
                last = now
    except Exception as e:  # a timeout, a reset connection: counted as this request's error
        stats.error = f"{type(e).__name__}: {e}"[:200]
        return stats
    stats.e2e = time.perf_counter() - start
    stats.tokens = int(usage["completion_tokens"]) if usage else chunks
    if chunks > 1 and stats.tokens > chunks:  # chunks holding several tokens (speculation): per-token gaps
        per = (stats.tokens - 1) / (chunks - 1)
        stats.gaps = [g / per for g in stats.gaps]
    stats.ok = True
    return stats


async def run_level(base: str, prompts: list[list[dict[str, str]]], concurrency: int, requests: int,
                    max_tokens: int, timeout_s: float) -> dict[str, Any]:
    """``concurrency`` closed-loop clients until ``requests`` requests are done or ``timeout_s`` passes."""
    import httpx

    results: list[RequestStats] = []
    next_index = 0
    start = time.perf_counter()

    async def client_loop(client: Any) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            results.append(await _one(client, base, prompts[i % len(prompts)], max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    return summarize(results, wall, concurrency, requests)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(results: list[RequestStats], wall: float, concurrency: int, asked: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    tokens = sum(r.tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "concurrency": concurrency, "requests": asked, "completed": len(ok),
        "failed": len(results) - len(ok), "unfinished": asked - len(results), "errors": errors[:5],
        "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(gaps, 50), "itl_p99_s": _pct(gaps, 99),
        "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
    }


async def prefix_probe(base: str, system: str, max_tokens: int, timeout_s: float) -> dict[str, Any]:
    """TTFT of a request with a long system prompt nothing has cached, then of requests sharing it."""
    import httpx

    ttfts = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
        for q in PREFIX_QUESTIONS:
            stats = await _one(client, base, [{"role": "system", "content": system}, {"role": "user", "content": q}],
                               max_tokens)
            if not stats.ok or stats.ttft is None:
                return {"error": stats.error or "no token"}
            ttfts.append(stats.ttft)
    cached = statistics.median(ttfts[1:])
    return {"first_ttft_s": ttfts[0], "cached_ttft_s": cached, "speedup": ttfts[0] / cached if cached else None,
            "ttfts_s": ttfts}


def long_system_prompt(tokenizer: Any, tokens: int = 1000) -> str:
    """About ``tokens`` tokens of an essay (the needle-in-a-haystack essays), as a system prompt."""
    from ponder.bench.longctx import essays_dir

    words: list[str] = []
    for path in sorted(essays_dir().glob("*.txt")):
        words += path.read_text(encoding="utf-8", errors="replace").split()
        if len(words) > 4 * tokens:
            break
    lo, hi = 1, len(words)
    while lo < hi:  # the most words that stay within the token count
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid]))["input_ids"]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return "Answer questions about this text.\n\n" + " ".join(words[:lo])


def run_serve(args: Any, specs: list[Any]) -> int:
    """The serve suite (module doc): every method's server in turn, the load levels, the prefix probe, outputs."""
    from ponder.bench.methods import llamacpp_available
    from ponder.bench.suites import load_suite
    from ponder.model.kernels import cpu_name
    from ponder.model.loader import load_tokenizer, read_config, resolve

    levels = _levels(args.concurrency)
    if args.requests is not None and args.requests < 1:
        raise PonderError(f"--requests must be >= 1, got {args.requests}")
    if args.level_timeout <= 0:
        raise PonderError(f"--level-timeout must be > 0, got {args.level_timeout}")
    source = args.suite.split(":", 1)[1] if ":" in args.suite else "builtin"
    cases = [c for c in load_suite(source) if c.turn == 1]
    if args.per_category:
        from ponder.bench import _per_category

        cases = _per_category(cases, args.per_category)
    cases = cases[: args.limit]
    if not cases:
        raise PonderError(f"the prompt suite {source!r} has no prompts")
    prompts = [[{"role": "user", "content": c.turns[0]}] for c in cases]
    path = resolve(args.model)
    tokenizer = load_tokenizer(path)
    window = read_config(path).max_position_embeddings
    # the probe's prompt: ~1,000 tokens, or half the context window of a smaller model
    system = long_system_prompt(tokenizer, min(1000, window // 2)) if args.prefix_probe else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"suite": "serve", "prompts": source, "n_prompts": len(prompts),
                               "max_new_tokens": args.max_new_tokens, "concurrency": levels,
                               "level_timeout_s": args.level_timeout, "methods": {},
                               "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(),
                               "threads": args.threads}
    for spec in specs:
        if spec.name == "llamacpp" and not (llamacpp_available() and _llamacpp_server_deps()):
            print(f"{spec.text}: skipped (pip install 'ponder[llamacpp]': llama-cpp-python[server])", file=sys.stderr)
            continue
        port = free_port()
        log = out / f"server-{_slug(spec.text)}.log"
        cmd = server_command(spec, args.model, port, args.threads, max(args.batch_size, 16), max(levels) + 8,
                             4096 if spec.name == "llamacpp" else 0)
        print(f"{spec.text}: starting {' '.join(cmd[1:4])} ... on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        server = ServerProcess(cmd, port, log)
        entry: dict[str, Any] = {"command": " ".join(cmd), "levels": []}
        try:
            asyncio.run(run_level(server.base, prompts[:1], 1, 1, 8, args.level_timeout))  # warm-up
            for c in levels:
                if server.died():
                    break
                n = args.requests or max(16, 2 * c)
                level = asyncio.run(run_level(server.base, prompts, c, n, args.max_new_tokens, args.level_timeout))
                entry["levels"].append(level)
                print(f"{spec.text}: concurrency {c}: {level['throughput_tok_s']:.1f} tok/s, TTFT p50 "
                      f"{_ms(level['ttft_p50_s'])}, ITL p99 {_ms(level['itl_p99_s'])}, {level['completed']}/{n} "
                      "done", file=sys.stderr, flush=True)
            if args.prefix_probe and not server.died():
                entry["prefix"] = asyncio.run(prefix_probe(server.base, system, 8, args.level_timeout))
            why = server.died()
            if why:  # its requests' errors alone (refused connections) would not say why
                from ponder.bench import LLAMACPP_CRASH_HINT

                entry["error"] = why + ("." + LLAMACPP_CRASH_HINT if spec.name == "llamacpp" else "")
                print(f"{spec.text}: {entry['error']}:\n{_tail(log)}", file=sys.stderr, flush=True)
        finally:
            server.stop()
        results["methods"][spec.text] = entry
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (out / "report.md").write_text(report)
    written = ["results.json", "report.md"]
    if plot(results, out / "serve.png"):
        written.append("serve.png")
    print(report)
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0


def _llamacpp_server_deps() -> bool:
    """llama-cpp-python's server needs its [server] extra's packages."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("sse_starlette", "starlette_context", "pydantic_settings", "uvicorn", "fastapi"))


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise PonderError(f"--concurrency takes comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 or c > 256 for c in levels):
        raise PonderError(f"--concurrency levels must be in 1..256, got {text!r}")
    return levels


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# ponder bench: serve ({results['date']}, {results['cpu']})", "",
             f"{results['n_prompts']} prompts from {results['prompts']}, greedy, {results['max_new_tokens']} new tokens "
             f"per request, closed-loop streaming chat clients on 127.0.0.1.", "",
             "| method | concurrency | done | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["methods"].items():
        for lv in entry["levels"]:
            errors = lv["failed"] + lv["unfinished"]
            lines.append(f"| {name} | {lv['concurrency']} | {lv['completed']}/{lv['requests']} | "
                         f"{lv['throughput_tok_s']:.1f} | {_ms(lv['ttft_p50_s'])} | {_ms(lv['ttft_p99_s'])} | "
                         f"{_ms(lv['itl_p50_s'])} | {_ms(lv['itl_p99_s'])} | {_ms(lv['e2e_p50_s'])} | "
                         f"{errors}{' (' + '; '.join(lv['errors']) + ')' if lv['errors'] else ''} |")
    scaling = []
    for name, entry in results["methods"].items():
        by_c = {lv["concurrency"]: lv["throughput_tok_s"] for lv in entry["levels"]}
        if 1 in by_c and 8 in by_c and by_c[1]:
            scaling.append(f"- {name}: throughput at concurrency 8 is {by_c[8] / by_c[1]:.2f}x concurrency 1")
    if scaling:
        lines += ["", *scaling]
    died = [f"- {name} (the levels it did not finish are not comparable): {e['error']}"
            for name, e in results["methods"].items() if "error" in e]
    if died:
        lines += ["", *died]
    probes = [(n, e["prefix"]) for n, e in results["methods"].items() if "prefix" in e]
    if probes:
        lines += ["", "Prefix cache: time to first token of a request with a ~1,000-token system prompt, nothing "
                      "cached vs the median of 4 more requests sharing it.", "",
                  "| method | first | cached | speedup |", "|---|---|---|---|"]
        for n, p in probes:
            if "error" in p:
                lines.append(f"| {n} | - | - | failed: {p['error']} |")
            else:
                lines.append(f"| {n} | {_ms(p['first_ttft_s'])} | {_ms(p['cached_ttft_s'])} | {p['speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in results["methods"].items():
        cs = [lv["concurrency"] for lv in entry["levels"]]
        a.plot(cs, [lv["throughput_tok_s"] for lv in entry["levels"]], marker="o", label=name)
        b.plot(cs, [(lv["ttft_p50_s"] or 0) * 1000 for lv in entry["levels"]], marker="o", label=name)
    for ax, title in ((a, "throughput (tokens/s)"), (b, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
