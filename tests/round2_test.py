"""Round 2: its design from round 1's committed series, its arms, its score and its
readers on hand-built runs."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from minirl_jax import config_base
from minirl_jax.experiments import grids
from minirl_jax.experiments import report
from minirl_jax.experiments import round2
from minirl_jax.experiments import rules
from minirl_jax.experiments import series
from minirl_jax.experiments import stats

ROOT = pathlib.Path(__file__).parents[1]
RESULTS = str(ROOT / "docs" / "results")


def _run(arm, seed, full, collapse_step=None, kl=1e-3):
  records = [{"step": 0, "eval/accuracy": 0.3, "eval/accuracy_full": full[0]}]
  records += [{"step": s, "eval/accuracy": a, "eval/accuracy_full": a, "mismatch/kl_k3": kl,
               "policy/entropy": 0.3} for s, a in zip((190, 200), full[1:])]
  return report.Run(arm, seed, records, collapse_step, 1.0)


def _read(runs):
  return {r.question: r for r in round2.read(rules.by_seed(runs, round2.scored_evaluations))}


def test_the_score_is_the_mean_of_the_last_two_full_evaluations_before_a_collapse():
  def score(run):
    return report.score(run, round2.scored_evaluations)
  assert round2.scored_evaluations(_run("a", 0, (0.3, 0.40, 0.50))) == [(190, 0.4), (200, 0.5)]
  assert score(_run("a", 0, (0.3, 0.40, 0.50))) == pytest.approx(0.45)
  # collapsed at step 195: the full evaluations before it (steps 0 and 190)
  assert score(_run("a", 0, (0.3, 0.40, 0.05), 195)) == pytest.approx(0.35)
  # collapsed at step 5, before any full evaluation but step 0's: that one alone
  early = _run("a", 0, (0.3, 0.40, 0.05), 5)
  assert round2.scored_evaluations(early) == [(0, 0.3)] and score(early) == pytest.approx(0.3)


def test_the_table_has_the_score_column(tmp_path):
  runs = [_run("a", s, (0.3, 0.40, 0.50 + 0.1 * s)) for s in range(2)]
  (row,) = report.write_table(runs, str(tmp_path), round2.scored_evaluations)
  # seed 0: (0.40 + 0.50) / 2, seed 1: (0.40 + 0.60) / 2
  assert row.score == pytest.approx(0.475) and row.score_std == pytest.approx(0.025)
  assert (tmp_path / "table.md").read_text().splitlines()[2] == (
      "| a | 2 | 0.300 ± 0.000 | 0.550 ± 0.050 | 0.550 ± 0.050 | 0.475 ± 0.025 | 0/2 | 0.3 | "
      "1.00e-03 | nan | 1 |")


def test_collapses_by_fisher_and_accuracy_by_intervals():
  runs = []
  for seed in range(5):
    runs.append(_run("minirl", seed, (0.3, 0.50, 0.52 + 0.01 * seed), kl=2e-3))
    runs.append(_run("minirl_no_is", seed, (0.3, 0.30, 0.20),
                     collapse_step=150 if seed < 4 else None))
    runs.append(_run("minirl+r3", seed, (0.3, 0.50, 0.52 + 0.01 * seed + 0.002 * (-1) ** seed),
                     kl=1e-3))
  readings = _read(runs)
  assert {q: r.verdict for q, r in readings.items()} == {
      "finding 3: w/o IS collapses, MiniRL does not": "reproduced",
      "finding 3: MiniRL ahead of w/o IS": "reproduced",
      "finding 4: R3 gives no accuracy gain": "reproduced",
      "finding 4: R3 lowers the k3 KL (last 10 steps, no replay - R3)": "reproduced"}
  assert readings["finding 3: w/o IS collapses, MiniRL does not"].evidence.startswith(
      "collapsed 4/5 vs 0/5, Fisher p = 0.0238")
  # the collapsed runs score their step-0 full evaluation (0.3), the one that held 0.25
  assert readings["finding 3: MiniRL ahead of w/o IS"].interval[0] == pytest.approx(
      (0.51 + 0.005 * 2) - (4 * 0.3 + 0.25) / 5)
  kl = readings["finding 4: R3 lowers the k3 KL (last 10 steps, no replay - R3)"]
  assert kl.evidence == "+0.001 [+0.001, +0.001] (95% t, 5 seeds)"


def test_each_n_is_read_alike_and_a_contrast_of_the_cold_start_says_so():
  """N = 8 and N = 2 are read alike; where every run of both arms collapsed before its
  first full evaluation after step 0, both scores are step 0's and the reading says so."""
  runs = []
  for seed in range(3):
    for arm in ("n8/minirl", "n8/minirl+r3"):
      runs.append(_run(arm, seed, (0.2 + 0.01 * seed, 0.0, 0.0), collapse_step=5))
    runs.append(_run("n2/minirl", seed, (0.2, 0.30, 0.30 + 0.01 * seed)))
    runs.append(_run("n2/minirl+r3", seed, (0.2, 0.40, 0.42 + 0.02 * seed)))
  readings = _read(runs)
  assert list(readings) == [
      "finding 5, N = 8: without replay, collapse",
      "finding 5, N = 8: MiniRL + R3 ahead of no replay",
      "finding 5, N = 2: without replay, collapse",
      "finding 5, N = 2: MiniRL + R3 ahead of no replay"]
  n8 = readings["finding 5, N = 8: MiniRL + R3 ahead of no replay"]
  assert n8.interval == (0.0, 0.0, 0.0) and n8.evidence.endswith(
      "the contrast compares the cold start with itself")
  assert readings["finding 5, N = 8: without replay, collapse"].evidence.startswith(
      "collapsed 3/3 vs 3/3, Fisher p = 1")
  n2 = readings["finding 5, N = 2: MiniRL + R3 ahead of no replay"]
  assert n2.verdict == "reproduced" and "cold start" not in n2.evidence
  # ((0.40 + 0.42 + 0.02 s) - (0.30 + 0.30 + 0.01 s)) / 2 = 0.11 + 0.005 s
  assert n2.interval[0] == pytest.approx(0.115)
  assert "; per seed 0: +0.110, 1: +0.115, 2: +0.120;" in n2.evidence


