"""Seeded sampling is a pure function of (seed, prompt index, prompt, params): speculative decoding with any
drafter, tree policy and batch size reproduces plain seeded sampling token for token, and so do repeated calls of
one engine whose drafters and policies have learned (and timed) different things in between."""

from pathlib import Path

import pytest

from ponder.engine import Engine
from ponder.sampling import SamplingParams
from ponder.speculate import make_speculator
from test_speculate_core import PROMPTS, spec_table

PARAMS = [
    SamplingParams(max_new_tokens=16, temperature=0.3, seed=11, ignore_eos=True),
    SamplingParams(max_new_tokens=16, temperature=1.2, top_k=5, top_p=0.9, seed=4, ignore_eos=True),
]


@pytest.fixture(scope="module")
def plain(cyclic) -> dict[int, list[list[int]]]:
    eng = Engine(cyclic)
    return {i: [c.output_ids for c in eng.generate(PROMPTS[:3], p)] for i, p in enumerate(PARAMS)}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_speculative_sampling_reproduces_plain_sampling(
    cyclic, cyclic_dir: Path, cyclic_head_dir: Path, cyclic_medusa_dir: Path, cyclic_exits_dir: Path, plain,
    batch_size: int,
) -> None:
    """On the cyclic model (tests/cyclic_model.py) every drafter gets drafts accepted while sampling too."""
    table = spec_table(cyclic_dir, cyclic_head_dir, cyclic_medusa_dir, cyclic_exits_dir)
    specs = [s for v in table.values() for s in v]
    specs += ["pld+recycling", "lookahead+early-exit:layer=1"]
    specs = [f"{s}:explore=0" for s in specs]  # the gate times steps; here every case must draft (and accept)
    for spec in specs:
        eng = Engine(cyclic, make_speculator(spec, cyclic))
        accepted = 0
        for i, params in enumerate(PARAMS):
            for _ in range(batch_size):  # batch 3: two more calls, starting from what drafters and policy learned
                out = eng.generate(PROMPTS[:3], params, batch_size=batch_size)
                assert [c.output_ids for c in out] == plain[i], (spec, params)
                accepted += sum(c.spec.accepted for c in out)
        assert accepted > 0, f"{spec}: no draft accepted, the comparison would not exercise verification"


def test_plain_sampling_does_not_depend_on_the_batch_size(cyclic, plain) -> None:
    eng = Engine(cyclic)
    for i, params in enumerate(PARAMS):
        assert [c.output_ids for c in eng.generate(PROMPTS[:3], params, batch_size=1)] == plain[i]
        assert [c.output_ids for c in eng.generate(PROMPTS[:3], params, batch_size=2)] == plain[i]


def test_seeds_and_rows_get_their_own_streams(cyclic, plain) -> None:
    eng = Engine(cyclic)
    same_prompt = eng.generate([PROMPTS[0]] * 3, PARAMS[1])
    assert len({tuple(c.output_ids) for c in same_prompt}) > 1  # rows are keyed by their index in the call
    other_seed = SamplingParams(**{**PARAMS[1].__dict__, "seed": 12})
    assert [c.output_ids for c in eng.generate(PROMPTS[:3], other_seed)] != plain[1]
    unseeded = SamplingParams(**{**PARAMS[1].__dict__, "seed": None})
    assert len({tuple(eng.generate(PROMPTS[:1], unseeded)[0].output_ids) for _ in range(3)}) > 1


def test_noise_streams_are_the_same_on_every_machine() -> None:
    """Known answers for two keys: the key hash (BLAKE2b) and torch's CPU Mersenne Twister are platform-independent,
    so a seed names the same noise everywhere (only the transcendental functions may differ in the last bit)."""
    import torch

    from ponder.sampling import gumbel_noise

    known = {(0, 0, 0, 4): [0.8215285282846383, 0.1903387716110393, 0.8835565455835133, 0.005916386336786591],
             (2026, 3, 17, 3): [2.076711325859339, -0.7610478098613724, 0.6044965150244048]}
    for key, values in known.items():
        assert torch.allclose(gumbel_noise(*key), torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-12), key
