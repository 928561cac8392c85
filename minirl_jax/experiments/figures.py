"""A grid's figures, drawn off-screen from its runs (`report.load`) and readings (`rules`):
- curves.png: the paper's Figures 1-4 layout, one panel per tracked metric against the RL
  step, one row per level (a gap level, the off-policy N);
- levels.png: final accuracy and train-infer KL against the level (levelled grids);
- collapse.png: the share of each arm's runs not yet collapsed, against the RL step;
- contrasts.png: each accuracy reading's paired difference with its 95% interval.

Every axis carries its quantity as a label, legends sit outside the data, a colour is never
repeated within a figure, and every band or bar says what it is.
"""
import os
from typing import Optional

import numpy as np

from minirl_jax.experiments import layout
from minirl_jax.experiments import report
from minirl_jax.experiments import rules

# One panel per metric the paper tracks (PAPER.md "Metrics the paper tracks").
PANELS = (("reward/mean", "training reward"), ("eval/accuracy", "held-out accuracy"),
          ("policy/entropy", "token entropy"), ("mismatch/kl_k3", "train-infer KL (k3)"))


# Where every legend goes: right of the last panel, off the data.
OUTSIDE = dict(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def _subplots(rows: int, cols: int, width: float, height: float, **kwargs):
  import matplotlib
  matplotlib.use("Agg")  # off-screen
  from matplotlib import pyplot as plt
  return plt.subplots(rows, cols, figsize=(width * cols, height * rows), **kwargs)


def panels(n: int, width: float = 4.2, height: float = 3.4):
  """(figure, axes): n panels in a row (one Axes when n is 1)."""
  return _subplots(1, n, width, height)


def panel_grid(rows: int, cols: int, width: float = 4.2, height: float = 3.2):
  """(figure, axes [rows, cols])."""
  return _subplots(rows, cols, width, height, squeeze=False)


def save_figure(fig, axes, path: str, title: str = "", legend_size: int = 7,
                legend: Optional[str] = "outside") -> str:
  """Grid lines, the legend ("outside": right of the last panel, off the data; None: the
  caller placed it), the title; writes the PNG and closes."""
  from matplotlib import pyplot as plt
  for ax in axes:
    ax.grid(alpha=0.3)
  if legend == "outside":
    axes[-1].legend(fontsize=legend_size, **OUTSIDE)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def arm_colors(arms) -> dict:
  """One colour per arm, never repeated within a figure (tab10, then tab20, then a ramp)."""
  from matplotlib import colormaps
  arms = list(dict.fromkeys(arms))
  if len(arms) <= 10:
    return {a: colormaps["tab10"](i) for i, a in enumerate(arms)}
  if len(arms) <= 20:
    return {a: colormaps["tab20"](i) for i, a in enumerate(arms)}
  return {a: colormaps["turbo"](i / (len(arms) - 1)) for i, a in enumerate(arms)}


def _legend_outside(ax, colors: dict) -> None:
  from matplotlib.lines import Line2D
  ax.legend(handles=[Line2D([], [], color=c, label=name) for name, c in colors.items()],
            fontsize=7, **OUTSIDE)


def _over_seeds(runs: list[report.Run], key: str):
  """(steps, mean, min, max) of `key` over the seeds that reached each step (a run that
  stopped at its collapse leaves the later steps to the others)."""
  by_step = {}
  for run in runs:
    for step, value in report.trajectory(run.records, key):
      by_step.setdefault(step, []).append(value)
  steps = sorted(by_step)
  values = [np.array(by_step[s]) for s in steps]
  return (steps, [v.mean() for v in values], [v.min() for v in values],
          [v.max() for v in values])


def plot_arms(runs: list[report.Run], path: str, title: str = "") -> str:
  """The four panels against RL step: per arm the mean over its seeds with a min-max band.
  Arms named LEVEL/VARIANT (a gap level, the off-policy N) get one row of panels per
  level, each variant one colour throughout."""
  grouped = report.by_arm(runs)
  levels = list(dict.fromkeys(layout.split_arm(arm)[0] for arm in grouped))
  colors = arm_colors(layout.split_arm(arm)[1] for arm in grouped)
  fig, axes = panel_grid(len(levels), len(PANELS))
  for arm, arm_runs in grouped.items():
    level, variant = layout.split_arm(arm)
    for ax, (key, label) in zip(axes[levels.index(level)], PANELS):
      steps, mean, low, high = _over_seeds(arm_runs, key)
      if not steps:
        continue
      ax.plot(steps, mean, color=colors[variant])
      ax.fill_between(steps, low, high, alpha=0.2, color=colors[variant])
      ax.set(xlabel="RL step", ylabel=f"{label}, {level}" if level else label)
  _legend_outside(axes[0, -1], colors)
  note = "lines: mean over seeds still running; bands: min-max over them"
  return save_figure(fig, list(axes.ravel()), path, f"{title}; {note}" if title else note,
                     legend=None)


def by_level(rows: list[report.ArmRow]):
  """Arms named LEVEL/VARIANT (the gap grid's sampler formats, the off-policy grid's N):
  (the levels in grid order, {variant: [(level index, row)]}); None for other grids."""
  if not rows or not all(layout.split_arm(r.arm)[0] for r in rows):
    return None
  levels, variants = {}, {}
  for r in rows:
    level, variant = layout.split_arm(r.arm)
    x = levels.setdefault(level, len(levels))
    variants.setdefault(variant, []).append((x, r))
  return list(levels), variants


def plot_levels(rows: list[report.ArmRow], path: str, title: str = "") -> Optional[str]:
  """Final held-out accuracy (error bar = std over seeds) and max train-infer KL against
  the level, one line per variant; None unless the arms are named LEVEL/VARIANT."""
  grouped = by_level(rows)
  if grouped is None:
    return None
  levels, variants = grouped
  colors = arm_colors(variants)
  fig, (acc_ax, kl_ax) = panels(2, width=5.0, height=3.6)
  for variant, points in variants.items():
    xs = [x for x, _ in points]
    acc_ax.errorbar(xs, [r.final_accuracy for _, r in points], marker="o", capsize=3,
                    yerr=[r.final_accuracy_std for _, r in points], color=colors[variant])
    kl_ax.plot(xs, [r.max_kl for _, r in points], marker="o", color=colors[variant])
  acc_ax.set(ylabel="final held-out accuracy\n(mean; bars: std over seeds)")
  kl_ax.set(ylabel="max train-infer KL (k3),\nmean over seeds")
  if all(r.max_kl > 0 for r in rows):
    kl_ax.set_yscale("log")  # labels within a decade, unlike symlog
  else:  # the zero-gap control's KL is exactly 0
    kl_ax.set_yscale("symlog", linthresh=1e-14)
  for ax in (acc_ax, kl_ax):
    ax.set_xticks(range(len(levels)), levels)
  _legend_outside(kl_ax, colors)
  return save_figure(fig, (acc_ax, kl_ax), path, title, legend=None)


DODGE = 0.01  # the collapse figure lifts arm i by DODGE * i, so equal curves stay visible


def surviving(runs: list[report.Run], steps: int) -> np.ndarray:
  """Share of `runs` not yet collapsed after each RL step 0..`steps`."""
  alive = np.ones((len(runs), steps + 1))
  for i, run in enumerate(runs):
    if run.collapse_step is not None:
      alive[i, run.collapse_step:] = 0
  return alive.mean(axis=0)


def plot_collapses(runs: list[report.Run], path: str, title: str = "") -> str:
  """Per arm, the share of its runs not yet collapsed against the RL step (a step
  function; the paper's "collapses early" read off the x axis)."""
  grouped = report.by_arm(runs)
  last = max((r["step"] for run in runs for r in run.records), default=0)
  colors = arm_colors(grouped)
  fig, ax = panels(1, width=7.0, height=3.6)
  styles = ("-", "--", "-.", ":")
  for i, (arm, arm_runs) in enumerate(grouped.items()):
    ax.step(range(last + 1), surviving(arm_runs, last) + DODGE * i, where="post",
            color=colors[arm], linestyle=styles[i % len(styles)],
            label=f"{arm} ({len(arm_runs)} runs)")
  ax.set(xlabel="RL step", ylabel="share of runs not yet collapsed\n"
         f"(arm i drawn {DODGE:g} x i higher)", ylim=(-0.03, 1.05 + DODGE * len(grouped)))
  return save_figure(fig, [ax], path, title)


def plot_contrasts(readings, path: str, title: str = "") -> Optional[str]:
  """Each accuracy reading (`rules.Reading` with an interval): its paired difference with
  the 95% t interval, against 0 and the smallest difference that matters; None when no
  reading has an interval yet."""
  rows = [r for r in readings if r.interval is not None]
  if not rows:
    return None
  fig, ax = panels(1, width=7.5, height=0.55 * len(rows) + 1.4)
  colors = arm_colors(r.question for r in rows)
  for y, r in enumerate(rows):
    mean, low, high = r.interval
    ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                color=colors[r.question])
    ax.annotate(r.verdict, (high, y), xytext=(6, 0), textcoords="offset points",
                va="center", fontsize=8)
  low = min(min(r.interval[1] for r in rows), -rules.SMALLEST_EFFECT)
  high = max(max(r.interval[2] for r in rows), rules.SMALLEST_EFFECT)
  ax.set_xlim(low - 0.1 * (high - low), high + 0.35 * (high - low))  # room for the verdicts
  ax.axvline(0.0, color="black", linewidth=0.8)
  for x in (-rules.SMALLEST_EFFECT, rules.SMALLEST_EFFECT):
    ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
  ax.set_yticks(range(len(rows)), [r.question for r in rows], fontsize=8)
  ax.invert_yaxis()
  ax.set(xlabel="paired difference of scores, first arm minus second\n"
                "(dot: mean over seeds; bar: 95% t interval; dashed: +-0.05, the effect that "
                "matters)")
  return save_figure(fig, [ax], path, title, legend=None)


def write(runs: list[report.Run], rows: list[report.ArmRow], readings, workdir: str,
          title: str) -> dict:
  """Every figure of a grid into `workdir`; returns their paths (None: not drawn)."""
  return {"figure": plot_arms(runs, os.path.join(workdir, "curves.png"), title),
          "levels_figure": plot_levels(rows, os.path.join(workdir, "levels.png"), title),
          "collapse_figure": plot_collapses(runs, os.path.join(workdir, "collapse.png"),
                                            title),
          "contrasts_figure": plot_contrasts(readings or [],
                                             os.path.join(workdir, "contrasts.png"), title)}
