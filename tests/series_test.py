"""The per-step series: written, read back at the digits the readings need, and restored as
finished runs on the next machine."""
import csv
import os

import numpy as np
import pytest

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax.experiments import design
from minirl_jax.experiments import layout
from minirl_jax.experiments import report
from minirl_jax.experiments import series

from experiments_testlib import rl
from experiments_testlib import write_run


def test_series_keeps_every_runs_steps(tmp_path):
  write_run(tmp_path / "a" / "seed_0", [{"step": 0, "eval/accuracy": 0.25},
                                        rl(1, kl=2.5e-3), rl(2, acc=0.375, entropy=0.125)])
  runs = report.load({"a": [str(tmp_path / "a" / "seed_0")]})
  with open(series.write_series(runs, str(tmp_path))) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["run", "step", *series.SERIES]  # no full evaluations: no column
  assert [(r["run"], r["step"]) for r in rows] == [("a/seed_0", "0"), ("a/seed_0", "1"),
                                                   ("a/seed_0", "2")]
  assert [r["eval/accuracy"] for r in rows] == ["0.25", "", "0.375"]
  assert rows[1]["mismatch/kl_k3"] == "0.0025" and rows[2]["policy/entropy"] == "0.125"
  assert rows[0]["policy/entropy"] == "" and rows[2]["is/seq_frac_masked"] == ""


def test_series_keep_the_digits_the_readings_read(tmp_path):
  """1 - cosine is what the early warning reads: a cosine near 1 keeps 9 digits (any float32
  exactly); accuracies keep k / problems exactly for the collapse rule; the rest 6."""
  cos = float(np.float32(0.99999912))
  run = report.Run("a", 0, [
      {"step": 1, "is/grad_cosine_token_seq_last": cos, "mismatch/kl_k3": 1 / 3}], None, 1.0)
  back = series.read_series(series.write_series([run], str(tmp_path)))["a/seed_0"][0]
  assert np.float32(back["is/grad_cosine_token_seq_last"]) == np.float32(cos)
  assert 1 - back["is/grad_cosine_token_seq_last"] == pytest.approx(1 - cos, rel=1e-4)
  assert back["mismatch/kl_k3"] == 0.333333
  acc = report.Run("a", 0, [{"step": 0, "eval/accuracy": 34 / 128},
                            {"step": 10, "eval/accuracy": 17 / 128}], None, 1.0)
  back = series.read_series(series.write_series([acc], str(tmp_path)))["a/seed_0"]
  assert [r["eval/accuracy"] for r in back] == [34 / 128, 17 / 128]  # exactly half: no collapse
  assert collapse.collapse_step(back) is None


def test_runs_from_series_name_their_arms_and_seeds(tmp_path):
  runs = [report.Run("n8/a", 2, [{"step": 0, "eval/accuracy": 0.5},
                                 {"step": 1, "policy/entropy": 0.01}], 1, 3.0)]
  path = series.write_series(runs, str(tmp_path))
  (back,) = series.runs_from_series(path, prefix="gap/")
  assert (back.arm, back.seed, back.name) == ("gap/n8/a", 2, "gap/n8/a/seed_2")
  assert back.collapse_step == 1 and np.isnan(back.wall_s)
  assert back.records == [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "policy/entropy": 0.01}]


def test_a_committed_report_restores_its_runs_for_the_next_machine(tmp_path):
  grid = design.Grid("t", "configs/smoke.py", (design.Arm("a"), design.Arm("b")), "test")
  made = tmp_path / "made"
  for seed in range(2):
    write_run(made / "a" / f"seed_{seed}", [
        {"step": 0, "eval/accuracy": 0.25}, rl(1, kl=1 / 3, staleness=0.01 * seed),
        rl(2, acc=0.375 + 0.125 * seed, entropy=0.01)], wall_s=10.0 + seed)
  write_run(made / "b" / "seed_0", [{"step": 0, "eval/accuracy": 0.25}, rl(1, acc=0.5)])
  results = tmp_path / "results"
  os.makedirs(results)
  runs = report.load(report.finished_runs(grid, 2, str(made)))
  report.write_table(runs, str(results))
  series.write_series(runs, str(results))
  workdir = tmp_path / "next_machine"
  write_run(workdir / "b" / "seed_0", [{"step": 0, "eval/accuracy": 0.75}])  # kept as is
  assert series.restore(grid, str(results), str(workdir)) == [
      str(workdir / "a" / "seed_0"), str(workdir / "a" / "seed_1")]
  assert layout.summary(str(workdir / "a" / "seed_1")) == {
      "wall_s": 10.5, "restored_from": str(results)}
  restored = report.load(report.finished_runs(grid, 2, str(workdir)))
  a0 = restored[0]
  assert (a0.name, a0.seed, a0.collapse_step) == ("a/seed_0", 0, 2)  # entropy under the floor
  assert a0.records[1]["mismatch/kl_k3"] == pytest.approx(1 / 3, rel=1e-6)  # 6 digits kept
  assert a0.accuracies == [0.25, 0.375] and restored[1].accuracies == [0.25, 0.5]
  assert [r.wall_s for r in restored] == [10.5, 10.5, 10.0]  # the arm's mean: it stays
  assert restored[2].accuracies == [0.75]
  other = design.Grid("other", "configs/smoke.py", (design.Arm("a"),), "test")
  with pytest.raises(errors.UserError, match="run b/seed_0 is not an arm of grid other"):
    series.restore(other, str(results), str(tmp_path / "x"))
  with pytest.raises(errors.UserError, match="no .*missing.table.csv"):
    series.restore(grid, str(tmp_path / "missing"), str(tmp_path / "x"))
