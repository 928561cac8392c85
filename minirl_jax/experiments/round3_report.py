"""Round 3, part 2, read back: the measured points' tables, the predictions read by part 1's
rules, and the figures, all from the committed series (`<dir>/*.json` beside `*.npz`).

  python scripts/first_order.py --workdir=runs/round3 --report_only --results=docs/results/round3
"""
import dataclasses
import glob
import json
import os
from typing import Optional

import numpy as np

from minirl_jax.experiments import figures
from minirl_jax.experiments import round3


@dataclasses.dataclass(frozen=True)
class Measured:
  point: round3.Point
  summary: dict
  gram: round3.Gram


def load(directory: str) -> dict[round3.Point, Measured]:
  """Every finished point of a series directory."""
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    if path.endswith(".tmp.json"):
      continue  # a point being written
    with open(path) as f:
      summary = json.load(f)
    if "point" not in summary:
      continue  # the pilot, the noise calibration
    with np.load(path[:-len(".json")] + ".npz") as f:
      gram = round3.Gram(f["gram"], f["sets"], f["prompts"])
    point = round3.Point(**{k: summary[k] for k in ("checkpoint", "staleness", "length", "gap",
                                                    "replay")})
    out[point] = Measured(point, summary, gram)
  return out


def _mean(stats: list, key: str) -> float:
  return float(np.mean([s[key] for s in stats]))


def point_row(m: Measured) -> list[str]:
  """A point's sampler-side numbers and MiniRL's bias."""
  s, st = m.summary["stats"], m.summary["chunk_stats"]
  ratio = s["minirl/ratio"]
  return [m.point.name, f"{_mean(st, 'mismatch/kl_k3'):.2e}",
          f"{_mean(st, 'moe/routing_disagreement'):.3f}",
          f"{_mean(st, 'rollout/length_mean'):.0f}", f"{_mean(st, 'reward/mean'):.3f}",
          f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]",
          f"{s['minirl/cosine'][0]:.3f}", f"{s['minirl/ceiling'][0]:.3f}",
          "holds" if ratio[0] >= round3.HOLDS else "does not hold"]


def estimator_rows(m: Measured, zero: Optional[Measured]) -> list[list[str]]:
  """Each estimator's bias and noise at a point; its variance also relative to the
  on-policy MiniRL's (the zero gap at the same checkpoint, staleness and length)."""
  s = m.summary["stats"]
  rows = []
  for name in round3.ESTIMATOR_NAMES:
    r = s[f"{name}/ratio"]
    relative = (f"{s[f'{name}/trace_rel'][0] / zero.summary['stats']['minirl/trace_rel'][0]:.2f}"
                if zero is not None else "-")
    rows.append([m.point.name, name, f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]",
                 f"{s[f'{name}/cosine'][0]:.3f}", f"{s[f'{name}/ceiling'][0]:.3f}",
                 f"{s[f'{name}/split_half'][0]:.3f}", f"{s[f'{name}/trace_rel'][0]:.1f}",
                 relative, f"{s[f'{name}/proj_rel'][0]:.1f}"])
  return rows


def _zero_of(points: dict, point: round3.Point) -> Optional[Measured]:
  return points.get(dataclasses.replace(point, gap="zero", replay="none"))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def within(g: round3.Gram, a: str, b: str, draws: int = 1000) -> list[float]:
  """signal cosine of estimator a - that of b at one point (paired draws)."""
  def diff(w):
    return (round3.signal_cosine(g, a, round3.TRUE, w)
            - round3.signal_cosine(g, b, round3.TRUE, w))
  samples = [diff(w) for w in round3.bootstrap_weights(g.num_prompts, draws)]
  return [diff(np.ones(g.num_prompts)), *round3._interval(samples)]


def _fmt(diff: list[float]) -> str:
  return f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"


def readings(points: dict[round3.Point, Measured], draws: int = 1000) -> list[list[str]]:
  """Each prediction's contrasts that the measured points allow, read by the rules:
  [prediction, contrast, A - B with its 95% interval, reading]."""
  out = []
  base = round3.Point()
  have = lambda **kw: points.get(dataclasses.replace(base, **kw))

  def between(label, a, b, sign, stat="minirl/ratio", prediction=""):
    if a is not None and b is not None:
      diff = round3.contrast(a.gram, b.gram, stat, draws)
      out.append([prediction, label, _fmt(diff), round3.reading(diff, sign)])

  # P1: MiniRL's bias grows with the gap (its signal cosine falls).
  ladder = [g for g in round3.GAPS if have(gap=g) is not None]
  if len(ladder) >= 2:
    between(f"minirl: {ladder[0]} - {ladder[-1]}", have(gap=ladder[0]), have(gap=ladder[-1]),
            +1, prediction="P1 (extreme)")
    for lo, hi in zip(ladder, ladder[1:]):
      between(f"minirl: {lo} - {hi}", have(gap=lo), have(gap=hi), +1, prediction="P1")
  # P3: with IS beats without IS at every nonzero gap; equal at zero.
  for g in round3.GAPS:
    m = have(gap=g)
    if m is not None:
      diff = within(m.gram, "minirl", "minirl_no_is", draws)
      out.append(["P3", f"{g}: minirl - minirl_no_is", _fmt(diff),
                  round3.reading(diff, +1) if g != "zero" else
                  ("equal" if round3.reading(diff, +1) == "equal" else
                   "not equal: " + round3.reading(diff, +1))])
  # P4: staleness adds bias.
  stale = [k for k in round3.STALENESS if have(staleness=k) is not None]
  if len(stale) >= 2:
    between(f"minirl: k={stale[0]} - k={stale[-1]}", have(staleness=stale[0]),
            have(staleness=stale[-1]), +1, prediction="P4 (extreme)")
  # P5: R3 brings MiniRL closer to the zero gap; R2 changes nothing at k = 0.
  for g in ("fp8", "int4"):
    between(f"{g}: minirl r3 - none", have(gap=g, replay="r3"), have(gap=g), +1,
            prediction="P5")
    between(f"{g}: minirl r2 - none", have(gap=g, replay="r2"), have(gap=g), +1,
            prediction="P5 (R2: equal expected)")
  # P2: length multiplies the gap: MiniRL's bias grows with length at fp8.
  between("fp8: minirl short - medium", have(length="short"), have(), +1, prediction="P2")
  # P6: sequence-level IS unbiased (its signal cosine near 1) at every gap.
  for g in ladder:
    m = have(gap=g)
    r = m.summary["stats"]["seq_is/ratio"]
    out.append(["P6", f"{g}: seq_is signal cosine", f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]",
                "unbiased (interval reaches 1 - margin)" if r[2] >= 1 - round3.EQUIVALENCE
                else "biased"])
  return out


