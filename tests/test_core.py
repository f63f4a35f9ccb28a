"""The request-level engine core (``ponder.core``): per-request sampling parameters in one running batch, requests
joining a running batch, abort, and clear errors; with and without a speculator.

The reference for every request is the same request generated alone (``Engine.generate`` with one prompt): a
request's tokens must not depend on what else shares its batch."""

import math

import pytest

from ponder.core import EngineCore
from ponder.engine import Engine
from ponder.errors import PonderError
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator

PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [11, 12, 11, 12, 11, 12, 11, 12, 11, 12, 11],
    [40, 41, 42],
]
PARAMS = [
    SamplingParams(max_new_tokens=20, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_new_tokens=5, ignore_eos=True),
    SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, seed=3, ignore_eos=True),
]


def alone(eng: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return eng.generate([prompt], params)[0].output_ids


def run(core: EngineCore, out: dict | None = None) -> dict:
    """Step until done; each request's tokens (appended to ``out``, which holds those of earlier steps)."""
    out = {} if out is None else out
    finished = set()
    while core.has_work():
        for ev in core.step():
            assert ev.row not in finished, "an event after the request finished"
            out.setdefault(ev.row, []).extend(ev.token_ids)
            if ev.finished:
                finished.add(ev.row)
                assert ev.completion.output_ids == out[ev.row]
    return out


@pytest.mark.parametrize("spec", [None, "pld:explore=0"])
def test_each_request_keeps_its_own_parameters_in_one_batch(cyclic, spec: str | None) -> None:
    eng = Engine(cyclic, make_speculator(spec, cyclic) if spec else None)
    core = eng.core(batch_size=4)
    ids = [core.add_request(p, params, f"req-{i}") for i, (p, params) in enumerate(zip(PROMPTS, PARAMS))]
    got = run(core)
    assert set(got) == set(ids)
    for i, (p, params) in enumerate(zip(PROMPTS, PARAMS)):
        assert got[f"req-{i}"] == alone(eng, p, params), f"request {i}"
        assert len(got[f"req-{i}"]) == params.max_new_tokens
    assert core.step() == [] and not core.has_work()


@pytest.mark.parametrize("spec", [None, "pld:explore=0"])
def test_a_request_joins_a_running_batch_and_abort_frees_its_row(cyclic, spec: str | None) -> None:
    eng = Engine(cyclic, make_speculator(spec, cyclic) if spec else None)
    core = eng.core(batch_size=2)
    a = core.add_request(PROMPTS[0], SamplingParams(max_new_tokens=80, ignore_eos=True))  # still running below
    b = core.add_request(PROMPTS[1], PARAMS[1])
    assert (a, b) == (0, 1)  # default ids: the next free integers
    out: dict = {}
    for _ in range(3):  # admit both, then two decode steps
        for ev in core.step():
            out.setdefault(ev.row, []).extend(ev.token_ids)
    assert len(core.rows) == 2 and core.cache.batch == 2
    assert core.abort(a) and not core.abort(a) and not core.abort("nobody")
    assert [r.index for r in core.rows] == [b] and core.cache.batch == 1  # its KV row is gone at once
    c = core.add_request(PROMPTS[2], PARAMS[0])  # joins the running batch
    d = core.add_request(PROMPTS[3], PARAMS[3])
    assert core.abort(d)  # still waiting: never runs
    before_a = list(out[a])
    rest = run(core, out)
    assert d not in rest and rest[a] == before_a  # nothing more for the aborted request
    assert rest[b] == alone(eng, PROMPTS[1], PARAMS[1])
    assert rest[c] == alone(eng, PROMPTS[2], PARAMS[0])


def test_bad_requests_get_one_line_errors(cyclic) -> None:
    eng = Engine(cyclic)
    core = eng.core(batch_size=2)
    core.add_request(PROMPTS[0], request_id="x")
    with pytest.raises(PonderError, match="already in use"):
        core.add_request(PROMPTS[1], request_id="x")
    with pytest.raises(PonderError, match="empty"):
        core.add_request([])
    with pytest.raises(PonderError, match="outside the vocabulary"):
        core.add_request([1, cyclic.model.config.vocab_size])
    with pytest.raises(PonderError, match="context window"):
        core.add_request([1] * cyclic.model.config.max_position_embeddings)
    with pytest.raises(PonderError, match="batch_size"):
        eng.core(batch_size=0)
    assert [r.index for r in core.waiting] == ["x"]  # the refused requests left nothing behind
    run(core)
    core.add_request(PROMPTS[1], request_id="x")  # a finished request's id is free again


# --- log-probabilities --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "pld:explore=0", "recycling:explore=0"])
def test_logprobs_are_the_models_own_and_do_not_depend_on_speculation(cyclic, spec: str | None) -> None:
    """Each output token's log-probability is the model's log-softmax at that position (``Engine.score``, teacher
    forced one step at a time), its top alternatives come most likely first, and a speculative step (which reads
    them from the verify forward) reports what plain decoding reports."""
    import math

    eng = Engine(cyclic, make_speculator(spec, cyclic) if spec else None)
    plain = Engine(cyclic)
    for params in (SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=3),
                   SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=0, temperature=0.8, seed=5)):
        out = eng.generate(PROMPTS[:3], params)
        ref = plain.generate(PROMPTS[:3], params)
        if spec:
            assert sum(c.spec.accepted for c in out) > 0  # some tokens came from verify steps
        for p, c, r in zip(PROMPTS, out, ref):
            assert c.output_ids == r.output_ids
            assert [lp.token for lp in c.token_logprobs] == c.output_ids
            want = plain.score(p, c.output_ids)
            assert [lp.logprob for lp in c.token_logprobs] == pytest.approx(want, abs=1e-4)
            assert [lp.logprob for lp in c.token_logprobs] == pytest.approx([lp.logprob for lp in r.token_logprobs],
                                                                            abs=1e-5)
            for lp in c.token_logprobs:
                assert len(lp.top) == params.logprobs
                values = [v for _, v in lp.top]
                assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
                if params.greedy:  # the greedy token is the most likely one
                    assert lp.top[0][0] == lp.token and math.isclose(lp.top[0][1], lp.logprob, abs_tol=1e-6)


