"""A grid's runs read once (`Run`: records, collapse step by `minirl_jax.collapse`, round
2's score), its table (CSV, Markdown) and per-step series (CSV); the figures are
`figures.py`'s.
"""
import csv
import dataclasses
import json
import os
import re
from typing import Optional

import numpy as np

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax import metrics as metrics_lib
from minirl_jax.experiments import grids
from minirl_jax.experiments import runner

# The per-step metrics DIR/series.csv keeps for every run: what the results pages quote per
# seed (trajectories, KL, entropy, masking, the early-warning signals) beyond the tables.
SERIES = ("reward/mean", "eval/accuracy", "policy/entropy", "mismatch/kl_k3",
          "moe/routing_disagreement", "staleness/abs_log_pi_pi_old", "is/first_order_error",
          "is/grad_cosine_token_seq_last", "is/frac_truncated", "is/seq_frac_masked",
          "rollout/length_mean", "optim/skipped")
# 6 significant digits, except where a reading rule looks at the digits past them: the
# early warning reads 1 - cosine, and a cosine of 0.99999912 written as 1 reads 0
# (round 1's series gave 14/27 false alarms where the runs had 16/27), 9 digits keep any
# float32 exactly; accuracies are k / problems, whose exact value the collapse rule's
# "below half the peak" compares (17/128 = 0.1328125 written as 0.132812 is below half of
# 34/128: round 1's series moved one collapse from step 20 to 10), 12 digits keep them.
DIGITS = {"is/grad_cosine_token_seq_last": 9, "eval/accuracy": 12, "eval/accuracy_full": 12}
# Columns written only when a run has them, so earlier grids' series remake byte-identical.
OPTIONAL_SERIES = ("eval/accuracy_full",)


def rl_records(workdir: str) -> list[dict]:
  return [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["stage"] == "rl"]


