"""``ponder serve``: started by the tests as a subprocess on 127.0.0.1 with a free port (tiny model), talked to with
the real ``openai`` client and with raw HTTP, stopped by the tests; every wait is bounded."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ponder  # noqa: E402
from ponder.engine import Engine  # noqa: E402
from ponder.sampling import SamplingParams  # noqa: E402
from conftest import DEVICE  # noqa: E402
from tinymodel import make_model_dir  # noqa: E402

MODEL = "tiny"
KEY = "sk-test-123"


class Server:
    """``ponder serve --port 0``: the system picks a free port and the server names it in its start-up line (a port
    picked here and closed again could be taken by a server of another test worker meanwhile). A thread keeps
    reading the server's output (``output()``), so a chatty server never blocks on a full pipe."""

    def __init__(self, model_dir: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ponder", "serve", "--model", str(model_dir), "--served-model-name", MODEL,
             "--host", "127.0.0.1", "--port", "0", "--batch-size", "4",
             *(("--device", DEVICE) if DEVICE != "cpu" else ()), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self._lines.append(line)
                if re.search(r" on http://127\.0\.0\.1:\d+/v1 ", line):
                    started.set()
            started.set()  # the server exited

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        line = re.search(r" on http://127\.0\.0\.1:(\d+)/v1 ", "".join(self._lines)) if started.wait(90) else None
        if line is None or self.proc.poll() is not None:  # no start-up line: it exited (or is about to), or hangs
            self.stop()
            raise AssertionError(f"ponder serve did not start within 90 s: {self.output()}")
        self.port = int(line[1])
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ponder serve exited: {self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"ponder serve did not answer /health within 30 s of starting: {self.output()}")

    def output(self) -> str:
        """What the server wrote so far (all of it once it has stopped)."""
        if self.proc.poll() is not None:
            self._reader.join(10)
        return "".join(self._lines)

    def client(self, key: str = "none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Iterator[Server]:
    s = Server(tiny_dir)
    yield s
    assert s.stop() == 0  # SIGTERM: a clean exit


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine(ponder.load(str(tiny_dir)))


def test_completions_equal_the_engine_and_stream_equals_non_stream(server: Server, engine: Engine) -> None:
    c = server.client()
    r = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0)
    want = engine.generate(["Hello world"], SamplingParams(max_new_tokens=12))[0]
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    assert r.usage.completion_tokens == len(want.output_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    ids = c.completions.create(model=MODEL, prompt=want.prompt_ids, max_tokens=12, temperature=0)  # token ids
    assert ids.choices[0].text == want.text


def test_chat_stream_equals_non_stream_and_seeded_n_is_reproducible(server: Server, engine: Engine) -> None:
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rain."}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    want = engine.generate([messages], SamplingParams(max_new_tokens=10))[0]
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want.text
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0.9, seed=5, n=3)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # the n choices draw different noise
    assert 3 <= a.usage.completion_tokens <= 3 * 8 and a.usage.prompt_tokens == len(want.prompt_ids)


def test_stop_strings_cut_the_text(server: Server, engine: Engine) -> None:
    c = server.client()
    full = c.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0).choices[0].text
    if len(full) < 4:
        pytest.skip("the tiny model's output is too short to place a stop string")
    stop = full[2:4]
    r = c.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs_are_the_engines_in_openais_shapes(server: Server, engine: Engine) -> None:
    """Chat (``logprobs`` + ``top_logprobs``) and completions (``logprobs``: alternatives per token), streamed and
    not: one entry per completion token, the engine's own values, the token texts spelling the output."""
    c = server.client()
    messages = [{"role": "user", "content": "Tell me about rain."}]
    want = engine.generate([messages], SamplingParams(max_new_tokens=10, logprobs=3))[0]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(want.output_ids)
    assert [e.logprob for e in content] == pytest.approx([lp.logprob for lp in want.token_logprobs], abs=1e-5)
    for e, lp in zip(content, want.token_logprobs):
        assert e.token == engine.tokenizer.decode([lp.token])
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token or "\ufffd" in e.token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx([v for _, v in lp.top], abs=1e-5)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3, stream=True)
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: not computed

    comp = c.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    chunks = list(c.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0, logprobs=2,
                                       stream=True))
    assert [t for ch in chunks for t in ch.choices[0].logprobs.tokens] == lp.tokens
    assert [o for ch in chunks for o in ch.choices[0].logprobs.text_offset] == lp.text_offset


