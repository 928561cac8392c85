"""Run directories written by hand for the experiments tests (report, series)."""
import json
import os

from minirl_jax.experiments import layout


def write_run(run_dir, records, wall_s=10.0):
  """A finished run: its RL records in metrics.jsonl and a summary with `wall_s`."""
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"stage": "rl", **r}) + "\n" for r in records)
  layout.write_summary(str(run_dir), {"wall_s": wall_s})


def rl(step, acc=None, entropy=0.3, kl=1e-3, staleness=0.0):
  """One RL step's record with the metrics the reports read."""
  r = {"step": step, "policy/entropy": entropy, "mismatch/kl_k3": kl, "reward/mean": 0.5,
       "optim/skipped": 0.0, "staleness/abs_log_pi_pi_old": staleness}
  return r | ({"eval/accuracy": acc} if acc is not None else {})
