"""What a round is made of: arms (config overrides on a base config), grids of arms with
their reading rules, and the recipes every round's arms share.

An arm is RL overrides on top of a base config plus (optionally) cold-start overrides; arms
with the same cold-start overrides branch from one shared SFT checkpoint (trained at seed 0,
whatever the RL seed), so they differ only in what the arm changes.
"""
import dataclasses
from typing import Callable, Mapping, Optional

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
  """A round's grid: its arms, and the rules its round stated before the runs."""
  name: str
  base_config: str  # path relative to the repository root
  arms: tuple[Arm, ...]
  description: str
  # {arm: rules.ArmResult} -> [rules.Reading]; None: the grid has no stated rules
  read: Optional[Callable[[dict], list]] = None
  # report.Run -> the (step, accuracy) evaluations its score averages; None: no score
  # beyond the last evaluation (the table's final accuracy)
  scored: Optional[Callable[[object], list[tuple[int, float]]]] = None
  # {arm: rules.ArmResult} -> Markdown lines under verdicts.md's table: checks made after
  # the runs, which change no verdict; None: none
  checks: Optional[Callable[[dict], list[str]]] = None
  # the table's ± over seeds: the sample SD (ddof = 1) where True, else the population SD
  # (round 1's committed tables print it)
  sample_sd: bool = False
  # metrics DIR/series.csv keeps beyond `series.SERIES` for this grid's readings
  series: tuple[str, ...] = ()


MINIRL = {"objective.name": "minirl"}
NO_IS = {**MINIRL, "objective.train_infer_is": False}
LENGTH_NORM = {**MINIRL, "objective.length_norm": True}
R2, R3 = {"rl.routing_replay": "r2"}, {"rl.routing_replay": "r3"}
NO_CLIP = {"objective.clip": False}
