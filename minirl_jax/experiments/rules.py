"""The grids' reading rules as code: each finished grid read by the rules that
docs/results/README.md stated before its runs (its commit history dates them), so a verdict
is computed from the runs, not judged from a figure.

Shared by every rule:
- a run collapses by `collapse.collapse_step`;
- arm A is *ahead* of arm B when A collapses in at most 1 of its seeds while B collapses in
  at least 2, or else when their mean final held-out accuracies (over the seeds both have)
  differ by more than NOISE and every paired seed (same cold start, same RL seed) points
  the same way. Otherwise no difference is shown.
"""
import dataclasses
import os
from typing import Optional

import numpy as np

from minirl_jax.experiments import grids
from minirl_jax.experiments import power
from minirl_jax.experiments import report

NOISE = 0.04  # the binomial noise of 128 held-out problems near 0.35
MIN_SEEDS = 3  # fewer finished seeds in any arm: the readings are progress, not verdicts
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclasses.dataclass(frozen=True)
class ArmResult:
  """One arm's finished runs, by RL seed."""
  start: dict[int, float]  # held-out accuracy at RL step 0
  final: dict[int, float]  # at the last evaluation
  collapsed: dict[int, bool]
  score: dict[int, float] = dataclasses.field(default_factory=dict)  # `report.Run.score`
  late_kl: dict[int, float] = dataclasses.field(default_factory=dict)  # k3, last 10 steps
  # the score is RL step 0's evaluation alone (the run collapsed before any other)
  scored_at_start: dict[int, bool] = dataclasses.field(default_factory=dict)

  @property
  def collapses(self) -> int:
    return sum(self.collapsed.values())

  @property
  def stable(self) -> bool:
    """Collapsed in at most 1 of its seeds (the rules' "stable"; 2 or more is not)."""
    return self.collapses <= 1

  def mean(self, which: str = "final") -> float:
    return float(np.mean(list(getattr(self, which).values())))


@dataclasses.dataclass(frozen=True)
class Reading:
  question: str
  verdict: str
  evidence: str
  # an accuracy reading's paired difference: (mean, low, high) of its 95% t interval
  interval: Optional[tuple[float, float, float]] = None


def by_seed(runs: list[report.Run]) -> dict[str, ArmResult]:
  """Each arm's runs (as `report.load` read them) by RL seed."""
  arms = {}
  for run in runs:
    arm = arms.setdefault(run.arm, ArmResult({}, {}, {}))
    arm.start[run.seed], arm.final[run.seed] = run.accuracies[0], run.accuracies[-1]
    arm.collapsed[run.seed] = run.collapse_step is not None
    arm.score[run.seed] = run.score
    arm.scored_at_start[run.seed] = [s for s, _ in run.scored_evaluations] == [0]
    kl = [r["mismatch/kl_k3"] for r in run.records if "mismatch/kl_k3" in r][-10:]
    arm.late_kl[run.seed] = float(np.mean(kl)) if kl else float("nan")
  return arms


def ahead(a: ArmResult, b: ArmResult) -> int:
  """+1: a is ahead of b; -1: b of a; 0: no difference shown (module docstring)."""
  if a.stable and not b.stable:
    return 1
  if b.stable and not a.stable:
    return -1
  paired = sorted(a.final.keys() & b.final.keys())
  diffs = np.array([a.final[s] - b.final[s] for s in paired])
  if not paired or abs(diffs.mean()) <= NOISE:
    return 0
  if (diffs > 0).all():
    return 1
  return -1 if (diffs < 0).all() else 0


def _order(a: str, b: str, sign: int) -> str:
  return {1: f"{a} ahead", -1: f"{b} ahead", 0: "no difference shown"}[sign]


def _paired(a: ArmResult, b: ArmResult) -> str:
  """The means over the seeds both have (those `ahead` compares), then per seed."""
  seeds = sorted(a.final.keys() & b.final.keys())
  mean = lambda arm: float(np.mean([arm.final[s] for s in seeds]))
  diffs = ", ".join(f"{a.final[s] - b.final[s]:+.3f}" for s in seeds)
  return (f"{mean(a):.3f} vs {mean(b):.3f} (per seed {diffs}; collapsed {a.collapses}/"
          f"{len(a.final)} vs {b.collapses}/{len(b.final)})")