def test_checks_read_power_the_interval_otherwise_and_matched_steps():
  """Seed 0's MiniRL run collapses at step 5 and scores its step-0 evaluation; every seed's
  training reward is lower with MiniRL over the steps both runs logged."""
  runs = []
  for seed in range(4):
    for arm, base in (("minirl", 0.40), ("minirl_no_is", 0.45)):
      # scores (steps 190 and 200): MiniRL 0.405 + 0.015 seed, w/o IS 0.45 + 0.015 seed
      run = _run(arm, seed, (0.21, base + 0.01 * seed,
                             base + 0.02 * seed + 0.01 * (arm == "minirl")))
      steps = range(1, 6) if arm == "minirl" and seed == 0 else range(1, 11)
      run.records[1:1] = [{"step": s, "reward/mean": 0.3 - 0.01 * (arm == "minirl") + 0.001 * s,
                           "policy/entropy": 0.05, "mismatch/kl_k3": 1e-3} for s in steps]
      if arm == "minirl" and seed == 0:  # collapsed at step 5: scores its step 0, 0.21
        run = report.Run(arm, seed, run.records[:6], 5, 1.0)
      runs.append(run)
  arms = rules.by_seed(runs, round2.scored_evaluations)
  lines = round2.checks(arms)
  assert lines[0] == "## Checks made after the runs"
  sd = float(np.std([0.21 - 0.45, -0.045, -0.045, -0.045], ddof=1))
  power = next(line for line in lines if line.startswith("| finding 3: MiniRL - w/o IS | 4 |"))
  assert power.split(" | ")[2:4] == [
      f"{sd:.3f} (0.034)", f"{stats.detectable_effect(sd, 4):.3f} "
      f"({stats.detectable_effect(round2.PLANNED_DIFF_SD, 4):.3f})"]
  otherwise = [line for line in lines if line.startswith("| finding 3") and "seed 0" in line]
  assert otherwise and otherwise[0].endswith("| minirl seed 0 |")
  assert "seed 0 -0.240" in otherwise[0]
  reward = next(line for line in lines if "| training reward, mean |" in line)
  assert reward.endswith("| 4 / 0 | 0.125 |")  # every seed lower with MiniRL: 2 / 2^4
  assert "| -0.010 [-0.010, -0.010] |" in reward  # over the steps both runs logged
  assert round2.checks({"minirl": arms["minirl"]}) == []  # no contrast: no section


