"""The grid registry: every round's grids by name, and arms' overrides as configs and flags."""
import pathlib
import subprocess
import sys

import pytest

from minirl_jax import config_base
from minirl_jax import errors
from minirl_jax.experiments import grids
from minirl_jax.experiments import round1
from minirl_jax.experiments import round2

ROOT = pathlib.Path(__file__).parents[1]


def test_every_rounds_grids_are_registered_by_name():
  assert sorted(grids.GRIDS) == ["async", "coldstart", "gap", "offpolicy", "onpolicy", "quick",
                                 "round2", "round3"]
  assert grids.get("gap") is round1.GRIDS["gap"]
  assert grids.get("round2") is round2.GRIDS["round2"]
  assert [grids.round_of(g) for g in ("onpolicy", "gap", "offpolicy", "coldstart", "round2")] == [
      "round 1"] * 4 + ["round 2"]
  with pytest.raises(errors.UserError, match="--grid must be one of .*got 'nope'"):
    grids.get("nope")
  with pytest.raises(errors.UserError, match="grid 'quick' is in no round"):
    grids.round_of("quick")


def test_naming_the_grids_does_not_import_jax():
  code = "import sys, minirl_jax.experiments.grids; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       text=True, timeout=120).stdout
  assert out.strip() == "False"


def test_overrides_as_config_and_flags():
  config = grids.apply(config_base.sibling(str(ROOT / "configs" / "smoke.py"), "smoke"),
                       {"objective.clip": False, "rl.steps": 2})
  assert (config.objective.clip, config.rl.steps) == (False, 2)
  assert grids.flags({"rl.steps": 2, "objective.clip": False}) == [
      "--config.objective.clip=False", "--config.rl.steps=2"]


@pytest.mark.parametrize("name", sorted(grids.GRIDS))
def test_every_arm_is_a_valid_config(name):
  """Each arm's overrides (cold start and RL) on its grid's base config build valid
  settings: a typo in a grid fails here, not hours into a run."""
  from minirl_jax.rl import settings as settings_lib
  grid = grids.get(name)
  for arm in grid.arms:
    config = config_base.sibling(str(ROOT / grid.base_config),
                                 pathlib.Path(grid.base_config).stem)
    s = settings_lib.from_config(grids.apply(config, {**arm.cold_start, **arm.overrides}))
    assert s.rl.global_batch % s.rl.mini_batch_size == 0, arm.name