def read_gap(arms: dict[str, ArmResult]) -> list[Reading]:
  """Finding 3 and MiniRL against w/o IS at each level, the w/o-IS penalty against the gap,
  and token IS against the sequence-level corrections at the widest level."""
  levels = [level for level, _ in grids.GAP_LEVELS
            if f"{level}/minirl" in arms and f"{level}/minirl_no_is" in arms]
  readings = []
  for level in levels:
    minirl, no_is = arms[f"{level}/minirl"], arms[f"{level}/minirl_no_is"]
    if not no_is.stable and minirl.stable:
      verdict = REPRODUCED
    else:
      verdict = NOT_REPRODUCED if no_is.collapses == 0 else INCONCLUSIVE
    readings.append(Reading(f"{level}: finding 3 (w/o IS collapses)", verdict,
                            f"w/o IS collapsed {no_is.collapses}/{len(no_is.final)}, MiniRL "
                            f"{minirl.collapses}/{len(minirl.final)}"))
    readings.append(Reading(f"{level}: MiniRL vs w/o IS",
                            _order("MiniRL", "w/o IS", ahead(minirl, no_is)),
                            _paired(minirl, no_is)))
  if len(levels) >= 2:
    penalty = {level: arms[f"{level}/minirl"].mean() - arms[f"{level}/minirl_no_is"].mean()
               for level in (levels[0], levels[-1])}
    growth = penalty[levels[-1]] - penalty[levels[0]]
    readings.append(Reading(
        f"the w/o-IS penalty grows from {levels[0]} to {levels[-1]} by more than {NOISE}",
        "yes" if growth > NOISE else "no",
        f"penalty (MiniRL - w/o IS) {penalty[levels[0]]:+.3f} -> {penalty[levels[-1]]:+.3f}"))
  widest = grids.GAP_LEVELS[-1][0]
  token = arms.get(f"{widest}/minirl")
  for arm in grids.SEQUENCE_IS:
    other = arms.get(f"{widest}/{arm.name}")
    if token and other:
      readings.append(Reading(f"{widest}: token IS vs {arm.name}",
                              _order("token IS", arm.name, ahead(token, other)),
                              _paired(token, other)))
  return readings


# The off-policy arms without clipping, without replay, or without both
LACKING_CLIP_OR_REPLAY = ("minirl_no_clip", "minirl+r2_no_clip", "minirl")


def _finding5(arms: dict[str, ArmResult]) -> list[Reading]:
  """At each N: do the arms lacking clipping or replay collapse while MiniRL + R3 holds?"""
  readings, holds, none_worse = [], [], []
  for n in grids.OFFPOLICY_NS:
    lacking = [arms.get(f"n{n}/{name}") for name in LACKING_CLIP_OR_REPLAY]
    full = arms.get(f"n{n}/minirl+r3")
    if full is None or None in lacking:
      continue
    holds.append(all(not m.stable for m in lacking) and full.stable)
    # the lacking arms collapse no more often, together, than 3 x MiniRL + R3
    none_worse.append(sum(m.collapses for m in lacking) <= len(lacking) * full.collapses)
    counts = ", ".join(f"{name} {m.collapses}/{len(m.final)}"
                       for name, m in zip(LACKING_CLIP_OR_REPLAY, lacking))
    readings.append(Reading(f"N = {n}: finding 5 holds", "yes" if holds[-1] else "no",
                            f"collapsed: {counts}; minirl+r3 {full.collapses}/"
                            f"{len(full.final)}"))
  if len(holds) == len(grids.OFFPOLICY_NS):
    verdict = (REPRODUCED if sum(holds) >= 2 else
               NOT_REPRODUCED if all(none_worse) else INCONCLUSIVE)
    readings.append(Reading("finding 5 (without clipping or replay, collapse)", verdict,
                            f"holds at {sum(holds)} of {len(holds)} N"))
  return readings


