"""A grid's runs read once (`Run`: RL records, collapse step by `minirl_jax.collapse`, wall
time) and its table (CSV, Markdown), one row per arm; the series are `series.py`'s, the
figures `figures.py`'s.
"""
import csv
import dataclasses
import os
from typing import Callable, Optional

import numpy as np

from minirl_jax import collapse
from minirl_jax import metrics as metrics_lib
from minirl_jax.experiments import layout

# `design.Grid.scored`: a run -> the (step, accuracy) evaluations its score averages
Scored = Callable[["Run"], list[tuple[int, float]]]


def rl_records(workdir: str) -> list[dict]:
  return [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["stage"] == "rl"]


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run, read once for the table, the figures, the early warning and the
  verdicts."""
  arm: str
  seed: int
  records: list[dict]  # its RL records
  collapse_step: Optional[int]
  wall_s: float  # the runner's wall time (nan where it is not known)

  @property
  def name(self) -> str:
    return layout.run_name(self.arm, self.seed)

  @property
  def accuracies(self) -> list[float]:
    """Held-out accuracy at each evaluation, RL step 0 first."""
    return [r["eval/accuracy"] for r in self.records if "eval/accuracy" in r]


def load(run_dirs: dict[str, list[str]]) -> list[Run]:
  """Each run's RL records, collapse step and wall time, arm by arm (run dirs ARM/seed_K)."""
  runs = []
  for arm, dirs in run_dirs.items():
    for run_dir in dirs:
      records = rl_records(run_dir)
      runs.append(Run(arm, layout.parse_run_name(run_dir)[1], records,
                      collapse.collapse_step(records),
                      layout.summary(run_dir).get("wall_s", float("nan"))))
  return runs


def by_arm(runs: list[Run]) -> dict[str, list[Run]]:
  """The runs grouped by arm, arms in the order they first appear."""
  grouped = {}
  for run in runs:
    grouped.setdefault(run.arm, []).append(run)
  return grouped


def score(run: Run, scored: Scored) -> float:
  """The run's score: the mean of the evaluations its grid's `scored` reads."""
  return float(np.mean([accuracy for _, accuracy in scored(run)]))


@dataclasses.dataclass
class ArmRow:
  arm: str
  seeds: int
  start_accuracy: float  # the first evaluation, RL step 0: where the cold start stands
  start_accuracy_std: float
  peak_accuracy: float
  peak_accuracy_std: float
  final_accuracy: float
  final_accuracy_std: float
  collapsed: int
  collapse_step_median: Optional[float]
  final_entropy: float
  max_kl: float
  max_staleness: float  # |log pi_theta - log pi_old| per token, the step's mean: 0 at N = 1
  wall_s: float
  score: Optional[float] = None  # `score`, mean over seeds (None: the grid has no score)
  score_std: Optional[float] = None


def trajectory(records, key) -> list[tuple[int, float]]:
  """(step, value) of `key` over the records that have it."""
  return [(r["step"], r[key]) for r in records if key in r]


def _mean_of_max(records, key) -> float:
  """Each run's largest value of `key` over its RL steps, averaged over runs."""
  return float(np.mean([max((v for _, v in trajectory(r, key)), default=float("nan"))
                        for r in records]))


def _sd(values, ddof: int) -> float:
  """The SD over seeds: population (ddof = 0) or sample (ddof = 1; nan for one seed)."""
  return float(np.std(values, ddof=ddof)) if len(values) > ddof else float("nan")


def arm_row(arm: str, runs: list[Run], scored: Optional[Scored] = None,
            ddof: int = 0) -> ArmRow:
  """One arm's table row from its runs (all of the same arm); its SDs over seeds with `ddof`
  (0: population, 1: sample)."""
  records = [run.records for run in runs]
  accs = [run.accuracies for run in runs]
  starts, peaks, finals = [a[0] for a in accs], [max(a) for a in accs], [a[-1] for a in accs]
  collapsed = [run.collapse_step for run in runs if run.collapse_step is not None]
  scores = [score(run, scored) for run in runs] if scored else None
  return ArmRow(
      arm=arm, seeds=len(runs), start_accuracy=float(np.mean(starts)),
      start_accuracy_std=_sd(starts, ddof), peak_accuracy=float(np.mean(peaks)),
      peak_accuracy_std=_sd(peaks, ddof), final_accuracy=float(np.mean(finals)),
      final_accuracy_std=_sd(finals, ddof), collapsed=len(collapsed),
      collapse_step_median=float(np.median(collapsed)) if collapsed else None,
      final_entropy=float(np.mean([trajectory(r, "policy/entropy")[-1][1] for r in records])),
      max_kl=_mean_of_max(records, "mismatch/kl_k3"),
      max_staleness=_mean_of_max(records, "staleness/abs_log_pi_pi_old"),
      wall_s=float(np.mean([run.wall_s for run in runs])),
      score=float(np.mean(scores)) if scores else None,
      score_std=_sd(scores, ddof) if scores else None)


def finished_runs(grid, seeds: int, workdir: str) -> dict[str, list[str]]:
  """Each arm's finished runs (seeds 0..seeds-1 with a summary) of a `design.Grid`; arms
  with none are left out, so a grid cut short reports what it has and the table says how
  many seeds each had."""
  dirs = {}
  for arm in grid.arms:
    finished = [d for d in (layout.run_dir(workdir, arm.name, k) for k in range(seeds))
                if layout.done(d)]
    if finished:
      dirs[arm.name] = finished
  return dirs


def write_table(runs: list[Run], workdir: str, scored: Optional[Scored] = None,
                sample_sd: bool = False) -> list[ArmRow]:
  """DIR/table.csv and DIR/table.md, one row per arm; a score column where `scored` is
  given (`design.Grid.scored`); ± is the population SD over seeds, or the sample SD
  (`design.Grid.sample_sd`), which table.md then names under the table."""
  rows = [arm_row(arm, arm_runs, scored, ddof=int(sample_sd))
          for arm, arm_runs in by_arm(runs).items()]
  fields = [f.name for f in dataclasses.fields(ArmRow)]
  with open(os.path.join(workdir, "table.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)
  lines = ["| arm | seeds | start acc | peak acc | final acc | "
           + ("score (full evaluations) | " if scored else "")
           + "collapsed (step) | final entropy | max KL | max staleness | wall s |",
           "|---|---|---|---|---|" + ("---|" if scored else "") + "---|---|---|---|---|"]
  for r in rows:
    when = f" ({r.collapse_step_median:.0f})" if r.collapsed else ""
    score_cell = f"{r.score:.3f} ± {r.score_std:.3f} | " if scored else ""
    lines.append(
        f"| {r.arm} | {r.seeds} | {r.start_accuracy:.3f} ± {r.start_accuracy_std:.3f} | "
        f"{r.peak_accuracy:.3f} ± {r.peak_accuracy_std:.3f} | "
        f"{r.final_accuracy:.3f} ± {r.final_accuracy_std:.3f} | {score_cell}"
        f"{r.collapsed}/{r.seeds}{when}"
        f" | {r.final_entropy:.3g} | {r.max_kl:.2e} | {r.max_staleness:.2e} | {r.wall_s:.0f} |")
  if sample_sd:
    lines += ["", "± : the sample SD over seeds (ddof = 1)."]
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return rows


def title(grid, seeds: int, rows: list[ArmRow]) -> str:
  """What a figure of a grid read mid-run shows: how many of the seeds are in."""
  counts = sorted({r.seeds for r in rows}) or [0]
  have = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  return f"{grid.name}: mean over {have} of {seeds} seed(s)"