def test_the_committed_table_and_verdicts_rederive(tmp_path):
  """round2.md's command (`--restore_from=docs/results/round2 --report_only`) remakes the
  committed table.md and verdicts.md byte for byte from the committed series."""
  grid = round2.GRIDS["round2"]
  results = ROOT / "docs" / "results" / "round2"
  series.restore(grid, str(results), str(tmp_path))
  runs = report.load(report.finished_runs(grid, 10, str(tmp_path)))
  report.write_table(runs, str(tmp_path), grid.scored, grid.sample_sd)
  rules.write(grid, 10, runs, str(tmp_path))
  for name in ("table.md", "verdicts.md"):
    assert (tmp_path / name).read_text() == (results / name).read_text(), name


def test_arms_keep_the_global_batch_and_plan_their_seeds():
  from minirl_jax.rl import settings as settings_lib
  grid = round2.GRIDS["round2"]
  assert {a.name: a.seeds for a in grid.arms} == {
      "minirl": 10, "minirl_no_is": 10, "n8/minirl": 5, "n8/minirl+r3": 5, "minirl+r3": 0,
      "minirl_no_is+r3": 0, "n8/minirl+r2": 0, "n8/minirl_no_clip": 0, "n2/minirl": 5,
      "n2/minirl+r3": 5}
  for arm in grid.arms:  # N at the on-policy global batch: only the mini-batch changes
    config = grids.apply(config_base.sibling(str(ROOT / grid.base_config), "paper_moe"),
                         arm.overrides)
    s = settings_lib.from_config(config)
    n = int(arm.name[1]) if arm.name.startswith("n") else 1
    assert (s.rl.global_batch, s.rl.num_minibatches) == (64, n), arm.name


def test_round1s_contrasts_and_their_noise():
  pairs, scores = round2.round1_contrasts(RESULTS)
  # 90 same-level pairs, 64 with two or more seeds where neither run collapsed (pooled)
  assert len(pairs) == 90 and sum(len(diffs) >= 2 for *_, diffs in pairs) == 64
  assert len(scores) == 111  # the runs that did not collapse
  assert pairs[0][:3] == ("onpolicy", "cispo", "grpo")
  assert {grid for grid, *_ in pairs} == {"onpolicy", "gap", "offpolicy", "coldstart"}
  out = round2.power_analysis(RESULTS, 0.05)
  assert (out["noise_final"].contrasts, out["noise_final"].df) == (64, 108)
  assert round(out["accuracy"], 3) == 0.327
  # the larger training SD, the last-two-evaluations score's (round2.md: 0.031)
  assert out["train_sd_used"] == out["noise_last2"].train_sd == pytest.approx(0.0305, abs=1e-4)
  # the paired SD the checks hold the realised one against: 1024 problems, 2 evaluations
  (planned,) = [d for d in out["designs"] if (d["problems"], d["evals"]) == (1024, 2)]
  assert round(planned["diff_sd"], 4) == round2.PLANNED_DIFF_SD


def test_round1_reread_by_round2s_rules():
  rows = {(finding, label): (verdict, evidence)
          for finding, label, verdict, evidence in round2.reread_round1(RESULTS)}
  assert len(rows) == 20
  assert rows[("5", "unclipped vs clipped collapses (N = 2, 4, 8)")][0] == "reproduced"
  assert rows[("5", "unclipped vs clipped collapses (N = 2, 4, 8)")][1].startswith(
      "collapsed 10/18 vs 1/27, Fisher p = 0.00012")
  assert rows[("2", "MiniRL - length-norm")] == (
      "inconclusive", "+0.044 [-0.155, +0.243] (95% t, 3 seeds)")


def test_power_script_rederives_round2s_design_from_round1s_series():
  """scripts/power.py on the committed round-1 series gives the numbers round2.md's part 1
  quotes: paired SD 0.063 (0.059 of it evaluation), and 6 seeds for 0.05 at 1024 problems
  scored by the mean of the last 2 evaluations."""
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "power.py")], check=True,
                       capture_output=True, text=True, timeout=300).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert round(result["noise_final"]["diff_sd"], 3) == 0.063
  assert round(result["noise_final"]["eval_sd"], 3) == 0.059
  assert result["noise_final"]["contrasts"] == 64
  design = {(d["problems"], d["evals"]): d for d in result["designs"]}
  assert design[(1024, 2)]["seeds"] == 6 and design[(128, 1)]["seeds"] == 16
  assert round(design[(1024, 2)]["mde_5"], 3) == 0.057
  assert round(result["fisher_p"]["4/5 vs 0/5"], 3) == 0.024
  assert len(result["round1_reread"]) == 20