POINT_HEAD = ["point", "KL k3", "routing differs", "tokens", "reward", "MiniRL signal cos [95%]",
              "MiniRL raw cos", "ceiling", "approximation (>= 0.9)"]
ESTIMATOR_HEAD = ["point", "estimator", "signal cos [95%]", "raw cos", "ceiling",
                  "split half", "trace / ||mean||^2", "vs on-policy MiniRL",
                  "proj. var / mean^2"]


def markdown(points: dict[round3.Point, Measured], draws: int = 1000) -> list[str]:
  ms = list(points.values())
  return (["### Points", ""] + _table(POINT_HEAD, [point_row(m) for m in ms])
          + ["", "### Estimators", ""]
          + _table(ESTIMATOR_HEAD, [r for m in ms
                                    for r in estimator_rows(m, _zero_of(points, m.point))])
          + ["", "### Predictions, read by part 1's rules", ""]
          + _table(["prediction", "contrast (signal cosine)", "A - B [95%]", "reading"],
                   readings(points, draws)))


def plot_gap(points: dict[round3.Point, Measured], path: str) -> Optional[str]:
  """Each estimator's signal cosine (95% interval) against the gap's measured KL, at the
  base point's checkpoint, staleness, length and replay."""
  base = round3.Point()
  ladder = [points[p] for p in (dataclasses.replace(base, gap=g) for g in round3.GAPS)
            if p in points]
  if len(ladder) < 2:
    return None
  fig, ax = figures.panels(1, width=6.0)
  x = np.arange(len(ladder))
  for i, name in enumerate(round3.ESTIMATOR_NAMES):
    r = np.array([m.summary["stats"][f"{name}/ratio"] for m in ladder])
    ax.errorbar(x + 0.06 * (i - 2.5), r[:, 0], yerr=[r[:, 0] - r[:, 1], r[:, 2] - r[:, 0]],
                marker="o", capsize=2, label=name)
  ax.axhline(round3.HOLDS, color="grey", ls="--", lw=1, label="0.9: approximation holds")
  ax.set_xticks(x, [f"{m.point.gap}\n{_mean(m.summary['chunk_stats'], 'mismatch/kl_k3'):.1e}"
                    for m in ladder], fontsize=7)
  ax.set_xlabel("sampler format (k3 KL to the trainer per token)")
  ax.set_ylabel("cos(E estimator, true gradient)")
  return figures.save_figure(fig, [ax], path, "bias against the train-inference gap")


def plot_factor(points: dict[round3.Point, Measured], path: str) -> Optional[str]:
  """MiniRL's and MiniRL w/o IS's signal cosine at every measured point (95% intervals)."""
  ms = list(points.values())
  if not ms:
    return None
  fig, ax = figures.panels(1, width=max(6.0, 0.45 * len(ms)))
  x = np.arange(len(ms))
  for i, name in enumerate(("minirl", "minirl_no_is", "seq_tis")):
    r = np.array([m.summary["stats"][f"{name}/ratio"] for m in ms])
    ax.errorbar(x + 0.15 * (i - 1), r[:, 0], yerr=[r[:, 0] - r[:, 1], r[:, 2] - r[:, 0]],
                fmt="o", capsize=2, label=name)
  ax.axhline(round3.HOLDS, color="grey", ls="--", lw=1, label="0.9: approximation holds")
  ax.set_xticks(x, [m.point.name.replace("/", "\n") for m in ms], fontsize=6)
  ax.set_ylabel("cos(E estimator, true gradient)")
  return figures.save_figure(fig, [ax], path, "bias at every measured point")


def write(series: str, out: str, draws: int = 1000) -> dict:
  """Writes <out>/part2.md and the figures from the series in `series`."""
  points = load(series)
  os.makedirs(out, exist_ok=True)
  lines = markdown(points, draws)
  with open(os.path.join(out, "part2.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  made = [p for p in (plot_gap(points, os.path.join(out, "gap.png")),
                      plot_factor(points, os.path.join(out, "points.png"))) if p]
  return {"points": len(points), "figures": made}
