"""Power analysis of round 1 (docs/results/round2.md): the noise of paired contrasts in the
committed `series.csv` files, and the seeds, held-out problems and evaluations round 2 needs.

  python scripts/power.py [--results=docs/results] [--effect=0.05]

Reads each round-1 grid's `series.csv`, pairs arms of the same level (the gap grid's
levels, the off-policy grid's N) seed by seed, pools the paired differences of final
held-out accuracy over every contrast whose two runs did not collapse, splits the SD into
evaluation (binomial) and training noise, then prints the designs, and round 1's verdict
rows re-read by round 2's rules (intervals and Fisher p). Last line: one JSON object.
"""
import itertools
import json
import os

from absl import app
from absl import flags
import numpy as np

from minirl_jax import collapse
from minirl_jax import errors
from minirl_jax.experiments import power
from minirl_jax.experiments import report

_RESULTS = flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), os.pardir,
                                                       "docs", "results"),
                               "Round 1's results folder (one sub-folder per grid).")
_EFFECT = flags.DEFINE_float("effect", 0.05, "Final-accuracy difference to detect.")
GRIDS = ("onpolicy", "gap", "offpolicy", "coldstart")
ROUND1_PROBLEMS = 128
DESIGNS = [(128, 1), (128, 3), (512, 3), (1024, 1), (1024, 2), (1024, 3), (2048, 3)]


def _runs(grid_dir: str) -> dict[str, dict[int, list[dict]]]:
  """arm -> seed -> RL records, from a grid's series.csv."""
  arms = {}
  for name, records in report.read_series(os.path.join(grid_dir, "series.csv")).items():
    arm, seed = name.rsplit("/seed_", 1)
    arms.setdefault(arm, {})[int(seed)] = records
  return arms


def _score(records, last: int) -> float:
  accuracies = [r["eval/accuracy"] for r in records if r.get("eval/accuracy") is not None]
  return float(np.mean(accuracies[-last:]))


def contrasts(results: str, last: int = 1):
  """(grid, arm a, arm b, per-seed differences) for every same-level pair of arms, over
  the seeds where neither run collapsed; and every score read."""
  out, scores = [], []
  for grid in GRIDS:
    arms = _runs(os.path.join(results, grid))
    for a, b in itertools.combinations(sorted(arms), 2):
      if a.rpartition("/")[0] != b.rpartition("/")[0]:
        continue  # different level or N: not a contrast the rules read
      diffs = []
      for seed in sorted(arms[a].keys() & arms[b].keys()):
        ra, rb = arms[a][seed], arms[b][seed]
        if collapse.collapse_step(ra) is None and collapse.collapse_step(rb) is None:
          diffs.append(_score(ra, last) - _score(rb, last))
      out.append((grid, a, b, diffs))
    scores += [_score(r, last) for runs in arms.values() for r in runs.values()
               if collapse.collapse_step(r) is None]
  return out, scores


def _paired(arms, a: str, b: str) -> list[float]:
  """Per-seed differences of the final evaluation."""
  return [_score(arms[a][s], 1) - _score(arms[b][s], 1)
          for s in sorted(arms[a].keys() & arms[b].keys())]


def _collapses(arms, names) -> tuple[int, int]:
  runs = [r for name in names for r in arms[name].values()]
  return sum(collapse.collapse_step(r) is not None for r in runs), len(runs)


def reread_round1(results: str) -> list[tuple[str, str, str, str]]:
  """Round 1's verdict rows read by round 2's rules (docs/results/round2.md): (finding,
  contrast, verdict, evidence), every accuracy contrast with its 95% t interval and every
  collapse contrast with its one-sided Fisher p."""
  on, gap, off, cold = (_runs(os.path.join(results, g)) for g in GRIDS)
  rows = []
  def diff(finding, label, arms, a, b, claim="ahead"):
    rows.append((finding, label, *power.read_difference(_paired(arms, a, b), claim)))
  def collapse(finding, label, a, b):
    rows.append((finding, label, *power.read_collapses(*a, *b)))
  for other in ("minirl+length_norm", "minirl_no_is", "grpo", "cispo", "minirl_seq_tis"):
    diff("1", f"MiniRL - {other} (on-policy, fp8)", on, "minirl", other)
  diff("2", "MiniRL - length-norm", on, "minirl", "minirl+length_norm")
  collapse("3", "w/o IS vs MiniRL collapses (on-policy, fp8)",
           _collapses(on, ["minirl_no_is"]), _collapses(on, ["minirl"]))
  levels = sorted({a.rpartition("/")[0] for a in gap})
  collapse("3", "w/o IS vs MiniRL collapses (gap grid, 7 levels pooled)",
           _collapses(gap, [f"{v}/minirl_no_is" for v in levels]),
           _collapses(gap, [f"{v}/minirl" for v in levels]))
  rows.append(("4", "R3 - no replay, accuracy (3 arm pairs x 3 seeds)", *power.read_difference(
      sum((_paired(on, f"{a}+r3", a) for a in ("minirl", "minirl+length_norm", "minirl_no_is")),
          []), "no gain")))
  collapse("4", "R3 w/o IS vs MiniRL + R3 collapses", _collapses(on, ["minirl_no_is+r3"]),
           _collapses(on, ["minirl+r3"]))
  unclipped = [a for a in off if a.endswith("_no_clip")]
  collapse("5", "unclipped vs clipped collapses (N = 2, 4, 8)", _collapses(off, unclipped),
           _collapses(off, [a for a in off if a not in unclipped]))
  collapse("5", "clipped, no replay vs MiniRL + R3 collapses (N = 2, 4, 8)",
           _collapses(off, [f"n{n}/minirl" for n in (2, 4, 8)]),
           _collapses(off, [f"n{n}/minirl+r3" for n in (2, 4, 8)]))
  for n, claim_r2 in ((2, True), (4, False), (8, False)):
    a, b = ("r2", "r3") if claim_r2 else ("r3", "r2")
    diff("6", f"N = {n}: MiniRL + {a.upper()} - {b.upper()}", off, f"n{n}/minirl+{a}",
         f"n{n}/minirl+{b}")
  diff("7", "final accuracy, 30% start - 15% start (the two the rule keeps)", cold,
       "minirl_from_sft_default", "minirl_from_sft_short", "no gain")
  diff("-", "int4: token IS - sequence TIS", gap, "int4/minirl", "int4/minirl_seq_tis")
  diff("-", "int4: token IS - geometric masking", gap, "int4/minirl", "int4/minirl_geo_mis")
  diff("-", "fp8: token IS - geometric masking", on, "minirl", "minirl_geo_mis")
  collapse("-", "int4: geometric masking vs token IS collapses",
           _collapses(gap, ["int4/minirl_geo_mis"]), _collapses(gap, ["int4/minirl"]))
  return rows


