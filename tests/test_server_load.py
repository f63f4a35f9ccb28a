"""``ponder serve`` under load (issue 14's reliability promises), on the tiny model: isolation of 1,000 requests with
shared prefixes and aborts, disconnect latency, overload, and a soak. Each test starts its own server on
127.0.0.1 with a free port and stops it; every wait is bounded."""

import asyncio
import json
import os
import random
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import ponder  # noqa: E402
from ponder.engine import Engine  # noqa: E402
from ponder.sampling import RowNoise, SamplingParams  # noqa: E402
from test_server import MODEL, Server, scrape  # noqa: E402

WORDS = "the cat sat on a mat and dog ran to red blue sky sea car one two three".split()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _stream(client, base: str, body: dict, abort_after: int | None = None) -> tuple[str, bool]:
    """A streamed completion's text, and whether it ended with [DONE]; with ``abort_after``, the client closes the
    connection after that many chunks."""
    text, chunks = "", 0
    async with client.stream("POST", base + "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return text, True
            if line.startswith("data: "):
                data = json.loads(line[6:])
                assert "error" not in data, data
                text += data["choices"][0]["text"] if data["choices"] else ""
                chunks += 1
                if abort_after is not None and chunks >= abort_after:
                    return text, False
    return text, False


def _wait_idle(base: str, timeout: float = 10.0) -> float:
    """Seconds until ``/health`` says nothing is in flight (polled every 5 ms)."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if httpx.get(base + "/health", timeout=5).json()["in_flight"] == 0:
            return time.monotonic() - t
        time.sleep(0.005)
    raise AssertionError(f"requests still in flight after {timeout} s")


def test_isolation_1000_requests_shared_prefixes_20_percent_aborted(tiny_dir: Path) -> None:
    """1,000 streamed requests, 16 at a time, over 8 shared prefixes, greedy and seeded sampling mixed, one in five
    closed by its client mid-stream: every finished response equals the same request run alone in the engine
    (no text leaks between requests), and afterwards nothing is in flight."""
    engine = Engine(ponder.load(str(tiny_dir)))
    rng = random.Random(0)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(8)]
    requests = []
    for i in range(1000):
        prompt = f"{rng.choice(prefixes)} {' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))}"
        sampled = rng.random() < 0.5
        body = {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(4, 16),
                "temperature": 0.9 if sampled else 0, "seed": rng.randint(0, 10**6) if sampled else None}
        requests.append((body, 2 if rng.random() < 0.2 else None))
    expected: dict[str, str] = {}

    def alone(body: dict) -> str:
        key = json.dumps(body, sort_keys=True)
        if key not in expected:
            params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                    seed=body["seed"])
            core = engine.core(1)
            ids = engine.encode(body["prompt"])
            core.add_request(ids, params, 0, None if params.greedy else RowNoise(body["seed"], 0))
            done = None
            while core.has_work():
                for ev in core.step():
                    if ev.finished:
                        done = ev.completion
            expected[key] = done.text
        return expected[key]

    s = Server(tiny_dir, "--batch-size", "8", "--max-queue", "64")
    try:
        async def main() -> list[tuple[dict, str, bool]]:
            queue = list(requests)
            out = []
            async with httpx.AsyncClient(timeout=60) as client:
                async def worker() -> None:
                    while queue:
                        body, abort_after = queue.pop()
                        text, finished = await _stream(client, s.base, body, abort_after)
                        out.append((body, text, finished))

                await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(16)]), 300)
            return out

        results = asyncio.run(main())
        assert len(results) == 1000
        finished = [(b, t) for b, t, f in results if f]
        assert len(finished) >= 700  # the aborted ones (~20%) may still have finished first
        wrong = [b for b, t in finished if t != alone(b)]
        assert not wrong, f"{len(wrong)} responses differ from the request run alone, e.g. {wrong[0]}"
        _wait_idle(s.base)
        metrics = scrape(s)
        assert metrics["ponder:num_requests_running"] == 0 and metrics["ponder:prefix_cache_hits_total"] > 0
    finally:
        assert s.stop() == 0


@pytest.mark.serial
def test_disconnects_free_rows_quickly(tiny_dir: Path) -> None:
    """50 trials each: a client that closes mid-stream, one that gives up on a non-streamed answer, and one whose
    request is still queued: the in-flight count is back to idle within 250 ms p99 of the client leaving (measured
    from the close, polling /health)."""
    s = Server(tiny_dir, "--batch-size", "1")
    long_body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "n": 4, "temperature": 0.8, "seed": 1}
    try:
        latencies: dict[str, list[float]] = {"stream": [], "non-stream": [], "queued": []}
        for trial in range(50):
            with httpx.stream("POST", s.base + "/v1/completions", json=long_body | {"stream": True},
                              timeout=30) as r:
                next(r.iter_lines())
            t = time.monotonic()
            _wait_idle(s.base)
            latencies["stream"].append(time.monotonic() - t)

            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.base + "/v1/completions", json=long_body, timeout=httpx.Timeout(30, read=0.05))
            t = time.monotonic()
            _wait_idle(s.base)
            latencies["non-stream"].append(time.monotonic() - t)

            # one request occupies the single running place; a second waits in the queue and its client leaves
            with httpx.stream("POST", s.base + "/v1/completions", json=long_body | {"stream": True},
                              timeout=30) as running:
                next(running.iter_lines())
                with httpx.stream("POST", s.base + "/v1/completions", json=long_body | {"stream": True, "n": 1},
                                  timeout=30) as queued:
                    assert queued.status_code == 200
                t = time.monotonic()
                deadline = t + 10
                while httpx.get(s.base + "/health", timeout=5).json()["in_flight"] > 4 and time.monotonic() < deadline:
                    time.sleep(0.005)
                latencies["queued"].append(time.monotonic() - t)
            _wait_idle(s.base)
        for kind, values in latencies.items():
            assert _pct(values, 99) <= 0.25, (kind, sorted(values)[-5:])
        metrics = scrape(s)
        assert metrics["ponder:num_requests_running"] == 0 and metrics["ponder:num_requests_waiting"] == 0
        assert metrics["ponder:kv_cache_bytes"] == 0
    finally:
        assert s.stop() == 0


async def _raw_post(port: int, path: str, body: dict) -> tuple[int, float, dict[str, str], bytes]:
    """One POST on a fresh connection written by hand (status, seconds from connecting to the status line, headers,
    body): a load generator's client, whose own cost is a few system calls, where an HTTP library's client would
    take ~1-2 ms of Python per request from the 2 cores the server shares with it."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    t = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + data)
        await writer.drain()
        status = await reader.readline()
        seconds = time.perf_counter() - t
        rest = await asyncio.wait_for(reader.read(), 120)
    finally:
        writer.close()
    lines, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode("latin-1").lower().split(": ", 1) for line in lines.split(b"\r\n") if b": " in line)
    return int(status.split()[1]), seconds, headers, payload


