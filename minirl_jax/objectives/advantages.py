"""Group-relative advantages from sequence rewards."""
import jax
import jax.numpy as jnp

from minirl_jax.objectives.config import STD_DDOFS


def group_advantages(rewards_N: jax.Array, group_size: int, normalize_std: bool,
                     std_ddof: int = 0) -> jax.Array:
  """A = R - mean_G R (MiniRL), or (R - mean_G R) / std_G R (GRPO, CISPO).

  Rows [g * G, (g + 1) * G) hold the G responses to prompt g. The std is
  sqrt(sum_G (R - mean_G R)^2 / (G - std_ddof)): the population std by default, the
  sample std with `std_ddof=1` (as many GRPO implementations compute it). A group whose
  rewards are all equal carries no signal and gets exactly zero advantages (never NaN),
  whatever the float rounding of its mean.

  Args:
    rewards_N: [N] sequence rewards, N a multiple of `group_size`.
    group_size: G, responses per prompt.
    normalize_std: divide the centred rewards by the group std.
    std_ddof: 0 (population std) or 1 (sample std; needs G >= 2 when `normalize_std`).

  Returns:
    [N] float32 advantages.
  """
  num = rewards_N.shape[0]
  if group_size < 1 or num % group_size:
    raise ValueError(f"{num} rewards do not split into groups of {group_size}")
  if not isinstance(std_ddof, int) or isinstance(std_ddof, bool) or std_ddof not in STD_DDOFS:
    raise ValueError(f"std_ddof must be one of {STD_DDOFS}, got {std_ddof!r}")
  if normalize_std and group_size <= std_ddof:
    raise ValueError(f"the sample std (std_ddof={std_ddof}) needs group_size >= "
                     f"{std_ddof + 1}, got {group_size}")
  rewards_PG = _groups(rewards_N, group_size)  # P prompts
  centred_PG = rewards_PG - jnp.mean(rewards_PG, axis=-1, keepdims=True)
  if normalize_std:
    std_P1 = jnp.std(rewards_PG, axis=-1, keepdims=True, ddof=std_ddof)
    centred_PG = centred_PG / jnp.where(std_P1 > 0, std_P1, 1.0)
  equal_P1 = equal_reward_groups(rewards_N, group_size)[:, None]
  return jnp.where(equal_P1, 0.0, centred_PG).reshape(num)


def equal_reward_groups(rewards_N: jax.Array, group_size: int) -> jax.Array:
  """[P] bool: the prompt groups whose G rewards are all equal (no learning signal: their
  advantages are exactly 0)."""
  rewards_PG = _groups(rewards_N, group_size)
  return jnp.max(rewards_PG, -1) == jnp.min(rewards_PG, -1)


def zero_advantage_frac(rewards_N: jax.Array, group_size: int) -> jax.Array:
  """`reward/zero_adv_frac`: the fraction of prompt groups without learning signal; 1 means
  the step's update has nothing to learn from."""
  return jnp.mean(equal_reward_groups(rewards_N, group_size).astype(jnp.float32))


def _groups(rewards_N: jax.Array, group_size: int) -> jax.Array:
  return rewards_N.astype(jnp.float32).reshape(-1, group_size)
