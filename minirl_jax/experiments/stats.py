"""The statistics every verdict and design reports: paired-contrast noise and power, the t
interval, and one-sided Fisher exact tests of collapse counts. Pure: no verdict policy.

A contrast is two arms run at the same seeds from the same cold start; its per-seed paired
difference of final accuracy has variance

    var(diff) = 2 p (1 - p) / (problems * evals)  +  var_train

where the first term is the binomial noise of the two arms' evaluations (each a mean of
`evals` evaluations of `problems` held-out problems at accuracy p) and var_train what the RL
runs themselves add (sampling, mini-batch order).
"""
import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import stats


def eval_var(p: float, problems: int, evals: int = 1) -> float:
  """Variance of one arm's score: the mean of `evals` evaluations of `problems` problems."""
  return p * (1 - p) / (problems * evals)


@dataclasses.dataclass(frozen=True)
class Noise:
  """A paired contrast's noise per seed, pooled over contrasts (standard deviations)."""
  diff_sd: float   # of the paired difference, as measured
  eval_sd: float   # its binomial part (two arms' evaluations)
  train_sd: float  # the rest: sqrt(max(0, diff^2 - eval^2))
  accuracy: float  # the mean accuracy p the binomial part uses
  problems: int
  evals: int
  contrasts: int   # how many contrasts were pooled
  df: int          # degrees of freedom of the pooled variance

  def diff_sd_at(self, problems: int, evals: int = 1) -> float:
    """The paired difference's SD with `problems` held-out problems and a score that is the
    mean of `evals` evaluations (training noise unchanged: conservative, since averaging
    late evaluations also averages step-to-step policy noise)."""
    return math.sqrt(2 * eval_var(self.accuracy, problems, evals) + self.train_sd ** 2)


def pooled_noise(diffs_by_contrast: Iterable[Sequence[float]], accuracy: float, problems: int,
                 evals: int = 1) -> Noise:
  """Pools the per-seed paired differences of several contrasts (each centred on its own
  mean, so a real effect does not count as noise) into one per-seed SD, and splits it."""
  ss, df, count = 0.0, 0, 0
  for diffs in diffs_by_contrast:
    d = np.asarray(diffs, float)
    if len(d) < 2:
      continue
    ss += float(np.sum((d - d.mean()) ** 2))
    df += len(d) - 1
    count += 1
  if not df:
    raise ValueError("no contrast has two or more paired seeds")
  diff_sd = math.sqrt(ss / df)
  eval_sd = math.sqrt(2 * eval_var(accuracy, problems, evals))
  train_sd = math.sqrt(max(0.0, diff_sd ** 2 - eval_sd ** 2))
  return Noise(diff_sd, eval_sd, train_sd, accuracy, problems, evals, count, df)


def paired_t_power(effect: float, sd: float, seeds: int, alpha: float = 0.05) -> float:
  """Power of a two-sided paired t-test at level `alpha` to find a true mean difference
  `effect` with per-seed SD `sd` from `seeds` paired seeds (noncentral t)."""
  if seeds < 2:
    return 0.0
  df = seeds - 1
  critical = stats.t.ppf(1 - alpha / 2, df)
  shift = effect / (sd / math.sqrt(seeds))
  return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                 most: int = 1000) -> int:
  """The fewest paired seeds whose paired t-test has `power` to find `effect`."""
  for seeds in range(2, most + 1):
    if paired_t_power(effect, sd, seeds, alpha) >= power:
      return seeds
  return most + 1


def detectable_effect(sd: float, seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
  """The smallest true difference a paired t-test over `seeds` finds with `power`."""
  low, high = 0.0, 10 * sd + 1.0
  for _ in range(60):
    mid = (low + high) / 2
    low, high = (mid, high) if paired_t_power(mid, sd, seeds, alpha) < power else (low, mid)
  return high


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the t interval of the mean paired difference (nan with < 2 seeds)."""
  d = np.asarray(diffs, float)
  mean = float(d.mean()) if len(d) else float("nan")
  if len(d) < 2:
    return mean, float("nan"), float("nan")
  half = stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return mean, mean - half, mean + half


def sign_test(diffs: Sequence[float]) -> tuple[int, int, float]:
  """(differences below 0, above 0, two-sided exact binomial p that either sign is as likely);
  zeros are dropped. 10 of 10 one way gives p = 2 / 2^10 = 0.002."""
  d = np.asarray(diffs, float)
  below, above = int((d < 0).sum()), int((d > 0).sum())
  if not below + above:
    return 0, 0, 1.0
  return below, above, float(stats.binomtest(below, below + above, 0.5).pvalue)


def fisher_one_sided(a_events: int, a_runs: int, b_events: int, b_runs: int) -> float:
  """One-sided Fisher exact p that arm a has the higher event (collapse) rate."""
  table = [[a_events, a_runs - a_events], [b_events, b_runs - b_events]]
  return float(stats.fisher_exact(table, alternative="greater").pvalue)


def fisher_power(rate_a: float, rate_b: float, runs: int, alpha: float = 0.05) -> float:
  """Probability that `runs` runs per arm at true collapse rates give a one-sided Fisher
  p < alpha (every outcome enumerated)."""
  power = 0.0
  for a in range(runs + 1):
    for b in range(runs + 1):
      if fisher_one_sided(a, runs, b, runs) < alpha:
        power += stats.binom.pmf(a, runs, rate_a) * stats.binom.pmf(b, runs, rate_b)
  return float(power)


def fewest_decisive_collapses(a_runs: int, b_runs: int, alpha: float = 0.05) -> Optional[int]:
  """The fewest collapses in `a_runs` runs that, against none in `b_runs`, give a one-sided
  Fisher p < alpha (the smallest collapse contrast a design can detect); None if none."""
  return next((k for k in range(1, a_runs + 1)
               if fisher_one_sided(k, a_runs, 0, b_runs) < alpha), None)
