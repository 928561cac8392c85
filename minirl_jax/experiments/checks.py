"""Checks of a paired contrast made after its runs, printed beside its verdict and never in
its place: the power it realised against the power planned, its interval with one seed left
out, and per-step metrics of its two arms compared over the steps both runs logged.
"""
import dataclasses
import math
from typing import Callable, Optional

import numpy as np

from minirl_jax.experiments import stats


@dataclasses.dataclass(frozen=True)
class Power:
  """The noise of a contrast's paired differences, realised and planned."""
  seeds: int
  diff_sd: float  # sample SD (ddof = 1) of the per-seed differences
  detectable: float  # smallest effect a paired t-test finds at `seeds` (nan: no spread)
  planned_sd: float
  planned_detectable: float  # the same at the planned SD
  correlation: float  # Pearson r of the two arms' scores over seeds (nan: a constant arm)


def realised_power(a: dict[int, float], b: dict[int, float], planned_sd: float,
                   alpha: float = 0.05, power: float = 0.8) -> Optional[Power]:
  """The power a contrast had, by the test its design planned with (`stats.detectable_effect`:
  paired t, two-sided `alpha`, `power`), over the seeds both arms have; None under 2 seeds.

  The paired SD is sqrt(sd_a^2 + sd_b^2 - 2 r sd_a sd_b): pairing helps only where the arms'
  scores correlate positively over seeds (r > 0), and a negative r makes it worse than two
  independent arms.
  """
  seeds = sorted(a.keys() & b.keys())
  if len(seeds) < 2:
    return None
  x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
  sd = float(np.std(x - y, ddof=1))
  spread = x.std() > 0 and y.std() > 0
  return Power(len(seeds), sd,
               stats.detectable_effect(sd, len(seeds), alpha, power) if sd > 0 else math.nan,
               planned_sd, stats.detectable_effect(planned_sd, len(seeds), alpha, power),
               float(np.corrcoef(x, y)[0, 1]) if spread else math.nan)


def leave_one_out(diffs: dict[int, float]) -> dict[int, tuple[float, float, float]]:
  """Per seed: the 95% t interval of the other seeds' differences (`stats.t_interval`)."""
  return {s: stats.t_interval([d for k, d in diffs.items() if k != s]) for s in diffs}


def matched(a: dict[int, list[dict]], b: dict[int, list[dict]], key: str,
            reduce: Callable = np.mean) -> dict[int, tuple[float, float]]:
  """Per seed both arms have: (a's, b's) `reduce` of `key` over the RL steps both runs logged
  it, so a run that stopped early (a collapse) is compared over its own steps only."""
  out = {}
  for seed in sorted(a.keys() & b.keys()):
    x, y = ({r["step"]: r[key] for r in records if key in r} for records in (a[seed], b[seed]))
    steps = sorted(x.keys() & y.keys())
    if steps:
      out[seed] = (float(reduce([x[k] for k in steps])), float(reduce([y[k] for k in steps])))
  return out


@dataclasses.dataclass(frozen=True)
class Paired:
  """Per-seed pairs (a, b) summarised: the arms' means, a - b by its 95% t interval, and the
  sign test of a - b."""
  a: float
  b: float
  diff: tuple[float, float, float]  # (mean, low, high)
  below: int  # seeds where a < b
  above: int
  p: float  # `stats.sign_test`, two-sided

  @classmethod
  def of(cls, pairs: dict[int, tuple[float, float]]) -> "Paired":
    diffs = [x - y for x, y in pairs.values()]
    return cls(float(np.mean([x for x, _ in pairs.values()])),
               float(np.mean([y for _, y in pairs.values()])), stats.t_interval(diffs),
               *stats.sign_test(diffs))
