"""A run's random streams, each named: every key the main job draws comes from here.

All are `fold_in`s of `jax.random.key(seed)` by fixed numbers: changing one changes every
run's metrics, so recorded runs would no longer reproduce. Two pairs share a key, harmlessly
since each pair draws for different weights: cold-start evaluation 1 and RL's evaluations,
and cold-start evaluation 1000 + n and rollout n.
"""
import dataclasses

import jax

_ROLLOUT_BASE = 1000  # rollout n's stream: fold_in(root, 1000 + n)


@dataclasses.dataclass(frozen=True)
class Keys:
  """The named streams of one run's seed."""
  root: jax.Array  # jax.random.key(seed)

  @classmethod
  def of(cls, seed: int) -> "Keys":
    return cls(jax.random.key(seed))

  @property
  def init(self) -> jax.Array:
    """The random initial parameters (when not `init_from`)."""
    return jax.random.fold_in(self.root, 0)

  def sft_eval(self, step: int) -> jax.Array:
    """The held-out check after cold-start step `step` (>= 1)."""
    return jax.random.fold_in(self.root, step)

  @property
  def rl_eval(self) -> jax.Array:
    """Every held-out evaluation of RL (the same draws at each step, so the curve compares
    policies, not samples)."""
    return jax.random.fold_in(self.root, 1)

  def rollout(self, step: int) -> jax.Array:
    """The training rollout of RL step `step` (>= 1)."""
    return jax.random.fold_in(self.root, _ROLLOUT_BASE + step)
