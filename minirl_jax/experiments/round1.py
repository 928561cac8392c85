"""Round 1 (docs/results/README.md): four grids of 40-step runs from one cold start of
configs/paper_small.py, and their readers, by round 1's rule (`rules.ahead`) as that page
stated them before the runs.
"""
import numpy as np

from minirl_jax.experiments import design
from minirl_jax.experiments import layout
from minirl_jax.experiments import rules
from minirl_jax.rl import gap_levels

BASE_CONFIG = "configs/paper_small.py"
MINIRL, NO_IS, R2, R3 = design.MINIRL, design.NO_IS, design.R2, design.R3

# The critics' corrections (PAPER.md "Beyond the paper"): sequence-level TIS at the paper's
# cap, and geometric-mean masking at verl's usual bounds.
SEQUENCE_IS = (design.Arm("minirl_seq_tis", {**MINIRL, "objective.is_level": "sequence"}),
               design.Arm("minirl_geo_mis", {**MINIRL, "objective.is_level": "geometric",
                                             "objective.is_bounds": (0.999, 1.001)}))


def _onpolicy() -> tuple[design.Arm, ...]:
  arms = []
  for name, overrides in (("minirl", MINIRL), ("minirl+length_norm", design.LENGTH_NORM),
                          ("minirl_no_is", NO_IS)):
    arms.append(design.Arm(name, overrides))
    arms.append(design.Arm(f"{name}+r3", {**overrides, **R3}))
  arms += [design.Arm("grpo", {"objective.name": "grpo"}),
           design.Arm("cispo", {"objective.name": "cispo"})]
  return tuple(arms) + SEQUENCE_IS


# The off-policy grid: N updates per step, and its five recipes (finding 5 compares those
# lacking clipping or replay with MiniRL + R3; finding 6, R2 with R3).
OFFPOLICY_NS = (2, 4, 8)
OFFPOLICY_RECIPES = {"minirl_no_clip": {**MINIRL, **design.NO_CLIP},
                     "minirl+r2_no_clip": {**MINIRL, **design.NO_CLIP, **R2},
                     "minirl": MINIRL, "minirl+r2": {**MINIRL, **R2},
                     "minirl+r3": {**MINIRL, **R3}}


def _n(n: int) -> str:
  """The off-policy grid's level of N updates per step."""
  return f"n{n}"


