"""The reading rules (`experiments.rules`) on hand-built arms, and `load` on written runs."""
import json
import os

import pytest

from minirl_jax.experiments import grids
from minirl_jax.experiments import report
from minirl_jax.experiments import rules
from minirl_jax.experiments import runner


def arm(*finals, collapsed=(), starts=None):
  seeds = range(len(finals))
  return rules.ArmResult(start={s: (starts or finals)[s] for s in seeds},
                   final={s: finals[s] for s in seeds},
                   collapsed={s: s in collapsed for s in seeds})


@pytest.mark.parametrize("a,b,want", [
    (arm(0.40, 0.35, 0.36), arm(0.30, 0.33, 0.31), 1),  # +0.057 mean, every seed +
    (arm(0.30, 0.33, 0.31), arm(0.40, 0.35, 0.36), -1),
    (arm(0.33, 0.37, 0.35), arm(0.30, 0.33, 0.31), 0),  # +0.037 mean: within NOISE
    (arm(0.50, 0.30, 0.40), arm(0.30, 0.31, 0.31), 0),  # +0.093 mean, one seed the other way
    (arm(0.36, 0.35, 0.31), arm(0.30, 0.30, 0.31), 0),  # a tied seed is not "the same way"
    # the collapse clause comes first: 1 of 3 collapsed against 2 of 3 is ahead, whatever
    # the accuracy says
    (arm(0.20, 0.20, 0.20, collapsed=[0]), arm(0.30, 0.30, 0.30, collapsed=[0, 2]), 1),
    (arm(0.3, 0.3, 0.3, collapsed=[0, 1]), arm(0.1, 0.1, 0.1, collapsed=[0, 1, 2]), 1),
])
def test_ahead(a, b, want):
  assert rules.ahead(a, b) == want
  assert rules.ahead(b, a) == -want


def test_gap_reading_per_level_penalty_and_head_to_head():
  arms = {"zero/minirl": arm(0.40, 0.40, 0.40), "zero/minirl_no_is": arm(0.40, 0.40, 0.39),
          "int4/minirl": arm(0.35, 0.36, 0.34),
          "int4/minirl_no_is": arm(0.10, 0.20, 0.30, collapsed=[0, 1]),
          "int4/minirl_seq_tis": arm(0.30, 0.30, 0.30),
          "int4/minirl_geo_mis": arm(0.05, 0.05, 0.05, collapsed=[0, 1, 2])}
  got = {r.question: r.verdict for r in rules.read_gap(arms)}
  assert got == {
      "zero: finding 3 (w/o IS collapses)": "not reproduced",
      "zero: MiniRL vs w/o IS": "no difference shown",
      "int4: finding 3 (w/o IS collapses)": "reproduced",
      "int4: MiniRL vs w/o IS": "MiniRL ahead",
      "the w/o-IS penalty grows from zero to int4 by more than 0.04": "yes",
      "int4: token IS vs minirl_seq_tis": "token IS ahead",
      "int4: token IS vs minirl_geo_mis": "token IS ahead"}
  arms["int4/minirl_no_is"] = arm(0.30, 0.30, 0.30, collapsed=[0])  # 1 of 3: undecided
  got = {r.question: r.verdict for r in rules.read_gap(arms)}
  assert got["int4: finding 3 (w/o IS collapses)"] == "inconclusive"


def _offpolicy(collapses, r2_r3):
  """collapses[n] = collapse counts of (no_clip, r2_no_clip, minirl, r3) over 3 seeds;
  r2_r3[n] = (R2 finals, R3 finals)."""
  arms = {}
  for n in (2, 4, 8):
    for name, k in zip(("minirl_no_clip", "minirl+r2_no_clip", "minirl"), collapses[n]):
      arms[f"n{n}/{name}"] = arm(0.3, 0.3, 0.3, collapsed=range(k))
    r2, r3 = r2_r3[n]
    arms[f"n{n}/minirl+r2"] = arm(*r2)
    arms[f"n{n}/minirl+r3"] = arm(*r3, collapsed=range(collapses[n][3]))
  return {r.question: r.verdict for r in rules.read_offpolicy(arms)}


