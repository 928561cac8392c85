"""A grid's runs read once and its table: aggregates over seeds, a grid cut short."""
import csv
import os

import pytest

from minirl_jax.experiments import design
from minirl_jax.experiments import layout
from minirl_jax.experiments import report

from experiments_testlib import rl
from experiments_testlib import write_run


def test_load_reads_each_runs_records_collapse_and_wall_time(tmp_path):
  write_run(tmp_path / "n8" / "a" / "seed_3", [{"step": 0, "eval/accuracy": 0.25},
                                               rl(1, entropy=0.01), rl(2, acc=0.5)],
            wall_s=7.5)
  (run,) = report.load({"n8/a": [str(tmp_path / "n8" / "a" / "seed_3")]})
  assert (run.arm, run.seed, run.name) == ("n8/a", 3, "n8/a/seed_3")
  assert (run.collapse_step, run.wall_s, run.accuracies) == (1, 7.5, [0.25, 0.5])
  assert [r["step"] for r in run.records] == [0, 1, 2]


def test_table_aggregates_seeds(tmp_path):
  grid = design.Grid("t", "configs/smoke.py",
                     tuple(design.Arm(name) for name in ("a", "b", "c", "never_ran")), "test")
  for seed, (peak, final) in enumerate(((0.4, 0.3), (0.6, 0.5))):
    write_run(tmp_path / "a" / f"seed_{seed}", [
        {"step": 0, "eval/accuracy": 0.2}, rl(1, acc=peak, kl=2e-3, staleness=0.02 * seed),
        rl(2, acc=final, staleness=0.01)])
    write_run(tmp_path / "b" / f"seed_{seed}", [
        {"step": 0, "eval/accuracy": 0.2}, rl(1, acc=0.5), rl(2, acc=0.1, entropy=0.5)])
  # c: seed 0 finished, seed 1 interrupted (no summary); a grid cut short reports what it has
  write_run(tmp_path / "c" / "seed_0", [{"step": 0, "eval/accuracy": 0.2}, rl(1, acc=0.7)])
  write_run(tmp_path / "c" / "seed_1", [{"step": 0, "eval/accuracy": 0.2}])
  os.remove(tmp_path / "c" / "seed_1" / layout.SUMMARY)
  assert report.finished_runs(grid, 2, str(tmp_path)) == {
      "a": [str(tmp_path / "a" / "seed_0"), str(tmp_path / "a" / "seed_1")],
      "b": [str(tmp_path / "b" / "seed_0"), str(tmp_path / "b" / "seed_1")],
      "c": [str(tmp_path / "c" / "seed_0")]}
  runs = report.load(report.finished_runs(grid, 2, str(tmp_path)))
  rows = {r.arm: r for r in report.write_table(runs, str(tmp_path))}
  assert list(rows) == ["a", "b", "c"] and rows["c"].seeds == 1
  assert rows["c"].peak_accuracy == pytest.approx(0.7)
  a, b = rows["a"], rows["b"]
  assert (a.start_accuracy, a.peak_accuracy, a.final_accuracy) == pytest.approx((0.2, 0.5, 0.4))
  assert a.peak_accuracy_std == pytest.approx(0.1) and a.max_kl == pytest.approx(2e-3)
  assert a.max_staleness == pytest.approx((0.01 + 0.02) / 2)  # per run max, then the mean
  assert a.collapsed == 0 and b.collapsed == 2 and b.collapse_step_median == 2
  assert b.final_entropy == pytest.approx(0.5) and a.wall_s == 10.0
  assert (a.score, a.score_std) == (None, None)  # no score rule: no score column
  with open(tmp_path / "table.csv") as f:
    assert [(r["arm"], r["seeds"], r["score"]) for r in csv.DictReader(f)] == [
        ("a", "2", ""), ("b", "2", ""), ("c", "1", "")]
  assert (tmp_path / "table.md").read_text().splitlines()[:4] == [
      "| arm | seeds | start acc | peak acc | final acc | collapsed (step) | final entropy | "
      "max KL | max staleness | wall s |", "|---|---|---|---|---|---|---|---|---|---|",
      "| a | 2 | 0.200 ± 0.000 | 0.500 ± 0.100 | 0.400 ± 0.100 | 0/2 | 0.3 | 2.00e-03 | "
      "1.50e-02 | 10 |",
      "| b | 2 | 0.200 ± 0.000 | 0.500 ± 0.000 | 0.100 ± 0.000 | 2/2 (2) | 0.5 | 1.00e-03 | "
      "0.00e+00 | 10 |"]
  assert report.title(grid, 2, list(rows.values())) == "t: mean over 1-2 of 2 seed(s)"


def test_a_score_rule_adds_the_score_column(tmp_path):
  runs = [report.Run("a", s, [{"step": 0, "eval/accuracy": 0.2, "policy/entropy": 0.3},
                              {"step": 5, "eval/accuracy": 0.3 + 0.1 * s}], None, 1.0)
          for s in range(2)]
  def first_and_last(run):
    return [(r["step"], r["eval/accuracy"]) for r in run.records][::len(run.records) - 1]
  assert report.score(runs[1], first_and_last) == pytest.approx(0.3)
  (row,) = report.write_table(runs, str(tmp_path), first_and_last)
  assert (row.score, row.score_std) == pytest.approx((0.275, 0.025))
  assert "| 0.350 ± 0.050 | 0.275 ± 0.025 | 0/2 |" in (tmp_path / "table.md").read_text()


def test_a_grid_can_print_the_sample_sd_and_says_so(tmp_path):
  runs = [report.Run("a", s, [{"step": 0, "eval/accuracy": 0.2 + 0.1 * s,
                               "policy/entropy": 0.3}], None, 1.0) for s in range(2)]
  (row,) = report.write_table(runs, str(tmp_path), sample_sd=True)
  assert row.start_accuracy_std == pytest.approx(0.1 / 2 ** 0.5)  # ddof = 1: sqrt(0.005)
  lines = (tmp_path / "table.md").read_text().splitlines()
  assert "| 0.250 ± 0.071 |" in lines[2]
  assert lines[3:] == ["", "± : the sample SD over seeds (ddof = 1)."]
  (one,) = report.write_table(runs[:1], str(tmp_path), sample_sd=True)
  assert one.start_accuracy_std != one.start_accuracy_std  # one seed: no sample SD (nan)
