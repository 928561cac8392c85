"""Round 2 (docs/results/round2.md): its design from round 1's noise (the power analysis),
its grid of 200-step runs on configs/paper_moe.py, its score, and its readers by round 2's
rules (`rules.read_difference`, `rules.read_collapses`), which also re-read round 1.
"""
import dataclasses
import itertools
import os
from typing import Optional

import numpy as np

from minirl_jax.experiments import checks as checks_lib
from minirl_jax.experiments import design
from minirl_jax.experiments import layout
from minirl_jax.experiments import report
from minirl_jax.experiments import round1
from minirl_jax.experiments import rules
from minirl_jax.experiments import series
from minirl_jax.experiments import stats

MINIRL, NO_IS, R2, R3 = design.MINIRL, design.NO_IS, design.R2, design.R3
ROUND1_PROBLEMS = 128  # round 1's held-out problems per evaluation
# (held-out problems, evaluations a score averages): the designs the power analysis sizes
DESIGNS = ((128, 1), (128, 3), (512, 3), (1024, 1), (1024, 2), (1024, 3), (2048, 3))
# The paired SD part 1 planned with: `power_analysis` at 1024 problems and a score of 2
# evaluations (round2.md prints it as 0.034; tests/round2_test.py re-derives it).
PLANNED_DIFF_SD = 0.0338
# The accuracy contrasts `read` reads, as (label, arm A, arm B): A - B seed by seed.
CONTRASTS = (("finding 3: MiniRL - w/o IS", "minirl", "minirl_no_is"),
             ("finding 4: MiniRL + R3 - MiniRL", "minirl+r3", "minirl"),
             ("finding 5, N = 8: MiniRL + R3 - no replay", "n8/minirl+r3", "n8/minirl"),
             ("finding 5, N = 2: MiniRL + R3 - no replay", "n2/minirl+r3", "n2/minirl"),
             ("finding 6, N = 8: R3 - R2", "n8/minirl+r3", "n8/minirl+r2"))
# Per-step metrics the checks compare over matched steps: (label, key, reduce, format).
METRICS = (("training reward, mean", "reward/mean", np.mean, ".3f"),
           ("token entropy, mean", "policy/entropy", np.mean, ".4f"),
           ("k3 KL, mean", "mismatch/kl_k3", np.mean, ".2e"),
           ("k3 KL, max", "mismatch/kl_k3", np.max, ".2e"))


def _round1_runs(results: str) -> dict[str, dict[str, dict[int, report.Run]]]:
  """grid -> arm -> seed -> run, from round 1's committed series under `results`."""
  grids = {}
  for grid in round1.GRIDS:
    for run in series.runs_from_series(os.path.join(results, grid, "series.csv")):
      grids.setdefault(grid, {}).setdefault(run.arm, {})[run.seed] = run
  return grids


def _last(run: report.Run, evals: int) -> float:
  """Round 1's run scored by the mean of its last `evals` evaluations."""
  return float(np.mean(run.accuracies[-evals:]))


def round1_contrasts(results: str, evals: int = 1):
  """Round 1's paired contrasts: every pair of arms of one level (the gap grid's levels, the
  off-policy grid's N; the other grids are one level each).

  Args:
    results: the folder of round 1's committed reports (one sub-folder per grid).
    evals: a run's score is the mean of its last `evals` evaluations.

  Returns:
    ([(grid, arm a, arm b, per-seed differences a - b over the seeds where neither run
    collapsed)], [the score of every run that did not collapse]).
  """
  out, scores = [], []
  for grid, arms in _round1_runs(results).items():
    for a, b in itertools.combinations(sorted(arms), 2):
      if layout.split_arm(a)[0] != layout.split_arm(b)[0]:
        continue  # different level or N: not a contrast the rules read
      diffs = [_last(arms[a][s], evals) - _last(arms[b][s], evals)
               for s in sorted(arms[a].keys() & arms[b].keys())
               if arms[a][s].collapse_step is None and arms[b][s].collapse_step is None]
      out.append((grid, a, b, diffs))
    scores += [_last(run, evals) for runs in arms.values() for run in runs.values()
               if run.collapse_step is None]
  return out, scores


