"""The draft policy's gate: drafting runs only while it commits more tokens per second than plain steps."""

import random

import pytest

from ponder.speculate.policy import DraftGate, DraftPolicy, PolicyOptions
from ponder.speculate.tree import DraftTree


def run(gate: DraftGate, rate: dict[bool, float], steps: int) -> list[bool]:
    modes = []
    for _ in range(steps):
        drafting = gate.drafting()
        modes.append(drafting)
        gate.observe(drafting, tokens=int(rate[drafting] * 10), seconds=10.0, draft_seconds=3.0 if drafting else 0.0)
    return modes


def test_gate_keeps_the_faster_mode_and_explores_the_other():
    # 4 drafting steps, 1 plain step, then the faster mode, the other one on every 8th step
    slow_drafts = run(DraftGate(explore=8), {True: 5.0, False: 20.0}, 40)
    assert slow_drafts == [i < 4 or (i > 4 and i % 8 == 0) for i in range(40)]
    fast_drafts = run(DraftGate(explore=8), {True: 30.0, False: 20.0}, 40)
    assert fast_drafts == [i != 4 and not (i > 4 and i % 8 == 0) for i in range(40)]


def test_gate_follows_a_change_of_text():
    gate = DraftGate(explore=4)
    run(gate, {True: 5.0, False: 20.0}, 20)
    assert gate.rate[True] < gate.rate[False]
    modes = run(gate, {True: 60.0, False: 20.0}, 20)  # a copyable passage: drafting now pays
    assert gate.rate[True] > gate.rate[False]
    assert modes[-8:] == [(20 + i) % 4 != 0 for i in range(12, 20)]  # plain only on exploration steps


def test_policy_without_adaptive_always_drafts():
    policy = DraftPolicy(PolicyOptions(adaptive=False))
    for _ in range(30):
        assert policy.drafting()
        policy.observe([DraftTree.chain([1, 2])], [[]], True, seconds=100.0)  # slow and rejected
    with pytest.raises(ValueError, match="explore"):
        PolicyOptions(explore=1)
    ungated = DraftPolicy(PolicyOptions(explore=0))  # adaptive trees, but drafting never switched off
    for _ in range(30):
        assert ungated.drafting()
        ungated.observe([DraftTree.chain([1, 2])], [[]], True, seconds=100.0, draft_seconds=90.0)


def test_policy_counts_committed_tokens_per_step():
    policy = DraftPolicy()
    policy.observe([DraftTree.chain([1, 2, 3]), DraftTree.chain([4])], [[0, 1], []], True, seconds=2.0,
                   draft_seconds=0.5)
    assert policy.gate.draft_share == pytest.approx(0.25)
    assert policy.gate.rate[True] == pytest.approx((3 + 1) / 2.0)


def test_gate_never_stops_drafting_that_costs_nothing():
    gate = DraftGate(explore=4)
    for _ in range(20):  # drafting looks slower (an unlucky stretch) but takes 1% of the step
        drafting = gate.drafting()
        assert drafting
        gate.observe(drafting, tokens=1, seconds=1.0, draft_seconds=0.01)
    costly = DraftGate(explore=4)
    modes = []
    for _ in range(20):
        drafting = costly.drafting()
        modes.append(drafting)
        costly.observe(drafting, tokens=1 if drafting else 2, seconds=1.0, draft_seconds=0.3 if drafting else 0.0)
    assert not all(modes) and sum(modes) < 10


