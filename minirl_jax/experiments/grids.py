"""The paper's experiments as named grids of arms, each arm a set of config overrides.

An arm is RL overrides on top of a base config plus (optionally) cold-start overrides; arms
with the same cold-start overrides branch from one shared SFT checkpoint (trained at seed 0,
whatever the RL seed), so they differ only in what the arm changes.
"""
import dataclasses
from typing import Mapping, Optional

from minirl_jax import errors
from minirl_jax.rl import gap as gap_lib

# Overrides of one arm: dotted config keys (`objective.clip`) -> value.
Overrides = Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  overrides: Overrides = dataclasses.field(default_factory=dict)
  cold_start: Overrides = dataclasses.field(default_factory=dict)  # sft.* / model.* etc.
  seeds: Optional[int] = None  # the most RL seeds this arm runs; None: the grid's --seeds

  def seeds_at(self, seeds: int) -> int:
    """How many RL seeds this arm runs when its grid runs `seeds` (0: none planned)."""
    return seeds if self.seeds is None else min(self.seeds, seeds)


@dataclasses.dataclass(frozen=True)
class Grid:
  name: str
  base_config: str  # path relative to the repository root
  arms: tuple[Arm, ...]
  description: str


MINIRL = {"objective.name": "minirl"}
NO_IS = {**MINIRL, "objective.train_infer_is": False}
LENGTH_NORM = {**MINIRL, "objective.length_norm": True}
R2, R3 = {"rl.routing_replay": "r2"}, {"rl.routing_replay": "r3"}
NO_CLIP = {"objective.clip": False}


def _onpolicy() -> tuple[Arm, ...]:
  arms = []
  for name, overrides in (("minirl", MINIRL), ("minirl+length_norm", LENGTH_NORM),
                          ("minirl_no_is", NO_IS)):
    arms.append(Arm(name, overrides))
    arms.append(Arm(f"{name}+r3", {**overrides, **R3}))
  arms += [Arm("grpo", {"objective.name": "grpo"}), Arm("cispo", {"objective.name": "cispo"})]
  return tuple(arms) + SEQUENCE_IS


# The critics' corrections (PAPER.md "Beyond the paper"): sequence-level TIS at the paper's
# cap, and geometric-mean masking at verl's usual bounds.
SEQUENCE_IS = (Arm("minirl_seq_tis", {**MINIRL, "objective.is_level": "sequence"}),
               Arm("minirl_geo_mis", {**MINIRL, "objective.is_level": "geometric",
                                      "objective.is_bounds": (0.999, 1.001)}))


# The off-policy grid: N updates per step, and its five recipes (finding 5 compares those
# lacking clipping or replay with MiniRL + R3; finding 6, R2 with R3).
OFFPOLICY_NS = (2, 4, 8)
OFFPOLICY_RECIPES = {"minirl_no_clip": {**MINIRL, **NO_CLIP},
                     "minirl+r2_no_clip": {**MINIRL, **NO_CLIP, **R2},
                     "minirl": MINIRL, "minirl+r2": {**MINIRL, **R2},
                     "minirl+r3": {**MINIRL, **R3}}


def _offpolicy(mini_batch_size: int, group_size: int) -> tuple[Arm, ...]:
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
      arms.append(Arm(f"n{n}/{name}", {**batch, **overrides}))
  return tuple(arms)


# Train-infer gap levels, zero to widest: the zero-gap control (mu_old := pi_old), then the
# sampler's formats against the float32 trainer.
GAP_LEVELS = (("zero", {"sampler.dtype": "float32", "objective.behaviour_logp": "pi_old"}),
              *((dtype, {"sampler.dtype": dtype}) for dtype in gap_lib.LEVELS))


def _gap() -> tuple[Arm, ...]:
  """MiniRL vs w/o train-infer IS at every gap level; at the widest (int4), also the
  head-to-head of token-level IS (the paper) with sequence-level TIS and geometric masking
  (its critics)."""
  arms = [Arm(f"{level}/{name}", {**overrides, **level_overrides})
          for level, level_overrides in GAP_LEVELS
          for name, overrides in (("minirl", MINIRL), ("minirl_no_is", NO_IS))]
  widest, widest_overrides = GAP_LEVELS[-1]
  arms += [Arm(f"{widest}/{arm.name}", {**arm.overrides, **widest_overrides})
           for arm in SEQUENCE_IS]
  return tuple(arms)


