"""The benchmark's synthetic workloads (benchmarks/traces.py), as a specification."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.traces import (BATCH_MODES, adapter_indices, batch_adapters, batch_counts,
                               gamma_arrivals, make_trace, prompt_tokens)


def trace(**changes):
    """A 200-request trace over 100 adapters, with `changes` to make_trace's arguments."""
    args = dict(alpha=1.0, rate=4.0, cv=1.0, num_requests=200, prompt_range=(8, 32),
                output_range=(16, 64), seed=7)
    args.update(changes)
    return make_trace(100, **args)


def test_the_same_seed_gives_the_same_trace_and_another_seed_another():
    assert trace() == trace()
    assert trace() != trace(seed=8)


def test_lengths_stay_in_their_inclusive_ranges_and_reach_both_ends():
    requests = trace(num_requests=2000, prompt_range=(3, 5), output_range=(10, 11))
    assert {r.prompt_len for r in requests} == {3, 4, 5}
    assert {r.output_len for r in requests} == {10, 11}
    assert [r.index for r in requests] == list(range(2000))


def test_arrivals_increase_at_the_asked_mean_rate():
    requests = trace(num_requests=5000, rate=8.0)
    arrivals = [r.arrival for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert 5000 / arrivals[-1] == pytest.approx(8.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gaps_have_the_asked_coefficient_of_variation(cv):
    gaps = np.diff(gamma_arrivals(2.0, cv, 50_000, np.random.default_rng(0)))
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_alpha_one_is_uniform_and_smaller_alpha_is_more_skewed():
    rng = np.random.default_rng(0)
    uniform = np.bincount(adapter_indices(10, 1.0, 100_000, rng), minlength=10) / 100_000
    assert uniform == pytest.approx([0.1] * 10, abs=0.01)
    skewed = np.bincount(adapter_indices(10, 0.1, 100_000, rng), minlength=10) / 100_000
    # P(index < k) = (k / n) ** alpha: with alpha 0.1, index 0 takes 10 ** -0.1 = 79 %
    assert skewed[0] == pytest.approx(10 ** -0.1, abs=0.01)
    assert list(skewed) == sorted(skewed, reverse=True)


def test_adapter_indices_stay_in_range():
    indices = adapter_indices(3, 0.5, 10_000, np.random.default_rng(1))
    assert indices.min() >= 0 and indices.max() <= 2


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        adapter_indices(0, 1.0, 5, np.random.default_rng(0))
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, 1.0, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown batch mode"):
        batch_adapters("zipf", 8)


def test_punica_batch_mode_shares():
    assert batch_counts("distinct", 8) == [1] * 8
    assert batch_counts("identical", 8) == [8]
    assert batch_counts("uniform", 32) == [6, 6, 5, 5, 5, 5]  # ceil(sqrt(32)) adapters
    assert batch_counts("uniform", 64) == [8] * 8
    # Zipf-1.5: 1, 1, 2, 3, 5, 7, 11 fit under 32; the remaining 2 go to one more adapter
    assert batch_counts("skewed", 32) == [11, 7, 5, 3, 2, 2, 1, 1]
    for mode in BATCH_MODES:
        for size in (1, 2, 7, 32, 100):
            counts = batch_counts(mode, size)
            assert sum(counts) == size and min(counts) >= 1
            assert counts == sorted(counts, reverse=True)


def test_punica_batches_follow_the_shares_in_a_seeded_order():
    for mode in BATCH_MODES:
        batch = batch_adapters(mode, 32, seed=3)
        assert sorted(np.bincount(batch), reverse=True) == batch_counts(mode, 32)
        assert batch == batch_adapters(mode, 32, seed=3)
    assert batch_adapters("distinct", 32, seed=1) != batch_adapters("distinct", 32, seed=2)


def test_prompts_are_seeded_per_request_and_in_the_vocabulary():
    first, second = trace()[:2]
    assert prompt_tokens(first, 500) == prompt_tokens(first, 500)
    assert prompt_tokens(first, 500) != prompt_tokens(second, 500)
    assert len(prompt_tokens(first, 500)) == first.prompt_len
    assert all(5 <= t < 500 for t in prompt_tokens(first, 500))
