"""GRPO as the paper's appendix writes it: PPO min-clip, per-sequence length normalisation."""
import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax.objectives import config as config_lib
from minirl_jax.objectives import diagnostics
from minirl_jax.objectives import minirl
from minirl_jax.objectives import tokens


def loss(logp_BT: jax.Array, batch: batch_lib.TrainBatch, cfg: config_lib.ObjectiveConfig):
  """Negated GRPO objective and its metrics.

  J = (1/G) sum_i (1/|y_i|) sum_t min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)
  with r_it = pi_theta/pi_old, the global `num_sequences` as G, and A_i z-scored by the
  caller (`group_advantages(..., normalize_std=True)`). Ablations: not length_norm sums
  over tokens; not clip uses r_it A_i; train_infer_is multiplies each token by
  sg[min(pi_old/mu_old, tis_cap)].

  Args:
    logp_BT: log pi_theta of each token (the only input gradients flow to).
    batch: old_logp, mu_logp, loss_mask, advantages and the global counts.
    cfg: the objective config.

  Returns:
    (loss, metrics): loss = -J, metrics as `diagnostics.token_metrics`.
  """
  logp_BT, old_BT, mu_BT, adv_B1 = tokens.inputs(logp_BT, batch)
  ratio_BT = tokens.clamped_exp(logp_BT - old_BT)
  term_BT = ratio_BT * adv_B1
  if cfg.clip:
    clipped_ratio_BT = jnp.clip(ratio_BT, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    term_BT = jnp.minimum(term_BT, clipped_ratio_BT * adv_B1)
  weight_BT, truncated_BT = tokens.truncate(old_BT - mu_BT, cfg.tis_cap)
  if cfg.use_train_infer_is:
    term_BT = weight_BT * term_BT
  how = tokens.SEQ_MEAN if cfg.use_length_norm else tokens.SEQ_SUM
  objective = tokens.normalize(term_BT, batch, how)
  ratio_BT = jax.lax.stop_gradient(ratio_BT)
  high_BT, low_BT = minirl.clipped(ratio_BT, adv_B1, cfg)
  metrics = diagnostics.token_metrics(
      logp_BT, batch, ratio_BT=ratio_BT, is_weight_BT=weight_BT,
      is_truncated_BT=truncated_BT, clip_high_BT=high_BT, clip_low_BT=low_BT)
  return -objective, metrics