def test_cheap_drafters_keep_drafting_while_the_gate_turns_the_costly_ones_off(cyclic_dir) -> None:
    """A composite's cheap parts (copying, n-gram pools) draft in the gate's "off" steps too: the gate then weighs
    the costly parts (a head, a draft model, early exit) against the cheap ones alone, not against no drafting.
    Lossless either way."""
    import ponder
    from ponder.engine import Engine
    from ponder.sampling import SamplingParams
    from ponder.speculate import Composite, make_speculator
    from ponder.speculate.base import DraftBatch, DraftRow, Drafter, Proposal
    from test_speculate_core import PROMPTS, drafted_and_accepted

    class Costly(Drafter):
        name = "costly"

        def propose(self, batch: DraftBatch) -> Proposal:
            self.budgets = [r.budget for r in batch.rows]
            return Proposal([DraftTree([], []) for _ in batch.rows])

    target = ponder.load(str(cyclic_dir))
    pld, costly = make_speculator("pld", target).drafter, Costly()
    both = Composite([pld, costly])
    assert pld.cheap and not costly.cheap and both.has_cheap and not both.cheap and not costly.has_cheap
    rows = [DraftRow([1, 2, 3], both.new_state([1, 2]), 5)]
    for cheap_only, want in ((False, [5]), (True, [0])):
        both.propose(DraftBatch(rows, target.model, target.model.new_cache(1, 8), cheap_only))
        assert costly.budgets == want
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = [c.output_ids for c in Engine(target).generate(PROMPTS, params, batch_size=1)]
    for spec, drafts in (("pld+early-exit:layer=1", True), ("early-exit:layer=1", False)):
        eng = Engine(target, make_speculator(spec, target))
        gate = eng.speculator.policy.gate
        gate.explore, gate.steps = 1000, 10
        gate.rate = {True: 0.0, False: 1e12}  # drafting measured hopeless: the gate stays off (no exploration)
        gate.draft_share = 0.5
        out = eng.generate(PROMPTS, params, batch_size=1)
        assert [c.output_ids for c in out] == plain, spec
        assert (drafted_and_accepted(out)[0] > 0) == drafts, spec


def test_plan_prices_a_sequential_drafters_forwards():
    """A chain drafter's length is chosen before it drafts: expected tokens per second of n draft forwards plus
    the verify forward, from the observed acceptance per depth."""
    from ponder.speculate.policy import CostCurve

    curve = CostCurve({1: 0.025, 2: 0.026, 4: 0.03, 8: 0.035, 16: 0.045})
    policy = DraftPolicy(PolicyOptions(max_nodes=15), curve)
    assert policy.plan([8, 3], ("lowbit",)) == [8, 3]  # no draft forward timed for 2 rows yet: the budgets
    chain = DraftTree.chain([1] * 4, [1.0] * 4, "lowbit")
    for _ in range(50):  # every node accepted at depths 1-4
        policy.observe([chain], [[0, 1, 2, 3]], forwards=4, draft_seconds=0.004 * 4)
    assert policy.forward_s[1] == pytest.approx(0.004)
    # depths 5+ were never tested: they get the pooled rate, so chains grow; n=15 beats any shorter one here
    assert policy.plan([15], ("lowbit",)) == [15]
    assert policy.plan([6], ("lowbit",)) == [6]
    assert policy.plan([15], ("other",)) == [1]  # nothing known about another source's nodes: 1/2 each
    # dear forwards: 15 forwards of 50 ms never pay against a 25 ms verify; still one draft (the gate decides on/off)
    policy.forward_s[1] = 0.05
    assert policy.plan([15], ("lowbit",)) == [1]
    # half of the depth-2 nodes rejected: chains stop after depth 1 when forwards cost 10 ms
    policy = DraftPolicy(PolicyOptions(max_nodes=15), curve)
    pair = DraftTree.chain([1, 2], [1.0, 1.0], "lowbit")
    for i in range(200):
        policy.observe([pair], [[0, 1] if i % 2 else [0]], forwards=2, draft_seconds=0.02)
    assert policy.plan([15], ("lowbit",))[0] <= 2
    # a few early rejections past depth 7 (chains of 15 rejected at depth 9), then a drafter that is always
    # accepted: the plan tries longer chains every `explore` plans, so the estimate of the deeper depths recovers
    # and the chains grow back to the budget (without those tries they stayed at 7: tau 7.3 where 26 was possible)
    policy = DraftPolicy(PolicyOptions(max_nodes=15, explore=16), curve)
    policy.forward_s[1] = 0.004
    long = DraftTree.chain([1] * 15, [1.0] * 15, "lowbit")
    for _ in range(3):
        policy.observe([long], [list(range(8))], forwards=15, draft_seconds=0.06)
    plans = []
    for _ in range(80):
        n = policy.plan([15], ("lowbit",))[0]
        plans.append(n)
        policy.observe([DraftTree.chain([1] * n, [1.0] * n, "lowbit")], [list(range(n))], forwards=n,
                       draft_seconds=0.004 * n)
    assert plans[0] < 15 and plans[-1] == 15, plans
    # adaptive=false: always the budgets
    fixed = DraftPolicy(PolicyOptions(adaptive=False), curve)
    fixed.forward_s[1] = 1.0
    assert fixed.plan([9], ("lowbit",)) == [9]


