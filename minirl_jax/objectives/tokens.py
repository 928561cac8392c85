"""Masked token reductions with GLOBAL normalisers, and overflow-safe ratios.

Every mean divides by a count carried in the batch (`num_sequences`, `num_tokens`) rather
than by a local sum, so data-parallel shards' losses and mean metrics add up to the full
batch's.
"""
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax import batch as batch_lib

# exp(20) ~ 4.9e8: ratios beyond it only occur when a token is broken (and is then masked
# or truncated in any sane config); clamping keeps float32 sums over 1e9 tokens finite.
LOG_RATIO_LIMIT = 20.0

# A -inf log-prob on a loss token (a sampler or kernel underflow) would turn every
# difference into inf - inf; any floor far below real log-probs keeps them finite.
LOG_PROB_FLOOR = -1e6

# How a per-token term becomes a scalar: sum over tokens then mean over sequences
# (MiniRL, Eq. 7), per-sequence token mean then mean over sequences (GRPO, MiniRL
# +length-norm), or a token mean over the batch or within each prompt group (CISPO).
SEQ_SUM, SEQ_MEAN, TOKEN_MEAN = "seq_sum", "seq_mean", "token_mean"


def sanitize(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Float32 `x` with 0 off the mask, so pad garbage (-inf, NaN) reaches no value or grad."""
  return jnp.where(mask_BT > 0, x_BT.astype(jnp.float32), 0.0)


def sanitize_logp(logp_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """`sanitize` for log-probs, also floored at LOG_PROB_FLOOR."""
  return jnp.maximum(sanitize(logp_BT, mask_BT), LOG_PROB_FLOOR)


def inputs(logp_BT: jax.Array, batch: batch_lib.TrainBatch):
  """Sanitized float32 (logp, old_logp, mu_logp) [B, T] and advantages broadcast to [B, 1]."""
  mask_BT = batch.loss_mask
  adv_B1 = batch.advantages.astype(jnp.float32)[:, None]
  return (sanitize_logp(logp_BT, mask_BT), sanitize_logp(batch.old_logp, mask_BT),
          sanitize_logp(batch.mu_logp, mask_BT), adv_B1)


def clamped_exp(log_x: jax.Array, limit: float = LOG_RATIO_LIMIT) -> jax.Array:
  """exp(clip(log_x, -limit, limit)) whose gradient is that value times d log_x.

  Unlike exp(clip(.)), a token past the limit keeps a (bounded) gradient instead of none.
  """
  value = jax.lax.stop_gradient(jnp.exp(jnp.clip(log_x, -limit, limit)))
  return value * jnp.exp(log_x - jax.lax.stop_gradient(log_x))


def truncate(log_w_BT: jax.Array, cap) -> tuple[jax.Array, jax.Array]:
  """Stop-gradient weight min(exp(log_w), cap) and where the cap binds (TIS).

  Args:
    log_w_BT: log of the IS weight.
    cap: truncation C, or None for none.

  Returns:
    (weight_BT, truncated_BT): the float32 weight, and True where the cap binds.
  """
  log_w_BT = jax.lax.stop_gradient(log_w_BT)
  if cap is None:
    return clamped_exp(log_w_BT), jnp.zeros(log_w_BT.shape, bool)
  log_cap = float(np.log(cap))
  return clamped_exp(jnp.minimum(log_w_BT, log_cap)), log_w_BT > log_cap


def lengths(batch: batch_lib.TrainBatch) -> jax.Array:
  """[B] number of loss tokens per sequence."""
  return jnp.sum(batch.loss_mask.astype(jnp.float32), axis=-1)


def _positive(count: jax.Array) -> jax.Array:
  # An empty (mini-)batch has count 0 and a zero sum: report 0, not NaN.
  return jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


def normalize(term_BT: jax.Array, batch: batch_lib.TrainBatch, how: str,
              token_norm: str = "batch") -> jax.Array:
  """Reduces a sanitized per-token term to a scalar with the batch's global counts.

  Args:
    term_BT: per-token term, finite and already zero off the loss mask.
    batch: supplies `loss_mask`, `num_sequences`, `num_tokens` and, for
      `token_norm="group"`, `group_length_mean`.
    how: SEQ_SUM (sum_t, mean over sequences), SEQ_MEAN ((1/|y|) sum_t, mean over
      sequences) or TOKEN_MEAN (a token mean, see `token_norm`).
    token_norm: TOKEN_MEAN's normaliser (ignored by the others): "batch" divides the sum
      over all tokens by `num_tokens`; "group" divides each sequence's token sum by its
      group's mean length and averages over `num_sequences`.

  Returns:
    The scalar; shards' values sum to the full batch's.
  """
  mask_BT = batch.loss_mask.astype(jnp.float32)
  per_seq_B = jnp.sum(term_BT * mask_BT, axis=-1)
  if how == SEQ_SUM:
    return jnp.sum(per_seq_B) / _positive(batch.num_sequences)
  if how == SEQ_MEAN:
    return jnp.sum(per_seq_B / _positive(lengths(batch))) / _positive(batch.num_sequences)
  if how == TOKEN_MEAN and token_norm == "batch":
    return jnp.sum(per_seq_B) / _positive(batch.num_tokens)
  if how == TOKEN_MEAN and token_norm == "group":
    return _group_token_mean(per_seq_B, batch)
  raise ValueError(f"unknown normalisation {how!r} (token_norm {token_norm!r})")


def _group_token_mean(per_seq_B: jax.Array, batch: batch_lib.TrainBatch) -> jax.Array:
  # CISPO as the paper writes it, per prompt group g of G rows over P prompts:
  #   (1/P) sum_g (1/sum_{i in g} |y_i|) sum_{i in g} sum_t term_it
  #   = (1/(P G)) sum_i (sum_t term_it) / mean_{j in g(i)} |y_j|.
  # The row-wise form needs only the row's own group mean (over the GLOBAL batch) and the
  # global sequence count, so it holds however a group's rows are split into mini-batches
  # or shards, and their values still add up.
  if batch.group_length_mean is None:
    raise ValueError(
        "objective.token_norm='group' needs TrainBatch.group_length_mean (each row's mean "
        "prompt-group response length over the global batch), got None")
  mean_B = batch.group_length_mean.astype(jnp.float32)
  # A group without loss tokens has mean 0 and only all-zero rows: they add 0, not NaN.
  return (jnp.sum(per_seq_B / jnp.where(mean_B > 0, mean_B, 1.0))
          / _positive(batch.num_sequences))


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array, count: jax.Array) -> jax.Array:
  """sum(x * mask) / count; pass the GLOBAL token count (e.g. `batch.num_tokens`)."""
  return jnp.sum(sanitize(x_BT, mask_BT) * mask_BT) / _positive(count)


def masked_max(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """max of a non-negative `x` over the mask; 0 when the mask is empty."""
  return jnp.max(jnp.where(mask_BT > 0, x_BT.astype(jnp.float32), 0.0), initial=0.0)


def sequence_mean(x_B: jax.Array, batch: batch_lib.TrainBatch) -> jax.Array:
  """sum over sequences / GLOBAL `num_sequences`."""
  return jnp.sum(x_B.astype(jnp.float32)) / _positive(batch.num_sequences)
