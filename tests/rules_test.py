"""What a verdict is: round 2's interval and Fisher rules, a contrast of two arms read by
them, arms read by seed from their runs, and verdicts.md (partial while seeds are missing)."""
import json
import math
import os

import numpy as np
import pytest

from minirl_jax.experiments import design
from minirl_jax.experiments import layout
from minirl_jax.experiments import report
from minirl_jax.experiments import round1
from minirl_jax.experiments import rules


@pytest.mark.parametrize("diffs,claim,verdict,evidence", [
    ([0.06, 0.08, 0.07, 0.05, 0.09], "ahead", "reproduced",  # interval above 0
     "+0.070 [+0.050, +0.090] (95% t, 5 seeds)"),
    ([0.00, 0.01, -0.01, 0.02, 0.0], "ahead", "not reproduced",  # below 0.05 throughout
     "+0.004 [-0.010, +0.018] (95% t, 5 seeds)"),
    ([0.2, -0.1, 0.15, -0.05, 0.1], "ahead", "inconclusive",  # wide, straddles 0
     "+0.060 [-0.101, +0.221] (95% t, 5 seeds)"),
    ([0.00, 0.01, -0.01, 0.02, 0.0], "no gain", "reproduced",  # within +-0.05
     "+0.004 [-0.010, +0.018] (95% t, 5 seeds)"),
    ([0.06, 0.08, 0.07, 0.05, 0.09], "no gain", "not reproduced",
     "+0.070 [+0.050, +0.090] (95% t, 5 seeds)"),
    ([0.2, -0.1, 0.15, -0.05, 0.1], "no gain", "inconclusive",
     "+0.060 [-0.101, +0.221] (95% t, 5 seeds)"),
    ([0.1], "ahead", "inconclusive", "+0.100 (1 seed: no interval)"),  # no interval
])
def test_read_difference(diffs, claim, verdict, evidence):
  assert rules.read_difference(diffs, claim) == (verdict, evidence)


def test_read_difference_names_a_claim_it_does_not_know():
  with pytest.raises(ValueError, match="claim must be 'ahead' or 'no gain', got 'better'"):
    rules.read_difference([0.1, 0.2], "better")


@pytest.mark.parametrize("counts,verdict,evidence", [
    ((4, 5, 0, 5), "reproduced", "collapsed 4/5 vs 0/5, Fisher p = 0.0238; at these runs the "
     "smallest decisive count is 4/5 vs 0/5"),
    ((3, 5, 0, 5), "inconclusive", "collapsed 3/5 vs 0/5, Fisher p = 0.0833; at these runs "
     "the smallest decisive count is 4/5 vs 0/5"),
    ((0, 5, 0, 5), "not reproduced", "collapsed 0/5 vs 0/5, Fisher p = 1; at these runs the "
     "smallest decisive count is 4/5 vs 0/5"),  # never collapsed in 5 runs
    ((0, 3, 0, 3), "inconclusive", "collapsed 0/3 vs 0/3, Fisher p = 1; no count at these "
     "runs can reach p < 0.05"),  # round 1's 3 runs are too few to say never
])
def test_read_collapses(counts, verdict, evidence):
  assert rules.read_collapses(*counts) == (verdict, evidence)


def test_accuracy_readings_carry_their_interval_and_each_seed():
  a = rules.ArmResult({}, {0: 0.4, 1: 0.5}, {0: False, 1: False}, score={0: 0.4, 1: 0.5})
  b = rules.ArmResult({}, {0: 0.3, 1: 0.3}, {0: False, 1: False}, score={0: 0.3, 1: 0.3})
  reading = rules.accuracy("a ahead of b", a, b, "ahead")
  mean, low, high = reading.interval
  assert mean == pytest.approx(0.15)
  # diffs 0.1, 0.2: standard error 0.05, t(0.975, 1 df) = 12.706
  assert (low, high) == pytest.approx((0.15 - 0.6353, 0.15 + 0.6353), abs=1e-3)
  assert reading.evidence == ("+0.150 [-0.485, +0.785] (95% t, 2 seeds); per seed 0: +0.100, "
                              "1: +0.200; smallest effect this design finds (80%): 0.702")
  one = rules.accuracy("x", rules.ArmResult({}, {0: 0.4}, {0: False}, score={0: 0.4}),
                       rules.ArmResult({}, {0: 0.3}, {0: False}, score={0: 0.3}), "ahead")
  assert one.interval is None  # one seed: no interval


