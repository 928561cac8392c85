"""Grid figures: the numbers they draw (survival, means over seeds still running) and the
files they write."""
import numpy as np

from minirl_jax import collapse
from minirl_jax.experiments import figures
from minirl_jax.experiments import report
from minirl_jax.experiments import rules


def _run(arm, seed, entropies, accuracy=0.3):
  records = [{"step": 0, "eval/accuracy": accuracy}] + [
      {"step": s, "policy/entropy": e, "reward/mean": 0.5, "mismatch/kl_k3": 1e-3}
      for s, e in enumerate(entropies, start=1)]
  return report.Run(arm, seed, records, collapse.collapse_step(records), 1.0)


def test_surviving_share_steps_down_at_each_collapse():
  runs = [_run("a", 0, [0.3, 0.01, 0.3, 0.3]),   # collapses at step 2
          _run("a", 1, [0.3, 0.3, 0.3, 0.01]),   # at step 4
          _run("a", 2, [0.3, 0.3, 0.3, 0.3])]    # never
  np.testing.assert_allclose(figures.surviving(runs, 5), [1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3])


def test_curves_average_the_seeds_still_running():
  """A run that stopped at its collapse leaves the later steps to the other seeds."""
  long, short = _run("a", 0, [0.2, 0.4, 0.6]), _run("a", 1, [0.4])
  steps, mean, low, high = figures._over_seeds([long, short], "policy/entropy")
  assert steps == [1, 2, 3]
  np.testing.assert_allclose(mean, [0.3, 0.4, 0.6])
  np.testing.assert_allclose(low, [0.2, 0.4, 0.6])
  np.testing.assert_allclose(high, [0.4, 0.4, 0.6])


def test_every_figure_is_written(tmp_path):
  runs = [_run("a", s, [0.3, 0.3 - 0.1 * s, 0.3]) for s in range(3)] + [
      _run("n8/b", s, [0.3, 0.01]) for s in range(3)]
  readings = [rules.Reading("a ahead of b", "inconclusive", "...", (0.02, -0.03, 0.07)),
              rules.Reading("b collapses", "reproduced", "...")]
  out = figures.write(runs, [], readings, str(tmp_path), "test")
  assert out["levels_figure"] is None  # not a levelled grid
  for key in ("figure", "collapse_figure", "contrasts_figure"):
    assert (tmp_path / out[key].rsplit("/", 1)[-1]).stat().st_size > 5_000, key
  assert figures.plot_contrasts(readings[1:], str(tmp_path / "none.png")) is None


def test_levels_group_level_variant_arms_in_grid_order(tmp_path):
  def row(arm, acc):
    return report.ArmRow(arm, 3, 0.3, 0.0, acc, 0.0, acc, 0.01, 0, None, 0.05, 1e-3, 0.0, 9.0)
  rows = [row("zero/minirl", 0.4), row("zero/no_is", 0.3), row("int4/minirl", 0.2),
          row("int4/no_is", 0.1), row("int4/seq", 0.25)]
  levels, variants = figures.by_level(rows)
  assert levels == ["zero", "int4"] and list(variants) == ["minirl", "no_is", "seq"]
  assert [(x, r.final_accuracy) for x, r in variants["no_is"]] == [(0, 0.3), (1, 0.1)]
  assert [x for x, _ in variants["seq"]] == [1]
  assert figures.by_level(rows + [row("plain_arm", 0.5)]) is None  # not a levelled grid
  assert figures.plot_levels(rows, str(tmp_path / "levels.png")) == str(tmp_path / "levels.png")
  assert (tmp_path / "levels.png").stat().st_size > 0
