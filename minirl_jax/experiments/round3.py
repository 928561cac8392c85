"""Round 3, part 2: the first-order approximation's grid and its statistics
(docs/results/round3.md, whose part 1 fixed both before any measurement).

A point measures, at one checkpoint, staleness, response length, sampler format and
routing replay, chunks of the true gradient and of each estimator (`rl.first_order`). Its
series is the Gram matrix of those chunk vectors, each row labelled by its set and prompt
chunk, so every figure here re-derives from the committed files without the vectors:
means over chunks are weighted sums, and a bootstrap over prompt chunks only reweights the
Gram matrix. No JAX here.

Part 3 is a grid (`GRIDS["round3"]`): finding 3's mechanism arms, scored under the
trainer's own policy.
"""
import dataclasses
import functools
from typing import Optional

import numpy as np

from minirl_jax.experiments import design
from minirl_jax.experiments import round2
from minirl_jax.experiments import rules

TRUE = "true"
ESTIMATOR_NAMES = ("minirl", "minirl_no_is", "seq_is", "seq_tis", "grpo", "cispo")
GAPS = ("zero", "bfloat16", "int8", "fp8", "int4", "int4+noise")
STALENESS = (0, 1, 3, 7)
LENGTHS = {"short": (2, 6), "medium": (10, 18), "long": (60, 64)}
REPLAYS = ("none", "r2", "r3")
CHECKPOINTS = ("cold", "rl50", "rl150")
BASE = dict(checkpoint="cold", staleness=0, length="medium", gap="fp8", replay="none")
EQUIVALENCE = 0.02  # cosine margin of the reading rules
HOLDS = 0.9  # the approximation holds while cos >= HOLDS x its noise ceiling


@dataclasses.dataclass(frozen=True)
class Point:
  checkpoint: str = BASE["checkpoint"]
  staleness: int = BASE["staleness"]
  length: str = BASE["length"]
  gap: str = BASE["gap"]
  replay: str = BASE["replay"]

  @property
  def name(self) -> str:
    return (f"{self.checkpoint}/k{self.staleness}/{self.length}/{self.gap}/"
            f"{self.replay}").replace("+", "_")

  @property
  def truth_key(self) -> str:
    """Points sharing this share their true gradient (same policy, prompts, samples)."""
    return f"{self.checkpoint}/k{self.staleness}/{self.length}"


def grid(checkpoints=CHECKPOINTS) -> list[Point]:
  """One factor at a time around the base point, at each checkpoint, base first; replay at
  the base gap and at int4 (round3.md part 1). The long level is measured only where its
  cold start exists (`long` points are listed last)."""
  points = []
  for checkpoint in checkpoints:
    at = lambda **kw: Point(**{**BASE, "checkpoint": checkpoint, **kw})
    # Measured in this order (the widest contrasts first); each factor's levels are
    # part 1's.
    points += [at()] + [at(gap=g) for g in ("zero", "int4", "int4+noise")]
    points += [at(replay="r3")] + [at(gap=g) for g in ("bfloat16", "int8")]
    points += [at(replay="r2"), at(replay="r3", gap="int4"), at(replay="r2", gap="int4")]
    points += [at(staleness=k) for k in STALENESS if k]
    points += [at(length="short")]
  points += [Point(**{**BASE, "checkpoint": c, "length": "long"}) for c in checkpoints]
  return list(dict.fromkeys(points))


# -------------------------------------------------------------------------------------
# Statistics of one point's Gram matrix. Its rows are chunk vectors, each labelled by its
# set (the true gradient or an estimator) and its prompt chunk; `w` weights prompt chunks
# (ones: the estimate; a bootstrap draw: counts), so a set's mean is a weighted mean of its
# rows. Pairs of rows on the same prompt chunk share the prompts' own gradient, so the
# signal terms (U-statistics) leave them out.

@dataclasses.dataclass(frozen=True)
class Gram:
  K: np.ndarray        # [R, R] inner products of the rows
  sets: np.ndarray     # [R] set name of each row
  prompts: np.ndarray  # [R] prompt chunk of each row

  def rows(self, name: str) -> np.ndarray:
    return np.flatnonzero(self.sets == name)

  @property
  def names(self) -> list[str]:
    return list(dict.fromkeys(self.sets.tolist()))

  @property
  def num_prompts(self) -> int:
    return int(self.prompts.max()) + 1


def _pair(g: Gram, a: str, b: str, w: np.ndarray):
  ra, rb = g.rows(a), g.rows(b)
  wa, wb = w[g.prompts[ra]], w[g.prompts[rb]]
  same = g.prompts[ra][:, None] == g.prompts[rb][None, :]
  return g.K[np.ix_(ra, rb)], wa, wb, same


def mean_inner(g: Gram, a: str, b: str, w: np.ndarray) -> float:
  """<weighted mean of a's rows, weighted mean of b's rows>."""
  K, wa, wb, _ = _pair(g, a, b, w)
  return _ratio(float(wa @ K @ wb), float(wa.sum() * wb.sum()))


