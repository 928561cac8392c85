"""Names and places of a grid's runs: the one format and parse of run names (ARM/seed_K) and
arm names (LEVEL/VARIANT), and where a run lives and says it has finished.

A run's name is also its directory under the grid's workdir and its `run` column in a
series.csv, so a report, a restored run and a rerun all find it by the same string.
"""
import json
import os
import re

from minirl_jax import errors

SUMMARY = "summary.json"  # written last: a run dir with one has finished
_SEED = re.compile(r"seed_(\d+)")


def run_name(arm: str, seed: int) -> str:
  """ARM/seed_K."""
  return f"{arm}/seed_{seed}"


def parse_run_name(name: str) -> tuple[str, int]:
  """(arm, seed) of ARM/seed_K (a run dir's path parses the same way)."""
  arm, _, last = name.rpartition("/")
  match = _SEED.fullmatch(last)
  if not arm or match is None:
    raise errors.UserError(f"run {name!r} is not named ARM/seed_K")
  return arm, int(match.group(1))


def arm_name(level: str, variant: str) -> str:
  """LEVEL/VARIANT: an arm of a levelled grid (a gap level, the off-policy N)."""
  return f"{level}/{variant}"


def split_arm(arm: str) -> tuple[str, str]:
  """(level, variant) of an arm named LEVEL/VARIANT (a gap level, the off-policy N);
  ("", arm) of an arm without a level."""
  level, _, variant = arm.rpartition("/")
  return level, variant


def run_dir(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, run_name(arm, seed))


def done(path: str) -> bool:
  """Whether the run in `path` finished: its summary is written last."""
  return os.path.exists(os.path.join(path, SUMMARY))


def summary(path: str) -> dict:
  """The run's summary.json ({} for a run that has not finished or was made outside a
  grid, e.g. in a notebook)."""
  if not done(path):
    return {}
  with open(os.path.join(path, SUMMARY), encoding="utf-8") as f:
    return json.load(f)


def write_summary(path: str, values: dict) -> None:
  """Marks the run in `path` finished."""
  with open(os.path.join(path, SUMMARY), "w", encoding="utf-8") as f:
    json.dump(values, f)