def power_analysis(results: str, effect: float) -> dict:
  """Round 2's design from round 1's noise.

  Args:
    results: the folder of round 1's committed reports (one sub-folder per grid).
    effect: the accuracy difference the design must detect.

  Returns:
    `accuracy` (mean score of the runs that did not collapse), `noise_final` and
    `noise_last2` (`stats.Noise` of the contrasts scored by the final evaluation and by the
    mean of the last two), `train_sd_used` (the larger training SD), `designs` (per
    DESIGNS entry: paired SD, seeds for `effect`, smallest effect at 5 and 10 seeds),
    `fisher_p` and `fisher_power` (collapse counts round 2 can see).
  """
  pairs, scores = round1_contrasts(results)
  accuracy = float(np.mean(scores))
  noise = stats.pooled_noise([d for *_, d in pairs], accuracy, ROUND1_PROBLEMS)
  pairs2, _ = round1_contrasts(results, evals=2)  # steps 30 and 40
  noise2 = stats.pooled_noise([d for *_, d in pairs2], accuracy, ROUND1_PROBLEMS, evals=2)
  train_sd = max(noise.train_sd, noise2.train_sd)  # the larger: conservative
  model = dataclasses.replace(noise, train_sd=train_sd)
  designs = []
  for problems, evals in DESIGNS:
    sd = model.diff_sd_at(problems, evals)
    designs.append(dict(problems=problems, evals=evals, diff_sd=sd,
                        seeds=stats.seeds_needed(effect, sd),
                        mde_5=stats.detectable_effect(sd, 5),
                        mde_10=stats.detectable_effect(sd, 10)))
  fisher = {f"{a}/{n} vs {b}/{n}": stats.fisher_one_sided(a, n, b, n)
            for a, b, n in ((4, 0, 5), (3, 0, 5), (5, 1, 5), (5, 0, 5), (4, 0, 10), (5, 1, 10))}
  fisher_power = {f"rates {p:.1f} vs 0 at {n} runs": stats.fisher_power(p, 0.0, n)
                  for p in (0.5, 0.8, 1.0) for n in (5, 10)}
  return {"accuracy": accuracy, "noise_final": noise, "noise_last2": noise2,
          "train_sd_used": train_sd, "designs": designs, "fisher_p": fisher,
          "fisher_power": fisher_power}


def reread_round1(results: str) -> list[tuple[str, str, str, str]]:
  """Round 1's verdict rows read by round 2's rules: (finding, contrast, verdict,
  evidence), every accuracy contrast with its 95% t interval and every collapse contrast
  with its one-sided Fisher p."""
  runs = _round1_runs(results)
  on, gap, off, cold = (runs[g] for g in ("onpolicy", "gap", "offpolicy", "coldstart"))

  def paired(arms, a, b):
    return [_last(arms[a][s], 1) - _last(arms[b][s], 1)
            for s in sorted(arms[a].keys() & arms[b].keys())]

  def collapses(arms, names):
    counted = [run for name in names for run in arms[name].values()]
    return sum(run.collapse_step is not None for run in counted), len(counted)

  rows = []

  def diff(finding, label, arms, a, b, claim="ahead"):
    rows.append((finding, label, *rules.read_difference(paired(arms, a, b), claim)))

  def collapse(finding, label, a, b):
    rows.append((finding, label, *rules.read_collapses(*a, *b)))

  for other in ("minirl+length_norm", "minirl_no_is", "grpo", "cispo", "minirl_seq_tis"):
    diff("1", f"MiniRL - {other} (on-policy, fp8)", on, "minirl", other)
  diff("2", "MiniRL - length-norm", on, "minirl", "minirl+length_norm")
  collapse("3", "w/o IS vs MiniRL collapses (on-policy, fp8)",
           collapses(on, ["minirl_no_is"]), collapses(on, ["minirl"]))
  levels = sorted({layout.split_arm(a)[0] for a in gap})
  collapse("3", "w/o IS vs MiniRL collapses (gap grid, 7 levels pooled)",
           collapses(gap, [layout.arm_name(v, "minirl_no_is") for v in levels]),
           collapses(gap, [layout.arm_name(v, "minirl") for v in levels]))
  rows.append(("4", "R3 - no replay, accuracy (3 arm pairs x 3 seeds)", *rules.read_difference(
      sum((paired(on, f"{a}+r3", a) for a in ("minirl", "minirl+length_norm", "minirl_no_is")),
          []), "no gain")))
  collapse("4", "R3 w/o IS vs MiniRL + R3 collapses", collapses(on, ["minirl_no_is+r3"]),
           collapses(on, ["minirl+r3"]))
  unclipped = [a for a in off if a.endswith("_no_clip")]
  collapse("5", "unclipped vs clipped collapses (N = 2, 4, 8)", collapses(off, unclipped),
           collapses(off, [a for a in off if a not in unclipped]))
  collapse("5", "clipped, no replay vs MiniRL + R3 collapses (N = 2, 4, 8)",
           collapses(off, [layout.arm_name(f"n{n}", "minirl") for n in (2, 4, 8)]),
           collapses(off, [layout.arm_name(f"n{n}", "minirl+r3") for n in (2, 4, 8)]))
  for n, claim_r2 in ((2, True), (4, False), (8, False)):
    a, b = ("r2", "r3") if claim_r2 else ("r3", "r2")
    diff("6", f"N = {n}: MiniRL + {a.upper()} - {b.upper()}", off,
         layout.arm_name(f"n{n}", f"minirl+{a}"), layout.arm_name(f"n{n}", f"minirl+{b}"))
  diff("7", "final accuracy, 30% start - 15% start (the two the rule keeps)", cold,
       "minirl_from_sft_default", "minirl_from_sft_short", "no gain")
  diff("-", "int4: token IS - sequence TIS", gap, "int4/minirl", "int4/minirl_seq_tis")
  diff("-", "int4: token IS - geometric masking", gap, "int4/minirl", "int4/minirl_geo_mis")
  diff("-", "fp8: token IS - geometric masking", on, "minirl", "minirl_geo_mis")
  collapse("-", "int4: geometric masking vs token IS collapses",
           collapses(gap, ["int4/minirl_geo_mis"]), collapses(gap, ["int4/minirl"]))
  return rows


