"""The async grid (docs/results/async.md, issue 40): staleness from asynchrony
(`rl.max_staleness` = k, the sampler k weight versions behind) against staleness from
mini-batches (N updates per global batch), MiniRL with and without R3, in round 2's regime
(configs/paper_moe.py, its cold start, the on-policy global batch of 8 prompts x 8).

The rules, stated in async.md before any run: collapse by round 2's criterion; the score is
round 2's (held-out accuracy, mean of the last two full evaluations); paired contrasts
seed by seed from the one cold start, read by `rules.accuracy` and `rules.collapse`.
Asynchrony runs colocated here: with `rl.placement=disaggregated` the run is the same
(tests/placement_test.py), and this host has one device.
"""
from minirl_jax.experiments import design
from minirl_jax.experiments import round2
from minirl_jax.experiments import rules

MINIRL, R3 = design.MINIRL, design.R3
SEEDS = 5
# Staleness sources, each with its overrides: k versions behind (N = 1), or N mini-batches.
SOURCES = (("k1", {"rl.max_staleness": 1}), ("k2", {"rl.max_staleness": 2}),
           ("n2", {"rl.mini_batch_size": 32}), ("n4", {"rl.mini_batch_size": 16}))
# (asynchrony, mini-batches) compared: the first staleness of each kind, then the second.
MATCHED = (("k1", "n2"), ("k2", "n4"))


def _arms() -> tuple[design.Arm, ...]:
  return tuple(design.Arm(f"{source}/minirl{replay}", {**MINIRL, **overrides, **extra},
                          seeds=SEEDS)
               for source, overrides in SOURCES
               for replay, extra in (("", {}), ("+r3", R3)))


def read(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """Asynchrony against mini-batches, and replay within each, by async.md's rules."""
  readings = []
  for a, n in MATCHED:
    for replay in ("", "+r3"):
      x, y = f"{a}/minirl{replay}", f"{n}/minirl{replay}"
      if x in arms and y in arms:
        readings += [rules.accuracy(f"{a} (asynchrony) ahead of {n} (mini-batches){replay}",
                                    arms[x], arms[y], "ahead"),
                     rules.collapse(f"{a} collapses, {n} does not{replay}", arms[x], arms[y])]
  for source, _ in SOURCES:
    x, y = f"{source}/minirl+r3", f"{source}/minirl"
    if x in arms and y in arms:
      readings += [rules.accuracy(f"{source}: R3 ahead of no replay", arms[x], arms[y],
                                  "ahead"),
                   rules.collapse(f"{source}: no replay collapses, R3 does not", arms[y],
                                  arms[x])]
  return readings


GRIDS = {
    "async": design.Grid("async", "configs/paper_moe.py", _arms(),
                         "staleness from asynchrony (k = 1, 2 versions behind) against "
                         "staleness from mini-batches (N = 2, 4), MiniRL with and without "
                         "R3, round 2's regime (docs/results/async.md)",
                         read=read, scored=round2.scored_evaluations, sample_sd=True),
}