def signal_inner(g: Gram, a: str, b: str, w: np.ndarray) -> float:
  """<E a, E b> without the rows' own noise or their prompts' shared part: the weighted
  mean over pairs of rows on DIFFERENT prompt chunks (a U-statistic; nan if none)."""
  K, wa, wb, same = _pair(g, a, b, w)
  total = float(wa @ K @ wb) - float(wa @ (K * same) @ wb)
  pairs = float(wa.sum() * wb.sum()) - float(wa @ same @ wb)
  return _ratio(total, pairs)


def _ratio(num: float, den: float) -> float:
  return num / den if den > 0 else float("nan")


def cosine(g: Gram, a: str, b: str, w: np.ndarray) -> float:
  """Cosine of the two sets' means: what the measurement reads, noise included."""
  return _ratio(mean_inner(g, a, b, w),
                float(np.sqrt(mean_inner(g, a, a, w) * mean_inner(g, b, b, w))))


def signal_cosine(g: Gram, a: str, b: str, w: np.ndarray) -> float:
  """cos(E a, E b), every term a U-statistic: the bias, with the noise taken out. Equals
  cosine / ceiling when the two sets share no prompt chunk (nan where a signal norm is
  not positive: too few chunks to see it)."""
  aa, bb = signal_inner(g, a, a, w), signal_inner(g, b, b, w)
  if not (aa > 0 and bb > 0):
    return float("nan")
  return signal_inner(g, a, b, w) / float(np.sqrt(aa * bb))


def reliability(g: Gram, a: str, w: np.ndarray) -> float:
  """||E a||^2 / E||mean a||^2: the share of the mean's squared norm that is signal, so
  that the cosine of two independent means is at most sqrt(r_a r_b) (their noise
  ceiling). Equal in expectation to Spearman-Brown from split halves."""
  return _ratio(signal_inner(g, a, a, w), mean_inner(g, a, a, w))


def ceiling(g: Gram, a: str, b: str, w: np.ndarray) -> float:
  r_a, r_b = reliability(g, a, w), reliability(g, b, w)
  return float(np.sqrt(r_a * r_b)) if r_a > 0 and r_b > 0 else float("nan")