@pytest.mark.serial
def test_overload_is_refused_fast_and_admitted_requests_succeed(tiny_dir: Path) -> None:
    """64 clients at once against 4 running places and --max-queue 16: the excess gets 429 with Retry-After at
    once, and every admitted request completes. A request holds its place from its arrival (before its body is read
    and its prompt encoded), so the 429s never wait for the engine (test_server.py checks that with an engine that
    never steps). Issue 14 asks for 50 ms p99; asserted here: 250 ms, for a CI VM's noise (measured: docs/serve.md). ``PONDER_OVERLOAD_BURSTS`` bursts (2 in CI) against
    ``PONDER_OVERLOAD_MODEL`` (the tiny model; a bench run: ``smollm2-135m``, with ``PONDER_OVERLOAD_ARGS``)."""
    model = os.environ.get("PONDER_OVERLOAD_MODEL") or str(tiny_dir)
    s = Server(model, "--batch-size", "4", "--max-queue", "16", *os.environ.get("PONDER_OVERLOAD_ARGS", "").split())
    refused: list[float] = []
    try:
        for _ in range(int(os.environ.get("PONDER_OVERLOAD_BURSTS", "2"))):
            async def burst() -> list[tuple[int, float, dict[str, str], bytes]]:
                return await asyncio.gather(*[
                    _raw_post(s.port, "/v1/completions", {"model": MODEL, "prompt": f"word {i % 7}", "max_tokens": 250,
                                                          "temperature": 0.8, "seed": i}) for i in range(64)])

            results = asyncio.run(burst())
            codes = [code for code, *_ in results]
            # 20 places at once (4 running, 16 waiting); a request that finished during the burst frees one more
            assert set(codes) == {200, 429} and codes.count(200) >= 20 and codes.count(429) >= 32, codes
            for code, seconds, headers, payload in results:
                if code == 429:
                    refused.append(seconds)
                    assert headers.get("retry-after") == "1", headers
                    assert json.loads(payload)["error"]["code"] == "queue_full"
                else:
                    choice = json.loads(payload)["choices"][0]
                    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
            _wait_idle(s.base, timeout=120)
        print(f"overload: {len(refused)} 429s, p50 {_pct(refused, 50) * 1000:.1f} ms, "
              f"p99 {_pct(refused, 99) * 1000:.1f} ms, max {max(refused) * 1000:.1f} ms")
        assert _pct(refused, 99) <= 0.25, sorted(refused)[-5:]
    finally:
        assert s.stop() == 0


@pytest.mark.long
def test_soak_16_streaming_clients(tiny_dir: Path) -> None:
    """16 streaming clients for ``PONDER_SOAK_S`` seconds (120 in CI, as issue 14 asks; 600 in a bench run): no
    error, every stream ends with [DONE], and the server's resident memory grows by at most 3% after a warm-up. It
    asserts on no elapsed time, so ``make test`` runs it first, beside the other tests (marker ``long``)."""
    seconds = float(os.environ.get("PONDER_SOAK_S", "120"))
    # a small prefix cache, full after the warm-up: it holds up to its budget by design
    s = Server(tiny_dir, "--batch-size", "8", "--max-queue", "32", "--prefix-cache-mb", "4")

    def rss_mb() -> float:
        with open(f"/proc/{s.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    try:
        async def run_for(duration: float) -> tuple[int, int]:
            rng = random.Random(1)
            stop = time.monotonic() + duration
            counts = [0, 0]  # streams, streams that ended with [DONE]
            async with httpx.AsyncClient(timeout=60) as client:
                async def worker() -> None:
                    while time.monotonic() < stop:
                        body = {"model": MODEL, "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))),
                                "max_tokens": rng.randint(8, 64), "temperature": 0.7, "seed": rng.randint(0, 999)}
                        _, done = await _stream(client, s.base, body)
                        counts[0] += 1
                        counts[1] += done

                await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(16)]), duration + 60)
            return counts[0], counts[1]

        asyncio.run(run_for(min(20.0, seconds / 4)))  # warm-up: allocator pools, prefix cache, compiled routes
        before = rss_mb()
        streams, done = asyncio.run(run_for(seconds))
        after = rss_mb()
        assert streams > 0 and done == streams
        assert after <= before * 1.03, (before, after)
    finally:
        assert s.stop() == 0