def test_logprobs_off_by_default_and_bounded(cyclic) -> None:
    out = Engine(cyclic).generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))
    assert out[0].token_logprobs == []
    for bad in (-1, 21):
        with pytest.raises(PonderError, match="logprobs must be in 0..20"):
            SamplingParams(logprobs=bad)


# --- chunked prefill and prefix caching ---------------------------------------------------------------------------
LONG = [(7 * i + 3) % 37 + 3 for i in range(70)]  # a 70-token prompt


@pytest.mark.parametrize("spec", [None, "pld:explore=0", "head"])
def test_chunked_prefill_interleaves_with_decoding_and_changes_no_token(
    cyclic, cyclic_head_dir, spec: str | None,
) -> None:
    """A long prompt prefilled 8 tokens per step: the running row gets a token at every one of those steps, and
    every request's tokens equal its tokens prefilled whole and alone (with a draft head too, whose prompt states
    are captured chunk by chunk)."""
    if spec == "head":
        spec = f"head:{cyclic_head_dir}:explore=0"
    eng = Engine(cyclic, make_speculator(spec, cyclic) if spec else None)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    core = eng.core(batch_size=3, prefill_chunk=8)
    core.add_request(PROMPTS[0], params, "short")
    out = {}
    for ev in core.step():  # 13 prompt tokens: 8 now, 5 with the next step
        out.setdefault(ev.row, []).extend(ev.token_ids)
    assert core.partial is not None and not core.rows
    for ev in core.step():
        out.setdefault(ev.row, []).extend(ev.token_ids)
    assert [r.index for r in core.rows] == ["short"] and core.partial is None
    core.add_request(LONG, params, "long")
    steps, during = 0, 0
    while core.partial is not None or not any(r.index == "long" for r in core.rows):
        running = any(r.index == "short" for r in core.rows)
        events = core.step()
        steps += 1
        during += running and any(ev.row == "short" and ev.token_ids for ev in events)
        assert during == steps or not running  # the short row decoded at every step of the long prefill
        for ev in events:
            out.setdefault(ev.row, []).extend(ev.token_ids)
    assert steps == -(-70 // 8) and during >= 3
    got = run(core, {k: list(v) for k, v in out.items()})
    whole = Engine(cyclic, make_speculator(spec, cyclic) if spec else None)
    assert got["short"] == alone(whole, PROMPTS[0], params)
    assert got["long"] == alone(whole, LONG, params)


@pytest.mark.parametrize("spec", [None, "head"])
def test_prefix_cache_hits_change_no_token(cyclic, cyclic_head_dir, spec: str | None) -> None:
    """Requests sharing a 48-token prefix: the second and later copy its K/V (and the head's captured states) and
    prefill only their own suffix; each output equals the request run alone without the cache."""
    from ponder.prefix import PrefixCache

    if spec == "head":
        spec = f"head:{cyclic_head_dir}:explore=0"
    make = lambda: Engine(cyclic, make_speculator(spec, cyclic) if spec else None)  # noqa: E731
    eng, ref = make(), make()
    prefix = LONG[:48]
    prompts = [prefix + [5, 6, 7], prefix + [11, 12], prefix + [3, 1, 4, 1, 5], prefix[:40] + [9, 9, 9]]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    cache = PrefixCache(64 << 20)
    core = eng.core(batch_size=2, prefix_cache=cache, prefill_chunk=16)
    for i, p in enumerate(prompts):
        core.add_request(p, params, i)
    got = run(core)
    for i, p in enumerate(prompts):
        assert got[i] == alone(ref, p, params), i
    # the first prompt was prefilled whole; the next two reused 48 tokens, the last 40 (its own tokens differ after)
    assert cache.stats.lookups == 4 and cache.stats.hits == 3
    assert cache.stats.reused_tokens == 48 + 48 + 40
    again = eng.core(batch_size=1, prefix_cache=cache)
    again.add_request(prompts[1], params, "again")  # a whole prompt cached: all but its last token reused
    assert run(again)["again"] == got[1]
    assert cache.stats.reused_tokens == 48 + 48 + 40 + len(prompts[1]) - 1


def test_prefix_cache_is_bounded_and_least_recently_used_goes_first(cyclic) -> None:
    from ponder.prefix import BLOCK, PrefixCache

    model = cyclic.model
    per_token = model.new_cache(1, 1).nbytes()

    def kv(n: int):
        c = model.new_cache(1, n)
        c.set_length(0, n)
        return c

    a, b, c = [1] * 32, [2] * 32, [3] * 32
    cache = PrefixCache(per_token * 70)  # room for two 32-token entries
    cache.insert(a, kv(32))
    cache.insert(b, kv(32))
    assert cache.lookup(a + [5], 40)[1] == 32  # a is now the most recently used
    cache.insert(c, kv(32))  # evicts b
    assert cache.bytes <= cache.max_bytes and len(cache.entries) == 2
    assert cache.lookup(b + [5], 40) == (None, 0)
    assert cache.lookup(c, 31)[1] == 31  # at most the limit (a prompt's last token is always prefilled)
    longer = a + [4] * 20
    cache.insert(longer, kv(52))  # covers a: a is dropped, not evicted by age
    assert all(e.tokens != a for e in cache.entries.values())
    entry, n = cache.lookup(a + [6] * 20, 100)
    assert entry.tokens == longer and n == 32  # a block-aligned hit extended token by token up to the difference
    entry, n = cache.lookup(longer[:BLOCK + 3] + [9] * 40, 100)
    assert n == BLOCK + 3
    assert cache.lookup([1] * (BLOCK - 1), 100) == (None, 0)  # less than a block: no lookup hit
    cache.insert([7] * 200, kv(200))  # larger than the whole budget: not stored
    assert cache.bytes <= cache.max_bytes and cache.lookup([7] * 200, 199) == (None, 0)


def test_abort_while_prefilling_frees_the_partial_cache(cyclic) -> None:
    eng = Engine(cyclic)
    core = eng.core(batch_size=2, prefill_chunk=8)
    core.add_request(LONG, SamplingParams(max_new_tokens=5), "long")
    core.step()
    assert core.partial is not None and core.in_prefill == 1
    assert core.abort("long") and core.partial is None and not core.has_work()
    with pytest.raises(PonderError, match="prefill_chunk"):
        eng.core(batch_size=1, prefill_chunk=0)


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(cyclic) -> None:
    """A budget of two rows' K/V: a third request waits until a row leaves, every output is unchanged, the batch
    cache never holds more than the budget, and a request larger than the budget alone is refused."""
    eng = Engine(cyclic)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    slot = cyclic.model.new_cache(1, 1).nbytes()
    budget = 2 * (len(PROMPTS[0]) + 12) * slot
    core = eng.core(batch_size=4, max_kv_bytes=budget)
    for i, p in enumerate(PROMPTS[:3]):
        core.add_request(p, params, i)
    core.step()
    assert len(core.rows) == 2 and len(core.waiting) == 1  # room for 4 rows, KV for 2
    out: dict = {}
    most = 0
    while core.has_work():
        for ev in core.step():
            out.setdefault(ev.row, []).extend(ev.token_ids)
        most = max(most, core.kv_bytes())
    assert most <= budget
    for i, p in enumerate(PROMPTS[:3]):
        assert len(out[i]) == 12 or i < 2  # the first two rows' first tokens came in the admission step above
        assert eng.generate([p], params)[0].output_ids[-len(out[i]):] == out[i]
    with pytest.raises(PonderError, match="needs .* MiB of KV cache"):
        core.add_request(PROMPTS[0], SamplingParams(max_new_tokens=200))


def test_a_request_may_turn_speculation_off(cyclic) -> None:
    """``speculate=False``: the speculator drafts nothing for that row, the rows beside it still draft, and both
    outputs are plain decoding's."""
    eng = Engine(cyclic, make_speculator("pld:explore=0", cyclic))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    core = eng.core(batch_size=2)
    core.add_request(PROMPTS[0], params, "on")
    core.add_request(PROMPTS[0], params, "off", speculate=False)
    done = {}
    while core.has_work():
        for ev in core.step():
            if ev.finished:
                done[ev.row] = ev.completion
    plain = alone(Engine(cyclic), PROMPTS[0], params)
    assert done["on"].output_ids == done["off"].output_ids == plain
    assert done["on"].spec.drafted > 0 and done["off"].spec.drafted == 0


def test_prefill_chunks_shrink_as_the_prefix_grows(cyclic) -> None:
    """A prompt token at position c costs 1 + c / K tokens' worth (K: SmolLM2's ~3,900 keys whose attention costs
    what its weights cost per token): chunks fill the step's budget, shrink along a long prompt, never go below 16
    tokens at a step's first chunk, and the whole prompt is still prefilled."""
    from ponder.core import parity_keys

    eng = Engine(cyclic)
    core = eng.core(batch_size=1, prefill_chunk=128)
    assert core.parity_keys == parity_keys(cyclic.model.config)
    core.parity_keys = 3891.0  # SmolLM2-135M's (ponder.core.parity_keys of its config)
    cost = lambda at, n: n + n * (at + n / 2) / core.parity_keys  # noqa: E731
    sizes = [core._chunk(at, 128, True) for at in (0, 1000, 4000, 8000, 30000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] >= 120 and sizes[-1] == 16
    for at, n in zip((0, 1000, 4000, 8000), sizes):
        assert cost(at, n) <= 128 < cost(at, n + 1) or n == 16
    assert core._chunk(100, 10.0, False) < 16  # the rest of a step's budget: no minimum
    assert core._chunk(0, math.inf, True) > 10**9  # no chunking


def test_prefill_by_time_sizes_steps_from_the_measured_rate_while_rows_decode(cyclic) -> None:
    """With ``prefill_seconds``: while no row decodes, a step prefills up to ``prefill_chunk``; while rows decode,
    what the measured seconds per unit fit in ``prefill_seconds`` (at most the chunk); outputs stay those of each
    request alone."""
    eng = Engine(cyclic)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    core = eng.core(batch_size=3, prefill_chunk=64, prefill_seconds=0.5)
    assert core._budget() == 64  # nothing decoding: the whole chunk
    core.add_request(PROMPTS[0], params, "short")
    out: dict = {}
    while not core.rows:
        for ev in core.step():
            out.setdefault(ev.row, []).extend(ev.token_ids)
    assert core.unit_seconds is None  # a 13-token step is too small to measure
    assert core._budget() == 32  # rows decoding, nothing measured yet
    core.unit_seconds = 0.5 / 20
    assert core._budget() == pytest.approx(20)
    core.unit_seconds = 0.5 / 1000
    assert core._budget() == 64  # never more than the chunk
    core.unit_seconds = None
    core.add_request(LONG, params, "long")
    core.prefill_seconds = 1e-9  # smaller than any step: the minimum progress, 16 tokens a step
    seen = []  # (budget, rate it came from) per step of the long prompt's prefill
    while core.partial is not None or not any(r.index == "long" for r in core.rows):
        seen.append((core._budget(), core.unit_seconds))
        for ev in core.step():
            out.setdefault(ev.row, []).extend(ev.token_ids)
    assert seen[0] == (32, None) and all(u is not None and u > 0 and b == 1.0 for b, u in seen[1:])
    assert len(seen) == 1 + -(-(70 - 32) // 16)  # 32 tokens, then 16 per step
    got = run(core, out)
    whole = Engine(cyclic)
    assert got["short"] == alone(whole, PROMPTS[0], params)
    assert got["long"] == alone(whole, LONG, params)
    with pytest.raises(PonderError, match="prefill_seconds"):
        eng.core(batch_size=1, prefill_seconds=0)


def test_batch_cache_store_moves_one_row_per_finish_and_keeps_every_rows_contents() -> None:
    """KVCache with a capacity (continuous batching): joining rows land in the store, a finished row's place takes
    the last row, and each row's valid slots are what they were, whatever its new index."""
    from ponder.cache import KVCache

    def row_cache(value: float, length: int) -> KVCache:
        c = KVCache(2, 1, 1, 8, 2)
        for t in c.k + c.v:
            t[0, :, :length] = value
        c.lengths = [length]
        return c

    cache = row_cache(0.0, 3)
    for i in range(1, 4):
        cache.extend(row_cache(float(i), 3 + i), capacity=4)
    assert cache.store is not None and cache.batch == 4 and cache.store[0][0].shape[0] == 4
    store = [t.data_ptr() for t in cache.store[0]]
    order = cache.keep_rows_unordered([0, 2, 3])  # row 1 finished: row 3 takes its place
    assert order == [0, 3, 2] and cache.lengths == [3, 6, 5]
    for new, old in enumerate(order):
        for t in cache.k + cache.v:
            assert bool((t[new, :, : cache.lengths[new]] == float(old)).all())
    cache.extend(row_cache(9.0, 2), capacity=4)  # joins without a new store
    assert [t.data_ptr() for t in cache.store[0]] == store and cache.lengths == [3, 6, 5, 2]
    cache.ensure(16)  # the sequence axis grows with the store
    assert cache.max_len == 16 and cache.store[0][0].shape == (4, 1, 16, 2)
    assert bool((cache.k[1][1, :, :6] == 3.0).all()) and bool((cache.v[0][3, :, :2] == 9.0).all())
    assert cache.nbytes() == 2 * 2 * 4 * 16 * 2 * 4  # the store's rows are memory held
    cache.keep_rows([3, 0])  # the ordered path leaves the store
    assert cache.store is None and cache.lengths == [2, 3]


def test_abort_of_a_row_in_the_batch_store_moves_the_last_row(cyclic) -> None:
    """Rows that joined a running batch live in the store; aborting the first row (outside inference mode, as
    the server's engine thread does) moves the last row into its place, and the others' tokens are unchanged."""
    eng = Engine(cyclic)
    core = eng.core(batch_size=4, prefill_chunk=64)
    first = core.add_request(PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos=True))
    out: dict = {}
    for ev in core.step():
        out.setdefault(ev.row, []).extend(ev.token_ids)
    others = [core.add_request(PROMPTS[i], PARAMS[i]) for i in (1, 2, 3)]
    while len(core.rows) < 4:
        for ev in core.step():
            out.setdefault(ev.row, []).extend(ev.token_ids)
    assert core.cache.store is not None  # the joins went into the store
    assert core.abort(first)
    assert core.rows[0].index == others[-1]  # the last row took the aborted row's place
    rest = run(core, out)
    for rid, i in zip(others, (1, 2, 3)):
        assert rest[rid] == alone(eng, PROMPTS[i], PARAMS[i])


def test_a_prefill_stops_between_layers_when_its_request_is_being_aborted(cyclic) -> None:
    """With ``aborting`` (a server's view of aborts on their way), a prefill chunk's forward asks it before each
    layer and stops there: the prompt's progress is not advanced. Were the request not aborted after all, the chunk
    is prefilled again and the output is the request's alone; when it is, ``abort`` drops it."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eng = Engine(cyclic)
    layers = eng.model.config.num_hidden_layers
    core = eng.core(batch_size=2, prefill_chunk=32)
    asked: list = []
    stop_at = {"n": 3}  # true from the 3rd question on: two layers of the first chunk ran

    def aborting(rid) -> bool:
        asked.append(rid)
        return len(asked) >= stop_at["n"]

    core.aborting = aborting
    core.add_request(LONG, params, "long")
    assert core.step() == []
    assert core.partial is not None and core.partial.done == 0 and asked == ["long"] * 3
    stop_at["n"] = 10**9  # a false alarm: the next steps prefill the same chunk again, and the rest
    out = run(core)
    assert out["long"] == alone(Engine(cyclic), LONG, params)
    assert len(asked) == 3 + layers * -(-len(LONG) // 32)  # asked before every layer of every chunk

    core.add_request(LONG, params, "gone")
    stop_at["n"] = 0
    assert core.step() == [] and core.partial.done == 0
    assert core.abort("gone") and not core.has_work()


def test_with_a_kv_policy_a_prefill_stops_for_an_abort_and_its_batch_waits_again(cyclic) -> None:
    """With a KV policy prompts are prefilled whole, a batch at a time: ``aborting`` stops the prefill of the
    request being aborted between two layers, the batch's rows go back to the waiting queue in order, and once the
    abort took its row out the others give what they give alone (with the same policy)."""
    from ponder.kv import make_policy

    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    spec = "snapkv:ratio=0.5:window=4:kernel=3"
    eng = Engine(cyclic, kv=make_policy(spec))
    core = eng.core(batch_size=3)
    for i, prompt in enumerate([PROMPTS[0], LONG, PROMPTS[1]]):
        core.add_request(prompt, params, f"r{i}")
    asked: list = []

    def aborting(rid) -> bool:
        asked.append(rid)
        return rid == "r1" and asked.count("r1") >= 2  # r1's second layer: r0 was prefilled, r1 had begun

    core.aborting = aborting
    assert core.step() == [] and not core.rows
    assert [r.index for r in core.waiting] == ["r0", "r1", "r2"] and "r2" not in asked
    assert core.abort("r1")
    out = run(core)
    assert set(out) == {"r0", "r2"}
    for rid, prompt in (("r0", PROMPTS[0]), ("r2", PROMPTS[1])):
        assert out[rid] == alone(Engine(cyclic, kv=make_policy(spec)), prompt, params)
