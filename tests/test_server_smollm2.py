"""``ponder serve`` on the real default model (issue 14, promise 8): a long prompt's prefill does not starve the
running streams (chunked prefill), and ``/health`` stays responsive under load. The server is started on
127.0.0.1 with a free port and stopped by the test."""

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import HAVE_SMOLLM2, SMOLLM2_MISSING  # noqa: E402
from test_server import Server  # noqa: E402
from test_server_load import _pct  # noqa: E402

pytestmark = pytest.mark.slow  # the real default model


@pytest.mark.serial
def test_a_7000_token_prefill_does_not_starve_running_streams() -> None:
    """Three streams decode while a 7,000-token prompt is prefilled (~290 steps of ~200 ms of prefill each, the
    default --prefill-ms, ~70 s): the gap between a running stream's tokens stays <= 500 ms p99 (prefilled whole,
    the prompt would stop them for ~25 s), and ``/health`` answers in <= 50 ms p99 meanwhile (issue 14's targets;
    measured 0.35 s and 9 ms on 2 EPYC cores shared with the test's clients; docs/serve.md)."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    from ponder.bench.longctx import essays_dir
    from ponder.model.loader import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    words = " ".join(p.read_text(errors="replace") for p in sorted(essays_dir().glob("*.txt"))[:6]).split()
    ids = tokenizer(" ".join(words))["input_ids"][:7000]
    assert len(ids) == 7000
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
