"""The request-level engine core (``ponder.core``): per-request sampling parameters in one running batch, requests
joining a running batch, abort, and clear errors; with and without a speculator.

The reference for every request is the same request generated alone (``Engine.generate`` with one prompt): a
request's tokens must not depend on what else shares its batch."""

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
