"""The statistics against hand values and simulation."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from minirl_jax.experiments import stats


def test_fisher_one_sided_against_hand_counts():
  # 4/5 vs 0/5: P(a >= 4 | margins 4 of 10) = C(5,4) C(5,0) / C(10,4) = 5 / 210.
  assert stats.fisher_one_sided(4, 5, 0, 5) == pytest.approx(5 / 210)
  # 3/5 vs 0/5: (C(5,3) C(5,0)) / C(10,3) = 10 / 120.
  assert stats.fisher_one_sided(3, 5, 0, 5) == pytest.approx(10 / 120)
  assert stats.fisher_one_sided(0, 5, 4, 5) == pytest.approx(1.0)


def test_fisher_power_enumerates_outcomes():
  # Rate 1 vs 0 at 5 runs always gives 5/5 vs 0/5 (p = 1/252): power 1. Rate 0.8: the test
  # rejects only at 4/5 or 5/5 against 0/5, so power = P(Bin(5, 0.8) >= 4).
  assert stats.fisher_power(1.0, 0.0, 5) == pytest.approx(1.0)
  assert stats.fisher_power(0.8, 0.0, 5) == pytest.approx(5 * 0.8 ** 4 * 0.2 + 0.8 ** 5)
  assert stats.fisher_power(0.0, 0.0, 5) == 0.0


def test_pooled_noise_centres_each_contrast_and_splits_the_variance():
  # Two contrasts with different means: pooling must not count the effect as noise.
  a, b = [0.1, 0.2, 0.3], [1.0, 1.1, 1.2]
  n = stats.pooled_noise([a, b, [5.0]], accuracy=0.5, problems=100)
  assert n.contrasts == 2 and n.df == 4
  assert n.diff_sd == pytest.approx(0.1)  # each: squares 0.01 + 0 + 0.01 over 2
  assert n.eval_sd == pytest.approx(math.sqrt(2 * 0.25 / 100))  # 0.0707
  assert n.train_sd == pytest.approx(math.sqrt(0.01 - 0.005))
  assert n.diff_sd_at(100) == pytest.approx(0.1)  # the design it was measured at
  assert n.diff_sd_at(400, evals=2) == pytest.approx(math.sqrt(0.005 + 2 * 0.25 / 800))
  with pytest.raises(ValueError, match="no contrast has two or more paired seeds"):
    stats.pooled_noise([[0.1], []], accuracy=0.5, problems=100)


def test_paired_t_power_matches_simulation():
  rng = np.random.default_rng(0)
  effect, sd, seeds = 0.05, 0.04, 6
  diffs = rng.normal(effect, sd, (20000, seeds))
  p = scipy_stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
  assert stats.paired_t_power(effect, sd, seeds) == pytest.approx(np.mean(p < 0.05), abs=0.01)
  assert stats.paired_t_power(0.0, sd, seeds) == pytest.approx(0.05, abs=1e-9)
  assert stats.paired_t_power(effect, sd, 1) == 0.0  # one seed: no test


def test_seeds_needed_and_detectable_effect_are_inverse():
  sd = 0.034
  seeds = stats.seeds_needed(0.05, sd)
  assert seeds == 6
  assert stats.paired_t_power(0.05, sd, seeds) >= 0.8 > stats.paired_t_power(0.05, sd, seeds - 1)
  assert stats.detectable_effect(sd, seeds) <= 0.05 < stats.detectable_effect(sd, seeds - 1)


def test_t_interval_by_hand():
  mean, low, high = stats.t_interval([0.1, 0.2, 0.3])
  half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) x s / sqrt(n)
  assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
  mean, low, high = stats.t_interval([0.1])
  assert mean == 0.1 and math.isnan(low) and math.isnan(high)


def test_sign_test_is_an_exact_two_sided_binomial():
  # 10 of 10 one way: 2 x 0.5^10 (one-sided it would be half of that)
  assert stats.sign_test([-0.1] * 10) == (10, 0, pytest.approx(2 / 2 ** 10))
  # 9 of 10: 2 x (1 + 10) / 2^10; zeros are dropped
  assert stats.sign_test([0.1] * 9 + [-0.1, 0.0]) == (1, 9, pytest.approx(22 / 2 ** 10))
  assert stats.sign_test([0.0, 0.0]) == (0, 0, 1.0)


def test_fewest_decisive_collapses_is_the_designs_smallest_collapse_contrast():
  # 4/5 vs 0/5: p = 0.024, 3/5: 0.083 (round2.md part 1); 3/3 vs 0/3 is p = 0.05, not below
  assert stats.fewest_decisive_collapses(5, 5) == 4
  assert stats.fewest_decisive_collapses(10, 10) == 4  # 4/10 vs 0/10: p = 0.043
  assert stats.fewest_decisive_collapses(3, 3) is None
