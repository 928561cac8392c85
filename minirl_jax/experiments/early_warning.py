"""Early warning: which signal crossed its threshold, and how many RL steps before a run
collapsed (`collapse.collapse_step`).

Thresholds, fixed before any grid was run: a signal's baseline is its median over RL steps
1..BASELINE_STEPS; it crosses at the first later step where it has deteriorated by a factor
of FACTOR from that baseline, in the direction that signals trouble. A signal logged less
often than every step (the gradient cosine: every `objective.grad_cosine_every` steps) has no
value in that window; its baseline is its first value (a fix made after the on-policy grid,
whose report had never evaluated the cosine). The signals:
- first-order error (`is/first_order_error`): rises above FACTOR x baseline (the paper's
  theory: J_token is a first-order approximation of J_seq while this error is small);
- gradient cosine J_token vs J_seq on the last mini-batch (`is/grad_cosine_token_seq_last`):
  its distance from 1 grows above FACTOR x the baseline distance;
- train-infer KL (`mismatch/kl_k3`): rises above FACTOR x baseline;
- entropy (`policy/entropy`): falls below baseline / FACTOR.
The lead of a signal is collapse step - crossing step (positive: it warned first).
"""
import csv
import dataclasses
import os
from typing import Optional

import numpy as np

from minirl_jax.experiments import figures
from minirl_jax.experiments import report

BASELINE_STEPS = 5
FACTOR = 2.0
# (metric, label, how a value becomes "badness" that rises with trouble)
SIGNALS = (("is/first_order_error", "first-order error", lambda v: v),
           ("is/grad_cosine_token_seq_last", "1 - grad cosine (last mini-batch)",
            lambda v: 1.0 - v),
           ("mismatch/kl_k3", "train-infer KL (k3)", lambda v: v),
           ("policy/entropy", "1 / entropy", lambda v: 1.0 / max(v, 1e-12)))


@dataclasses.dataclass
class Lead:
  run: str
  collapse_step: int
  leads: dict[str, Optional[int]]  # signal metric -> lead in steps, None: never crossed


def badness(records, metric, transform) -> list[tuple[int, float]]:
  return [(r["step"], transform(r[metric])) for r in records
          if r["step"] > 0 and metric in r]


def baseline(series: list[tuple[int, float]]) -> Optional[tuple[float, int]]:
  """(baseline badness, last step of its window), or None for an empty series: the median
  over steps 1..BASELINE_STEPS, else the first value (module docstring)."""
  window = [(step, v) for step, v in series if step <= BASELINE_STEPS] or series[:1]
  if not window:
    return None
  return float(np.median([v for _, v in window])), max(BASELINE_STEPS, window[-1][0])


def crossing_step(records: list[dict], metric: str, transform=lambda v: v,
                  factor: float = FACTOR, before: Optional[int] = None) -> Optional[int]:
  """The one definition of a crossing: the first step after the baseline window (and
  before step `before`) where the signal's badness is positive and exceeds `factor` x its
  baseline (module docstring), or None.

  Args:
    records: a run's RL records.
    metric: the signal's metric.
    transform: its value -> badness (SIGNALS).
    factor: the threshold; FACTOR is the one stated before any grid ran.
    before: only crossings before this step count (a collapse step: a warning must come
      first); None: any step.
  """
  series = badness(records, metric, transform)
  base = baseline(series)
  if base is None:
    return None
  value_0, window_end = base
  for step, value in series:
    if before is not None and step >= before:
      return None
    if step > window_end and value > factor * value_0 and value > 0:
      return step
  return None


def warnings_for(runs: list[report.Run]) -> list[Lead]:
  """One row per collapsed run."""
  rows = []
  for run in runs:
    if run.collapse_step is None:
      continue
    leads = {}
    for metric, _, transform in SIGNALS:
      crossed = crossing_step(run.records, metric, transform)
      leads[metric] = None if crossed is None else run.collapse_step - crossed
    rows.append(Lead(run.name, run.collapse_step, leads))
  return rows


def false_alarms(runs: list[report.Run]) -> dict[str, tuple[int, int]]:
  """Per signal (crossed, runs) over the runs that never collapsed: how often a signal
  crosses without a collapse following, which a lead alone does not show."""
  stable = [run.records for run in runs if run.collapse_step is None]
  return {metric: (sum(crossing_step(r, metric, transform) is not None for r in stable),
                   len(stable)) for metric, _, transform in SIGNALS}


def write(runs: list[report.Run], workdir: str) -> dict:
  """DIR/early_warning.{csv,md} and DIR/early_warning.png; returns their paths."""
  rows = warnings_for(runs)
  metrics = [m for m, _, _ in SIGNALS]
  with open(os.path.join(workdir, "early_warning.csv"), "w", newline="",
            encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["run", "collapse_step", *metrics])
    writer.writerows([r.run, r.collapse_step, *(r.leads[m] for m in metrics)] for r in rows)
  fmt = lambda lead: "never" if lead is None else f"{lead:+d}"
  lines = ["| run | collapse step | " + " | ".join(label for _, label, _ in SIGNALS) + " |",
           "|---|---|" + "---|" * len(SIGNALS)]
  lines += [f"| {r.run} | {r.collapse_step} | " + " | ".join(fmt(r.leads[m]) for m in metrics)
            + " |" for r in rows]
  if not rows:
    lines.append("| (no run collapsed) |" + " |" * (len(SIGNALS) + 1))
  alarms = false_alarms(runs)
  lines.append("| runs that never collapsed: crossed anyway | - | "
               + " | ".join(f"{alarms[m][0]}/{alarms[m][1]}" for m in metrics) + " |")
  with open(os.path.join(workdir, "early_warning.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  figure = _plot(runs, os.path.join(workdir, "early_warning.png"))
  return {"early_warning_md": os.path.join(workdir, "early_warning.md"),
          "early_warning_csv": os.path.join(workdir, "early_warning.csv"),
          "early_warning_figure": figure, "collapsed_runs": len(rows),
          "false_alarms": alarms}


def _plot(runs: list[report.Run], path: str) -> str:
  """Each signal's badness over its baseline against RL step, one line per run (one colour
  per arm); the threshold FACTOR dashed; a collapsed run's collapse step marked with an x."""
  fig, axes = figures.panels(len(SIGNALS))
  colors, labelled = figures.arm_colors(run.arm for run in runs), set()
  for run in runs:
    color = colors[run.arm]
    label = None if run.arm in labelled else run.arm
    labelled.add(run.arm)
    for ax, (metric, title, transform) in zip(axes, SIGNALS):
      series = badness(run.records, metric, transform)
      base = baseline(series)
      if base is None or base[0] <= 0:
        continue
      steps = [s for s, _ in series]
      ratio = [v / base[0] for _, v in series]
      ax.plot(steps, ratio, color=color, alpha=0.7, lw=1, label=label)
      if run.collapse_step in steps:
        ax.plot(run.collapse_step, ratio[steps.index(run.collapse_step)], "x", color=color,
                ms=8)
      ax.set(xlabel="RL step", ylabel=f"{title} / its baseline", yscale="log")
  for ax in axes:
    ax.axhline(FACTOR, ls="--", color="k", lw=0.8)
  return figures.save_figure(fig, axes, path, legend_size=6)
