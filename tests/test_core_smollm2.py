"""Batch invariance of the request-level core on the real default model (issue 14, promise 4): 32 chat requests x 64
greedy tokens, each alone vs 16 at a time with staggered arrivals, chunked prefill and prefix-cache hits (the
requests share four system prompts), with and without speculation: every request's tokens are the same (fp32)."""

import pytest

from ponder.engine import Engine
from ponder.prefix import PrefixCache
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator

pytestmark = pytest.mark.slow  # the real default model

SYSTEMS = [
    "You are a careful assistant. Answer in plain words and keep every answer short, clear and correct.",
    "You are a travel guide for a small coastal town with a harbour, two museums and a market on Saturdays.",
    "You are a patient maths tutor. Show each step of a calculation before giving the final answer.",
    "You write product descriptions for a shop that sells handmade wooden toys, kitchen boards and bowls.",
]
QUESTIONS = [
    "What should I do first?", "Give me three ideas.", "Why is that true?", "Explain it to a child.",
    "What is 17 times 23?", "Summarize this in one sentence.", "What are the risks?", "Write a short title.",
]
MESSAGES = [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s in SYSTEMS for q in QUESTIONS]
PARAMS = SamplingParams(max_new_tokens=64)


@pytest.fixture(scope="module")
def alone(smollm2) -> list[list[int]]:
    eng = Engine(smollm2)
    return [eng.generate([m], PARAMS, chat=True)[0].output_ids for m in MESSAGES]


@pytest.mark.parametrize("spec", [None, "pld+recycling"])
def test_32_requests_alone_equal_16_at_a_time_with_staggered_arrivals_and_prefix_hits(smollm2, alone, spec) -> None:
    eng = Engine(smollm2, make_speculator(spec, smollm2) if spec else None)
    prefix = PrefixCache(256 << 20)
    core = eng.core(batch_size=16, prefill_chunk=32, prefix_cache=prefix)
    ids = [eng.encode(m) for m in MESSAGES]
    out: dict[int, list[int]] = {}
    added, steps = 0, 0
    while added < len(ids) or core.has_work():
        if added < len(ids) and steps % 3 == 0:  # a new request every third step, whatever is running
            core.add_request(ids[added], PARAMS, added)
            added += 1
        for ev in core.step():
            out.setdefault(ev.row, []).extend(ev.token_ids)
        steps += 1
    same = [i for i in range(len(ids)) if out[i] == alone[i]]
    assert len(same) == len(ids), f"requests differing from their run alone: {sorted(set(range(len(ids))) - set(same))}"
    assert prefix.stats.hits >= len(ids) - len(SYSTEMS)  # every request after its system prompt's first reused it
