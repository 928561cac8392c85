"""The sequence-level surrogate J_seq (Eq. 1) that token objectives approximate."""
import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax.metrics import Reduce
from minirl_jax.objectives import config as config_lib
from minirl_jax.objectives import tokens

# A whole sequence's log-ratio is a sum over tokens, so it may legitimately exceed the
# per-token limit; 80 keeps exp finite in float32 (overflow at ~88.7).
_SEQ_LOG_WEIGHT_LIMIT = 80.0


# How `loss`'s metrics reduce (`minirl_jax.metrics`).
METRICS = {"is/seq_weight_mean": Reduce.BATCH_MEAN, "is/seq_log_weight_abs_max": Reduce.MAX}


def loss(logp_BT: jax.Array, batch: batch_lib.TrainBatch, cfg: config_lib.ObjectiveConfig):
  """Negated J_seq = (1/num_sequences) sum_i [pi_theta(y_i)/mu_old(y_i)] A_i   (Eq. 1).

  The sequence ratio is prod_t pi_theta/mu_old = exp(sum_t log pi_theta - log mu_old),
  formed in log space. A_i (the batch's advantages) replaces R: the group baseline leaves
  the expected gradient unchanged and gives J_seq the same reward signal as the token
  objective, so the cosine of their gradients isolates the first-order approximation.
  There is no clipping, truncation or length normalisation; `cfg` is unused and kept for
  the shared signature.

  Args:
    logp_BT: log pi_theta of each token (the only input gradients flow to).
    batch: mu_logp, loss_mask, advantages and `num_sequences`.
    cfg: unused.

  Returns:
    (loss, metrics): loss = -J_seq; metrics `is/seq_weight_mean` and
    `is/seq_log_weight_abs_max` (max |log pi_theta(y)/mu_old(y)|; combine shards by max).
  """
  del cfg
  logp_BT, _, mu_BT, adv_B1 = tokens.inputs(logp_BT, batch)
  log_w_B = jnp.sum((logp_BT - mu_BT) * batch.loss_mask, axis=-1)
  w_B = tokens.clamped_exp(log_w_B, _SEQ_LOG_WEIGHT_LIMIT)
  has_tokens_B = tokens.lengths(batch) > 0  # An empty sequence is not part of J_seq.
  objective = tokens.sequence_mean(jnp.where(has_tokens_B, w_B * adv_B1[:, 0], 0.0),
                                   batch)  # Eq. 1
  w_B = jax.lax.stop_gradient(jnp.where(has_tokens_B, w_B, 0.0))
  metrics = {
      "is/seq_weight_mean": tokens.sequence_mean(w_B, batch),
      "is/seq_log_weight_abs_max": jnp.max(jnp.abs(jax.lax.stop_gradient(log_w_B)),
                                           initial=0.0),
  }
  return -objective, metrics