HI, LO, MID = (0.40, 0.40, 0.40), (0.30, 0.30, 0.30), (0.35, 0.35, 0.35)


def test_offpolicy_reading_findings_5_and_6():
  got = _offpolicy({2: (3, 2, 2, 0), 4: (3, 3, 2, 1), 8: (0, 0, 0, 0)},
                   {2: (HI, LO), 4: (LO, HI), 8: (LO, HI)})
  assert [got[f"N = {n}: finding 5 holds"] for n in (2, 4, 8)] == ["yes", "yes", "no"]
  assert got["finding 5 (without clipping or replay, collapse)"] == "reproduced"
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "reproduced"
  assert got["N = 2: R2 vs R3"] == "R2 ahead" and got["N = 8: R2 vs R3"] == "R3 ahead"
  # nothing collapses, and R3 ahead at N = 2: the opposite of the paper
  got = _offpolicy({n: (0, 0, 0, 0) for n in (2, 4, 8)},
                   {2: (LO, HI), 4: (LO, HI), 8: (LO, HI)})
  assert got["finding 5 (without clipping or replay, collapse)"] == "not reproduced"
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "not reproduced"
  # no difference anywhere and R2 never collapses: not reproduced; one N right: inconclusive
  got = _offpolicy({n: (1, 0, 0, 0) for n in (2, 4, 8)},
                   {2: (MID, MID), 4: (MID, MID), 8: (MID, MID)})
  assert got["finding 5 (without clipping or replay, collapse)"] == "inconclusive"
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "not reproduced"
  got = _offpolicy({n: (0, 0, 0, 0) for n in (2, 4, 8)},
                   {2: (HI, LO), 4: (MID, MID), 8: (MID, MID)})
  assert got["finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"] == "inconclusive"


@pytest.mark.parametrize("starts,finals,collapsed,want", [
    ((0.15, 0.30, 0.45), (0.35, 0.36, 0.38), 0, "reproduced"),   # spread 0.30 -> 0.03
    ((0.15, 0.30, 0.45), (0.20, 0.33, 0.45), 0, "not reproduced"),  # 0.30 -> 0.25
    ((0.15, 0.30, 0.45), (0.25, 0.33, 0.40), 0, "inconclusive"),  # 0.30 -> 0.15: partly
    ((0.30, 0.31, 0.32), (0.30, 0.31, 0.32), 0, "inconclusive"),  # nothing to close
    ((0.15, 0.30, 0.45), (0.05, 0.36, 0.38), 2, "reproduced"),  # the collapsed start is out
])
def test_coldstart_reading(starts, finals, collapsed, want):
  arms = {f"minirl_from_{name}": arm(f, f, f, starts=(s, s, s),
                                     collapsed=range(collapsed) if k == 0 else ())
          for k, (name, s, f) in enumerate(zip(("sft_short", "sft_default", "sft_long"),
                                               starts, finals))}
  (reading,) = rules.read_coldstart(arms)
  assert reading.verdict == want
  assert rules.read_coldstart({}) == []  # a grid cut short has no verdict yet


def _runs(grid, workdir):
  return report.load(report.finished_runs(grid, 3, str(workdir)))


