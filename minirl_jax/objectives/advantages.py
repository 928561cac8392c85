"""Group-relative advantages from sequence rewards."""
import jax
import jax.numpy as jnp


def group_advantages(rewards_N: jax.Array, group_size: int, normalize_std: bool) -> jax.Array:
  """A = R - mean_G R (MiniRL), or (R - mean_G R) / std_G R (GRPO, CISPO).

  Rows [g * G, (g + 1) * G) hold the G responses to prompt g. The std is the population
  std of the G rewards. A group whose rewards are all equal carries no signal and gets
  exactly zero advantages (never NaN), whatever the float rounding of its mean.

  Args:
    rewards_N: [N] sequence rewards, N a multiple of `group_size`.
    group_size: G, responses per prompt.
    normalize_std: divide the centred rewards by the group std.

  Returns:
    [N] float32 advantages.
  """
  num = rewards_N.shape[0]
  if group_size < 1 or num % group_size:
    raise ValueError(f"{num} rewards do not split into groups of {group_size}")
  rewards_PG = rewards_N.astype(jnp.float32).reshape(-1, group_size)  # P prompts
  centred_PG = rewards_PG - jnp.mean(rewards_PG, axis=-1, keepdims=True)
  if normalize_std:
    std_P1 = jnp.std(rewards_PG, axis=-1, keepdims=True)
    centred_PG = centred_PG / jnp.where(std_P1 > 0, std_P1, 1.0)
  equal_P1 = jnp.max(rewards_PG, -1, keepdims=True) == jnp.min(rewards_PG, -1, keepdims=True)
  return jnp.where(equal_P1, 0.0, centred_PG).reshape(num)
