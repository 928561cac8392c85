"""Early warning as a classifier: how well each signal tells that a run will collapse within
the next HORIZON RL steps, over every threshold (docs/results/round2.md states HORIZON
before round 2's runs).

Each scored step is one example: a run's step after its signal's baseline window
(`early_warning.baseline`) and before its collapse step, scored by the signal's badness over
its baseline (the quantity `early_warning` thresholds at 2x), labelled positive when the run
collapses within the next HORIZON steps. Over all thresholds this gives the ROC and its AUC
(the probability that a positive step outscores a negative one); at each threshold, the
lead time is how many steps before its collapse a collapsed run first crossed it.
"""
import dataclasses
import os
from typing import Optional

import numpy as np
from scipy import stats

from minirl_jax.experiments import early_warning
from minirl_jax.experiments import figures
from minirl_jax.experiments import report

HORIZON = 10
SIGNALS = early_warning.SIGNALS + (
    ("moe/routing_disagreement", "routing disagreement", lambda v: v),)
ROUND1_RULE = early_warning.FACTOR  # the threshold round 1 stated


@dataclasses.dataclass(frozen=True)
class Examples:
  """One signal's scored steps over many runs."""
  scores: np.ndarray   # badness / baseline
  labels: np.ndarray   # bool: the run collapses within HORIZON steps
  runs: int            # runs with a baseline for this signal


def examples(runs: list[report.Run], metric: str, transform,
             horizon: int = HORIZON) -> Examples:
  scores, labels, used = [], [], 0
  for run in runs:
    series = early_warning.badness(run.records, metric, transform)
    base = early_warning.baseline(series)
    if base is None or base[0] <= 0:
      continue
    used += 1
    value_0, window_end = base
    for step, value in series:
      if step <= window_end:
        continue
      if run.collapse_step is not None and step >= run.collapse_step:
        break
      scores.append(value / value_0)
      labels.append(run.collapse_step is not None and run.collapse_step - step <= horizon)
  return Examples(np.asarray(scores, float), np.asarray(labels, bool), used)


def auc(ex: Examples) -> float:
  """P(a positive step scores above a negative one), ties counted half (Mann-Whitney)."""
  pos, neg = ex.scores[ex.labels], ex.scores[~ex.labels]
  if not len(pos) or not len(neg):
    return float("nan")
  ranks = stats.rankdata(np.concatenate([pos, neg]))  # ties: their mean rank
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def curve(ex: Examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false-positive rate, true-positive rate, threshold), thresholds high to low: a step
  is flagged when its score >= the threshold."""
  thresholds = np.unique(ex.scores)[::-1]
  pos, neg = max(ex.labels.sum(), 1), max((~ex.labels).sum(), 1)
  tpr = np.array([np.sum(ex.scores[ex.labels] >= t) / pos for t in thresholds])
  fpr = np.array([np.sum(ex.scores[~ex.labels] >= t) / neg for t in thresholds])
  return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def rates_at(ex: Examples, threshold: float) -> tuple[float, float]:
  """(true-positive rate, false-positive rate) of flagging steps scoring >= threshold."""
  flagged = ex.scores >= threshold
  return (float(flagged[ex.labels].mean()) if ex.labels.any() else float("nan"),
          float(flagged[~ex.labels].mean()) if (~ex.labels).any() else float("nan"))


def leads(runs: list[report.Run], metric: str, transform, threshold: float) -> list[Optional[int]]:
  """Per collapsed run: collapse step - the step it crossed `threshold`
  (`early_warning.crossing_step`), None if it did not before collapsing."""
  out = []
  for run in runs:
    if run.collapse_step is None:
      continue
    crossed = early_warning.crossing_step(run.records, metric, transform, threshold,
                                          before=run.collapse_step)
    out.append(None if crossed is None else run.collapse_step - crossed)
  return out


def _collapsed(runs: list[report.Run]) -> int:
  return sum(run.collapse_step is not None for run in runs)


def auc_by_group(groups: dict[str, list[report.Run]]) -> list[str]:
  """Markdown rows: each signal's AUC within each group of runs (e.g. per round), so a pooled
  AUC can be told from one that a single group carries."""
  lines = ["| signal | " + " | ".join(f"AUC, {name} ({len(runs)} runs, {_collapsed(runs)} "
                                      f"collapsed)" for name, runs in groups.items()) + " |",
           "|---|" + "---|" * len(groups)]
  for metric, label, transform in SIGNALS:
    cells = []
    for runs in groups.values():
      ex = examples(runs, metric, transform)
      cells.append(f"{auc(ex):.3f} ({int(ex.labels.sum())} positive steps)")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def write(runs: list[report.Run], workdir: str, title: str = "",
          groups: Optional[dict[str, list[report.Run]]] = None) -> dict:
  """DIR/roc.md (per signal: examples, AUC, the round-1 threshold's rates and leads; with
  `groups`, each group's AUC too) and DIR/roc.png (the curves over all runs); returns the
  per-signal figures."""
  rows = {}
  fig, ax = figures.panels(1, width=8.0, height=4.6)
  axes = [ax]
  for i, (metric, label, transform) in enumerate(SIGNALS):
    ex = examples(runs, metric, transform)
    tpr, fpr = rates_at(ex, ROUND1_RULE)
    lead = [x for x in leads(runs, metric, transform, ROUND1_RULE) if x is not None]
    rows[metric] = dict(label=label, runs=ex.runs, positives=int(ex.labels.sum()),
                        negatives=int((~ex.labels).sum()), auc=auc(ex),
                        tpr_at_2x=tpr, fpr_at_2x=fpr, warned_runs=len(lead),
                        median_lead=float(np.median(lead)) if lead else None)
    if ex.labels.any() and (~ex.labels).any():
      x, y, _ = curve(ex)
      ax.plot(x, y, color=f"C{i}", lw=1.5, label=f"{label} (AUC {rows[metric]['auc']:.2f})")
  ax.plot([0, 1], [0, 1], ls=":", color="k", lw=0.8, label="chance")
  ax.set(xlabel="false-positive rate (steps not followed by a collapse)",
         ylabel=f"true-positive rate (steps <= {HORIZON} before a collapse)")
  figure = figures.save_figure(fig, axes, os.path.join(workdir, "roc.png"), title,
                               legend_size=8, legend="outside")
  collapsed = _collapsed(runs)
  lines = [f"{len(runs)} runs, {collapsed} collapsed; a step is positive when its run "
           f"collapses within the next {HORIZON} steps.", "",
           "| signal (badness / baseline) | runs | positive steps | negative steps | AUC | "
           "at 2x: true-positive rate | at 2x: false-positive rate | collapsed runs warned "
           "at 2x | median lead (steps) |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows.values():
    lead = "-" if r["median_lead"] is None else f"{r['median_lead']:g}"
    lines.append(f"| {r['label']} | {r['runs']} | {r['positives']} | {r['negatives']} | "
                 f"{r['auc']:.3f} | {r['tpr_at_2x']:.3f} | {r['fpr_at_2x']:.3f} | "
                 f"{r['warned_runs']}/{collapsed} | {lead} |")
  if groups:
    lines += ["", "Within each group (AUC is nan where a group has no positive step):", "",
              *auc_by_group(groups)]
  with open(os.path.join(workdir, "roc.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return {"roc_md": os.path.join(workdir, "roc.md"), "roc_figure": figure, "signals": rows}
