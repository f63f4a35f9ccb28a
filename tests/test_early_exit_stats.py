"""early-exit's per-layer acceptance estimate (``LayerStats``): a running average that the order of one verify
step's hits and misses must not bias."""

import pytest

from ponder.speculate.early_exit import LayerStats


def test_a_steady_acceptance_rate_is_a_fixed_point() -> None:
    """A layer that hits exactly as often as the estimate says keeps it: 3 of 4 from 0.75 stays 0.75."""
    stats = LayerStats(rate={5: 0.75})
    for _ in range(20):
        stats.update(5, hits=3, total=4)
    assert stats.rate[5] == pytest.approx(0.75, abs=1e-12)
    assert stats.seen[5] == 80


def test_repeated_batches_converge_to_their_rate() -> None:
    """From the 0.5 prior, batches at 90% acceptance settle at 0.9, not below it."""
    stats = LayerStats()
    for _ in range(400):
        stats.update(2, hits=9, total=10)
    assert stats.rate[2] == pytest.approx(0.9, abs=1e-9)


@pytest.mark.parametrize("hits", [0, 4])
def test_a_batch_weighs_as_much_as_its_observations_one_at_a_time(hits: int) -> None:
    """Uniform batches (all hits or all misses) have no order: the batch update equals ``total`` single ones."""
    decay = 0.9
    batch, single = LayerStats(rate={1: 0.3}), LayerStats(rate={1: 0.3})
    batch.update(1, hits=hits, total=4, decay=decay)
    for _ in range(4):
        single.update(1, hits=hits // 4, total=1, decay=decay)
    assert batch.rate[1] == pytest.approx(single.rate[1], abs=1e-12)


def test_an_empty_batch_changes_nothing() -> None:
    stats = LayerStats(rate={3: 0.4}, seen={3: 7})
    stats.update(3, hits=0, total=0)
    assert stats.rate == {3: 0.4} and stats.seen == {3: 7}


def test_hits_must_fit_in_total() -> None:
    with pytest.raises(ValueError, match="hits"):
        LayerStats().update(0, hits=5, total=4)
