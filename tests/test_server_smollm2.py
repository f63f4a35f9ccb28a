"""``ponder serve`` on the real default model (issue 14, promises 6 and 8): a long prompt's prefill does not starve
the running streams (chunked prefill), ``/health`` stays responsive under load, and a client that leaves during a
long prefill is freed within half a second. The servers are started on 127.0.0.1 with a free port and stopped by
the tests."""

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import HAVE_SMOLLM2, SMOLLM2_MISSING  # noqa: E402
from test_server import Server, scrape  # noqa: E402
from test_server_load import _pct, _wait_idle  # noqa: E402

pytestmark = pytest.mark.slow  # the real default model


def _essay_ids(count: int) -> list[int]:
    """The first ``count`` SmolLM2 tokens of the Paul Graham essays (the long-context suites' text)."""
    from ponder.bench.longctx import essays_dir
    from ponder.model.loader import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    words = " ".join(p.read_text(errors="replace") for p in sorted(essays_dir().glob("*.txt"))[:6]).split()
    ids = tokenizer(" ".join(words))["input_ids"][:count]
    assert len(ids) == count
    return ids


@pytest.mark.serial
def test_a_7000_token_prefill_does_not_starve_running_streams() -> None:
    """Three streams decode while a 7,000-token prompt is prefilled (~290 steps of ~200 ms of prefill each, the
    default --prefill-ms, ~70 s): the gap between a running stream's tokens stays <= 500 ms p99 (prefilled whole,
    the prompt would stop them for ~25 s), and ``/health`` answers in <= 50 ms p99 meanwhile (issue 14's targets;
    measured 0.35 s and 9 ms on 2 EPYC cores shared with the test's clients; docs/serve.md)."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    ids = _essay_ids(7000)
    s = Server("smollm2-135m", "--batch-size", "4")
    gaps: list[float] = []
    health: list[float] = []
    prefilling = threading.Event()
    finished = threading.Event()

    def stream(i: int) -> None:
        body = {"model": "tiny", "prompt": f"Chapter {i}. The lighthouse keeper", "max_tokens": 2000,
                "temperature": 0.8, "seed": i, "stream": True}
        last = None
        with httpx.stream("POST", s.base + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is not None and prefilling.is_set() and not finished.is_set():
                    gaps.append(now - last)
                last = now
                if finished.is_set() or json.loads(line[6:])["choices"][0]["finish_reason"]:
                    return

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(3)  # the streams are decoding
        prefilling.set()
        result: dict = {}

        def long_request() -> None:
            result["r"] = httpx.post(s.base + "/v1/completions", timeout=300,
                                     json={"model": "tiny", "prompt": ids, "max_tokens": 1})

        long = threading.Thread(target=long_request)
        long.start()
        with httpx.Client(timeout=10) as client:  # one connection, as a load balancer's health check keeps
            while long.is_alive():
                t0 = time.perf_counter()
                assert client.get(s.base + "/health").status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.1)
        finished.set()
        for t in threads + [long]:
            t.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["prompt_tokens"] == 7000
        assert len(gaps) >= 100  # the streams kept going throughout the prefill
        assert _pct(gaps, 99) <= 0.5, sorted(gaps)[-5:]
        # never queued behind the engine (a step takes ~0.25 s): the HTTP thread answers while the engine computes
        assert _pct(health, 99) <= 0.05, sorted(health)[-5:]
    finally:
        finished.set()
        assert s.stop() == 0


@pytest.mark.serial
@pytest.mark.parametrize("extra", [(), ("--kv", "snapkv:ratio=0.5")], ids=["chunked", "kv-policy"])
def test_a_client_that_leaves_during_a_2000_token_prefill_frees_it_within_500_ms(extra) -> None:
    """50 trials (24 with a KV policy, for CI's time; half streamed, half not): a client sends a 2,000-token prompt
    and closes its connection 0.3 s into the prefill (which takes several times that, in steps of 512 tokens'
    worth, ~0.5 s each): ``/health`` shows
    nothing in flight within 500 ms p99 of the close (issue 14's target during a prefill) and 200 ms p50, 300 ms
    with a KV policy (the step's forward stops at its next layer: waiting for the step's end instead, a close
    landing anywhere in it, the median would be ~0.25 s and the p99 ~0.5 s; measured 37-49 ms and 95-210 ms on 2
    Xeon cores, and with ``--kv snapkv:ratio=0.5`` 110 and 259 ms, a whole prompt's layer taking ~0.1 s), no token
    was generated for any of them (each left while its prompt was still being prefilled), and the running and waiting
    gauges and the KV bytes are back to zero. Each trial's prompt starts at another place of the essays, so no
    prefix is reused. With a KV policy (prompts prefilled whole, a batch at a time) the prefill stops the same way."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    import socket

    ids = _essay_ids(2000 + 50 * 13)
    s = Server("smollm2-135m", "--batch-size", "4", *extra)
    try:
        t = time.monotonic()  # a whole prefill of such a prompt, for scale (another prompt again)
        r = httpx.post(s.base + "/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": ids[-2000:], "max_tokens": 1})
        assert r.status_code == 200, r.text
        whole = time.monotonic() - t
        assert whole > 0.6, f"a 2,000-token prefill took {whole:.2f} s: too short to leave during it"
        before = scrape(s)
        latencies = []
        for trial in range(24 if extra else 50):
            body = json.dumps({"model": "tiny", "prompt": ids[trial * 13:trial * 13 + 2000], "max_tokens": 8,
                               "stream": trial % 2 == 0}).encode()
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 10
            while httpx.get(s.base + "/health", timeout=5).json()["in_flight"] == 0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.005)
            time.sleep(0.3)
            sock.close()
            latencies.append(_wait_idle(s.base))
        after = scrape(s)
        assert after["ponder:generation_tokens_total"] == before["ponder:generation_tokens_total"]
        assert after["ponder:num_requests_running"] == 0 and after["ponder:num_requests_waiting"] == 0
        assert after["ponder:kv_cache_bytes"] == 0
        # the median the stop buys: a chunk's layer takes a few ms, a whole 2,000-token prompt's ~0.1 s (--kv);
        # waiting for the step instead: ~0.25 s in 512-token chunks, ~1.2 s whole
        median = 0.3 if extra else 0.2
        assert _pct(latencies, 99) <= 0.5 and _pct(latencies, 50) <= median, [f"{x:.2f}" for x in latencies]
        print(f"\n{' '.join(extra) or 'chunked'}: left during a 2,000-token prefill (whole: {whole:.2f} s): "
              f"freed in p50 {_pct(latencies, 50):.3f} s, "
              f"p99 {_pct(latencies, 99):.3f} s")
    finally:
        assert s.stop() == 0