def runner_summary(run_dir: str) -> dict:
  """The run's summary.json ({} for a run made outside a grid, e.g. in a notebook)."""
  if not runner.done(run_dir):
    return {}
  with open(os.path.join(run_dir, runner.SUMMARY), encoding="utf-8") as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run, read once for the table, the figures, the early warning and the
  verdicts."""
  arm: str
  name: str  # ARM/seed_K
  seed: Optional[int]  # K of a grid's seed_K run dir; None for another dir
  records: list[dict]  # its RL records
  collapse_step: Optional[int]
  wall_s: float  # the runner's wall time (nan for a run made outside a grid)

  @property
  def accuracies(self) -> list[float]:
    """Held-out accuracy at each evaluation, RL step 0 first."""
    return [r["eval/accuracy"] for r in self.records if "eval/accuracy" in r]

  @property
  def scored_evaluations(self) -> list[tuple[int, float]]:
    """(step, accuracy) of the full evaluations round 2's score reads
    (docs/results/round2.md): the last two, before the collapse step for a run that
    collapsed (step 0's when it collapsed before any other); [] without full evaluations
    (round 1)."""
    full = [(r["step"], r["eval/accuracy_full"]) for r in self.records
            if "eval/accuracy_full" in r]
    if self.collapse_step is not None:
      full = [(s, a) for s, a in full if s < self.collapse_step] or full[:1]
    return full[-2:]

  @property
  def score(self) -> float:
    """What the verdicts compare: the mean of `scored_evaluations`; without full
    evaluations (round 1), the last evaluation."""
    read = self.scored_evaluations
    return float(np.mean([a for _, a in read])) if read else self.accuracies[-1]


def load(run_dirs: dict[str, list[str]]) -> list[Run]:
  """Each run's RL records, collapse step and wall time, arm by arm."""
  runs = []
  for arm, dirs in run_dirs.items():
    for run_dir in dirs:
      records, base = rl_records(run_dir), os.path.basename(run_dir)
      seed = int(base[len("seed_"):]) if re.fullmatch(r"seed_\d+", base) else None
      runs.append(Run(arm, f"{arm}/{base}", seed, records, collapse.collapse_step(records),
                      runner_summary(run_dir).get("wall_s", float("nan"))))
  return runs


def by_arm(runs: list[Run]) -> dict[str, list[Run]]:
  """The runs grouped by arm, arms in the order they first appear."""
  grouped = {}
  for run in runs:
    grouped.setdefault(run.arm, []).append(run)
  return grouped


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
  score: Optional[float] = None  # `Run.score`, mean over seeds (None: no full evaluations)
  score_std: Optional[float] = None


def trajectory(records, key) -> list[tuple[int, float]]:
  """(step, value) of `key` over the records that have it."""
  return [(r["step"], r[key]) for r in records if key in r]


def _mean_of_max(records, key) -> float:
  """Each run's largest value of `key` over its RL steps, averaged over runs."""
  return float(np.mean([max((v for _, v in trajectory(r, key)), default=float("nan"))
                        for r in records]))


def arm_row(arm: str, runs: list[Run]) -> ArmRow:
  """One arm's table row from its runs (all of the same arm)."""
  records = [run.records for run in runs]
  accs = [run.accuracies for run in runs]
  starts, peaks, finals = [a[0] for a in accs], [max(a) for a in accs], [a[-1] for a in accs]
  collapsed = [run.collapse_step for run in runs if run.collapse_step is not None]
  return ArmRow(
      arm=arm, seeds=len(runs), start_accuracy=float(np.mean(starts)),
      start_accuracy_std=float(np.std(starts)), peak_accuracy=float(np.mean(peaks)),
      peak_accuracy_std=float(np.std(peaks)), final_accuracy=float(np.mean(finals)),
      final_accuracy_std=float(np.std(finals)), collapsed=len(collapsed),
      collapse_step_median=float(np.median(collapsed)) if collapsed else None,
      final_entropy=float(np.mean([trajectory(r, "policy/entropy")[-1][1] for r in records])),
      max_kl=_mean_of_max(records, "mismatch/kl_k3"),
      max_staleness=_mean_of_max(records, "staleness/abs_log_pi_pi_old"),
      wall_s=float(np.mean([run.wall_s for run in runs])),
      **_score_columns(runs))


def _score_columns(runs: list[Run]) -> dict:
  if not any(run.scored_evaluations for run in runs):
    return {}
  scores = [run.score for run in runs]
  return {"score": float(np.mean(scores)), "score_std": float(np.std(scores))}


def finished_runs(grid: grids.Grid, seeds: int, workdir: str) -> dict[str, list[str]]:
  """Each arm's finished runs (seeds 0..seeds-1 with a summary); arms with none are left
  out, so a grid cut short reports what it has and the table says how many seeds each had."""
  dirs = {}
  for arm in grid.arms:
    finished = [d for d in (runner.run_dir(workdir, arm.name, k) for k in range(seeds))
                if runner.done(d)]
    if finished:
      dirs[arm.name] = finished
  return dirs


def write_table(runs: list[Run], workdir: str) -> list[ArmRow]:
  """DIR/table.csv and DIR/table.md, one row per arm."""
  rows = [arm_row(arm, arm_runs) for arm, arm_runs in by_arm(runs).items()]
  fields = [f.name for f in dataclasses.fields(ArmRow)]
  with open(os.path.join(workdir, "table.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)
  scored = any(r.score is not None for r in rows)  # round 2: the full evaluations
  lines = ["| arm | seeds | start acc | peak acc | final acc | "
           + ("score (full evaluations) | " if scored else "")
           + "collapsed (step) | final entropy | max KL | max staleness | wall s |",
           "|---|---|---|---|---|" + ("---|" if scored else "") + "---|---|---|---|---|"]
  for r in rows:
    when = f" ({r.collapse_step_median:.0f})" if r.collapsed else ""
    score = ("" if not scored else "- | " if r.score is None else
             f"{r.score:.3f} ± {r.score_std:.3f} | ")
    lines.append(
        f"| {r.arm} | {r.seeds} | {r.start_accuracy:.3f} ± {r.start_accuracy_std:.3f} | "
        f"{r.peak_accuracy:.3f} ± {r.peak_accuracy_std:.3f} | "
        f"{r.final_accuracy:.3f} ± {r.final_accuracy_std:.3f} | {score}"
        f"{r.collapsed}/{r.seeds}{when}"
        f" | {r.final_entropy:.3g} | {r.max_kl:.2e} | {r.max_staleness:.2e} | {r.wall_s:.0f} |")
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return rows


def write_series(runs: list[Run], workdir: str) -> str:
  """DIR/series.csv: one row per (run, RL step) with the SERIES metrics (empty where a
  step did not log one), so every per-seed number can be checked without the runs."""
  path = os.path.join(workdir, "series.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    keys = SERIES + tuple(k for k in OPTIONAL_SERIES
                          if any(k in r for run in runs for r in run.records))
    writer.writerow(["run", "step", *keys])
    for run in runs:
      for r in run.records:
        writer.writerow([run.name, r["step"],
                         *(f"{r[key]:.{DIGITS.get(key, 6)}g}" if key in r else ""
                           for key in keys)])
  return path


def read_series(path: str) -> dict[str, list[dict]]:
  """The RL records of each run in a series.csv (write_series' inverse, 6 digits kept)."""
  records: dict[str, list[dict]] = {}
  with open(path, encoding="utf-8") as f:
    for row in csv.DictReader(f):
      records.setdefault(row.pop("run"), []).append(
          {"step": int(row.pop("step")), **{k: float(v) for k, v in row.items() if v}})
  return records


def runs_from_series(path: str, prefix: str = "") -> list[Run]:
  """The runs of a committed series.csv (`prefix` + their names), for analyses across
  grids; wall times are not in a series (nan)."""
  runs = []
  for name, records in read_series(path).items():
    arm, _, seed = name.rpartition("/seed_")
    runs.append(Run(prefix + arm, prefix + name, int(seed), records, collapse.collapse_step(records),
                    float("nan")))
  return runs


def restore(grid: grids.Grid, results_dir: str, workdir: str) -> list[str]:
  """Finished run dirs under `workdir` rebuilt from a committed report of `grid`
  (results_dir's series.csv and table.csv), so a grid spans machines: a rerun of the grid
  skips them and the report reads them like any run. A run dir keeps the SERIES metrics at
  6 significant digits and its arm's mean wall time (summary.json says "restored_from");
  dirs that exist are left alone. Returns the dirs it made."""
  table, series = (os.path.join(results_dir, name) for name in ("table.csv", "series.csv"))
  for path in (table, series):
    if not os.path.isfile(path):
      raise errors.UserError(f"--restore_from={results_dir}: no {path} (a grid's committed "
                             "report has table.csv and series.csv)")
  with open(table, encoding="utf-8") as f:
    wall_s = {row["arm"]: float(row["wall_s"]) for row in csv.DictReader(f)}
  records = read_series(series)
  known = {arm.name for arm in grid.arms} & set(wall_s)
  for name in records:
    if name.rsplit("/", 1)[0] not in known:
      raise errors.UserError(f"--restore_from={results_dir}: run {name} is not an arm of "
                             f"grid {grid.name} with a row in {table}")
  made = []
  for name, run_records in records.items():
    path, arm = os.path.join(workdir, name), name.rsplit("/", 1)[0]
    if os.path.exists(path):
      continue
    writer = metrics_lib.MetricWriter(path, tensorboard=False)
    for r in run_records:
      writer.write(r["step"], "rl", {k: v for k, v in r.items() if k != "step"})
    writer.close()
    with open(os.path.join(path, runner.SUMMARY), "w", encoding="utf-8") as f:
      json.dump({"wall_s": wall_s[arm], "restored_from": results_dir}, f)
    made.append(path)
  return made


def write_tables(runs: list[Run], workdir: str) -> dict:
  """Table and series of a grid's finished runs; returns where they are and the rows."""
  rows = write_table(runs, workdir)
  return {"table_csv": os.path.join(workdir, "table.csv"),
          "table_md": os.path.join(workdir, "table.md"),
          "series_csv": write_series(runs, workdir), "rows": rows}


def title(grid: grids.Grid, seeds: int, rows: list[ArmRow]) -> str:
  """What a figure of a grid read mid-run shows: how many of the seeds are in."""
  counts = sorted({r.seeds for r in rows}) or [0]
  have = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  return f"{grid.name}: mean over {have} of {seeds} seed(s)"
