"""CISPO as the paper's appendix writes it: clipped stop-gradient IS weight, token mean."""
import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax.objectives import config as config_lib
from minirl_jax.objectives import diagnostics
from minirl_jax.objectives import tokens


def loss(logp_BT: jax.Array, batch: batch_lib.TrainBatch, cfg: config_lib.ObjectiveConfig):
  """Negated CISPO objective and its metrics.

  J = (1/sum_i |y_i|) sum_i sum_t sg[clip(r_it, 1-eps_low, 1+eps_high)] A_i log pi_theta
  with r_it = pi_theta/pi_old and the global `num_tokens` as sum_i |y_i|. No token is
  ever masked: clipping only bounds the weight. token_norm="group" takes the token mean
  within each prompt group g instead, (1/P) sum_g (1/sum_{i in g} |y_i|) sum_{i in g}
  sum_t (...), with `group_length_mean` and `num_sequences`. Ablations: not length_norm
  divides by `num_sequences` instead; not clip uses sg[r_it]; train_infer_is multiplies
  each token by sg[min(pi_old/mu_old, tis_cap)].

  Args:
    logp_BT: log pi_theta of each token (the only input gradients flow to).
    batch: old_logp, mu_logp, loss_mask, advantages, the global counts and, for
      token_norm="group", group_length_mean.
    cfg: the objective config.

  Returns:
    (loss, metrics): loss = -J, metrics as `diagnostics.token_metrics`.
  """
  logp_BT, old_BT, mu_BT, adv_B1 = tokens.inputs(logp_BT, batch)
  ratio_BT = jax.lax.stop_gradient(tokens.clamped_exp(logp_BT - old_BT))
  high_BT = ratio_BT > 1.0 + cfg.eps_high
  low_BT = ratio_BT < 1.0 - cfg.eps_low
  coef_BT = jnp.clip(ratio_BT, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) if cfg.clip else ratio_BT
  weight_BT, truncated_BT = tokens.truncate(old_BT - mu_BT, cfg.tis_cap)
  if cfg.use_train_infer_is:
    coef_BT = weight_BT * coef_BT
  term_BT = coef_BT * adv_B1 * logp_BT
  how = tokens.TOKEN_MEAN if cfg.use_length_norm else tokens.SEQ_SUM
  objective = tokens.normalize(term_BT, batch, how, cfg.token_norm)
  metrics = diagnostics.token_metrics(
      logp_BT, batch, ratio_BT=ratio_BT, is_weight_BT=weight_BT,
      is_truncated_BT=truncated_BT, clip_high_BT=high_BT, clip_low_BT=low_BT)
  return -objective, metrics
