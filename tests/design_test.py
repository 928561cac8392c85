"""Arms and grids: how many seeds an arm runs, and the recipes the rounds share."""
from minirl_jax.experiments import design


def test_an_arm_runs_its_grids_seeds_up_to_its_own_cap():
  assert design.Arm("a").seeds_at(3) == 3
  assert design.Arm("a", seeds=5).seeds_at(10) == 5
  assert design.Arm("a", seeds=5).seeds_at(3) == 3
  assert design.Arm("a", seeds=0).seeds_at(10) == 0  # planned, not run


def test_recipes_change_only_what_they_name():
  assert design.NO_IS == {"objective.name": "minirl", "objective.train_infer_is": False}
  assert design.LENGTH_NORM == {"objective.name": "minirl", "objective.length_norm": True}
  assert (design.R2, design.R3) == ({"rl.routing_replay": "r2"}, {"rl.routing_replay": "r3"})
  grid = design.Grid("g", "configs/smoke.py", (design.Arm("a"),), "test")
  assert (grid.read, grid.scored) == (None, None)  # no stated rules, no score column