def test_load_and_write_read_the_runs(tmp_path):
  grid = grids.get("coldstart")
  for k, arm_ in enumerate(grid.arms):
    for seed in range(3):
      run_dir = tmp_path / arm_.name / f"seed_{seed}"
      os.makedirs(run_dir)
      start = 0.15 * (k + 1)
      records = [{"stage": "rl", "step": 0, "eval/accuracy": start},
                 {"stage": "rl", "step": 10, "eval/accuracy": 0.36 + 0.01 * seed,
                  "policy/entropy": 0.3}]
      (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
      (run_dir / runner.SUMMARY).write_text("{}")
  loaded = rules.by_seed(_runs(grid, tmp_path))
  assert loaded["minirl_from_sft_long"].start == pytest.approx({0: 0.45, 1: 0.45, 2: 0.45})
  assert loaded["minirl_from_sft_short"].final == pytest.approx({0: 0.36, 1: 0.37, 2: 0.38})
  (reading,) = rules.write(grid, 3, _runs(grid, tmp_path), str(tmp_path))
  assert reading.verdict == "reproduced"
  assert "| finding 7 (cold starts converge) | reproduced | spread of the stable starts " \
         "0.300 at RL step 0 -> 0.000 at the end" in (tmp_path / "verdicts.md").read_text()
  assert not (tmp_path / "verdicts.md").read_text().startswith("**Partial")
  os.remove(tmp_path / "minirl_from_sft_long" / "seed_2" / runner.SUMMARY)  # still running
  rules.write(grid, 3, _runs(grid, tmp_path), str(tmp_path))
  assert (tmp_path / "verdicts.md").read_text().startswith(
      "**Partial, not verdicts**: 1 arm(s) with fewer than 3 finished seeds, 0 with none.")
  assert rules.write(grids.get("quick"), 1, [], str(tmp_path)) is None
  # one seed asked for and finished: still progress, never a verdict
  one_seed = report.load(report.finished_runs(grid, 1, str(tmp_path)))
  rules.write(grid, 1, one_seed, str(tmp_path))
  assert (tmp_path / "verdicts.md").read_text().startswith(
      "**Partial, not verdicts**: 3 arm(s) with fewer than 3 finished seeds, 0 with none.")


@pytest.mark.parametrize("name,final_questions", [
    ("gap", ["the w/o-IS penalty grows from zero to int4 by more than 0.04",
             "int4: token IS vs minirl_seq_tis", "int4: token IS vs minirl_geo_mis"]),
    ("offpolicy", ["finding 5 (without clipping or replay, collapse)",
                   "finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)"]),
    ("coldstart", ["finding 7 (cold starts converge)"]),
])
def test_every_reading_finds_its_arms_in_the_real_grid(name, final_questions):
  """A rule reads arms by name: renaming a grid's arm must not silently drop its verdict."""
  arms = {a.name: arm(0.3, 0.3, 0.3) for a in grids.get(name).arms}
  questions = [r.question for r in rules.READERS[name](arms)]
  assert all(q in questions for q in final_questions), questions
  per_n = [f"N = {n}: {q}" for n in (2, 4, 8) for q in ("finding 5 holds", "R2 vs R3")]
  assert name != "offpolicy" or all(q in questions for q in per_n)


def _round2_run(arm, seed, full, collapse_step=None, kl=1e-3):
  records = [{"step": 0, "eval/accuracy": 0.3, "eval/accuracy_full": full[0]}]
  records += [{"step": s, "eval/accuracy": a, "eval/accuracy_full": a, "mismatch/kl_k3": kl,
               "policy/entropy": 0.3} for s, a in zip((190, 200), full[1:])]
  return report.Run(arm, f"{arm}/seed_{seed}", seed, records, collapse_step, 1.0)


def test_round2_score_is_the_mean_of_the_last_two_full_evaluations():
  assert _round2_run("a", 0, (0.3, 0.40, 0.50)).score == pytest.approx(0.45)
  # collapsed at step 195: the full evaluations before it (steps 0 and 190)
  assert _round2_run("a", 0, (0.3, 0.40, 0.05), 195).score == pytest.approx(0.35)
  # collapsed at step 5, before any full evaluation but step 0's: that one alone
  early = _round2_run("a", 0, (0.3, 0.40, 0.05), 5)
  assert early.scored_evaluations == [(0, 0.3)] and early.score == pytest.approx(0.3)
  # round 1 (no full evaluations): the last evaluation
  plain = report.Run("a", "a/seed_0", 0, [{"step": 0, "eval/accuracy": 0.3},
                                           {"step": 40, "eval/accuracy": 0.35}], None, 1.0)
  assert plain.scored_evaluations == [] and plain.score == 0.35


def test_round2_table_has_the_score_column(tmp_path):
  runs = [_round2_run("a", s, (0.3, 0.40, 0.50 + 0.1 * s)) for s in range(2)]
  rows = report.write_table(runs, str(tmp_path))
  # seed 0: (0.40 + 0.50) / 2, seed 1: (0.40 + 0.60) / 2
  assert rows[0].score == pytest.approx(0.475) and rows[0].score_std == pytest.approx(0.025)
  assert "| 0.475 ± 0.025 |" in (tmp_path / "table.md").read_text()


def test_round2_reads_collapses_by_fisher_and_accuracy_by_intervals():
  runs = []
  for seed in range(5):
    runs.append(_round2_run("minirl", seed, (0.3, 0.50, 0.52 + 0.01 * seed), kl=2e-3))
    runs.append(_round2_run("minirl_no_is", seed, (0.3, 0.30, 0.20),
                            collapse_step=150 if seed < 4 else None))
    runs.append(_round2_run("minirl+r3", seed, (0.3, 0.50, 0.52 + 0.01 * seed + 0.002 * (-1) ** seed),
                            kl=1e-3))
  readings = {r.question: r for r in rules.read_round2(rules.by_seed(runs))}
  collapse = readings["finding 3: w/o IS collapses, MiniRL does not"]
  assert collapse.verdict == "reproduced" and "4/5 vs 0/5" in collapse.evidence
  ahead = readings["finding 3: MiniRL ahead of w/o IS"]
  assert ahead.verdict == "reproduced" and "5 seeds" in ahead.evidence
  assert readings["finding 4: R3 gives no accuracy gain"].verdict == "reproduced"
  assert readings["finding 4: R3 lowers the k3 KL (last 10 steps, no replay - R3)"].verdict == (
      "reproduced")
  assert not any(q.startswith("finding 5") for q in readings)  # no off-policy arm ran


def test_round2_reads_each_n_and_names_contrasts_of_the_cold_start_with_itself():
  """N = 8 and N = 2 are read alike; where every run of both arms collapsed before its
  first full evaluation after step 0, both scores are step 0's and the reading says so."""
  runs = []
  for seed in range(3):
    for arm in ("n8/minirl", "n8/minirl+r3"):
      runs.append(_round2_run(arm, seed, (0.2 + 0.01 * seed, 0.0, 0.0), collapse_step=5))
    runs.append(_round2_run("n2/minirl", seed, (0.2, 0.30, 0.30 + 0.01 * seed)))
    runs.append(_round2_run("n2/minirl+r3", seed, (0.2, 0.40, 0.42 + 0.02 * seed)))
  readings = {r.question: r for r in rules.read_round2(rules.by_seed(runs))}
  n8 = readings["finding 5, N = 8: MiniRL + R3 ahead of no replay"]
  assert n8.interval == (0.0, 0.0, 0.0) and "compares the cold start with itself" in n8.evidence
  assert "collapsed 3/3 vs 3/3" in readings["finding 5, N = 8: without replay, collapse"].evidence
  n2 = readings["finding 5, N = 2: MiniRL + R3 ahead of no replay"]
  assert n2.verdict == "reproduced" and "cold start" not in n2.evidence
  assert n2.interval[0] == pytest.approx(0.115)  # ((0.40 + 0.42 + 0.02 s) - (0.30 + 0.30 + 0.01 s)) / 2
  assert "per seed 0: +0.110, 1: +0.115, 2: +0.120" in n2.evidence


def test_round2_arms_planned_with_no_seeds_are_named_not_counted_as_missing(tmp_path):
  grid = grids.get("round2")
  planned = {arm.name: arm.seeds for arm in grid.arms if arm.seeds}
  runs = [_round2_run(name, seed, (0.3, 0.4, 0.4)) for name, n in planned.items()
          for seed in range(n)]
  rules.write(grid, 10, runs, str(tmp_path))
  text = (tmp_path / "verdicts.md").read_text()
  unplanned = [arm.name for arm in grid.arms if arm.seeds == 0]
  assert unplanned and text.startswith(
      f"Not run (0 seeds planned): {', '.join(unplanned)}; the contrasts that need them "
      "have no row.")
  rules.write(grid, 10, runs[1:], str(tmp_path))  # one seed of the first arm still running
  assert (tmp_path / "verdicts.md").read_text().startswith(
      "**Partial, not verdicts**: 1 arm(s) with fewer than their seeds finished, 0 with none.")