def split_half(g: Gram, a: str, splits: int = 50, seed: int = 0) -> float:
  """Mean cosine between the means of two random halves of one set's rows (the design's
  ceiling, as measured)."""
  rows = g.rows(a)
  K = g.K[np.ix_(rows, rows)]
  c = len(rows)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(splits):
    order = rng.permutation(c)
    half, other = np.zeros(c), np.zeros(c)
    half[order[:c // 2]], other[order[c // 2:2 * (c // 2)]] = 1.0, 1.0
    out.append(_ratio(float(half @ K @ other),
                      float(np.sqrt(float(half @ K @ half) * float(other @ K @ other)))))
  return float(np.mean(out))


def variance(g: Gram, a: str, truth: str, w: np.ndarray) -> dict:
  """The rows' spread, scale-free: the trace of their covariance over the mean's squared
  norm, and the variance of their projection on the true gradient's direction over the
  mean projection squared."""
  rows = g.rows(a)
  wa = w[g.prompts[rows]]
  c = float(wa.sum())
  unit = np.sqrt(mean_inner(g, truth, truth, w))
  if not unit > 0 or not c > 1:
    return {"trace_rel": float("nan"), "proj_rel": float("nan")}
  mean_sq = mean_inner(g, a, a, w)
  rt = g.rows(truth)
  wt = w[g.prompts[rt]]
  proj = (g.K[np.ix_(rows, rt)] @ wt) / wt.sum() / unit  # <row, mean truth> / ||mean truth||
  proj_mean = float(wa @ proj) / c
  proj_var = (float(wa @ proj ** 2) / c - proj_mean ** 2) * c / (c - 1)
  trace = (float(wa @ np.diag(g.K)[rows]) / c - mean_sq) * c / (c - 1)
  return {"trace_rel": _ratio(trace, mean_sq), "proj_rel": _ratio(proj_var, proj_mean ** 2)}


def point_stats(g: Gram, w: Optional[np.ndarray] = None) -> dict:
  """Every estimator's statistics against the true gradient at one weighting `w` of the
  prompt chunks. `ratio` is the bias read by the rules: cos(E estimator, E truth)."""
  w = np.ones(g.num_prompts) if w is None else w
  out = {}
  for name in g.names:
    if name == TRUE:
      out[name] = {"reliability": reliability(g, TRUE, w)}
      continue
    cos = cosine(g, name, TRUE, w)
    out[name] = {"cosine": cos, "ceiling": ceiling(g, name, TRUE, w),
                 "ratio": signal_cosine(g, name, TRUE, w),
                 "rel_error": float(np.sqrt(max(0.0, 1.0 - cos ** 2))),
                 "reliability": reliability(g, name, w), **variance(g, name, TRUE, w)}
  return out


def bootstrap_weights(chunks: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
  """[draws, chunks] multiplicities of chunks resampled with replacement (fixed seed: every
  point, and so every contrast between points, uses the same draws)."""
  rng = np.random.default_rng(seed)
  return np.stack([np.bincount(rng.integers(0, chunks, chunks), minlength=chunks)
                   for _ in range(draws)]).astype(np.float64)


def flat(stats: dict) -> dict[str, float]:
  return {f"{s}/{k}": v for s, d in stats.items() for k, v in d.items()}


def _interval(samples) -> list[float]:
  samples = np.asarray(samples, np.float64)
  samples = samples[np.isfinite(samples)]
  return list(map(float, np.percentile(samples, [2.5, 97.5]))) if samples.size else [
      float("nan")] * 2


def summarise(g: Gram, draws: int = 1000) -> dict:
  """{"<set>/<stat>": [estimate, 2.5%, 97.5%]} plus the split-half cosines."""
  est = flat(point_stats(g))
  boot = [flat(point_stats(g, w)) for w in bootstrap_weights(g.num_prompts, draws)]
  out = {key: [value, *_interval([b[key] for b in boot])] for key, value in est.items()}
  for name in g.names:
    out[f"{name}/split_half"] = [split_half(g, name)]
  return out


def contrast(a: Gram, b: Gram, stat: str, draws: int = 1000) -> list[float]:
  """stat(a) - stat(b) for two points measured on the same prompt chunks (paired: the same
  bootstrap draws), as [estimate, 2.5%, 97.5%]."""
  diff = lambda w: flat(point_stats(a, w))[stat] - flat(point_stats(b, w))[stat]
  return [diff(None), *_interval([diff(w) for w in bootstrap_weights(a.num_prompts, draws)])]


def reading(diff: list[float], predicted_sign: int) -> str:
  """A contrast read by round3.md's rule: 'counts' (its interval excludes 0, it exceeds
  the margin, in the predicted direction), 'counts against', 'equal' (within the margin,
  interval inside it) or 'inconclusive'."""
  est, low, high = diff
  if (low > 0 or high < 0) and abs(est) > EQUIVALENCE:
    return "counts" if np.sign(est) == predicted_sign else "counts against"
  if -EQUIVALENCE < low and high < EQUIVALENCE:
    return "equal"
  return "inconclusive"


# ---------------------------------------------------------------------------------------
# Part 3: finding 3's mechanism arms (round3.md part 1), round 2's regime and cold start.

TRAINER_EVAL = {"rl.eval_trainer": True}
PART3_SEEDS = 10


def _part3_arms() -> tuple[design.Arm, ...]:
  arms = (("minirl", design.MINIRL), ("minirl_no_is", design.NO_IS),
          ("minirl_shuffled", {**design.MINIRL, "objective.is_shuffle": True}),
          ("zero_gap", {**design.MINIRL, "objective.behaviour_logp": "pi_old"}))
  return tuple(design.Arm(name, {**overrides, **TRAINER_EVAL}, seeds=PART3_SEEDS)
               for name, overrides in arms)


def read_part3(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """The primary endpoint (MiniRL - w/o IS, scored under the trainer's policy) and the
  two explanations' contrasts, each as round 2's rules read accuracy and collapse."""
  readings = []
  pairs = (("primary: MiniRL ahead of w/o IS (trainer's policy)", "minirl", "minirl_no_is"),
           ("variance from the weights: shuffled ahead of MiniRL", "minirl_shuffled",
            "minirl"),
           ("shuffled ahead of w/o IS", "minirl_shuffled", "minirl_no_is"),
           ("zero gap ahead of MiniRL", "zero_gap", "minirl"))
  for question, a, b in pairs:
    if a in arms and b in arms:
      readings.append(rules.accuracy(question, arms[a], arms[b], "ahead"))
  if "minirl" in arms and "minirl_no_is" in arms:
    readings.append(rules.collapse("w/o IS collapses, MiniRL does not",
                                   arms["minirl_no_is"], arms["minirl"]))
  return readings


GRIDS = {
    "round3": design.Grid(
        "round3", "configs/paper_moe.py", _part3_arms(),
        "round 3, part 3: finding 3's mechanism (MiniRL, w/o IS, shuffled weights, zero gap), "
        "scored under the trainer's own policy (docs/results/round3.md)",
        read=read_part3,
        scored=functools.partial(round2.scored_evaluations, key="eval/accuracy_full_trainer"),
        sample_sd=True,
        series=("eval/accuracy_trainer", "eval/accuracy_full", "eval/accuracy_full_trainer",
                "is/weight_mean", "is/weight_max", "rollout/sampler_entropy",
                "mismatch/kl_mu_pi_old")),
}