def scored_evaluations(run: report.Run, key: str = "eval/accuracy_full"
                       ) -> list[tuple[int, float]]:
  """Round 2's score reads the last two full evaluations (`key`), before the collapse step
  for a run that collapsed (step 0's when it collapsed before any other)."""
  full = [(r["step"], r[key]) for r in run.records if key in r]
  if run.collapse_step is not None:
    full = [(s, a) for s, a in full if s < run.collapse_step] or full[:1]
  return full[-2:]


def _late_kl(arm: rules.ArmResult) -> dict[int, float]:
  """Each seed's mean k3 KL over its last 10 logged steps."""
  late = {}
  for seed, records in arm.records.items():
    kl = [r["mismatch/kl_k3"] for r in records if "mismatch/kl_k3" in r][-10:]
    late[seed] = float(np.mean(kl)) if kl else float("nan")
  return late


def read(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """Round 2's contrasts by the rules round2.md stated before its runs."""
  readings = []

  def have(*names):
    return all(name in arms for name in names)

  if have("minirl", "minirl_no_is"):
    readings += [rules.collapse("finding 3: w/o IS collapses, MiniRL does not",
                                arms["minirl_no_is"], arms["minirl"]),
                 rules.accuracy("finding 3: MiniRL ahead of w/o IS", arms["minirl"],
                                arms["minirl_no_is"], "ahead")]
  if have("minirl+r3", "minirl_no_is+r3"):
    readings.append(rules.collapse("finding 4: R3 w/o IS still collapses",
                                   arms["minirl_no_is+r3"], arms["minirl+r3"]))
  if have("minirl", "minirl+r3"):
    kl_verdict, kl_evidence = rules.read_difference(
        list(rules.paired_differences(_late_kl(arms["minirl"]),
                                      _late_kl(arms["minirl+r3"])).values()),
        "ahead", effect=0.0)
    readings += [rules.accuracy("finding 4: R3 gives no accuracy gain", arms["minirl+r3"],
                                arms["minirl"], "no gain"),
                 rules.Reading("finding 4: R3 lowers the k3 KL (last 10 steps, no replay - R3)",
                               kl_verdict, kl_evidence)]
  if have("n8/minirl_no_clip", "n8/minirl+r3"):
    readings.append(rules.collapse("finding 5, N = 8: without clipping, collapse",
                                   arms["n8/minirl_no_clip"], arms["n8/minirl+r3"]))
  for n in (8, 2):
    no_replay, r3 = layout.arm_name(f"n{n}", "minirl"), layout.arm_name(f"n{n}", "minirl+r3")
    if have(no_replay, r3):
      readings += [rules.collapse(f"finding 5, N = {n}: without replay, collapse",
                                  arms[no_replay], arms[r3]),
                   rules.accuracy(f"finding 5, N = {n}: MiniRL + R3 ahead of no replay",
                                  arms[r3], arms[no_replay], "ahead")]
  if have("n8/minirl+r2", "n8/minirl+r3"):
    readings += [rules.accuracy("finding 6, N = 8: R3 ahead of R2", arms["n8/minirl+r3"],
                                arms["n8/minirl+r2"], "ahead"),
                 rules.collapse("finding 6, N = 8: R2 eventually collapses",
                                arms["n8/minirl+r2"], arms["n8/minirl+r3"])]
  return readings


def _final_only(arm: rules.ArmResult) -> dict[int, float]:
  """Each run scored by the last full evaluation its score reads, alone."""
  out = {}
  for seed, steps in arm.scored_steps.items():
    full = {r["step"]: r["eval/accuracy_full"] for r in arm.records[seed]
            if "eval/accuracy_full" in r}
    out[seed] = full[steps[-1]]
  return out


def _interval(mean_low_high, spec: str = "+.3f") -> str:
  mean, low, high = mean_low_high
  return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def _power_row(label: str, a: rules.ArmResult, b: rules.ArmResult) -> str:
  p = checks_lib.realised_power(a.score, b.score, PLANNED_DIFF_SD)
  found = f"{p.detectable:.3f}" if p.diff_sd > 0 else "none: no spread"
  r = f"{p.correlation:+.2f}" if p.correlation == p.correlation else "-"
  return (f"| {label} | {p.seeds} | {p.diff_sd:.3f} ({p.planned_sd:.3f}) | {found} "
          f"({p.planned_detectable:.3f}) | {r} |")


def _read_otherwise_row(label: str, names: tuple[str, str], a: rules.ArmResult,
                        b: rules.ArmResult) -> Optional[str]:
  """The score difference with each seed left out, scored by the final evaluation alone, its
  two largest seeds and its step-0 scores; None when every seed's difference is the same."""
  diffs = rules.paired_differences(a.score, b.score)
  if not np.std(list(diffs.values())) > 0:
    return None
  loo = [s for s, (_, low, high) in checks_lib.leave_one_out(diffs).items() if low <= 0 <= high]
  final = rules.paired_differences(_final_only(a), _final_only(b))
  top = sorted(diffs, key=lambda s: -abs(diffs[s]))[:2]
  cold = [f"{name} seed {s}" for name, arm in zip(names, (a, b)) for s in diffs
          if arm.scored_steps.get(s) == [0]]
  return (f"| {label} | {_interval(stats.t_interval(list(diffs.values())))} | "
          f"{'seeds ' + ', '.join(map(str, loo)) if loo else 'none'} | "
          f"{_interval(stats.t_interval(list(final.values())))} | "
          + ", ".join(f"seed {s} {diffs[s]:+.3f}" for s in top)
          + f" ({sum(diffs[s] for s in top):+.3f} of {sum(diffs.values()):+.3f}) | "
          f"{', '.join(cold) or 'none'} |")


def _per_step_rows(label: str, a: rules.ArmResult, b: rules.ArmResult) -> list[str]:
  rows = []
  for name, key, reduce, spec in METRICS:
    pairs = checks_lib.matched(a.records, b.records, key, reduce)
    if len(pairs) < 2:
      continue
    m = checks_lib.Paired.of(pairs)
    ratio = f"{m.a / m.b:.2f}" if m.b else "-"
    rows.append(f"| {label} | {name} | {m.a:{spec}} | {m.b:{spec}} | {ratio} | "
                f"{_interval(m.diff, '+' + spec)} | {m.below} / {m.above} | {m.p:.3g} |")
  return rows


def checks(arms: dict[str, rules.ArmResult]) -> list[str]:
  """Round 2's checks after its runs (`checks_lib`), as Markdown under its verdicts: per
  accuracy contrast with two or more seeds, the realised power against part 1's plan, the
  score difference read otherwise (where the seeds' differences spread), and the arms'
  per-step metrics over matched steps with their sign tests."""
  contrasts = [(label, (a, b), arms[a], arms[b]) for label, a, b in CONTRASTS
               if a in arms and b in arms and len(arms[a].score.keys() & arms[b].score) >= 2]
  if not contrasts:
    return []
  power = [_power_row(label, a, b) for label, _, a, b in contrasts]
  otherwise = [row for row in (_read_otherwise_row(*c) for c in contrasts) if row]
  per_step = sum((_per_step_rows(label, a, b) for label, _, a, b in contrasts), [])
  lines = ["## Checks made after the runs", "",
           "Computed from the same runs once they had finished (added 2026-12-07): no rule "
           "stated them before the runs, so they change no verdict above; they say how much "
           "a verdict rests on. A contrast is A - B seed by seed; an SD is the sample SD over "
           "seeds (ddof = 1).", "",
           f"**Power, realised and planned.** Part 1 planned with a paired SD of "
           f"{PLANNED_DIFF_SD:.3f}; the smallest effect found is the paired t-test's at the "
           "seeds run (two-sided 5%, power 80%, `stats.detectable_effect`), as part 1 "
           "computed it.", "",
           "| contrast, A - B | seeds | paired SD, realised (planned) | smallest effect found "
           "(80%), realised (planned) | r of A's and B's scores over seeds |",
           "|---|---|---|---|---|", *power]
  if otherwise:
    lines += ["", "**The score difference, read otherwise.**", "",
              "| contrast, A - B | as scored, 95% t | 0 inside the interval with one seed left "
              "out | scored by the final evaluation alone | the two largest differences (their "
              "sum, of the total) | scores that are the RL step-0 evaluation |",
              "|---|---|---|---|---|---|", *otherwise]
  if per_step:
    lines += ["", "**Per-step metrics over matched steps**: each seed's mean (or max) over the "
              "RL steps both runs logged, so a run that stopped at its collapse is compared "
              "over its own steps; A and B are means over seeds; the sign test is exact "
              "binomial, two-sided (ties dropped).", "",
              "| contrast, A - B | metric | A | B | A / B | A - B, 95% t | seeds A below / "
              "above B | sign test p |", "|---|---|---|---|---|---|---|---|", *per_step]
  return lines


def _arms() -> tuple[design.Arm, ...]:
  """The contrasts the power analysis ranked, each arm with its seeds: 10 for rank 1 and 5
  for rank 2. Ranks 3-4 (seeds=0) wait until ranks 1-2 have finished: the first arm took 29
  minutes, so ranks 1-2 alone fill the ~15 h budget, and at 3 seeds no collapse contrast of
  theirs could reach p < 0.05 anyway. Off-policy at N = 8 keeps the on-policy global batch
  (8 prompts x 8) and splits it into mini-batches of 8, so N is not confounded with data per
  step."""
  n8, n2 = {"rl.mini_batch_size": 8}, {"rl.mini_batch_size": 32}
  return (design.Arm("minirl", MINIRL, seeds=10), design.Arm("minirl_no_is", NO_IS, seeds=10),
          design.Arm("n8/minirl", {**MINIRL, **n8}, seeds=5),
          design.Arm("n8/minirl+r3", {**MINIRL, **R3, **n8}, seeds=5),
          design.Arm("minirl+r3", {**MINIRL, **R3}, seeds=0),
          design.Arm("minirl_no_is+r3", {**NO_IS, **R3}, seeds=0),
          design.Arm("n8/minirl+r2", {**MINIRL, **R2, **n8}, seeds=0),
          design.Arm("n8/minirl_no_clip", {**MINIRL, **design.NO_CLIP, **n8}, seeds=0),
          # Added before any N = 2 run (round2.md, "Addendum"): a mini-batch of 8 is one
          # prompt's group, and every N = 8 run collapsed by step 5 with and without replay;
          # N = 2 updates on 4 prompts' groups. 5 seeds each, after ranks 1-2.
          design.Arm("n2/minirl", {**MINIRL, **n2}, seeds=5),
          design.Arm("n2/minirl+r3", {**MINIRL, **R3, **n2}, seeds=5))


GRIDS = {
    "round2": design.Grid("round2", "configs/paper_moe.py", _arms(),
                          "round 2: findings 3-6 in long runs of a model whose routing "
                          "matters, seeds by the power analysis (docs/results/round2.md)",
                          read=read, scored=scored_evaluations, checks=checks,
                          sample_sd=True),
}