# The cold-start grid's three SFT checkpoints, least trained first.
COLD_STARTS = {"sft_short": {"sft.target_accuracy": 0.15},
               "sft_default": {},
               "sft_long": {"sft.target_accuracy": 0.45}}


def coldstart_arm(start: str) -> str:
  return f"minirl_from_{start}"


def _coldstart() -> tuple[Arm, ...]:
  """The stable recipe (MiniRL, on-policy) from three differently trained SFT checkpoints."""
  return tuple(Arm(coldstart_arm(name), MINIRL, cold) for name, cold in COLD_STARTS.items())


def _round2() -> tuple[Arm, ...]:
  """docs/results/round2.md: the contrasts the power analysis ranked, each arm with its
  seeds: 10 for rank 1 and 5 for rank 2. Ranks 3-4 (seeds=0) wait until ranks 1-2 have
  finished: the first arm took 29 minutes, so ranks 1-2 alone fill the ~15 h budget, and at
  3 seeds no collapse contrast of theirs could reach p < 0.05 anyway. Off-policy at N = 8
  keeps the on-policy global batch (8 prompts x 8) and splits it into mini-batches of 8, so
  N is not confounded with data per step."""
  n8, n2 = {"rl.mini_batch_size": 8}, {"rl.mini_batch_size": 32}
  return (Arm("minirl", MINIRL, seeds=10), Arm("minirl_no_is", NO_IS, seeds=10),
          Arm("n8/minirl", {**MINIRL, **n8}, seeds=5),
          Arm("n8/minirl+r3", {**MINIRL, **R3, **n8}, seeds=5),
          Arm("minirl+r3", {**MINIRL, **R3}, seeds=0),
          Arm("minirl_no_is+r3", {**NO_IS, **R3}, seeds=0),
          Arm("n8/minirl+r2", {**MINIRL, **R2, **n8}, seeds=0),
          Arm("n8/minirl_no_clip", {**MINIRL, **NO_CLIP, **n8}, seeds=0),
          # Added before any N = 2 run (round2.md, "Addendum"): every N = 8 run so far
          # collapsed by step 5 with and without replay, a mini-batch of 8 being one
          # prompt's group; N = 2 updates on 4 prompts' groups. 5 seeds each, after ranks 1-2
          # (round2.md, "The budget from here").
          Arm("n2/minirl", {**MINIRL, **n2}, seeds=5),
          Arm("n2/minirl+r3", {**MINIRL, **R3, **n2}, seeds=5))


GRIDS = {
    "quick": Grid("quick", "configs/smoke.py",
                  (Arm("minirl", {**MINIRL, "rl.steps": 2}),
                   Arm("minirl_no_is", {**NO_IS, "rl.steps": 2})),
                  "two arms, two RL steps on the smoke config: checks the machinery (tests)"),
    "onpolicy": Grid("onpolicy", "configs/paper_small.py", _onpolicy(),
                     "findings 1-4: N = 1; MiniRL, +length-norm, w/o train-infer IS, each "
                     "with and without R3; GRPO and CISPO as the paper writes them; MiniRL "
                     "with sequence-level TIS and geometric masking"),
    "offpolicy": Grid("offpolicy", "configs/paper_small.py",
                      _offpolicy(mini_batch_size=32, group_size=8),
                      "findings 5-6: N = 2, 4, 8 at a fixed mini-batch; clipping and replay"),
    "gap": Grid("gap", "configs/paper_small.py", _gap(),
                "the gap knob: MiniRL vs w/o train-infer IS from zero gap to int4"),
    "coldstart": Grid("coldstart", "configs/paper_small.py", _coldstart(),
                      "finding 7: MiniRL from three cold starts"),
    "round2": Grid("round2", "configs/paper_moe.py", _round2(),
                   "round 2: findings 3-6 in long runs of a model whose routing matters, "
                   "seeds by the power analysis (docs/results/round2.md)"),
}


def get(name: str) -> Grid:
  if name not in GRIDS:
    raise errors.UserError(f"--grid must be one of {sorted(GRIDS)}, got {name!r}")
  return GRIDS[name]


def apply(config, overrides: Overrides):
  """`config` (a ConfigDict) with the overrides set in place, as the flags would set them."""
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def flags(overrides: Overrides) -> list[str]:
  """`--config.key=value` flags for an override mapping (bools and None as Python writes
  them, which ml_collections parses)."""
  return [f"--config.{key}={value}" for key, value in sorted(overrides.items())]