def _finding6(arms: dict[str, ArmResult]) -> list[Reading]:
  """At each N, R2 against R3 by the ahead rule; the paper: R2 at N = 2, R3 at 4 and 8."""
  readings, signs = [], {}
  for n in grids.OFFPOLICY_NS:
    r2, r3 = arms.get(f"n{n}/minirl+r2"), arms.get(f"n{n}/minirl+r3")
    if r2 and r3:
      signs[n] = ahead(r2, r3)
      readings.append(Reading(f"N = {n}: R2 vs R3", _order("R2", "R3", signs[n]),
                              _paired(r2, r3)))
  if len(signs) == len(grids.OFFPOLICY_NS):
    wanted = {2: 1, 4: -1, 8: -1}
    r2_never_collapses = all(arms[f"n{n}/minirl+r2"].collapses == 0 for n in (4, 8))
    if all(signs[n] == wanted[n] for n in grids.OFFPOLICY_NS):
      verdict = REPRODUCED
    elif any(signs[n] == -wanted[n] for n in grids.OFFPOLICY_NS) or (
        not any(signs.values()) and r2_never_collapses):
      verdict = NOT_REPRODUCED
    else:
      verdict = INCONCLUSIVE
    readings.append(Reading("finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)", verdict,
                            ", ".join(f"N = {n}: {_order('R2', 'R3', s)}"
                                      for n, s in signs.items())))
  return readings


def read_offpolicy(arms: dict[str, ArmResult]) -> list[Reading]:
  """Findings 5 and 6, read at each N that has every arm they need."""
  return _finding5(arms) + _finding6(arms)


def read_coldstart(arms: dict[str, ArmResult]) -> list[Reading]:
  """Finding 7: the spread of the stable cold starts' mean accuracy, at RL step 0 and at
  the end."""
  starts = {name: arms[grids.coldstart_arm(name)] for name in grids.COLD_STARTS
            if grids.coldstart_arm(name) in arms}
  if len(starts) < len(grids.COLD_STARTS):
    return []
  stable = {name: arm for name, arm in starts.items() if arm.stable}
  spread = lambda which: float(np.ptp([arm.mean(which) for arm in stable.values()]))
  evidence = "; ".join(f"{name}: {arm.mean('start'):.3f} -> {arm.mean():.3f} (collapsed "
                       f"{arm.collapses}/{len(arm.final)})" for name, arm in starts.items())
  if len(stable) < 2:
    return [Reading("finding 7 (cold starts converge)", INCONCLUSIVE,
                    f"fewer than 2 stable cold starts; {evidence}")]
  start, final = spread("start"), spread("final")
  if final <= NOISE and start > 2 * NOISE:
    verdict = REPRODUCED
  else:
    verdict = NOT_REPRODUCED if final > NOISE and final >= 0.75 * start else INCONCLUSIVE
  return [Reading("finding 7 (cold starts converge)", verdict,
                  f"spread of the stable starts {start:.3f} at RL step 0 -> {final:.3f} at "
                  f"the end; {evidence}")]


def _differences(a: ArmResult, b: ArmResult, which: str = "score") -> dict[int, float]:
  """Paired differences a - b of `which`, seed by seed, over the seeds both finished."""
  x, y = getattr(a, which), getattr(b, which)
  return {s: x[s] - y[s] for s in sorted(x.keys() & y.keys())}


def _accuracy(question: str, a: ArmResult, b: ArmResult, claim: str) -> Reading:
  by_seed_diff = _differences(a, b)
  seeds, diffs = list(by_seed_diff), list(by_seed_diff.values())
  verdict, evidence = power.read_difference(diffs, claim)
  evidence += "; per seed " + ", ".join(f"{s}: {d:+.3f}" for s, d in by_seed_diff.items())
  sd = float(np.std(diffs, ddof=1)) if len(diffs) >= 2 else 0.0
  if sd > 0:
    evidence += (f"; smallest effect this design finds (80%): "
                 f"{power.detectable_effect(sd, len(diffs)):.3f}")
  elif len(diffs) >= 2:
    evidence += ("; every seed's difference is the same, so no spread to size the design "
                 "by")
  if seeds and all(arm.scored_at_start.get(s) for arm in (a, b) for s in seeds):
    evidence += ("; both arms' scores are their RL step-0 evaluation in every seed (each "
                 "run collapsed before its first full evaluation after step 0): the contrast "
                 "compares the cold start with itself")
  interval = power.t_interval(diffs) if len(diffs) >= 2 else None
  return Reading(question, verdict, evidence, interval)


def _collapse(question: str, collapses: ArmResult, holds: ArmResult) -> Reading:
  return Reading(question, *power.read_collapses(collapses.collapses, len(collapses.final),
                                                 holds.collapses, len(holds.final)))


