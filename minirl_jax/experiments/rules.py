"""What a verdict is: its words, a reading of two arms' runs by a stated rule, and a grid's
verdicts.md. Each rule was stated in docs/results before the runs it reads (the commit
history dates them); the rounds' modules say which contrasts each finding reads.

Round 1's rule (`ahead`): arm A is ahead of arm B when A collapses in at most 1 of its
seeds while B collapses in at least 2, or else when their mean final held-out accuracies
(over the seeds both have) differ by more than NOISE and every paired seed (same cold start,
same RL seed) points the same way. Otherwise no difference is shown.

Round 2's rules, which replace it (docs/results/round2.md): an accuracy contrast is read by
the 95% t interval of its paired score differences (`read_difference`), a collapse contrast
by a one-sided Fisher exact test (`read_collapses`).
"""
import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np

from minirl_jax.experiments import report
from minirl_jax.experiments import stats

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
NOISE = 0.04  # round 1: the binomial noise of 128 held-out problems near 0.35
SMALLEST_EFFECT = 0.05  # round 2: the accuracy difference it is designed to detect
MIN_SEEDS = 3  # fewer finished seeds in any arm: the readings are progress, not verdicts


@dataclasses.dataclass(frozen=True)
class ArmResult:
  """One arm's finished runs, by RL seed."""
  start: dict[int, float]  # held-out accuracy at RL step 0
  final: dict[int, float]  # at the last evaluation
  collapsed: dict[int, bool]
  score: dict[int, float] = dataclasses.field(default_factory=dict)  # `report.score`
  # the steps of the evaluations each score averages
  scored_steps: dict[int, list[int]] = dataclasses.field(default_factory=dict)
  records: dict[int, list[dict]] = dataclasses.field(default_factory=dict)  # RL records

  @property
  def collapses(self) -> int:
    return sum(self.collapsed.values())

  @property
  def stable(self) -> bool:
    """Collapsed in at most 1 of its seeds (round 1's "stable"; 2 or more is not)."""
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


def by_seed(runs: list[report.Run], scored: Optional[Callable] = None) -> dict[str, ArmResult]:
  """Each arm's runs (as `report.load` read them) by RL seed; scored by `scored`
  (`design.Grid.scored`) where the grid has a score."""
  arms = {}
  for run in runs:
    arm = arms.setdefault(run.arm, ArmResult({}, {}, {}))
    arm.start[run.seed], arm.final[run.seed] = run.accuracies[0], run.accuracies[-1]
    arm.collapsed[run.seed] = run.collapse_step is not None
    arm.records[run.seed] = run.records
    if scored is not None:
      arm.score[run.seed] = report.score(run, scored)
      arm.scored_steps[run.seed] = [step for step, _ in scored(run)]
  return arms


