"""The power analysis' statistics against hand values and simulation."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from minirl_jax.experiments import power


def test_fisher_one_sided_against_hand_counts():
  # 4/5 vs 0/5: P(a >= 4 | margins 4 of 10) = C(5,4) C(5,0) / C(10,4) = 5 / 210.
  assert power.fisher_one_sided(4, 5, 0, 5) == pytest.approx(5 / 210)
  # 3/5 vs 0/5: (C(5,3) C(5,0)) / C(10,3) = 10 / 120.
  assert power.fisher_one_sided(3, 5, 0, 5) == pytest.approx(10 / 120)
  assert power.fisher_one_sided(0, 5, 4, 5) == pytest.approx(1.0)


def test_fisher_power_enumerates_outcomes():
  # Rate 1 vs 0 at 5 runs always gives 5/5 vs 0/5 (p = 1/252): power 1. Rate 0.8: the test
  # rejects only at 4/5 or 5/5 against 0/5, so power = P(Bin(5, 0.8) >= 4).
  assert power.fisher_power(1.0, 0.0, 5) == pytest.approx(1.0)
  assert power.fisher_power(0.8, 0.0, 5) == pytest.approx(5 * 0.8 ** 4 * 0.2 + 0.8 ** 5)
  assert power.fisher_power(0.0, 0.0, 5) == 0.0


def test_pooled_noise_centres_each_contrast_and_splits_the_variance():
  # Two contrasts with different means: pooling must not count the effect as noise.
  a, b = [0.1, 0.2, 0.3], [1.0, 1.1, 1.2]
  n = power.pooled_noise([a, b, [5.0]], accuracy=0.5, problems=100)
  assert n.contrasts == 2 and n.df == 4
  assert n.diff_sd == pytest.approx(0.1)  # each: squares 0.01 + 0 + 0.01 over 2
  assert n.eval_sd == pytest.approx(math.sqrt(2 * 0.25 / 100))  # 0.0707
  assert n.train_sd == pytest.approx(math.sqrt(0.01 - 0.005))
  assert n.diff_sd_at(100) == pytest.approx(0.1)  # the design it was measured at
  assert n.diff_sd_at(400, evals=2) == pytest.approx(math.sqrt(0.005 + 2 * 0.25 / 800))


def test_paired_t_power_matches_simulation():
  rng = np.random.default_rng(0)
  from scipy import stats
  effect, sd, seeds = 0.05, 0.04, 6
  diffs = rng.normal(effect, sd, (20000, seeds))
  p = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
  assert power.paired_t_power(effect, sd, seeds) == pytest.approx(np.mean(p < 0.05), abs=0.01)
  assert power.paired_t_power(0.0, sd, seeds) == pytest.approx(0.05, abs=1e-9)


def test_seeds_needed_and_detectable_effect_are_inverse():
  sd = 0.034
  seeds = power.seeds_needed(0.05, sd)
  assert power.paired_t_power(0.05, sd, seeds) >= 0.8 > power.paired_t_power(0.05, sd, seeds - 1)
  assert power.detectable_effect(sd, seeds) <= 0.05 < power.detectable_effect(sd, seeds - 1)


def test_t_interval_by_hand():
  mean, low, high = power.t_interval([0.1, 0.2, 0.3])
  half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) x s / sqrt(n)
  assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
  assert math.isnan(power.t_interval([0.1])[1])


@pytest.mark.parametrize("diffs,claim,verdict", [
    ([0.06, 0.08, 0.07, 0.05, 0.09], "ahead", "reproduced"),      # interval above 0
    ([0.00, 0.01, -0.01, 0.02, 0.0], "ahead", "not reproduced"),  # below 0.05 throughout
    ([0.2, -0.1, 0.15, -0.05, 0.1], "ahead", "inconclusive"),     # wide, straddles 0
    ([0.00, 0.01, -0.01, 0.02, 0.0], "no gain", "reproduced"),    # within +-0.05
    ([0.06, 0.08, 0.07, 0.05, 0.09], "no gain", "not reproduced"),
    ([0.2, -0.1, 0.15, -0.05, 0.1], "no gain", "inconclusive"),
    ([0.1], "ahead", "inconclusive"),                             # one seed: no interval
])
def test_read_difference(diffs, claim, verdict):
  got, evidence = power.read_difference(diffs, claim)
  assert got == verdict
  assert f"{np.mean(diffs):+.3f}" in evidence
  if len(diffs) >= 2:
    assert f"(95% t, {len(diffs)} seeds)" in evidence and "nan" not in evidence
  else:
    assert evidence == f"{diffs[0]:+.3f} (1 seed: no interval)"


@pytest.mark.parametrize("counts,verdict", [
    ((4, 5, 0, 5), "reproduced"),       # p = 0.024
    ((3, 5, 0, 5), "inconclusive"),     # p = 0.083
    ((0, 5, 0, 5), "not reproduced"),   # never collapsed in 5 runs
    ((0, 3, 0, 3), "inconclusive"),     # round 1's 3 runs are too few to say never
])
def test_read_collapses(counts, verdict):
  got, evidence = power.read_collapses(*counts)
  assert got == verdict and f"{counts[0]}/{counts[1]} vs {counts[2]}/{counts[3]}" in evidence


def test_fewest_decisive_collapses_is_the_designs_smallest_collapse_contrast():
  # 4/5 vs 0/5: p = 0.024, 3/5: 0.083 (round2.md part 1); 3/3 vs 0/3 is p = 0.05, not below
  assert power.fewest_decisive_collapses(5, 5) == 4
  assert power.fewest_decisive_collapses(10, 10) == 4  # 4/10 vs 0/10: p = 0.043
  assert power.fewest_decisive_collapses(3, 3) is None
  assert "smallest decisive count is 4/5 vs 0/5" in power.read_collapses(2, 5, 0, 5)[1]
  assert "no count at these runs can reach p < 0.05" in power.read_collapses(3, 3, 3, 3)[1]


def test_power_script_rederives_round2s_design_from_round1s_series():
  """scripts/power.py on the committed round-1 series gives the numbers round2.md's part 1
  quotes: paired SD 0.063 (0.059 of it evaluation), and 6 seeds for 0.05 at 1024 problems
  scored by the mean of the last 2 evaluations."""
  root = pathlib.Path(__file__).parents[1]
  out = subprocess.run([sys.executable, str(root / "scripts" / "power.py")], check=True,
                       capture_output=True, text=True, timeout=300).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert round(result["noise_final"]["diff_sd"], 3) == 0.063
  assert round(result["noise_final"]["eval_sd"], 3) == 0.059
  assert result["noise_final"]["contrasts"] == 64
  design = {(d["problems"], d["evals"]): d for d in result["designs"]}
  assert design[(1024, 2)]["seeds"] == 6 and design[(128, 1)]["seeds"] == 16
  assert round(design[(1024, 2)]["mde_5"], 3) == 0.057
  assert round(result["fisher_p"]["4/5 vs 0/5"], 3) == 0.024
