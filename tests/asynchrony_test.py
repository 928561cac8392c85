"""The async grid: its arms as valid configs, its readings by the stated rules."""
import pathlib


from minirl_jax import config_base
from minirl_jax.experiments import asynchrony
from minirl_jax.experiments import grids
from minirl_jax.experiments import rules
from minirl_jax.rl import settings

ROOT = pathlib.Path(__file__).parents[1]


def test_arms_cross_each_staleness_source_with_replay():
  grid = grids.get("async")
  names = [a.name for a in grid.arms]
  assert names == [f"{s}/minirl{r}" for s in ("k1", "k2", "n2", "n4") for r in ("", "+r3")]
  assert all(a.seeds == 5 for a in grid.arms)
  for arm in grid.arms:
    config = config_base.sibling(str(ROOT / grid.base_config), "paper_moe")
    grids.apply(config, arm.overrides)
    s = settings.from_config(config)
    k, n = s.rl.max_staleness, s.rl.num_minibatches
    assert s.rl.global_batch == 64  # the on-policy global batch throughout
    assert (k, n) in ((1, 1), (2, 1), (0, 2), (0, 4))
    assert (s.rl.routing_replay == "r3") == arm.name.endswith("+r3")


def _arm(scores, collapsed=()):
  by_seed = dict(enumerate(scores))
  return rules.ArmResult(start={i: 0.25 for i in by_seed}, final=by_seed, score=by_seed,
                         collapsed={i: i in collapsed for i in by_seed})


def test_read_compares_matched_staleness_and_replay():
  arms = {"k1/minirl": _arm([0.30, 0.31, 0.29, 0.33, 0.30]),
          "n2/minirl": _arm([0.20, 0.22, 0.21, 0.19, 0.20], collapsed=(0, 1, 2, 3)),
          "k1/minirl+r3": _arm([0.30, 0.30, 0.31, 0.30, 0.29])}
  readings = {r.question: r for r in asynchrony.read(arms)}
  assert set(readings) == {"k1 (asynchrony) ahead of n2 (mini-batches)",
                           "k1 collapses, n2 does not", "k1: R3 ahead of no replay",
                           "k1: no replay collapses, R3 does not"}
  assert readings["k1 (asynchrony) ahead of n2 (mini-batches)"].verdict == "reproduced"
  assert readings["k1: R3 ahead of no replay"].verdict != "reproduced"