def paired_differences(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
  """a - b seed by seed, over the seeds both have."""
  return {s: a[s] - b[s] for s in sorted(a.keys() & b.keys())}


def ahead(a: ArmResult, b: ArmResult) -> int:
  """Round 1's rule: +1: a is ahead of b; -1: b of a; 0: no difference shown."""
  if a.stable and not b.stable:
    return 1
  if b.stable and not a.stable:
    return -1
  diffs = np.array(list(paired_differences(a.final, b.final).values()))
  if not len(diffs) or abs(diffs.mean()) <= NOISE:
    return 0
  if (diffs > 0).all():
    return 1
  return -1 if (diffs < 0).all() else 0


def read_difference(diffs: Sequence[float], claim: str,
                    effect: float = SMALLEST_EFFECT) -> tuple[str, str]:
  """A paired accuracy contrast read by its 95% t interval (round 2's rule).

  Args:
    diffs: per-seed paired differences, arm A minus arm B.
    claim: "ahead" (the paper: A beats B) or "no gain" (the paper: A does not beat B).
    effect: the smallest difference that matters.

  Returns:
    (verdict, evidence). "ahead": reproduced when the interval lies above 0, not reproduced
    when it lies below `effect` (any advantage is smaller than what matters), else
    inconclusive. "no gain": reproduced when the interval lies within (-effect, effect),
    not reproduced when it excludes 0, else inconclusive.
  """
  mean, low, high = stats.t_interval(diffs)
  if not high >= low:  # nan: fewer than 2 seeds
    return INCONCLUSIVE, f"{mean:+.3f} ({len(diffs)} seed: no interval)"
  evidence = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (95% t, {len(diffs)} seeds)"
  if claim == "ahead":
    verdict = REPRODUCED if low > 0 else NOT_REPRODUCED if high < effect else INCONCLUSIVE
  elif claim == "no gain":
    verdict = (REPRODUCED if -effect < low and high < effect else
               NOT_REPRODUCED if low > 0 or high < 0 else INCONCLUSIVE)
  else:
    raise ValueError(f"claim must be 'ahead' or 'no gain', got {claim!r}")
  return verdict, evidence


def read_collapses(a_collapsed: int, a_runs: int, b_collapsed: int,
                   b_runs: int) -> tuple[str, str]:
  """The paper's "A collapses, B does not" read by a one-sided Fisher exact test (round 2's
  rule): reproduced at p < 0.05, not reproduced when A never collapsed in >= 5 runs, else
  inconclusive."""
  p = stats.fisher_one_sided(a_collapsed, a_runs, b_collapsed, b_runs)
  evidence = f"collapsed {a_collapsed}/{a_runs} vs {b_collapsed}/{b_runs}, Fisher p = {p:.3g}"
  fewest = stats.fewest_decisive_collapses(a_runs, b_runs)
  evidence += (f"; at these runs the smallest decisive count is {fewest}/{a_runs} vs "
               f"0/{b_runs}" if fewest is not None else
               "; no count at these runs can reach p < 0.05")
  if p < 0.05:
    return REPRODUCED, evidence
  return (NOT_REPRODUCED if a_collapsed == 0 and a_runs >= 5 else INCONCLUSIVE), evidence


def accuracy(question: str, a: ArmResult, b: ArmResult, claim: str) -> Reading:
  """A's score against B's, seed by seed, by `read_difference`; the evidence adds each
  seed's difference and the smallest effect the design finds."""
  by_seed_diff = paired_differences(a.score, b.score)
  seeds, diffs = list(by_seed_diff), list(by_seed_diff.values())
  verdict, evidence = read_difference(diffs, claim)
  evidence += "; per seed " + ", ".join(f"{s}: {d:+.3f}" for s, d in by_seed_diff.items())
  sd = float(np.std(diffs, ddof=1)) if len(diffs) >= 2 else 0.0
  if sd > 0:
    evidence += (f"; smallest effect this design finds (80%): "
                 f"{stats.detectable_effect(sd, len(diffs)):.3f}")
  elif len(diffs) >= 2:
    evidence += ("; every seed's difference is the same, so no spread to size the design "
                 "by")
  if seeds and all(arm.scored_steps.get(s) == [0] for arm in (a, b) for s in seeds):
    evidence += ("; both arms' scores are their RL step-0 evaluation in every seed (each "
                 "run collapsed before its first full evaluation after step 0): the contrast "
                 "compares the cold start with itself")
  interval = stats.t_interval(diffs) if len(diffs) >= 2 else None
  return Reading(question, verdict, evidence, interval)


def collapse(question: str, collapses: ArmResult, holds: ArmResult) -> Reading:
  """Reads "`collapses` collapses, `holds` does not" by `read_collapses`."""
  return Reading(question, *read_collapses(collapses.collapses, len(collapses.final),
                                           holds.collapses, len(holds.final)))


def write(grid, seeds: int, runs: list[report.Run], workdir: str) -> Optional[list[Reading]]:
  """Reads a grid's finished runs by its rules into DIR/verdicts.md.

  Args:
    grid: a `design.Grid`; its `read` gives the readings, its `scored` the scores.
    seeds: the seeds the grid was asked to run (each arm runs `Arm.seeds_at(seeds)`).
    runs: its finished runs (`report.load`).
    workdir: where verdicts.md goes.

  Returns:
    The readings, or None for a grid without stated rules (and no verdicts.md). The file
    says "Partial, not verdicts" while an arm has fewer than its planned seeds (at least
    MIN_SEEDS), names the arms planned with 0 seeds, and ends with the grid's `checks`.
  """
  if grid.read is None:
    return None
  arms = by_seed(runs, grid.scored)
  readings = grid.read(arms)
  caps = {arm.name: arm.seeds_at(seeds) for arm in grid.arms}
  # an arm planned with 0 seeds is outside this run of the grid: its contrasts get no row,
  # and it does not make the others' verdicts partial
  planned = [arm.name for arm in grid.arms if caps[arm.name] > 0]

  def needed(name):
    return max(caps.get(name, seeds), MIN_SEEDS)

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
  extra = grid.checks(arms) if grid.checks is not None else []
  if extra:  # checks made after the runs: beside the verdicts, never in their place
    lines += ["", *extra]
  with open(os.path.join(workdir, "verdicts.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return readings
