"""Early warning as a classifier: labels, AUC, curve, rates and leads on hand-built runs."""
import numpy as np
import pytest

from minirl_jax.experiments import report
from minirl_jax.experiments import roc

KL = "mismatch/kl_k3"


def _run(name, values, collapse_step=None):
  records = [{"step": s, KL: v} for s, v in enumerate(values, start=1)]
  return report.Run(name, f"{name}/seed_0", 0, records, collapse_step, float("nan"))


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
