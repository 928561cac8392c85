"""MiniRL (Eq. 7): IS-weighted token REINFORCE under a decoupled-PPO trust-region mask."""
import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax.objectives import config as config_lib
from minirl_jax.objectives import diagnostics
from minirl_jax.objectives import rollout_correction
from minirl_jax.objectives import tokens


def clipped(ratio_BT: jax.Array, adv_B1: jax.Array, cfg: config_lib.ObjectiveConfig):
  """Tokens the trust region clips (M_t = 0 in Eq. 7; PPO's min picks the clipped term).

  Args:
    ratio_BT: r_t = pi_theta / pi_old.
    adv_B1: per-sequence advantages, broadcastable to [B, T].
    cfg: supplies eps_low and eps_high.

  Returns:
    (high_BT, low_BT): A > 0 and r > 1 + eps_high; A < 0 and r < 1 - eps_low.
  """
  high_BT = (adv_B1 > 0) & (ratio_BT > 1.0 + cfg.eps_high)
  low_BT = (adv_B1 < 0) & (ratio_BT < 1.0 - cfg.eps_low)
  return high_BT, low_BT


def is_weight(logp_BT, old_logp_BT, mu_logp_BT, cfg: config_lib.ObjectiveConfig):
  """The stop-gradient token weight sg[pi_theta/mu_old] of Eq. 7, TIS-truncated.

  Returns:
    (weight_BT, truncated_BT); which factor the cap truncates is `cfg.tis_target`.
  """
  if cfg.tis_target == "pi_theta_mu":
    return tokens.truncate(logp_BT - mu_logp_BT, cfg.tis_cap)
  weight_BT, truncated_BT = tokens.truncate(old_logp_BT - mu_logp_BT, cfg.tis_cap)
  staleness_BT = jax.lax.stop_gradient(tokens.clamped_exp(logp_BT - old_logp_BT))
  return weight_BT * staleness_BT, truncated_BT


def shuffled(x_BT: jax.Array, mask_BT: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """`x` with its entries on `mask` permuted among themselves (elsewhere unchanged): the
  same values, at other tokens. The permutation is seeded by the batch's tokens, so a batch
  is always shuffled alike (resume, micro-batches) and two batches differently."""
  flat_x, valid = jnp.asarray(x_BT).reshape(-1), jnp.asarray(mask_BT).reshape(-1) > 0
  n = flat_x.shape[0]
  seed = jnp.sum(jnp.asarray(tokens_BT).reshape(-1).astype(jnp.uint32)
                 * (jnp.arange(n, dtype=jnp.uint32) + 1))
  draws = jax.random.uniform(jax.random.fold_in(jax.random.key(0), seed), (n,))
  in_order = jnp.argsort(jnp.where(valid, jnp.arange(n), n))   # valid positions first
  at_random = jnp.argsort(jnp.where(valid, draws, 2.0))       # valid positions, shuffled
  out = flat_x.at[in_order].set(flat_x[at_random])
  return jnp.where(valid, out, flat_x).reshape(x_BT.shape)


def loss(logp_BT: jax.Array, batch: batch_lib.TrainBatch, cfg: config_lib.ObjectiveConfig):
  """Negated MiniRL objective and its metrics.

  J = (1/num_sequences) sum_i sum_t M_t sg[pi_theta/mu_old] A_i log pi_theta   (Eq. 7)
  with 1/|y_i| inside when length_norm, the weight dropped when not train_infer_is, and
  M_t = 1 when not clip. `is_level` "sequence" replaces the weight by
  sg[min(prod_t pi_old/mu_old, C) pi_theta/pi_old] and "geometric" keeps it; both multiply
  by the sequence's keep mask (`rollout_correction`).

  Args:
    logp_BT: log pi_theta of each token (the only input gradients flow to).
    batch: old_logp, mu_logp, loss_mask, advantages and the global counts.
    cfg: the objective config.

  Returns:
    (loss, metrics): loss = -J, metrics a flat dict (see `diagnostics.token_metrics`;
    `rollout_correction.metrics` too unless is_level is "token").
  """
  logp_BT, old_BT, mu_BT, adv_B1 = tokens.inputs(logp_BT, batch)
  ratio_BT = jax.lax.stop_gradient(tokens.clamped_exp(logp_BT - old_BT))
  high_BT, low_BT = clipped(ratio_BT, adv_B1, cfg)
  keep_BT = ~(high_BT | low_BT) if cfg.clip else jnp.ones_like(high_BT)
  weight_BT, truncated_BT = is_weight(logp_BT, old_BT, mu_BT, cfg)
  applied_BT = weight_BT if cfg.use_train_infer_is else 1.0
  if cfg.is_shuffle:
    applied_BT = shuffled(weight_BT, batch.loss_mask, batch.tokens)
  seq_metrics = {}
  if cfg.is_level != "token":
    corr = rollout_correction.sequence_correction(old_BT, mu_BT, batch, cfg)
    keep_BT = keep_BT & corr.keep_B[:, None]
    if cfg.is_level == "sequence" and cfg.use_train_infer_is:
      # seq-TIS times the staleness ratio: the sequence weight itself on-policy.
      applied_BT = corr.weight_B[:, None] * ratio_BT
    seq_metrics = rollout_correction.metrics(corr, batch)
  term_BT = keep_BT * applied_BT * adv_B1 * logp_BT  # Eq. 7
  how = tokens.SEQ_MEAN if cfg.use_length_norm else tokens.SEQ_SUM
  objective = tokens.normalize(term_BT, batch, how)
  metrics = diagnostics.token_metrics(
      logp_BT, batch, ratio_BT=ratio_BT, is_weight_BT=weight_BT,
      is_truncated_BT=truncated_BT, clip_high_BT=high_BT, clip_low_BT=low_BT)
  return -objective, {**metrics, **seq_metrics}
