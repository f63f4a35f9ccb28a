"""Speculative decoding on the real default model (SmolLM2-135M-Instruct): greedy output equals plain greedy."""

import pytest
from conftest import HAVE_SMOLLM2, SMOLLM2_MISSING

from ponder.engine import Engine
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator

pytestmark = pytest.mark.slow  # every test here runs the real default model

PROMPTS = [
    [{"role": "user", "content": "Summarize: The city council met on Monday. The city council voted to build a "
                                 "new library. The new library will open next year near the old city hall."}],
    [{"role": "user", "content": "Translate to French: I like green apples and red apples."}],
    [{"role": "user", "content": "What is 12 times 7? Explain step by step."}],
]


@pytest.fixture(scope="module")
def reference(smollm2) -> dict[int, list[list[int]]]:
    eng, params = Engine(smollm2), SamplingParams(max_new_tokens=40)
    return {1: [eng.generate([p], params)[0].output_ids for p in PROMPTS],
            3: [c.output_ids for c in eng.generate(PROMPTS, params)]}


@pytest.mark.parametrize("spec", ["pld", "lookahead", "recycling", "pld+recycling",
                                  # early-exit: the draft policy sizes trees from measured verify costs, and two loaded
                                  # clean-clone runs drafted 5 tokens and kept none: a fixed tree policy (adaptive=false,
                                  # min_prob=0) and retrying drafting every other step make its drafts certain
                                  "early-exit:adaptive=false:min_prob=0:explore=2",
                                  # the trained drafters, with the artifacts that ship with ponder; explore=0: they
                                  # draft at every step, whatever the policy's gate measures on this machine
                                  "head:explore=0", "medusa:explore=0", "head+pld:explore=0",
                                  "early-exit:adapter=default:explore=0",
                                  # the target's q4 copy drafting over its cache
                                  "lowbit:explore=0", "lowbit:k=12:max_nodes=16+pld:explore=0"])
def test_smollm2_speculation_is_lossless(smollm2, reference, spec: str) -> None:
    eng, params = Engine(smollm2, make_speculator(spec, smollm2)), SamplingParams(max_new_tokens=40)
    alone = [eng.generate([p], params)[0] for p in PROMPTS]
    assert [c.output_ids for c in alone] == reference[1]
    batch = eng.generate(PROMPTS, params)
    assert [c.output_ids for c in batch] == reference[3]
    # not vacuous: drafts were verified and some kept
    assert sum(c.spec.drafted for c in alone + batch) > 0 and sum(c.spec.accepted for c in alone + batch) > 0


@pytest.fixture(scope="module")
def smollm2_int8():
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    import ponder

    return ponder.load(dtype="int8")


INT8_PROMPTS = PROMPTS + [
    [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle. "
                                 "Use vivid details and end with a surprise."}],
]


def test_int8_speculation_is_lossless(smollm2_int8) -> None:
    """int8 weights run their activations in bf16, whose rounding turns the last-bit differences between a 1-token
    decode step and a many-token verify forward into different tokens, unless attention is batch-invariant (token by
    token, ``LlamaModel.invariant_attention``). Without it, these prompts diverge within 64 tokens."""
    params = SamplingParams(max_new_tokens=64)
    plain = Engine(smollm2_int8)
    reference = [plain.generate([p], params)[0].output_ids for p in INT8_PROMPTS]
    eng = Engine(smollm2_int8, make_speculator("pld+recycling", smollm2_int8))
    assert [eng.generate([p], params)[0].output_ids for p in INT8_PROMPTS] == reference
    assert [c.output_ids for c in eng.generate(INT8_PROMPTS, params, batch_size=3)] == reference


@pytest.mark.parametrize("compile", [False, True])
def test_q4_speculation_is_lossless(compile: bool) -> None:
    """q4 (the GGUF's 4-bit blocks, bf16 activations, a 4-bit head re-scored in fp32) attends token by token like int8;
    also on the fast path (compiled decode/verify layer), against the fast path's own plain decoding."""
    import ponder

    q4 = ponder.load(dtype="q4", compile=compile)
    params = SamplingParams(max_new_tokens=64)
    reference = [Engine(q4).generate([p], params)[0].output_ids for p in INT8_PROMPTS]
    eng = Engine(q4, make_speculator("pld+recycling", q4))
    assert [eng.generate([p], params)[0].output_ids for p in INT8_PROMPTS] == reference
    assert [c.output_ids for c in eng.generate(INT8_PROMPTS, params, batch_size=3)] == reference


def test_fp16_speculation_is_lossless() -> None:
    """fp16 keeps 11 bits of mantissa between kernels, so like int8 it attends token by token in decode and verify
    steps (``quant.py``); its projections are row-invariant (test_kernels.py)."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    import ponder

    fp16 = ponder.load(dtype="fp16")
    params = SamplingParams(max_new_tokens=64)
    reference = [Engine(fp16).generate([p], params)[0].output_ids for p in INT8_PROMPTS]
    eng = Engine(fp16, make_speculator("pld+recycling", fp16))
    assert [eng.generate([p], params)[0].output_ids for p in INT8_PROMPTS] == reference
    assert [c.output_ids for c in eng.generate(INT8_PROMPTS, params, batch_size=3)] == reference


def test_bf16_speculation_is_refused() -> None:
    """bf16 is refused up front: with batch-invariant attention, bf16 ``pld+recycling`` still parted from bf16 plain decoding
    after 31 and 45 tokens on 2 of 4 Spec-Bench prompts, because bf16 matmuls are not row-invariant (SmolLM2's
    1536-wide down projection: some rows of an 8-or-more-row call round differently than alone; test_kernels.py)."""
    if not HAVE_SMOLLM2:
        pytest.skip(SMOLLM2_MISSING)
    import ponder
    from ponder.errors import PonderError

    bf16 = ponder.load(dtype="bf16")
    with pytest.raises(PonderError, match="not lossless with --dtype bf16"):
        make_speculator("pld+recycling", bf16)