def read_round2(arms: dict[str, ArmResult]) -> list[Reading]:
  """Round 2's contrasts by the rules round2.md stated before its runs."""
  readings = []
  def have(*names):
    return all(name in arms for name in names)
  if have("minirl", "minirl_no_is"):
    readings += [_collapse("finding 3: w/o IS collapses, MiniRL does not", arms["minirl_no_is"],
                           arms["minirl"]),
                 _accuracy("finding 3: MiniRL ahead of w/o IS", arms["minirl"],
                           arms["minirl_no_is"], "ahead")]
  if have("minirl+r3", "minirl_no_is+r3"):
    readings.append(_collapse("finding 4: R3 w/o IS still collapses", arms["minirl_no_is+r3"],
                              arms["minirl+r3"]))
  if have("minirl", "minirl+r3"):
    kl_verdict, kl_evidence = power.read_difference(
        list(_differences(arms["minirl"], arms["minirl+r3"], "late_kl").values()), "ahead",
        effect=0.0)
    readings += [_accuracy("finding 4: R3 gives no accuracy gain", arms["minirl+r3"],
                           arms["minirl"], "no gain"),
                 Reading("finding 4: R3 lowers the k3 KL (last 10 steps, no replay - R3)",
                         kl_verdict, kl_evidence)]
  if have("n8/minirl_no_clip", "n8/minirl+r3"):
    readings.append(_collapse("finding 5, N = 8: without clipping, collapse",
                              arms["n8/minirl_no_clip"], arms["n8/minirl+r3"]))
  for n in (8, 2):
    if have(f"n{n}/minirl", f"n{n}/minirl+r3"):
      readings += [_collapse(f"finding 5, N = {n}: without replay, collapse",
                             arms[f"n{n}/minirl"], arms[f"n{n}/minirl+r3"]),
                   _accuracy(f"finding 5, N = {n}: MiniRL + R3 ahead of no replay",
                             arms[f"n{n}/minirl+r3"], arms[f"n{n}/minirl"], "ahead")]
  if have("n8/minirl+r2", "n8/minirl+r3"):
    readings += [_accuracy("finding 6, N = 8: R3 ahead of R2", arms["n8/minirl+r3"],
                           arms["n8/minirl+r2"], "ahead"),
                 _collapse("finding 6, N = 8: R2 eventually collapses", arms["n8/minirl+r2"],
                           arms["n8/minirl+r3"])]
  return readings


READERS = {"gap": read_gap, "offpolicy": read_offpolicy, "coldstart": read_coldstart,
           "round2": read_round2}


def write(grid: grids.Grid, seeds: int, runs: list[report.Run],
          workdir: str) -> Optional[list[Reading]]:
  """DIR/verdicts.md for a grid with stated rules (None for the others)."""
  if grid.name not in READERS:
    return None
  arms = by_seed(runs)
  readings = READERS[grid.name](arms)
  caps = {arm.name: arm.seeds_at(seeds) for arm in grid.arms}
  # an arm planned with 0 seeds is outside this run of the grid: its contrasts get no row,
  # and it does not make the others' verdicts partial
  planned = [arm.name for arm in grid.arms if caps[arm.name] > 0]
  needed = lambda name: max(caps.get(name, seeds), MIN_SEEDS)  # noqa: E731
  short = sorted(name for name, arm in arms.items() if len(arm.final) < needed(name))
  missing = sum(name not in arms for name in planned)
  lines = []
  if short or missing:
    wanted = {needed(name) for name in planned}
    seeds_text = f"{wanted.pop()} finished seeds" if len(wanted) == 1 else "their seeds finished"
    lines += [f"**Partial, not verdicts**: {len(short)} arm(s) with fewer than {seeds_text}, "
              f"{missing} with none.", ""]
  unplanned = [arm.name for arm in grid.arms if caps[arm.name] == 0]
  if unplanned:
    lines += [f"Not run (0 seeds planned): {', '.join(unplanned)}; the contrasts that need "
              "them have no row.", ""]
  lines += ["| question | reading | evidence |", "|---|---|---|"]
  lines += [f"| {r.question} | {r.verdict} | {r.evidence} |" for r in readings]
  with open(os.path.join(workdir, "verdicts.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return readings
