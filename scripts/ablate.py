"""Runs a named ablation grid (arms x seeds) resumably, then writes its table and figures.

  python scripts/ablate.py --grid=quick --seeds=1 --workdir=runs/quick
  python scripts/ablate.py --grid=onpolicy --seeds=3 --workdir=runs/onpolicy --jobs=1
  python scripts/ablate.py --grid=onpolicy --seeds=3 --workdir=runs/onpolicy --report_only
  python scripts/ablate.py --grid=offpolicy --seeds=3 --workdir=runs/offpolicy \
      --restore_from=docs/results/offpolicy  # go on from the committed runs
Grids: minirl_jax/experiments/grids.py (each round's in its own module, round1.py,
round2.py). Rerunning skips finished arms and resumes interrupted ones. Grids with stated
reading rules (gap, offpolicy, coldstart, round2) also get verdicts.md
(minirl_jax/experiments/rules.py). Last line: one JSON object (table, figures, rows,
readings).
"""
import dataclasses
import json
import os

from absl import app
from absl import flags

from minirl_jax import errors
from minirl_jax.experiments import early_warning
from minirl_jax.experiments import figures
from minirl_jax.experiments import grids
from minirl_jax.experiments import report
from minirl_jax.experiments import rules
from minirl_jax.experiments import runner
from minirl_jax.experiments import series

_GRID = flags.DEFINE_string("grid", "quick", f"One of {sorted(grids.GRIDS)}.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per arm (>= 3 for a verdict).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Grid output directory.", required=True)
_JOBS = flags.DEFINE_integer("jobs", 1, "Arms run at once (each its own process).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar over runs.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Run nothing: write the report (table, series, figures, early "
    "warning, verdicts) of the finished runs (a grid cut short, or one still running "
    "elsewhere).")
_RESTORE_FROM = flags.DEFINE_string(
    "restore_from", None, "A committed report's directory (e.g. docs/results/offpolicy): "
    "first rebuild the finished runs its series.csv and table.csv hold, so a grid goes on "
    "where another machine left it.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  grid = grids.get(_GRID.value)
  if _SEEDS.value < 1 or _JOBS.value < 1:
    raise errors.UserError("--seeds and --jobs must be >= 1")
  workdir = os.path.abspath(_WORKDIR.value)
  if _RESTORE_FROM.value:
    made = series.restore(grid, _RESTORE_FROM.value, workdir)
    print(f"restored {len(made)} finished run(s) from {_RESTORE_FROM.value}")
  if not _REPORT_ONLY.value:
    runner.run_grid(grid, seeds=_SEEDS.value, workdir=workdir, max_jobs=_JOBS.value,
                    root=ROOT, progress=_PROGRESS.value)
  runs = report.load(report.finished_runs(grid, _SEEDS.value, workdir))
  rows = report.write_table(runs, workdir, grid.scored, grid.sample_sd)
  result = {"table_csv": os.path.join(workdir, "table.csv"),
            "table_md": os.path.join(workdir, "table.md"),
            "series_csv": series.write_series(runs, workdir, grid.series), "rows": rows}
  result.update(early_warning.write(runs, workdir))
  readings = rules.write(grid, _SEEDS.value, runs, workdir)
  result.update(figures.write(runs, rows, readings, workdir,
                              report.title(grid, _SEEDS.value, rows)))
  result["rows"] = [dataclasses.asdict(r) for r in rows]
  print(open(result["table_md"], encoding="utf-8").read())
  if readings is not None:
    print(open(os.path.join(workdir, "verdicts.md"), encoding="utf-8").read())
    result["readings"] = [dataclasses.asdict(r) for r in readings]
  print(json.dumps({"grid": grid.name, "seeds": _SEEDS.value, **result}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
