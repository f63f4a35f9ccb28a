"""Engine behaviour (stopping, streaming, chat, sampling) and the KV cache, on a tiny random model."""

import pytest
import torch

from ponder import Engine, PonderError, SamplingParams
from ponder.cache import KVCache
from ponder.sampling import InvalidParameter, warp


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return Engine(tiny)


def test_max_new_tokens_and_length_finish(engine: Engine) -> None:
    c = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(c.output_ids) == 5 and c.finish_reason == "length"
    assert c.ttft_s > 0 and c.seconds >= c.ttft_s


def test_eos_finishes_a_row(engine: Engine) -> None:
    ref = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=40, ignore_eos=True))[0].output_ids
    engine_eos = set(engine.eos_ids)
    engine.eos_ids = {ref[3]}  # make the 4th generated token an end-of-sequence token
    try:
        c = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=40))[0]
    finally:
        engine.eos_ids = engine_eos
    assert c.finish_reason == "eos"
    assert c.output_ids == ref[: ref.index(ref[3]) + 1]


def test_stop_string_cuts_text(engine: Engine) -> None:
    full = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0].text
    words = full.split()
    stop = words[3]
    c = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,)))[0]
    assert c.finish_reason == "stop"
    assert stop not in c.text and full.startswith(c.text)


def test_stream_concatenates_to_final_text(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    pieces: dict[int, str] = {0: "", 1: ""}
    finals = {}
    for ev in engine.stream([[5, 6, 7], [8, 9]], params):
        pieces[ev.row] += ev.text
        if ev.finished:
            finals[ev.row] = ev.completion.text
    assert pieces == finals and all(finals.values())


def test_chat_messages_use_the_template(engine: Engine) -> None:
    ids = engine.encode([{"role": "user", "content": "the sea"}])
    assert engine.tokenizer.decode(ids).startswith("<|user|> the sea")
    assert engine.encode("the sea", chat=True) == ids


@pytest.mark.parametrize("bad", ["", [], [{"role": "user"}], [10**9], [1.5]])
def test_bad_prompts(engine: Engine, bad) -> None:
    with pytest.raises(PonderError):
        engine.generate([bad], SamplingParams(max_new_tokens=2))


def test_prompt_over_context_window(engine: Engine) -> None:
    with pytest.raises(PonderError, match="context window"):
        engine.generate([[5] * 300], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize(
    "kw", [{"max_new_tokens": 0}, {"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.01},
           {"seed": -1}, {"stop": "x"}, {"stop": ("",)}],
)
def test_invalid_sampling_params(kw) -> None:
    with pytest.raises(InvalidParameter):
        SamplingParams(**kw)


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: Engine) -> None:
    def run(seed: int) -> list[int]:
        p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
        return engine.generate([[5, 6, 7]], p)[0].output_ids

    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in range(4)}) > 1


def test_top_k_1_and_tiny_top_p_are_greedy(engine: Engine) -> None:
    greedy = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].output_ids
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        p = SamplingParams(max_new_tokens=10, temperature=0.7, seed=3, ignore_eos=True, **kw)
        assert engine.generate([[5, 6, 7]], p)[0].output_ids == greedy


def test_warp_support() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (warp(logits, SamplingParams(temperature=1.0, top_k=2))[0, 2:] == 0).all()
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=0.8))[0]
    kept = (probs > 0).nonzero().flatten().tolist()
    assert kept == [0, 1]  # p(0) ~ 0.64 < 0.8, so token 1 is needed; 0.64 + 0.24 >= 0.8 drops the rest
    assert abs(probs.sum().item() - 1) < 1e-6


def test_cache_rollback_and_rows() -> None:
    cache = KVCache(2, 3, 1, 8, 4)
    cache.advance([3, 5, 1])
    cache.truncate(1, 2)
    assert cache.lengths == [3, 2, 1]
    with pytest.raises(ValueError):
        cache.truncate(0, 4)
    cache.k[0][2].fill_(7.0)
    cache.keep_rows([0, 2])
    assert cache.lengths == [3, 1] and cache.batch == 2 and (cache.k[0][1] == 7.0).all()
    row = cache.row(1)
    row.k[1].fill_(2.0)  # a row view writes into the parent's storage
    assert (cache.k[1][1] == 2.0).all()
    with pytest.raises(ValueError):
        cache.set_length(0, 9)