def test_a_batch_prices_its_steps_with_fewer_rows_by_one_rows_curve(tiny, monkeypatch) -> None:
    """A server measures its curve for --batch-size rows, yet often steps one row. A 16-row curve knows nothing
    under 16 tokens: a 1-row step looked its widths up there, where 1 to 16 tokens cost the same, and drafted its
    most nodes even where each node costs most of a token's compute (q4 serving with pld: 0.67x plain). Forwards
    that cost 0.4 ms + 0.6 ms a token (synthetic curves, whatever the rows): a 1-row step drafts nothing with
    p = 0.3 nodes, and the 4-row sizes are the 4-row measurement's."""
    from ponder.speculate import make_speculator
    from ponder.speculate.policy import CostCurve, MEASURED_SIZES

    measured = []

    def linear(model, rows, max_tokens, prefix=64, reps=3):
        measured.append(rows)
        return CostCurve({rows * t: 0.001 * (0.4 + 0.6 * rows * t) * (1.01 if rows > 1 else 1.0)
                          for t in MEASURED_SIZES if t <= max_tokens})

    monkeypatch.setattr(CostCurve, "measure", classmethod(lambda cls, *a, **k: linear(*a, **k)))
    spec = make_speculator("pld", tiny)
    spec.prepare(tiny.model, 4)
    assert measured == [4, 1]
    curve = spec.policy.cost
    assert curve(1) == pytest.approx(0.001) and curve(3) == pytest.approx(0.0022)  # one row's own sizes
    assert curve(8) == pytest.approx(0.005252)  # 4 rows x 2 tokens: the batch's measurement (x 1.01)
    tree = DraftTree.chain([5, 6, 7, 8], [0.3] * 4, "pld")
    assert len(spec.policy.shape([tree])[0]) == 0  # (1 + 0.3) / 1.6 ms < 1 / 1 ms: no node pays
    wide = DraftTree.chain([5, 6, 7, 8], [0.95] * 4, "pld")
    assert len(spec.policy.shape([wide])[0]) > 0  # nodes that are nearly always accepted still do
    assert set(spec.costs[4].seconds) == {4 * t for t in MEASURED_SIZES if t <= spec.max_nodes + 1}  # as measured
    spec.prepare(tiny.model, 2)  # another batch size: its own measurement, one row's reused
    assert measured == [4, 1, 2]
    spec.prepare(tiny.model, 1)
    assert measured == [4, 1, 2] and spec.policy.cost.seconds == spec.costs[1].seconds


def test_the_cost_curve_never_falls_with_more_tokens():
    """A noisy dip in the measured curve (16 tokens timed below 8) must not make a longer verify look cheaper, nor
    make the extrapolation past the measured sizes fall."""
    from ponder.speculate.policy import CostCurve

    curve = CostCurve({1: 0.020, 4: 0.025, 8: 0.030, 16: 0.028})
    assert [curve(n) for n in (1, 3, 8, 12, 16)] == pytest.approx([0.020, 0.025, 0.029, 0.029, 0.029])  # pooled
    assert curve(40) == pytest.approx(0.029)  # the last two sizes' slope is 0 after the dip, never negative
    rising = CostCurve({8: 0.030, 16: 0.040})
    assert rising(24) == pytest.approx(0.050)


def test_a_spike_at_a_small_size_does_not_price_every_larger_one():
    """One size timed at twice its neighbours (a loaded machine) is pooled with them, not carried up to every
    larger size: nodes accepted half the time still pay against a flat 1 ms curve (under a running maximum every
    width would cost 2 ms and no node would: 2 expected tokens / 2 ms is no better than 1 / 1 ms)."""
    from ponder.speculate.policy import CostCurve

    flat = {t: 0.001 for t in (1, 2, 3, 4, 6, 8, 12)}
    curve = CostCurve({**flat, 2: 0.002})
    assert curve(1) == pytest.approx(0.001) and curve(2) == curve(12) == pytest.approx(0.007 / 6)
    policy = DraftPolicy(PolicyOptions(max_nodes=11), curve)
    chain = DraftTree.chain(list(range(1, 12)), [0.5] * 11, "pld")
    assert len(policy.shape([chain])[0]) > 0
    assert all(curve(a) <= curve(b) for a, b in zip(range(1, 30), range(2, 31)))