def _run(arm, seed, full, collapse_step=None):
  records = [{"step": 0, "eval/accuracy": 0.3, "eval/accuracy_full": full[0]}]
  records += [{"step": s, "eval/accuracy": a, "eval/accuracy_full": a, "policy/entropy": 0.3}
              for s, a in zip((190, 200), full[1:])]
  return report.Run(arm, seed, records, collapse_step, 1.0)


def _last_two(run):
  return [(r["step"], r["eval/accuracy_full"]) for r in run.records][-2:]


def test_by_seed_scores_runs_by_the_grids_rule():
  runs = [_run("a", 0, (0.2, 0.4, 0.6)), _run("a", 1, (0.2, 0.3, 0.5), collapse_step=200)]
  plain = rules.by_seed(runs)["a"]
  assert (plain.start, plain.final, plain.collapsed) == (
      {0: 0.3, 1: 0.3}, {0: 0.6, 1: 0.5}, {0: False, 1: True})
  assert (plain.score, plain.scored_steps, plain.collapses) == ({}, {}, 1)
  scored = rules.by_seed(runs, _last_two)["a"]
  assert scored.score == pytest.approx({0: 0.5, 1: 0.4})
  assert scored.scored_steps == {0: [190, 200], 1: [190, 200]}
  assert scored.records[1] is runs[1].records


def test_a_contrast_of_step0_scores_says_it_compares_the_cold_start_with_itself():
  def at_start(score):
    return rules.ArmResult({}, {0: 0.1, 1: 0.1}, {0: True, 1: True}, score=score,
                           scored_steps={0: [0], 1: [0]})
  reading = rules.accuracy("q", at_start({0: 0.2, 1: 0.25}), at_start({0: 0.2, 1: 0.25}),
                           "ahead")
  assert reading.interval == (0.0, 0.0, 0.0)
  assert reading.evidence.endswith(
      "every seed's difference is the same, so no spread to size the design by; both arms' "
      "scores are their RL step-0 evaluation in every seed (each run collapsed before its "
      "first full evaluation after step 0): the contrast compares the cold start with itself")


def _write_runs(workdir, grid, seeds):
  for k, arm in enumerate(grid.arms):
    for seed in range(seeds):
      run_dir = layout.run_dir(str(workdir), arm.name, seed)
      os.makedirs(run_dir)
      records = [{"stage": "rl", "step": 0, "eval/accuracy": 0.15 * (k + 1)},
                 {"stage": "rl", "step": 10, "eval/accuracy": 0.36 + 0.01 * seed,
                  "policy/entropy": 0.3}]
      with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      layout.write_summary(run_dir, {})


def _runs(grid, workdir, seeds=3):
  return report.load(report.finished_runs(grid, seeds, str(workdir)))