def _offpolicy(mini_batch_size: int, group_size: int) -> tuple[design.Arm, ...]:
  """N = 2, 4, 8 updates per step at a fixed mini-batch: the global batch grows with N.

  The grid uses mini-batch 32 (4 prompts x 8), half the on-policy grid's 64, for compute:
  an N = 8 arm samples and scores N mini-batches a step, ~40 minutes at 64 on the 2-core
  CPU. Decided before any off-policy arm ran.
  """
  arms = []
  for n in OFFPOLICY_NS:
    batch = {"rl.mini_batch_size": mini_batch_size,
             "rl.prompts_per_step": n * mini_batch_size // group_size}
    for name, overrides in OFFPOLICY_RECIPES.items():
      arms.append(design.Arm(layout.arm_name(_n(n), name), {**batch, **overrides}))
  return tuple(arms)


# Train-infer gap levels, zero to widest: the zero-gap control (mu_old := pi_old), then the
# sampler's formats against the float32 trainer.
GAP_LEVELS = ((gap_levels.ZERO, {"sampler.dtype": "float32",
                                 "objective.behaviour_logp": "pi_old"}),
              *((dtype, {"sampler.dtype": dtype}) for dtype in gap_levels.LEVELS))


def _gap() -> tuple[design.Arm, ...]:
  """MiniRL vs w/o train-infer IS at every gap level; at the widest (int4), also the
  head-to-head of token-level IS (the paper) with sequence-level TIS and geometric masking
  (its critics)."""
  arms = [design.Arm(layout.arm_name(level, name), {**overrides, **level_overrides})
          for level, level_overrides in GAP_LEVELS
          for name, overrides in (("minirl", MINIRL), ("minirl_no_is", NO_IS))]
  widest, widest_overrides = GAP_LEVELS[-1]
  arms += [design.Arm(layout.arm_name(widest, arm.name), {**arm.overrides, **widest_overrides})
           for arm in SEQUENCE_IS]
  return tuple(arms)


# The cold-start grid's three SFT checkpoints, least trained first.
COLD_STARTS = {"sft_short": {"sft.target_accuracy": 0.15},
               "sft_default": {},
               "sft_long": {"sft.target_accuracy": 0.45}}


def coldstart_arm(start: str) -> str:
  return f"minirl_from_{start}"


def _coldstart() -> tuple[design.Arm, ...]:
  """The stable recipe (MiniRL, on-policy) from three differently trained SFT checkpoints."""
  return tuple(design.Arm(coldstart_arm(name), MINIRL, cold)
               for name, cold in COLD_STARTS.items())


def _order(a: str, b: str, sign: int) -> str:
  return {1: f"{a} ahead", -1: f"{b} ahead", 0: "no difference shown"}[sign]


def _arm(arms: dict[str, rules.ArmResult], level: str, variant: str):
  return arms.get(layout.arm_name(level, variant))


def _paired(a: rules.ArmResult, b: rules.ArmResult) -> str:
  """The means over the seeds both have (those `rules.ahead` compares), then per seed."""
  diffs = rules.paired_differences(a.final, b.final)
  mean_a, mean_b = (float(np.mean([arm.final[s] for s in diffs])) for arm in (a, b))
  return (f"{mean_a:.3f} vs {mean_b:.3f} (per seed "
          f"{', '.join(f'{d:+.3f}' for d in diffs.values())}; collapsed {a.collapses}/"
          f"{len(a.final)} vs {b.collapses}/{len(b.final)})")


def read_gap(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """Finding 3 and MiniRL against w/o IS at each level, the w/o-IS penalty against the gap,
  and token IS against the sequence-level corrections at the widest level."""
  pairs = {level: (_arm(arms, level, "minirl"), _arm(arms, level, "minirl_no_is"))
           for level, _ in GAP_LEVELS}
  pairs = {level: pair for level, pair in pairs.items() if None not in pair}
  readings = []
  for level, (minirl, no_is) in pairs.items():
    if not no_is.stable and minirl.stable:
      verdict = rules.REPRODUCED
    else:
      verdict = rules.NOT_REPRODUCED if no_is.collapses == 0 else rules.INCONCLUSIVE
    readings.append(rules.Reading(f"{level}: finding 3 (w/o IS collapses)", verdict,
                                  f"w/o IS collapsed {no_is.collapses}/{len(no_is.final)}, "
                                  f"MiniRL {minirl.collapses}/{len(minirl.final)}"))
    readings.append(rules.Reading(f"{level}: MiniRL vs w/o IS",
                                  _order("MiniRL", "w/o IS", rules.ahead(minirl, no_is)),
                                  _paired(minirl, no_is)))
  levels = list(pairs)
  if len(levels) >= 2:
    penalty = {level: pairs[level][0].mean() - pairs[level][1].mean()
               for level in (levels[0], levels[-1])}
    growth = penalty[levels[-1]] - penalty[levels[0]]
    readings.append(rules.Reading(
        f"the w/o-IS penalty grows from {levels[0]} to {levels[-1]} by more than "
        f"{rules.NOISE}", "yes" if growth > rules.NOISE else "no",
        f"penalty (MiniRL - w/o IS) {penalty[levels[0]]:+.3f} -> {penalty[levels[-1]]:+.3f}"))
  widest = GAP_LEVELS[-1][0]
  token = _arm(arms, widest, "minirl")
  for arm in SEQUENCE_IS:
    other = _arm(arms, widest, arm.name)
    if token and other:
      readings.append(rules.Reading(f"{widest}: token IS vs {arm.name}",
                                    _order("token IS", arm.name, rules.ahead(token, other)),
                                    _paired(token, other)))
  return readings


# The off-policy arms without clipping, without replay, or without both
LACKING_CLIP_OR_REPLAY = ("minirl_no_clip", "minirl+r2_no_clip", "minirl")


def _finding5(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """At each N: do the arms lacking clipping or replay collapse while MiniRL + R3 holds?"""
  readings, holds, none_worse = [], [], []
  for n in OFFPOLICY_NS:
    lacking = [_arm(arms, _n(n), name) for name in LACKING_CLIP_OR_REPLAY]
    full = _arm(arms, _n(n), "minirl+r3")
    if full is None or None in lacking:
      continue
    holds.append(all(not m.stable for m in lacking) and full.stable)
    # the lacking arms collapse no more often, together, than 3 x MiniRL + R3
    none_worse.append(sum(m.collapses for m in lacking) <= len(lacking) * full.collapses)
    counts = ", ".join(f"{name} {m.collapses}/{len(m.final)}"
                       for name, m in zip(LACKING_CLIP_OR_REPLAY, lacking))
    readings.append(rules.Reading(f"N = {n}: finding 5 holds", "yes" if holds[-1] else "no",
                                  f"collapsed: {counts}; minirl+r3 {full.collapses}/"
                                  f"{len(full.final)}"))
  if len(holds) == len(OFFPOLICY_NS):
    verdict = (rules.REPRODUCED if sum(holds) >= 2 else
               rules.NOT_REPRODUCED if all(none_worse) else rules.INCONCLUSIVE)
    readings.append(rules.Reading("finding 5 (without clipping or replay, collapse)", verdict,
                                  f"holds at {sum(holds)} of {len(holds)} N"))
  return readings


def _finding6(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """At each N, R2 against R3 by the ahead rule; the paper: R2 at N = 2, R3 at 4 and 8."""
  readings, signs = [], {}
  r2 = {n: _arm(arms, _n(n), "minirl+r2") for n in OFFPOLICY_NS}
  r3 = {n: _arm(arms, _n(n), "minirl+r3") for n in OFFPOLICY_NS}
  for n in OFFPOLICY_NS:
    if r2[n] and r3[n]:
      signs[n] = rules.ahead(r2[n], r3[n])
      readings.append(rules.Reading(f"N = {n}: R2 vs R3", _order("R2", "R3", signs[n]),
                                    _paired(r2[n], r3[n])))
  if len(signs) == len(OFFPOLICY_NS):
    wanted = {2: 1, 4: -1, 8: -1}
    r2_never_collapses = all(r2[n].collapses == 0 for n in (4, 8))
    if all(signs[n] == wanted[n] for n in OFFPOLICY_NS):
      verdict = rules.REPRODUCED
    elif any(signs[n] == -wanted[n] for n in OFFPOLICY_NS) or (
        not any(signs.values()) and r2_never_collapses):
      verdict = rules.NOT_REPRODUCED
    else:
      verdict = rules.INCONCLUSIVE
    readings.append(rules.Reading("finding 6 (R2 ahead at N = 2, R3 at N = 4, 8)", verdict,
                                  ", ".join(f"N = {n}: {_order('R2', 'R3', s)}"
                                            for n, s in signs.items())))
  return readings


def read_offpolicy(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """Findings 5 and 6, read at each N that has every arm they need."""
  return _finding5(arms) + _finding6(arms)


def read_coldstart(arms: dict[str, rules.ArmResult]) -> list[rules.Reading]:
  """Finding 7: the spread of the stable cold starts' mean accuracy, at RL step 0 and at
  the end."""
  starts = {name: arms[coldstart_arm(name)] for name in COLD_STARTS
            if coldstart_arm(name) in arms}
  if len(starts) < len(COLD_STARTS):
    return []
  stable = {name: arm for name, arm in starts.items() if arm.stable}
  evidence = "; ".join(f"{name}: {arm.mean('start'):.3f} -> {arm.mean():.3f} (collapsed "
                       f"{arm.collapses}/{len(arm.final)})" for name, arm in starts.items())
  if len(stable) < 2:
    return [rules.Reading("finding 7 (cold starts converge)", rules.INCONCLUSIVE,
                          f"fewer than 2 stable cold starts; {evidence}")]
  start, final = (float(np.ptp([arm.mean(which) for arm in stable.values()]))
                  for which in ("start", "final"))
  if final <= rules.NOISE and start > 2 * rules.NOISE:
    verdict = rules.REPRODUCED
  else:
    verdict = (rules.NOT_REPRODUCED if final > rules.NOISE and final >= 0.75 * start else
               rules.INCONCLUSIVE)
  return [rules.Reading("finding 7 (cold starts converge)", verdict,
                        f"spread of the stable starts {start:.3f} at RL step 0 -> {final:.3f} "
                        f"at the end; {evidence}")]


# In the order the power analysis pools their contrasts (`round2.round1_contrasts`).
GRIDS = {
    "onpolicy": design.Grid("onpolicy", BASE_CONFIG, _onpolicy(),
                            "findings 1-4: N = 1; MiniRL, +length-norm, w/o train-infer IS, "
                            "each with and without R3; GRPO and CISPO as the paper writes "
                            "them; MiniRL with sequence-level TIS and geometric masking"),
    "gap": design.Grid("gap", BASE_CONFIG, _gap(),
                       "the gap knob: MiniRL vs w/o train-infer IS from zero gap to int4",
                       read=read_gap),
    "offpolicy": design.Grid("offpolicy", BASE_CONFIG,
                             _offpolicy(mini_batch_size=32, group_size=8),
                             "findings 5-6: N = 2, 4, 8 at a fixed mini-batch; clipping and "
                             "replay", read=read_offpolicy),
    "coldstart": design.Grid("coldstart", BASE_CONFIG, _coldstart(),
                             "finding 7: MiniRL from three cold starts", read=read_coldstart),
}
