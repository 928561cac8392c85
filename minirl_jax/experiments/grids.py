"""Every round's grids by name (a round is a module: `round1`, `round2`; a new round adds
one and a line to ROUNDS), and an arm's overrides as a config or as flags.
"""
from minirl_jax import errors
from minirl_jax.experiments import asynchrony
from minirl_jax.experiments import design
from minirl_jax.experiments import round1
from minirl_jax.experiments import round2
from minirl_jax.experiments import round3

# Two arms, two RL steps on the smoke config: checks the machinery (tests), in no round.
QUICK = design.Grid("quick", "configs/smoke.py",
                    (design.Arm("minirl", {**design.MINIRL, "rl.steps": 2}),
                     design.Arm("minirl_no_is", {**design.NO_IS, "rl.steps": 2})),
                    "two arms, two RL steps on the smoke config: checks the machinery (tests)")
ROUNDS = {"round 1": round1.GRIDS, "round 2": round2.GRIDS, "round 3": round3.GRIDS,
          "async": asynchrony.GRIDS}
GRIDS = {QUICK.name: QUICK,
         **{name: grid for grids in ROUNDS.values() for name, grid in grids.items()}}


def get(name: str) -> design.Grid:
  if name not in GRIDS:
    raise errors.UserError(f"--grid must be one of {sorted(GRIDS)}, got {name!r}")
  return GRIDS[name]


def round_of(grid: str) -> str:
  """The round a grid (by name) belongs to."""
  for round_name, grids in ROUNDS.items():
    if grid in grids:
      return round_name
  raise errors.UserError(f"grid {grid!r} is in no round (rounds: {sorted(ROUNDS)})")


def apply(config, overrides: design.Overrides):
  """`config` (a ConfigDict) with the overrides set in place, as the flags would set them."""
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def flags(overrides: design.Overrides) -> list[str]:
  """`--config.key=value` flags for an override mapping (bools and None as Python writes
  them, which ml_collections parses)."""
  return [f"--config.{key}={value}" for key, value in sorted(overrides.items())]
