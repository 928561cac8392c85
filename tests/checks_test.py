"""Checks made after a contrast's runs, against hand values: realised power, leave-one-out
intervals, per-step metrics over the steps both runs logged, and their sign test."""
import math

import numpy as np
import pytest

from minirl_jax.experiments import checks
from minirl_jax.experiments import stats


def test_realised_power_is_the_plans_test_at_the_paired_sd():
  a = {0: 0.30, 1: 0.40, 2: 0.35, 3: 0.45}
  b = {0: 0.40, 1: 0.30, 2: 0.45, 3: 0.35, 9: 0.9}  # seed 9 is unpaired: left out
  p = checks.realised_power(a, b, planned_sd=0.034)
  diffs = np.array([-0.10, 0.10, -0.10, 0.10])
  assert p.seeds == 4 and p.diff_sd == pytest.approx(diffs.std(ddof=1))
  assert p.detectable == pytest.approx(stats.detectable_effect(p.diff_sd, 4))
  assert p.planned_detectable == pytest.approx(stats.detectable_effect(0.034, 4))
  # sd(a - b)^2 = sd_a^2 + sd_b^2 - 2 r sd_a sd_b: anti-correlated arms add their noise
  x, y = np.array(list(a.values())), np.array([b[s] for s in a])
  assert p.correlation == pytest.approx(np.corrcoef(x, y)[0, 1]) and p.correlation < 0
  assert p.diff_sd ** 2 == pytest.approx(x.var(ddof=1) + y.var(ddof=1)
                                         - 2 * p.correlation * x.std(ddof=1) * y.std(ddof=1))
  assert checks.realised_power({0: 0.3}, {0: 0.2}, 0.034) is None  # one seed: no SD


def test_no_spread_has_no_detectable_effect():
  p = checks.realised_power({0: 0.2, 1: 0.3}, {0: 0.2, 1: 0.3}, 0.034)
  assert p.diff_sd == 0 and math.isnan(p.detectable) and p.correlation == pytest.approx(1.0)
  p = checks.realised_power({0: 0.2, 1: 0.2}, {0: 0.1, 1: 0.3}, 0.034)
  assert math.isnan(p.correlation)  # a constant arm has no correlation


def test_leave_one_out_drops_each_seed_in_turn():
  diffs = {0: -0.3, 1: -0.1, 2: -0.12, 3: -0.08}
  out = checks.leave_one_out(diffs)
  assert list(out) == [0, 1, 2, 3]
  assert out[0] == pytest.approx(stats.t_interval([-0.1, -0.12, -0.08]))
  assert out[2][0] == pytest.approx((-0.3 - 0.1 - 0.08) / 3)


def test_matched_compares_runs_over_the_steps_both_logged():
  def run(values, start=1):
    return [{"step": start + i, "mismatch/kl_k3": v} for i, v in enumerate(values)]
  # seed 0: b stopped at step 2 (a collapse), so a's later, larger KL is not compared
  a = {0: run([1.0, 2.0, 9.0]), 1: run([3.0, 1.0]), 2: run([1.0])}
  b = {0: run([2.0, 4.0]), 1: run([1.0, 1.0]) + [{"step": 3, "reward/mean": 0.5}]}
  assert checks.matched(a, b, "mismatch/kl_k3") == {0: (1.5, 3.0), 1: (2.0, 1.0)}
  assert checks.matched(a, b, "mismatch/kl_k3", np.max) == {0: (2.0, 4.0), 1: (3.0, 1.0)}
  assert checks.matched(a, b, "policy/entropy") == {}  # logged by neither


def test_paired_summarises_means_interval_and_signs():
  m = checks.Paired.of({0: (0.2, 0.3), 1: (0.1, 0.3), 2: (0.4, 0.3)})
  assert (m.a, m.b) == pytest.approx((0.7 / 3, 0.3))
  assert m.diff == pytest.approx(stats.t_interval([-0.1, -0.2, 0.1]))
  assert (m.below, m.above, m.p) == (2, 1, 1.0)
