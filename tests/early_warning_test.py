"""Early warning: each signal's baseline and the one definition of its crossing, the leads
before each collapse and the crossings without one."""
import json
import os

import pytest

from minirl_jax.experiments import early_warning
from minirl_jax.experiments import layout
from minirl_jax.experiments import report


def _write_run(run_dir, records):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"stage": "rl", **r}) + "\n" for r in records)
  layout.write_summary(str(run_dir), {"wall_s": 1.0})


def _rl(step, acc=None, kl=1e-3):
  r = {"step": step, "policy/entropy": 0.3, "mismatch/kl_k3": kl, "reward/mean": 0.5,
       "optim/skipped": 0.0}
  return r | ({"eval/accuracy": acc} if acc is not None else {})


def test_early_warning_leads_by_the_stated_thresholds(tmp_path):
  # Baseline (steps 1-5): first-order error 0.1, cosine 0.95, KL 1e-3, entropy 0.4.
  records = [{"step": 0, "eval/accuracy": 0.3}]
  for step in range(1, 21):
    records.append({"step": step, "policy/entropy": 0.4 if step < 16 else 0.15,
                    "mismatch/kl_k3": 1e-3, "reward/mean": 0.5,
                    "is/first_order_error": 0.1 if step < 9 else 0.25,  # x2.5 at step 9
                    "optim/skipped": 0.0})
    if step % 2 == 0:
      records[-1]["is/grad_cosine_token_seq_last"] = 0.95 if step < 12 else 0.85  # 1-c x3
    if step % 5 == 0:
      records[-1]["eval/accuracy"] = {5: 0.4, 10: 0.42, 15: 0.4, 20: 0.1}[step]
  _write_run(tmp_path / "arm" / "seed_0", records)
  _write_run(tmp_path / "calm" / "seed_0", [
      {"step": 0, "eval/accuracy": 0.3}, _rl(1, acc=0.3), _rl(2, acc=0.31)])
  # never collapses, but its KL rises x5 after the baseline window: a false alarm
  _write_run(tmp_path / "calm" / "seed_1", [{"step": 0, "eval/accuracy": 0.3}] + [
      _rl(step, acc=0.3 if step % 5 == 0 else None, kl=1e-3 if step <= 5 else 5e-3)
      for step in range(1, 11)])
  runs = {"arm": [str(tmp_path / "arm" / "seed_0")],
          "calm": [str(tmp_path / "calm" / "seed_0"), str(tmp_path / "calm" / "seed_1")]}
  leads = early_warning.warnings_for(report.load(runs))
  assert len(leads) == 1 and leads[0].run == "arm/seed_0" and leads[0].collapse_step == 20
  assert leads[0].leads == {"is/first_order_error": 11, "is/grad_cosine_token_seq_last": 8,
                            "mismatch/kl_k3": None, "policy/entropy": 4}
  out = early_warning.write(report.load(runs), str(tmp_path))
  assert out["false_alarms"] == {"is/first_order_error": (0, 2),
                                 "is/grad_cosine_token_seq_last": (0, 2),
                                 "mismatch/kl_k3": (1, 2),  # calm/seed_1's KL
                                 "policy/entropy": (0, 2)}
  assert open(out["early_warning_md"]).read().splitlines() == [
      "| run | collapse step | first-order error | 1 - grad cosine (last mini-batch) | "
      "train-infer KL (k3) | 1 / entropy |", "|---|---|---|---|---|---|",
      "| arm/seed_0 | 20 | +11 | +8 | never | +4 |",
      "| runs that never collapsed: crossed anyway | - | 0/2 | 0/2 | 1/2 | 0/2 |"]
  assert os.path.getsize(out["early_warning_figure"]) > 10_000


def test_a_signal_logged_every_10_steps_takes_its_first_value_as_baseline():
  series = [(10, 0.01), (20, 0.015), (30, 0.03)]  # 1 - cosine at steps 10, 20, 30
  assert early_warning.baseline(series) == (0.01, 10)
  assert early_warning.baseline([(2, 0.1), (4, 0.3), (6, 5.0)]) == (pytest.approx(0.2), 5)
  assert early_warning.baseline([]) is None
  records = [{"step": s, "is/grad_cosine_token_seq_last": 1 - v} for s, v in series]
  assert early_warning.crossing_step(records, "is/grad_cosine_token_seq_last",
                                     lambda v: 1.0 - v) == 30


KL = "mismatch/kl_k3"


@pytest.mark.parametrize("values,factor,before,want", [
    ([1.0] * 5 + [1.5, 2.0, 2.5], 2.0, None, 8),  # exactly 2x is not above it
    ([1.0] * 5 + [1.5, 2.0, 2.5], 1.4, None, 6),
    ([1.0] * 5 + [1.5, 2.0, 2.5], 2.0, 8, None),  # a warning must come before the collapse
    ([0.0] * 5 + [0.0, 1e-9], 2.0, None, 7),  # a zero baseline: any positive value crosses
    ([0.0] * 7, 2.0, None, None),  # exactly zero throughout never crosses
    ([1.0] * 5 + [3.0], 2.0, 6, None),
    ([], 2.0, None, None),
])
def test_crossing_step_is_the_first_step_past_the_threshold(values, factor, before, want):
  records = [{"step": s, KL: v} for s, v in enumerate(values, start=1)]
  assert early_warning.crossing_step(records, KL, factor=factor, before=before) == want
