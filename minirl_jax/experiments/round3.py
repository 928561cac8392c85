"""Round 3, part 2: the first-order approximation's grid and its statistics
(docs/results/round3.md, whose part 1 fixed both before any measurement).

A point measures, at one checkpoint, staleness, response length, sampler format and
routing replay, C chunks of the true gradient and of each estimator (`rl.first_order`).
Its series is the Gram matrix of those chunk vectors (sets x chunks, `TRUE` first), so
every figure here re-derives from the committed files without the vectors: means over
chunks are weighted sums, and a bootstrap over chunks only reweights the Gram matrix.
No JAX here.
"""
import dataclasses
from typing import Optional

import numpy as np

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
    points += [at()] + [at(gap=g) for g in GAPS if g != BASE["gap"]]
    points += [at(staleness=k) for k in STALENESS if k]
    points += [at(replay=r, gap=g) for g in ("fp8", "int4") for r in REPLAYS
               if not (r == "none" and g == "fp8")]
    points += [at(length="short")]
  points += [Point(**{**BASE, "checkpoint": c, "length": "long"}) for c in checkpoints]
  return list(dict.fromkeys(points))


# -------------------------------------------------------------------------------------
# Statistics of one point's Gram matrix. `K` is [S*C, S*C] over sets x chunks; `w` are
# chunk multiplicities (ones: the estimate; a bootstrap draw: counts).

def blocks(K: np.ndarray, sets: int) -> np.ndarray:
  """[S, S, C, C] view of the Gram matrix."""
  c = K.shape[0] // sets
  return K.reshape(sets, c, sets, c).transpose(0, 2, 1, 3)


def mean_inner(B: np.ndarray, w: np.ndarray) -> float:
  """<mean_w a, mean_w b> of two sets' chunk vectors, from their block B = <a_i, b_j>."""
  return float(w @ B @ w) / float(w.sum()) ** 2


def signal_inner(B: np.ndarray, w: np.ndarray) -> float:
  """<E a, E b> estimated without the chunks' own noise: the mean over pairs of DIFFERENT
  chunks (a U-statistic; a chunk drawn twice by the bootstrap is not paired with itself)."""
  total = float(w @ B @ w) - float(np.sum(w ** 2 * np.diag(B)))
  pairs = float(w.sum()) ** 2 - float(np.sum(w ** 2))
  return total / pairs if pairs > 0 else float("nan")  # nan: one chunk drawn every time


def _ratio(num: float, den: float) -> float:
  return num / den if den > 0 else float("nan")


def cosine(K4: np.ndarray, a: int, b: int, w: np.ndarray) -> float:
  """Cosine of the two sets' chunk means (nan if either is zero)."""
  return _ratio(mean_inner(K4[a, b], w),
                float(np.sqrt(mean_inner(K4[a, a], w) * mean_inner(K4[b, b], w))))


def reliability(K4: np.ndarray, a: int, w: np.ndarray) -> float:
  """||E a||^2 / E||mean a||^2: the share of the mean's squared norm that is signal, so
  that the cosine of two independent means is at most sqrt(r_a r_b) (their noise
  ceiling). Equal in expectation to Spearman-Brown from split halves."""
  return _ratio(signal_inner(K4[a, a], w), mean_inner(K4[a, a], w))


def ceiling(K4: np.ndarray, a: int, b: int, w: np.ndarray) -> float:
  r_a, r_b = reliability(K4, a, w), reliability(K4, b, w)
  return float(np.sqrt(r_a * r_b)) if r_a > 0 and r_b > 0 else float("nan")