def test_verdicts_md_of_a_grid_with_rules(tmp_path):
  grid = round1.GRIDS["coldstart"]
  _write_runs(tmp_path, grid, 3)
  loaded = rules.by_seed(_runs(grid, tmp_path))
  assert loaded["minirl_from_sft_long"].start == pytest.approx({0: 0.45, 1: 0.45, 2: 0.45})
  assert loaded["minirl_from_sft_short"].final == pytest.approx({0: 0.36, 1: 0.37, 2: 0.38})
  (reading,) = rules.write(grid, 3, _runs(grid, tmp_path), str(tmp_path))
  assert reading.verdict == "reproduced"
  assert (tmp_path / "verdicts.md").read_text().splitlines() == [
      "| question | reading | evidence |", "|---|---|---|",
      "| finding 7 (cold starts converge) | reproduced | spread of the stable starts 0.300 at "
      "RL step 0 -> 0.000 at the end; sft_short: 0.150 -> 0.370 (collapsed 0/3); "
      "sft_default: 0.300 -> 0.370 (collapsed 0/3); sft_long: 0.450 -> 0.370 (collapsed "
      "0/3) |"]
  os.remove(os.path.join(layout.run_dir(str(tmp_path), "minirl_from_sft_long", 2),
                         layout.SUMMARY))  # still running
  rules.write(grid, 3, _runs(grid, tmp_path), str(tmp_path))
  assert (tmp_path / "verdicts.md").read_text().startswith(
      "**Partial, not verdicts**: 1 arm(s) with fewer than 3 finished seeds, 0 with none.")
  # one seed asked for and finished: still progress, never a verdict
  rules.write(grid, 1, _runs(grid, tmp_path, seeds=1), str(tmp_path))
  assert (tmp_path / "verdicts.md").read_text().startswith(
      "**Partial, not verdicts**: 3 arm(s) with fewer than 3 finished seeds, 0 with none.")


def test_a_grid_without_rules_has_no_verdicts(tmp_path):
  grid = design.Grid("g", "configs/smoke.py", (design.Arm("a"),), "test")
  assert rules.write(grid, 1, [], str(tmp_path)) is None
  assert not (tmp_path / "verdicts.md").exists()


def test_arms_planned_with_no_seeds_are_named_not_counted_as_missing(tmp_path):
  def read(arms):
    return [rules.Reading("q", rules.INCONCLUSIVE, f"{len(arms)} arms")]
  grid = design.Grid("g", "configs/smoke.py", (design.Arm("a", seeds=5), design.Arm("b"),
                                               design.Arm("c", seeds=0)), "test", read=read)
  def runs(b_seeds):
    return [_run(arm, seed, (0.3, 0.4, 0.4)) for arm, seeds in (("a", 5), ("b", b_seeds))
            for seed in range(seeds)]
  assert rules.write(grid, 10, runs(9), str(tmp_path)) == [
      rules.Reading("q", "inconclusive", "2 arms")]
  assert (tmp_path / "verdicts.md").read_text().splitlines() == [
      "**Partial, not verdicts**: 1 arm(s) with fewer than their seeds finished, 0 with none.",
      "", "Not run (0 seeds planned): c; the contrasts that need them have no row.", "",
      "| question | reading | evidence |", "|---|---|---|", "| q | inconclusive | 2 arms |"]
  rules.write(grid, 10, runs(10), str(tmp_path))  # every planned seed has finished
  assert (tmp_path / "verdicts.md").read_text().splitlines()[:2] == [
      "Not run (0 seeds planned): c; the contrasts that need them have no row.", ""]


def test_a_grids_checks_end_its_verdicts(tmp_path):
  def read(arms):
    return [rules.Reading("q", rules.INCONCLUSIVE, "e")]
  def checks(arms):
    return ["## Checks", f"{sorted(arms)}"] if "b" in arms else []
  grid = design.Grid("g", "configs/smoke.py", (design.Arm("a"), design.Arm("b")), "test",
                     read=read, checks=checks)
  runs = [_run(arm, seed, (0.3, 0.4, 0.4)) for arm in ("a", "b") for seed in range(3)]
  rules.write(grid, 3, runs, str(tmp_path))
  assert (tmp_path / "verdicts.md").read_text().splitlines() == [
      "| question | reading | evidence |", "|---|---|---|", "| q | inconclusive | e |", "",
      "## Checks", "['a', 'b']"]
  rules.write(grid, 3, runs[:3], str(tmp_path))  # no lines: nothing added
  assert (tmp_path / "verdicts.md").read_text().splitlines()[-1] == "| q | inconclusive | e |"


def test_paired_differences_use_the_seeds_both_arms_have():
  assert rules.paired_differences({0: 0.5, 1: 0.4, 3: 0.1}, {1: 0.1, 0: 0.25, 2: 0.9}) == {
      0: 0.25, 1: pytest.approx(0.3)}
  assert math.isclose(np.mean(list(rules.paired_differences({0: 1.0}, {0: 0.5}).values())),
                      0.5)