def main(argv):
  del argv
  effect = _EFFECT.value
  pairs, scores = contrasts(_RESULTS.value)
  accuracy = float(np.mean(scores))
  noise = power.pooled_noise([d for *_, d in pairs], accuracy, ROUND1_PROBLEMS)
  # The same runs scored by the mean of their last two evaluations (steps 30 and 40).
  pairs2, _ = contrasts(_RESULTS.value, last=2)
  noise2 = power.pooled_noise([d for *_, d in pairs2], accuracy, ROUND1_PROBLEMS, evals=2)
  print(f"round 1: {noise.contrasts} same-level contrasts, {noise.df} degrees of freedom, mean "
        f"accuracy of non-collapsed runs {accuracy:.3f}")
  for label, n in (("final evaluation", noise), ("mean of last 2 evaluations", noise2)):
    print(f"  {label}: paired-difference SD {n.diff_sd:.4f} = evaluation {n.eval_sd:.4f} "
          f"(binomial, 2 x {n.problems} problems x {n.evals}) + training {n.train_sd:.4f}")
  train_sd = max(noise.train_sd, noise2.train_sd)  # the larger: conservative
  model = power.Noise(noise.diff_sd, noise.eval_sd, train_sd, accuracy, ROUND1_PROBLEMS, 1,
                      noise.contrasts, noise.df)
  print(f"\nseeds for a paired t-test (two-sided 5%, power 80%) to detect {effect}; training "
        f"SD {train_sd:.4f}")
  print(f"{'problems':>9}{'evals':>7}{'diff SD':>9}{'seeds':>7}{'MDE@5':>8}{'MDE@10':>8}")
  designs = []
  for problems, evals in DESIGNS:
    sd = model.diff_sd_at(problems, evals)
    row = dict(problems=problems, evals=evals, diff_sd=sd,
               seeds=power.seeds_needed(effect, sd),
               mde_5=power.detectable_effect(sd, 5), mde_10=power.detectable_effect(sd, 10))
    designs.append(row)
    print(f"{problems:>9}{evals:>7}{sd:>9.4f}{row['seeds']:>7}{row['mde_5']:>8.3f}"
          f"{row['mde_10']:>8.3f}")
  fisher = {f"{a}/{n} vs {b}/{n}": power.fisher_one_sided(a, n, b, n)
            for a, b, n in ((4, 0, 5), (3, 0, 5), (5, 1, 5), (5, 0, 5), (4, 0, 10), (5, 1, 10))}
  fisher_power = {f"rates {p:.1f} vs 0 at {n} runs": power.fisher_power(p, 0.0, n)
                  for p in (0.5, 0.8, 1.0) for n in (5, 10)}
  print("\none-sided Fisher exact p for collapse counts:")
  for k, v in fisher.items():
    print(f"  {k}: p = {v:.4f}")
  print("power (one-sided 5%) against true collapse rates:")
  for k, v in fisher_power.items():
    print(f"  {k}: {v:.3f}")
  reread = reread_round1(_RESULTS.value)
  print("\nround 1's verdict rows by round 2's rules:")
  for finding, label, verdict, evidence in reread:
    print(f"  {finding:>2} {label:<66} {verdict:<15} {evidence}")
  print(json.dumps({"accuracy": accuracy, "noise_final": noise.__dict__,
                    "noise_last2": noise2.__dict__, "train_sd_used": train_sd,
                    "designs": designs, "fisher_p": fisher, "fisher_power": fisher_power,
                    "round1_reread": [dict(zip(("finding", "contrast", "verdict", "evidence"), r))
                                      for r in reread]}))


if __name__ == "__main__":
  app.run(errors.reporting(main))