def split_half(K4: np.ndarray, a: int, splits: int = 50, seed: int = 0) -> float:
  """Mean cosine between the means of two random halves of one set's chunks (the design's
  ceiling, as measured)."""
  c = K4.shape[-1]
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(splits):
    half = np.zeros(c)
    half[rng.permutation(c)[:c // 2]] = 1.0
    other = 1.0 - half
    if c % 2:
      other[np.argmax(other)] = 0.0  # equal halves
    ab = float(half @ K4[a, a] @ other)
    out.append(_ratio(ab, float(np.sqrt(float(half @ K4[a, a] @ half)
                                        * float(other @ K4[a, a] @ other)))))
  return float(np.mean(out))


def variance(K4: np.ndarray, a: int, truth: int, w: np.ndarray) -> dict:
  """The chunks' spread, scale-free: the trace of their covariance over the mean's squared
  norm, and the variance of their projection on the true gradient's direction over the
  mean projection squared."""
  c = float(w.sum())
  Kaa = K4[a, a]
  mean_sq = mean_inner(Kaa, w)
  unit = np.sqrt(mean_inner(K4[truth, truth], w))
  if not unit > 0 or not c > 1:
    return {"trace_rel": float("nan"), "proj_rel": float("nan")}
  proj = (K4[a, truth] @ w) / c / unit  # <a_i, mean truth> / ||mean truth||
  proj_mean = float(w @ proj) / c
  proj_var = (float(w @ proj ** 2) / c - proj_mean ** 2) * c / (c - 1)
  trace = (float(w @ np.diag(Kaa)) / c - mean_sq) * c / (c - 1)
  return {"trace_rel": _ratio(trace, mean_sq), "proj_rel": _ratio(proj_var, proj_mean ** 2)}


def point_stats(K: np.ndarray, sets: list[str], w: Optional[np.ndarray] = None) -> dict:
  """Every estimator's statistics against the true gradient at one resampling `w`."""
  K4 = blocks(K, len(sets))
  w = np.ones(K4.shape[-1]) if w is None else w
  t = sets.index(TRUE)
  out = {}
  for i, name in enumerate(sets):
    if name == TRUE:
      out[name] = {"reliability": reliability(K4, t, w)}
      continue
    cos, ceil = cosine(K4, i, t, w), ceiling(K4, i, t, w)
    out[name] = {"cosine": cos, "ceiling": ceil, "ratio": _ratio(cos, ceil),
                 "rel_error": float(np.sqrt(max(0.0, 1.0 - cos ** 2))),
                 "reliability": reliability(K4, i, w), **variance(K4, i, t, w)}
  return out


def bootstrap_weights(chunks: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
  """[draws, chunks] multiplicities of chunks resampled with replacement (fixed seed: every
  point, and so every contrast between points, uses the same draws)."""
  rng = np.random.default_rng(seed)
  return np.stack([np.bincount(rng.integers(0, chunks, chunks), minlength=chunks)
                   for _ in range(draws)]).astype(np.float64)


def flat(stats: dict) -> dict[str, float]:
  return {f"{s}/{k}": v for s, d in stats.items() for k, v in d.items()}


def summarise(K: np.ndarray, sets: list[str], draws: int = 1000) -> dict:
  """{"<set>/<stat>": [estimate, 2.5%, 97.5%]} plus the split-half cosines."""
  est = flat(point_stats(K, sets))
  boot = [flat(point_stats(K, sets, w))
          for w in bootstrap_weights(K.shape[0] // len(sets), draws)]
  out = {}
  for key, value in est.items():
    samples = np.array([b[key] for b in boot], np.float64)
    samples = samples[np.isfinite(samples)]
    low, high = (np.percentile(samples, [2.5, 97.5]) if samples.size else (np.nan, np.nan))
    out[key] = [value, float(low), float(high)]
  K4 = blocks(K, len(sets))
  for i, name in enumerate(sets):
    out[f"{name}/split_half"] = [split_half(K4, i)]
  return out


def contrast(K_a: np.ndarray, K_b: np.ndarray, sets: list[str], stat: str,
             draws: int = 1000) -> list[float]:
  """stat(a) - stat(b) for two points measured on the same prompts and chunks (paired: the
  same bootstrap draws), as [estimate, 2.5%, 97.5%]."""
  diff = lambda w: flat(point_stats(K_a, sets, w))[stat] - flat(point_stats(K_b, sets, w))[stat]
  est = diff(None)
  samples = np.array([diff(w) for w in bootstrap_weights(K_a.shape[0] // len(sets), draws)])
  samples = samples[np.isfinite(samples)]
  return [est, *map(float, np.percentile(samples, [2.5, 97.5]))]


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