def test_observed_verify_times_rescale_the_curve_and_lengthen_chains():
    """The curve is measured after a 64-token prefix; after a long prompt every verify costs more. Observed verify
    forwards (seconds for so many tokens) rescale the curve by their moving-average ratio to it (clamped against a
    single stalled forward), and a dearer verify makes longer chains pay against the same draft forwards."""
    from ponder.speculate.policy import CostCurve

    curve = CostCurve({1: 0.025, 2: 0.026, 4: 0.03, 8: 0.035, 16: 0.045, 32: 0.065})
    policy = DraftPolicy(PolicyOptions(max_nodes=31), curve)
    chain = DraftTree.chain([1] * 8, [1.0] * 8, "lowbit")
    rng = random.Random(0)
    for _ in range(400):  # each depth accepted 80% of the time after its parent; 5 ms per draft forward
        n = 0
        while n < 8 and rng.random() < 0.8:
            n += 1
        policy.observe([chain], [list(range(n))], forwards=8, draft_seconds=0.04)
    short = policy.plan([31], ("lowbit",))[0]
    assert 1 < short < 31
    assert policy.verify_scale is None
    for _ in range(30):  # every verify of 9 tokens takes 3x what the curve says (acceptance as before)
        n = 0
        while n < 8 and rng.random() < 0.8:
            n += 1
        policy.observe([chain], [list(range(n))], forwards=8, draft_seconds=0.04, verify_seconds=3 * curve(9),
                       verify_tokens=9)
    assert policy.verify_scale == pytest.approx(3.0, rel=0.05)
    longer = policy.plan([31], ("lowbit",))[0]
    assert longer > short
    policy.verify_scale = None  # the same acceptance unscaled: the shorter chains again
    assert policy.plan([31], ("lowbit",))[0] < longer
    policy.verify_scale = 3.0
    policy.observe([], [], verify_seconds=100.0, verify_tokens=9)  # a stalled forward
    assert policy.verify_scale < 3.0 * 0.7 + 4.0 * 0.3 + 1e-9


def test_explore_0_verifies_each_rows_best_node_however_dear():
    """``explore=0`` never stops drafting: where no node pays (a verify of 2 tokens at 3x one's cost) or none
    passes ``min_prob``, each row still verifies its most likely node; the default prunes them all."""
    from ponder.speculate.policy import CostCurve

    curve = CostCurve({1: 0.001, 2: 0.003, 4: 0.004})
    chains = [DraftTree.chain([1, 2], [0.3, 0.3], "pld"), DraftTree.chain([3], [0.01], "pld")]
    assert [len(t) for t in DraftPolicy(PolicyOptions(), curve).shape(chains)] == [0, 0]
    always = DraftPolicy(PolicyOptions(explore=0), curve)
    assert [t.tokens for t in always.shape(chains)] == [[1], [3]]


def test_cost_curve_measures_the_largest_forward_it_will_price(tiny) -> None:
    """The kernel can change between two measured sizes (a route padding rows to the next measured count, F.linear
    past the routes), so the curve measures its largest size (a lowbit chain of 40 drafts: 41 tokens) instead of
    extrapolating to it."""
    from ponder.speculate.policy import CostCurve

    assert set(CostCurve.measure(tiny.model, 1, 41, reps=1).seconds) == {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 41}
    assert set(CostCurve.measure(tiny.model, 4, 41, reps=1).seconds) == {4 * t for t in (1, 2, 3, 4, 6, 8, 12, 16,
                                                                                        24, 32, 40, 41)}
    assert set(CostCurve.measure(tiny.model, 8, 41, reps=1).seconds) == {8 * t for t in (1, 2, 3, 4, 6, 8, 12, 16,
                                                                                        24, 32)}  # 256 at most