def test_token_bytes_of_partial_characters() -> None:
    """A byte-level BPE token holding part of a character decodes to U+FFFD alone; its bytes are its own."""
    from ponder.server.logprobs import TokenPieces

    class Tok:  # byte-level symbols: "Ã" is byte 0xC3, "©" is 0xA9 ("é" in UTF-8); "Ġ" is the space byte
        symbols = {0: "Ã", 1: "©", 2: "Ġhi", 3: "<0xE2>"}

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return {0: "\ufffd", 1: "\ufffd", 2: " hi", 3: "\ufffd"}[ids[0]]

        def convert_ids_to_tokens(self, token: int) -> str:
            return self.symbols[token]

    pieces = TokenPieces(Tok())
    assert pieces(0)[1] + pieces(1)[1] == list("é".encode())
    assert pieces(2) == (" hi", list(b" hi"))
    assert pieces(3)[1] == [0xE2]  # SentencePiece's byte tokens


def test_per_request_ponder_options(tiny_dir: Path, engine: Engine) -> None:
    """``ponder: {speculate: "off"}`` turns the server's speculation off for one request (same output: lossless);
    naming the server's own settings is accepted; anything the engine cannot do per request is a 400 naming it."""
    s = Server(tiny_dir, "--speculate", "pld")
    try:
        # the verify costs are measured before the server listens, not in the first request's time
        assert "ponder serve: verify costs measured in" in s.output().split(" on http://127.0.0.1:")[0], s.output()
        body = {"model": MODEL, "prompt": "the cat the cat the cat", "max_tokens": 12, "temperature": 0}
        want = engine.generate(["the cat the cat the cat"], SamplingParams(max_new_tokens=12))[0].text
        for opts in ({"speculate": "off"}, {"speculate": False}, {"speculate": "pld"}, {"speculate": True}, {}):
            r = httpx.post(s.base + "/v1/completions", json=body | {"ponder": opts}, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, opts
        for opts, param in (({"speculate": "lookahead"}, "ponder.speculate"), ({"kv": "snapkv"}, "ponder.kv"),
                            ({"unknown": 1}, "ponder.unknown"), ("pld", "ponder")):
            for stream in (False, True):
                r = httpx.post(s.base + "/v1/completions", json=body | {"ponder": opts, "stream": stream}, timeout=30)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (opts, r.text)
    finally:
        assert s.stop() == 0


BAD = [
    ("not json", "/v1/completions", b"{not json", "application/json"),
    ("array body", "/v1/completions", b"[1, 2]", "application/json"),
    ("no prompt", "/v1/completions", {"model": MODEL}, None),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, None),
    ("ids outside the vocabulary", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, None),
    ("negative temperature", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, None),
    ("huge temperature", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 1e9}, None),
    ("top_p zero", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, None),
    ("max_tokens zero", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None),
    ("n too large", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 5}, None),
    ("negative seed", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": -3}, None),
    ("empty stop", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, None),
    ("logprobs over 20", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, None),
    ("negative logprobs", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": -1}, None),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    ("echo", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, None),
    ("stream_options without stream", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, None),
    ("prompt over the context", "/v1/completions", {"model": MODEL, "prompt": [1] * 100_000}, None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, None),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, None),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None),
    ("content not a string", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]}, None),
    ("message not an object", "/v1/chat/completions", {"model": MODEL, "messages": ["hi"]}, None),
    ("invalid utf-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', "application/json"),
    ("deep nesting", "/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "application/json"),
    ("empty body", "/v1/completions", b"", "application/json"),
    ("null body", "/v1/completions", b"null", "application/json"),
    ("string body", "/v1/completions", b'"hello"', "application/json"),
    ("wrong content type", "/v1/completions", b'{"model": "tiny", "prompt": "x"}', "text/plain"),
    ("NaN temperature", "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
     "application/json"),
    ("prompt a number", "/v1/completions", {"model": MODEL, "prompt": 123}, None),
    ("prompt a list of strings", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, None),
    ("empty id list", "/v1/completions", {"model": MODEL, "prompt": []}, None),
    ("negative token id", "/v1/completions", {"model": MODEL, "prompt": [1, -1]}, None),
    ("fractional token id", "/v1/completions", {"model": MODEL, "prompt": [1, 1.5]}, None),
    ("no model", "/v1/completions", {"prompt": "x"}, None),
    ("model a number", "/v1/completions", {"model": 7, "prompt": "x"}, None),
    ("temperature a word", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, None),
    ("top_p above 1", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, None),
    ("fractional max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1.5}, None),
    ("n zero", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, None),
    ("huge seed", "/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**70}, None),
    ("five stops", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, None),
    ("stop not a string", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": [1]}, None),
    ("unknown stream option", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, None),
    ("top_logprobs over 20", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, None),
    ("tools", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, None),
    ("message without content", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, None),
    ("message without role", "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, None),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, None),
    ("negative max_completion_tokens", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}, None),
    ("unknown chat model", "/v1/chat/completions",
     {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, None),
    ("unknown endpoint", "/v1/embeddings", {"model": MODEL, "input": "x"}, None),
    ("detokenize out of vocabulary", "/detokenize", {"tokens": [-4]}, None),
    # strict types (found by the schema fuzzer): false was taken as 0 alternatives, i.e. logprobs turned on
    ("logprobs false", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": False}, None),
    ("token id as a string", "/detokenize", {"tokens": ["5"]}, None),
    ("max_tokens as a string", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "4"}, None),
    ("temperature a boolean", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": True}, None),
]


@pytest.mark.parametrize("name,path,body,ctype", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_error_object_and_the_server_keeps_serving(server: Server, name, path, body,
                                                                      ctype) -> None:
    if isinstance(body, bytes):
        r = httpx.post(server.base + path, content=body, headers={"content-type": ctype}, timeout=30)
    else:
        r = httpx.post(server.base + path, json=body, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= set(err)
    if name in ("unknown model", "unknown chat model", "unknown endpoint"):
        assert r.status_code == 404
    ok = httpx.post(server.base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200


def test_wrong_method_oversized_body_and_unknown_path(server: Server) -> None:
    wrong = httpx.get(server.base + "/v1/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"  # RFC 9110: a 405 names what is allowed
    whole = httpx.post(server.base + "/v1/completions", timeout=30,  # JSON's 2.0 is the integer 2
                       json={"model": MODEL, "prompt": [1.0, 2], "max_tokens": 2.0, "n": 1.0})
    assert whole.status_code == 200 and whole.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2,
                                                                 "total_tokens": 4}
    big = httpx.post(server.base + "/v1/completions", content=b"x" * (2 << 20),
                     headers={"content-type": "application/json"}, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the cap counts the bytes as they arrive
        for _ in range(64):
            yield b"x" * (64 << 10)

    chunked = httpx.post(server.base + "/v1/completions", content=chunks(),
                         headers={"content-type": "application/json"}, timeout=30)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    nf = httpx.get(server.base + "/v1/nothing", timeout=10)
    assert nf.status_code == 404 and "error" in nf.json()
    assert server.client().models.list().data[0].id == MODEL


def test_a_client_that_goes_away_frees_its_row(tmp_path: Path) -> None:
    """The request must outlive its client: on the shared tiny model (256 positions) it could finish by length or
    EOS before the server notices the client left, so this server's model takes 8,192 positions and the request
    asks to run past EOS (``ignore_eos``): ~8,000 tokens, seconds of work, unless cancelled."""
    server = Server(make_model_dir(tmp_path / "long", max_position_embeddings=8192))
    try:
        gone = scrape(server)["ponder:client_disconnects_total"]
        with httpx.stream("POST", server.base + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 100_000, "stream": True,
                                "ignore_eos": True}) as r:
            assert r.status_code == 200
            first = next(r.iter_lines())
            assert first.startswith("data: ") and "choices" in json.loads(first[6:])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if httpx.get(server.base + "/health", timeout=5).json()["in_flight"] == 0:
                break
            time.sleep(0.1)
        assert httpx.get(server.base + "/health", timeout=5).json() | {"status": "ok"} == {
            "status": "ok", "running": 0, "in_flight": 0}
        assert scrape(server)["ponder:client_disconnects_total"] == gone + 1
    finally:
        assert server.stop() == 0


def test_ignore_eos_runs_past_the_end_of_sequence(tmp_path: Path) -> None:
    """A model that ends its greedy answer early (this seed: EOS after a few tokens) runs to max_tokens with
    ``ignore_eos``."""
    server = Server(make_model_dir(tmp_path / "short", seed=1))
    try:
        def ask(**extra: object) -> dict:
            r = httpx.post(server.base + "/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": "x", "max_tokens": 200, "temperature": 0} | extra)
            assert r.status_code == 200, r.text
            return r.json()

        short = ask()
        assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 200
        full = ask(ignore_eos=True)
        assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 200
    finally:
        assert server.stop() == 0


def test_api_key(tiny_dir: Path) -> None:
    s = Server(tiny_dir, "--api-key", KEY)
    try:
        assert httpx.get(s.base + "/health", timeout=10).status_code == 200  # public
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = httpx.post(s.base + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert s.client(KEY).completions.create(model=MODEL, prompt="x", max_tokens=2).choices
    finally:
        assert s.stop() == 0
    assert KEY not in s.output()  # the key is never logged


def test_tokenize_and_detokenize(server: Server, engine: Engine) -> None:
    r = httpx.post(server.base + "/tokenize", json={"prompt": "Hello world"}, timeout=10).json()
    assert r["tokens"] == engine.encode("Hello world") and r["count"] == len(r["tokens"])
    chat = httpx.post(server.base + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      timeout=10).json()
    assert chat["tokens"] == engine.encode([{"role": "user", "content": "hi"}])
    back = httpx.post(server.base + "/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
    assert back["prompt"] == engine.tokenizer.decode(r["tokens"])
    for path, body in (("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": []}),
                       ("/detokenize", {"tokens": [10**9]}), ("/detokenize", {"tokens": "abc"})):
        bad = httpx.post(server.base + path, json=body, timeout=10)
        assert bad.status_code == 400 and "error" in bad.json(), (path, body, bad.text)


def scrape(server: Server) -> dict[str, float]:
    text = httpx.get(server.base + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_what_was_served(server: Server) -> None:
    before = scrape(server)
    r = server.client().completions.create(model=MODEL, prompt="count me", max_tokens=7, temperature=0)
    after = scrape(server)
    assert after["ponder:generation_tokens_total"] - before["ponder:generation_tokens_total"] == \
        r.usage.completion_tokens
    assert after["ponder:prompt_tokens_total"] - before["ponder:prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["ponder:time_to_first_token_seconds_count"] == before["ponder:time_to_first_token_seconds_count"] + 1
    assert after["ponder:e2e_request_latency_seconds_count"] == before["ponder:e2e_request_latency_seconds_count"] + 1
    assert after['ponder:e2e_request_latency_seconds_bucket{le="+Inf"}'] == \
        after["ponder:e2e_request_latency_seconds_count"]
    assert after["ponder:num_requests_running"] == 0


def test_sigterm_drains_running_requests_and_refuses_new_ones(tiny_dir: Path) -> None:
    """SIGTERM: running requests finish (their streams end in [DONE]), new ones get 503, the exit code is 0."""
    s = Server(tiny_dir, "--batch-size", "1")
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "n": 4, "stream": True, "temperature": 0.8,
                "seed": 1}  # 4 choices one after another (batch 1): ~1000 decode steps still to run
        with httpx.stream("POST", s.base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGTERM)
            refused = httpx.post(s.base + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert httpx.get(s.base + "/health", timeout=10).json()["status"] == "draining"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finished = [json.loads(x[6:])["choices"][0] for x in rest[:-1]]
        assert sum(1 for c in finished if c["finish_reason"]) == 4  # every choice ran to its end
        assert s.proc.wait(30) == 0
    finally:
        if s.proc.poll() is None:
            s.stop()


def test_the_async_client_runs_requests_concurrently(server: Server, engine: Engine) -> None:
    """AsyncOpenAI: four concurrent requests (one streamed) share the running batch and each gets its own answer."""
    import asyncio

    prompts = ["one", "two three", "four five six", "seven"]

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=60)

        async def one(p: str) -> str:
            r = await client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0)
            return r.choices[0].text

        async def streamed(p: str) -> str:
            stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=9, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*[one(p) for p in prompts[:3]], streamed(prompts[3]))
        finally:
            await client.close()

    got = asyncio.run(main())
    want = [c.text for c in engine.generate(prompts, SamplingParams(max_new_tokens=9))]
    assert got == want


def test_seeded_completions_are_reproducible_and_stream_the_same_text(server: Server) -> None:
    c = server.client()
    kw = dict(model=MODEL, prompt="a b c", max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True) if ch.choices)
    assert streamed == a.choices[0].text
    other = c.completions.create(**(kw | {"seed": 12}))
    assert other.usage.completion_tokens >= 1


@pytest.mark.serial
def test_overload_gets_429_with_retry_after_and_admitted_requests_succeed(tiny_dir: Path) -> None:
    """12 clients at once, one running place and 2 waiting places: the excess gets 429 (OpenAI's shape, Retry-After)
    at once, and every admitted request completes."""
    import asyncio

    s = Server(tiny_dir, "--batch-size", "1", "--max-queue", "2")
    try:
        async def main() -> list[tuple[int, dict, dict, float]]:
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(i: int) -> tuple[int, dict, dict, float]:
                    t = time.perf_counter()
                    r = await client.post(s.base + "/v1/completions",
                                          json={"model": MODEL, "prompt": f"word {i}", "max_tokens": 120,
                                                "temperature": 0})
                    return r.status_code, r.json(), dict(r.headers), time.perf_counter() - t

                return await asyncio.gather(*[one(i) for i in range(12)])

        results = asyncio.run(main())
        codes = sorted(code for code, *_ in results)
        assert codes.count(200) == 3 and codes.count(429) == 9, codes  # one running place, two waiting
        for code, body, headers, seconds in results:
            if code == 429:
                assert body["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
                assert seconds < 5  # refused at once, not after the admitted ones ran
            else:
                assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert scrape(s)["ponder:request_rejected_total"] == codes.count(429)
    finally:
        assert s.stop() == 0


def test_shared_prefixes_are_reused_and_change_no_output(server: Server, engine: Engine) -> None:
    """Chat requests with one long system prompt: the later ones reuse its K/V (the prefix-cache counters say so)
    and each answer equals the engine's for the same request alone."""
    system = " ".join(["the cat sat on the mat and the dog ran"] * 6)
    c = server.client()
    before = scrape(server)
    for question in ("where is the cat", "what did the dog do", "tell me more"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == engine.generate([messages], SamplingParams(max_new_tokens=12))[0].text
    after = scrape(server)
    hits = after["ponder:prefix_cache_hits_total"] - before["ponder:prefix_cache_hits_total"]
    reused = after["ponder:prefix_cache_hit_tokens_total"] - before["ponder:prefix_cache_hit_tokens_total"]
    assert hits >= 2 and reused >= 2 * 48
    assert after["ponder:prefix_cache_bytes"] > 0 and "ponder:kv_cache_bytes" in after


@pytest.mark.serial
def test_a_client_that_gives_up_on_a_non_streamed_answer_frees_its_row(tiny_dir: Path) -> None:
    """No stream: the server notices the closed connection while generating (it polls), aborts the request and
    frees its rows, instead of generating the whole answer for nobody."""
    s = Server(tiny_dir, "--batch-size", "1")
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 250, "n": 4, "temperature": 0.8, "seed": 1}
        t = time.monotonic()
        httpx.post(s.base + "/v1/completions", json=body, timeout=30)  # the whole answer: ~1000 decode steps
        whole = time.monotonic() - t
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.base + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=whole / 5))
        t = time.monotonic()
        while time.monotonic() - t < 10 and httpx.get(s.base + "/health", timeout=5).json()["in_flight"]:
            time.sleep(0.01)
        assert httpx.get(s.base + "/health", timeout=5).json()["in_flight"] == 0
        assert time.monotonic() - t < whole / 2  # well before the answer would have been ready
        assert scrape(s)["ponder:client_disconnects_total"] == 4  # its four choices
    finally:
        assert s.stop() == 0


def test_engine_loop_counts_places_from_arrival(tiny) -> None:
    """The loop's admission count: places reserved on arrival count as in flight, a reservation beyond the places
    is refused, a submission takes a reserved place without being refused again, and ``release`` gives back only
    what was not submitted; finished requests free theirs."""
    from ponder.server.loop import EngineLoop, QueueFull

    loop = EngineLoop(Engine(tiny), batch_size=2, max_queue=1)
    first = loop.reserve(2)
    assert loop.in_flight == 2
    with pytest.raises(QueueFull):
        loop.reserve(2)
    second = loop.reserve(1)
    with pytest.raises(QueueFull):
        loop.grow(second, 1)
    assert loop.in_flight == 3 and second.left == 1
    done: list = []
    params = SamplingParams(max_new_tokens=3)
    loop.submit("a", [1, 2, 3], params, None, done.append, ticket=first)  # full, but the place is its own
    assert first.left == 1 and loop.in_flight == 3
    loop.release(first)
    loop.release(first)  # idempotent
    assert first.left == 0 and loop.in_flight == 2
    loop.submit("c", [1], params, None, done.append)  # no ticket: takes the free place
    with pytest.raises(QueueFull):
        loop.submit("d", [1], params, None, done.append)  # none left
    loop.submit("b", [4, 5], params, None, done.append, ticket=second)
    loop.release(second)
    assert loop.in_flight == 3
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while loop.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.in_flight == 0
        assert sum(1 for ev in done if getattr(ev, "finished", False)) == 3
    finally:
        loop.stop()


def test_a_burst_is_refused_without_waiting_for_the_engine(tiny) -> None:
    """A request holds its place from its arrival: with the engine thread busy (here: not running at all, so no
    prompt is ever encoded), the requests past ``--batch-size`` + ``--max-queue`` get their 429 at once instead of
    waiting for the engine's step to end, and the places of requests that end before submitting come back."""
    import asyncio

    from ponder.server.app import create_app
    from ponder.server.loop import EngineLoop

    loop = EngineLoop(Engine(tiny), batch_size=2, max_queue=1)  # never started: encoding waits forever
    app = create_app(loop, MODEL)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ponder") as client:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
            stuck = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(3)]
            deadline = time.monotonic() + 10
            while loop.in_flight < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert loop.in_flight == 3  # counted on arrival, before any prompt was encoded
            r = await asyncio.wait_for(client.post("/v1/completions", json=body), 5)
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            r = await asyncio.wait_for(client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}), 5)
            assert r.status_code == 429
            assert (await client.get("/health")).status_code == 200
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        assert loop.in_flight == 0  # the places of requests that never submitted were given back

    asyncio.run(main())


def test_a_stalled_upload_holds_no_place(tiny) -> None:
    """A place is taken once the request's body has arrived: clients that send headers and then stall their upload
    hold none (they would otherwise lock everyone out with 429s); a request that could never fit (n beyond the
    batch plus the queue) is the client's 400, and a wrong method on a full server is still its 405."""
    import asyncio

    from ponder.server.app import create_app
    from ponder.server.loop import EngineLoop

    loop = EngineLoop(Engine(tiny), batch_size=2, max_queue=1)  # never started
    app = create_app(loop, MODEL)

    async def stalled(sent: list) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"ponder"), (b"content-type", b"application/json"),
                                              (b"content-length", b"1000")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
        chunks = [{"type": "http.request", "body": b'{"model": ', "more_body": True}]

        async def receive() -> dict:
            if chunks:
                return chunks.pop()
            await asyncio.sleep(3600)  # the rest of the body never comes
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    async def main() -> None:
        sent: list = []
        uploads = [asyncio.ensure_future(stalled(sent)) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert loop.in_flight == 0 and sent == []  # five half-sent requests, no place taken, nothing answered yet
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ponder") as client:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
            r = await asyncio.wait_for(client.post("/v1/completions", json={**body, "n": 4}), 5)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"
            assert loop.in_flight == 0
            admitted = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(3)]
            deadline = time.monotonic() + 10
            while loop.in_flight < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert loop.in_flight == 3  # the complete requests got the places the stalled ones did not take
            r = await asyncio.wait_for(client.post("/v1/completions", json=body), 5)
            assert r.status_code == 429
            r = await asyncio.wait_for(client.get("/v1/completions"), 5)
            assert r.status_code == 405
            for task in admitted + uploads:
                task.cancel()
            await asyncio.gather(*admitted, *uploads, return_exceptions=True)
        assert loop.in_flight == 0

    asyncio.run(main())
