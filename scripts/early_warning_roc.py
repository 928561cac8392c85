"""Early warning as a classifier over every committed grid (both rounds): per signal, the
ROC of "the run collapses within the next 10 RL steps" and its AUC.

  python scripts/early_warning_roc.py [--results=docs/results]

Reads every `<results>/*/series.csv` (round 1's four grids, round 2's when committed), writes
`<results>/roc.md` and `<results>/roc.png` (minirl_jax/experiments/roc.py). Last line: one
JSON object.
"""
import glob
import json
import os

from absl import app
from absl import flags

from minirl_jax import errors
from minirl_jax.experiments import grids
from minirl_jax.experiments import roc
from minirl_jax.experiments import series

_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), os.pardir,
                                                       "docs", "results"),
                               "Folder with one sub-folder per grid, each with series.csv.")


def main(argv):
  del argv
  names, rounds = [], {}
  for path in sorted(glob.glob(os.path.join(_RESULTS.value, "*", "series.csv"))):
    grid = os.path.basename(os.path.dirname(path))
    names.append(grid)
    rounds.setdefault(grids.round_of(grid), []).extend(
        series.runs_from_series(path, prefix=f"{grid}/"))
  runs = [run for round_runs in rounds.values() for run in round_runs]
  if not runs:
    raise errors.UserError(f"no */series.csv under --results={_RESULTS.value}")
  out = roc.write(runs, _RESULTS.value, f"{len(runs)} runs of {len(names)} grids: does the "
                  f"signal flag the {roc.HORIZON} steps before a collapse?",
                  groups=dict(sorted(rounds.items())))
  with open(out["roc_md"], encoding="utf-8") as f:
    print(f.read())
  print(json.dumps({"grids": names, "runs": len(runs), "figure": out["roc_figure"],
                    "signals": out["signals"]}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
