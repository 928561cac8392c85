"""Power analysis of round 1 (docs/results/round2.md): the noise of paired contrasts in the
committed `series.csv` files, and the seeds, held-out problems and evaluations round 2 needs.

  python scripts/power.py [--results=docs/results] [--effect=0.05]

Reads each round-1 grid's `series.csv`, pairs arms of the same level (the gap grid's
levels, the off-policy grid's N) seed by seed, pools the paired differences of final
held-out accuracy over every contrast whose two runs did not collapse, splits the SD into
evaluation (binomial) and training noise, then prints the designs, and round 1's verdict
rows re-read by round 2's rules (intervals and Fisher p) (minirl_jax/experiments/round2.py).
Last line: one JSON object.
"""
import dataclasses
import json
import os

from absl import app
from absl import flags

from minirl_jax import errors
from minirl_jax.experiments import round2

_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), os.pardir,
                                                       "docs", "results"),
                               "Round 1's results folder (one sub-folder per grid).")
_EFFECT = flags.DEFINE_float("effect", 0.05, "Final-accuracy difference to detect.")


def main(argv):
  del argv
  out = round2.power_analysis(_RESULTS.value, _EFFECT.value)
  noise = out["noise_final"]
  print(f"round 1: {noise.contrasts} same-level contrasts, {noise.df} degrees of freedom, mean "
        f"accuracy of non-collapsed runs {out['accuracy']:.3f}")
  for label, n in (("final evaluation", noise), ("mean of last 2 evaluations",
                                                 out["noise_last2"])):
    print(f"  {label}: paired-difference SD {n.diff_sd:.4f} = evaluation {n.eval_sd:.4f} "
          f"(binomial, 2 x {n.problems} problems x {n.evals}) + training {n.train_sd:.4f}")
  print(f"\nseeds for a paired t-test (two-sided 5%, power 80%) to detect {_EFFECT.value}; "
        f"training SD {out['train_sd_used']:.4f}")
  print(f"{'problems':>9}{'evals':>7}{'diff SD':>9}{'seeds':>7}{'MDE@5':>8}{'MDE@10':>8}")
  for row in out["designs"]:
    print(f"{row['problems']:>9}{row['evals']:>7}{row['diff_sd']:>9.4f}{row['seeds']:>7}"
          f"{row['mde_5']:>8.3f}{row['mde_10']:>8.3f}")
  print("\none-sided Fisher exact p for collapse counts:")
  for k, v in out["fisher_p"].items():
    print(f"  {k}: p = {v:.4f}")
  print("power (one-sided 5%) against true collapse rates:")
  for k, v in out["fisher_power"].items():
    print(f"  {k}: {v:.3f}")
  reread = round2.reread_round1(_RESULTS.value)
  print("\nround 1's verdict rows by round 2's rules:")
  for finding, label, verdict, evidence in reread:
    print(f"  {finding:>2} {label:<66} {verdict:<15} {evidence}")
  print(json.dumps({**out, "noise_final": dataclasses.asdict(noise),
                    "noise_last2": dataclasses.asdict(out["noise_last2"]),
                    "round1_reread": [dict(zip(("finding", "contrast", "verdict", "evidence"), r))
                                      for r in reread]}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