# --- continuous batching ---------------------------------------------------------------------------------------------
RAGGED = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [11, 12, 11, 12, 40], [20, 21, 22, 23, 24, 25],
          [7, 7, 8, 8, 9, 9, 10, 10, 11], [30, 31, 32]]


def _staggered(eng: Engine, params: SamplingParams) -> int:
    """Pick as EOS a token the rows emit at different steps, so they finish (and are replaced) at different times."""
    alone = [eng.generate([p], params)[0].output_ids for p in RAGGED]
    firsts: dict[int, set[int]] = {}
    for out in alone:
        for i, t in enumerate(out):
            firsts.setdefault(t, set()).add(out.index(t))
    return max(firsts, key=lambda t: (len(firsts[t]), -min(firsts[t])))


@pytest.mark.parametrize("speculate", [None, "pld+recycling:adaptive=false:min_prob=0",
                                       "early-exit:layer=2:threshold=0", "draft:{tiny_dir}:adaptive=false"])
def test_continuous_batching_equals_one_prompt_at_a_time(tiny, tiny_dir, speculate) -> None:
    from ponder.speculate import make_speculator

    params = SamplingParams(max_new_tokens=20)
    eng = Engine(tiny, make_speculator(speculate.format(tiny_dir=tiny_dir), tiny) if speculate else None)
    eng.eos_ids = {_staggered(Engine(tiny), params)}
    alone = [eng.generate([p], params)[0] for p in RAGGED]
    assert len({len(c.output_ids) for c in alone}) >= 3  # rows really finish at different steps
    runs = [alone]
    for size in (1, 2, 4, None):
        done = eng.generate(RAGGED, params, batch_size=size)
        assert [c.output_ids for c in done] == [c.output_ids for c in alone], size
        assert [c.finish_reason for c in done] == [c.finish_reason for c in alone]
        assert all(0 < c.ttft_s <= c.seconds for c in done)
        runs.append(done)
    assert eng.prefill_seconds > 0
    if speculate and speculate.startswith("early-exit"):
        # early exit after 2 of the 3 random layers at any confidence: its drafts and reused hidden states really
        # went through the batches (it may choose plain steps by their measured speed, so all runs count together)
        cs = [c for run in runs for c in run]
        assert sum(c.spec.drafted for c in cs) > 0 and sum(c.spec.accepted for c in cs) > 0


def test_continuous_batching_with_a_kv_policy_runs_batch_by_batch(tiny) -> None:
    from ponder.kv import make_policy

    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    eng = Engine(tiny, kv=make_policy("snapkv:ratio=0.5:window=2:kernel=3"))
    alone = [eng.generate([p], params)[0].output_ids for p in RAGGED]
    assert [c.output_ids for c in eng.generate(RAGGED, params, batch_size=4)] == alone


def test_batch_size_must_be_positive(engine: Engine) -> None:
    for bad in (0, -1, 1.5):
        with pytest.raises(PonderError, match="batch_size"):
            engine.generate(["hi"], batch_size=bad)


def test_cache_extend_appends_rows() -> None:
    a, b = KVCache(2, 2, 1, 8, 4), KVCache(2, 1, 1, 12, 4)
    a.k[0][:, :, :3] = 1.0
    b.k[0][:, :, :5] = 2.0
    a.lengths, b.lengths, b.evicted = [3, 2], [5], [4]
    a.extend(b)
    assert a.batch == 3 and a.max_len == 12 and a.lengths == [3, 2, 5] and a.evicted == [0, 0, 4]
    assert a.k[0].shape == (3, 1, 12, 4) and float(a.k[0][2, 0, 4, 0]) == 2.0 and float(a.k[0][0, 0, 2, 0]) == 1.0


def test_incremental_detokenization_follows_the_full_decode(tiny) -> None:
    """Each token's text comes from decoding a few tokens, not the whole output: at every step the text so far is a
    prefix of decoding all output tokens, at most a held-back incomplete character behind it."""
    import random

    from ponder.engine import Completion, _Row

    eng = Engine(tiny)
    rng = random.Random(0)
    sample_text = "héllo wörld, ça va? 你好 🙂 the end  of   spaces"
    for ids in (eng.encode(sample_text), [rng.randrange(tiny.model.config.vocab_size) for _ in range(300)]):
        row = _Row(0, Completion([1]), None)
        for i, t in enumerate(ids):
            row.completion.output_ids.append(t)
            row.completion.text += eng._new_text(row)
            full = tiny.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            assert full.startswith(row.completion.text) and len(full) - len(row.completion.text) <= 8, i
        assert row.completion.text == tiny.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
