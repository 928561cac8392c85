"""A grid's per-step series (DIR/series.csv): written from its runs, read back, and restored
as finished run dirs, so a committed report re-derives, and a grid goes on, on another
machine.
"""
import csv
import os

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax import metrics as metrics_lib
from minirl_jax.experiments import layout
from minirl_jax.experiments import report

# The per-step metrics DIR/series.csv keeps for every run: what the results pages quote per
# seed (trajectories, KL, entropy, masking, the early-warning signals) beyond the tables.
SERIES = ("reward/mean", "eval/accuracy", "policy/entropy", "mismatch/kl_k3",
          "moe/routing_disagreement", "staleness/abs_log_pi_pi_old", "is/first_order_error",
          "is/grad_cosine_token_seq_last", "is/frac_truncated", "is/seq_frac_masked",
          "rollout/length_mean", "optim/skipped")
# 6 significant digits, except where a reading rule looks at the digits past them: the
# early warning reads 1 - cosine, and a cosine of 0.99999912 written as 1 reads 0, so 9
# digits keep any float32 exactly; the collapse rule compares accuracies k / problems
# exactly against half the peak (17/128 written as 0.132812 is below half of 34/128), so 12
# digits keep them.
DIGITS = {"is/grad_cosine_token_seq_last": 9, "eval/accuracy": 12, "eval/accuracy_full": 12}
# Columns written only when a run has them, so earlier grids' series remake byte-identical.
OPTIONAL_SERIES = ("eval/accuracy_full",)


def write_series(runs: list[report.Run], workdir: str, extra: tuple[str, ...] = ()) -> str:
  """DIR/series.csv: one row per (run, RL step) with the SERIES metrics and the grid's
  `extra` ones (empty where a step did not log one), so every per-seed number can be
  checked without the runs."""
  path = os.path.join(workdir, "series.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    keys = SERIES + tuple(k for k in OPTIONAL_SERIES
                          if any(k in r for run in runs for r in run.records)) + tuple(
                              k for k in extra if k not in SERIES)
    writer.writerow(["run", "step", *keys])
    for run in runs:
      for r in run.records:
        writer.writerow([run.name, r["step"],
                         *(f"{r[key]:.{DIGITS.get(key, 6)}g}" if key in r else ""
                           for key in keys)])
  return path


def read_series(path: str) -> dict[str, list[dict]]:
  """The RL records of each run in a series.csv, by run name (write_series' inverse, at
  the digits it kept)."""
  records: dict[str, list[dict]] = {}
  with open(path, encoding="utf-8") as f:
    for row in csv.DictReader(f):
      records.setdefault(row.pop("run"), []).append(
          {"step": int(row.pop("step")), **{k: float(v) for k, v in row.items() if v}})
  return records


def runs_from_series(path: str, prefix: str = "") -> list[report.Run]:
  """The runs of a committed series.csv (`prefix` + their arms), for analyses across
  grids; wall times are not in a series (nan)."""
  runs = []
  for name, records in read_series(path).items():
    arm, seed = layout.parse_run_name(name)
    runs.append(report.Run(prefix + arm, seed, records, collapse.collapse_step(records),
                           float("nan")))
  return runs


def restore(grid, results_dir: str, workdir: str) -> list[str]:
  """Finished run dirs rebuilt from a committed report, so a grid spans machines: a rerun of
  the grid skips them and the report reads them like any run.

  Args:
    grid: the `design.Grid` the report is of; every run must be one of its arms.
    results_dir: the committed report (its series.csv and table.csv).
    workdir: the grid's workdir; run dirs that exist there are left alone.

  Returns:
    The run dirs it made: each keeps the SERIES metrics at the digits the series kept and
    its arm's mean wall time (its summary.json says "restored_from").
  """
  table, series = (os.path.join(results_dir, name) for name in ("table.csv", "series.csv"))
  for path in (table, series):
    if not os.path.isfile(path):
      raise errors.UserError(f"--restore_from={results_dir}: no {path} (a grid's committed "
                             "report has table.csv and series.csv)")
  with open(table, encoding="utf-8") as f:
    wall_s = {row["arm"]: float(row["wall_s"]) for row in csv.DictReader(f)}
  records = {layout.parse_run_name(name): run for name, run in read_series(series).items()}
  known = {arm.name for arm in grid.arms} & set(wall_s)
  for arm, seed in records:
    if arm not in known:
      raise errors.UserError(f"--restore_from={results_dir}: run "
                             f"{layout.run_name(arm, seed)} is not an arm of grid "
                             f"{grid.name} with a row in {table}")
  made = []
  for (arm, seed), run_records in records.items():
    path = layout.run_dir(workdir, arm, seed)
    if os.path.exists(path):
      continue
    writer = metrics_lib.MetricWriter(path, tensorboard=False)
    for r in run_records:
      writer.write(r["step"], "rl", {k: v for k, v in r.items() if k != "step"})
    writer.close()
    layout.write_summary(path, {"wall_s": wall_s[arm], "restored_from": results_dir})
    made.append(path)
  return made
