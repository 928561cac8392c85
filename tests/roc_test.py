"""Early warning as a classifier: labels, AUC, curve, rates and leads on hand-built runs."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minirl_jax.experiments import early_warning
from minirl_jax.experiments import report
from minirl_jax.experiments import roc
from minirl_jax.experiments import series

KL = "mismatch/kl_k3"


def _run(name, values, collapse_step=None):
  records = [{"step": s, KL: v} for s, v in enumerate(values, start=1)]
  return report.Run(name, 0, records, collapse_step, float("nan"))


# A collapses at step 20 and its KL triples from step 10; B never collapses, flat KL.
WARNED = _run("a", [1.0] * 9 + [3.0] * 10 + [9.0] * 5, collapse_step=20)
CALM = _run("b", [1.0] * 30)


def test_examples_label_the_horizon_before_a_collapse():
  ex = roc.examples([WARNED, CALM], KL, lambda v: v)
  # after the baseline window (steps 1-5), before the collapse: A 6-19, B 6-30
  assert ex.runs == 2 and len(ex.scores) == 14 + 25
  assert ex.labels.sum() == 10  # A's steps 10-19: at most 10 steps before step 20
  assert np.all(ex.scores[ex.labels] == 3.0)


def test_a_perfect_signal_and_its_rates_and_leads():
  ex = roc.examples([WARNED, CALM], KL, lambda v: v)
  assert roc.auc(ex) == 1.0
  assert roc.rates_at(ex, 2.0) == (1.0, 0.0)
  assert roc.leads([WARNED, CALM], KL, lambda v: v, 2.0) == [10]
  fpr, tpr, _ = roc.curve(ex)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_leads_count_the_early_warnings_crossing_before_the_collapse():
  """A lead is `early_warning.crossing_step` before the collapse: the same crossing the
  early-warning table reads, at any threshold."""
  late = _run("c", [1.0] * 9 + [3.0], collapse_step=10)  # crosses at its collapse step
  assert early_warning.crossing_step(late.records, KL) == 10
  assert roc.leads([WARNED, late, CALM], KL, lambda v: v, 2.0) == [10, None]
  # 3.0 is not above 3 x 1.0, and 9.0 comes at the collapse step: no warning
  assert roc.leads([WARNED], KL, lambda v: v, 3.0) == [None]


def test_auc_is_the_mann_whitney_probability_with_ties_half():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, 60).astype(float)  # many ties
  labels = rng.random(60) < 0.3
  ex = roc.Examples(scores, labels, runs=1)
  pos, neg = scores[labels], scores[~labels]
  brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert roc.auc(ex) == pytest.approx(brute)
  assert np.isnan(roc.auc(roc.Examples(scores, np.zeros(60, bool), runs=1)))


def test_write_makes_the_table_and_figure(tmp_path):
  out = roc.write([WARNED, CALM], str(tmp_path), "test")
  assert out["signals"][KL]["auc"] == 1.0 and out["signals"][KL]["warned_runs"] == 1
  assert "| train-infer KL (k3) | 2 | 10 | 29 | 1.000 |" in (tmp_path / "roc.md").read_text()
  assert (tmp_path / "roc.png").stat().st_size > 1000


def test_auc_by_group_reads_each_group_alone():
  # Within group "a" the KL warns perfectly; group "b" has no collapse, so no positive step.
  lines = roc.auc_by_group({"a": [WARNED, CALM], "b": [CALM]})
  assert lines[0].startswith("| signal | AUC, a (2 runs, 1 collapsed) | AUC, b (1 runs, 0 ")
  kl_row = next(line for line in lines if line.startswith("| train-infer KL (k3) |"))
  assert kl_row == "| train-infer KL (k3) | 1.000 (10 positive steps) | nan (0 positive steps) |"


def test_script_reads_every_grid_and_splits_the_rounds(tmp_path):
  """scripts/early_warning_roc.py over two committed series: one of round 1, round 2's."""
  root = pathlib.Path(__file__).parents[1]
  for grid in ("coldstart", "round2"):
    (tmp_path / grid).mkdir()
    shutil.copy(root / "docs" / "results" / grid / "series.csv", tmp_path / grid)
  out = subprocess.run([sys.executable, str(root / "scripts" / "early_warning_roc.py"),
                        f"--results={tmp_path}"], check=True, capture_output=True,
                       text=True, timeout=300).stdout
  summary = json.loads(out.strip().splitlines()[-1])
  coldstart = series.runs_from_series(str(tmp_path / "coldstart" / "series.csv"))
  round2 = series.runs_from_series(str(tmp_path / "round2" / "series.csv"))
  assert summary["grids"] == ["coldstart", "round2"]
  assert summary["runs"] == len(coldstart) + len(round2)
  text = (tmp_path / "roc.md").read_text()
  assert f"AUC, round 1 ({len(coldstart)} runs" in text
  assert f"AUC, round 2 ({len(round2)} runs" in text
  kl = roc.auc(roc.examples(round2, KL, lambda v: v))
  kl_row = next(line for line in text.split("Within")[1].splitlines()
                if line.startswith("| train-infer KL (k3) |"))
  assert kl_row.split(" | ")[-1].startswith(f"{kl:.3f} (")
