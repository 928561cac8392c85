"""Train-infer mismatch, staleness, IS and first-order-approximation diagnostics.

Means divide by the batch's GLOBAL counts, so shards' values add up to the full batch's;
`*_max` metrics combine across shards with a max.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax.metrics import Reduce
from minirl_jax.objectives import tokens

masked_mean = tokens.masked_mean

# exp(80) ~ 5.5e34 stays finite in float32 (overflow at ~88.7).
_MAX_LOG_ERROR = 80.0


def token_entropy(logits_BTV: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) over the full vocabulary, [B, T] float32.

  Safe for -inf logits (masked vocabulary entries): they add 0, not NaN, to value and grad.
  """
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  p_BTV = jnp.exp(logp_BTV)
  return -jnp.sum(p_BTV * jnp.where(p_BTV > 0, logp_BTV, 0.0), axis=-1)


def first_order_error(logp_BT: jax.Array, batch: batch_lib.TrainBatch) -> jax.Array:
  """Per-sequence error of prod_t(1 + d_t) ~= 1 + sum_t d_t, d_t = pi_theta/mu_old - 1.

  Returns |P - (1 + S)| / P with P = prod_t(1 + d_t) = exp(sum_t log(pi_theta/mu_old)) and
  S = sum_t d_t, evaluated as |expm1(log(1 + S) - log P)| so tiny errors keep their digits
  and huge ones do not overflow (the exponent is capped at 80). Where 1 + S <= 0 the error
  is 1 + |1 + S| / P. Sequences without loss tokens get 0.

  Args:
    logp_BT: log pi_theta (treated as a constant).
    batch: mu_logp and loss_mask.

  Returns:
    [B] float32 relative errors.
  """
  logp_BT, _, mu_BT, _ = tokens.inputs(jax.lax.stop_gradient(logp_BT), batch)
  log_w_BT = jnp.clip(logp_BT - mu_BT, -tokens.LOG_RATIO_LIMIT, tokens.LOG_RATIO_LIMIT)
  log_prod_B = jnp.sum(log_w_BT, axis=-1)
  sum_delta_B = jnp.sum(jnp.expm1(log_w_BT), axis=-1)
  positive_B = sum_delta_B > -1.0
  log_approx_B = jnp.where(positive_B, jnp.log1p(jnp.where(positive_B, sum_delta_B, 0.0)),
                           jnp.log(jnp.abs(1.0 + sum_delta_B)))
  gap_B = jnp.minimum(log_approx_B - log_prod_B, _MAX_LOG_ERROR)
  return jnp.where(positive_B, jnp.abs(jnp.expm1(gap_B)), 1.0 + jnp.exp(gap_B))


def mismatch_metrics(batch: batch_lib.TrainBatch) -> dict[str, jax.Array]:
  """Train-infer discrepancy pi_old vs mu_old over the loss tokens.

  Returns:
    `mismatch/kl_mu_pi_old`: the paper's D_KL[mu_old || pi_old] estimator,
      mean of log mu_old - log pi_old (can be negative on a batch);
    `mismatch/kl_k3`: the k3 estimator mean of (rho - 1) - log rho, rho = pi_old/mu_old
      (unbiased and never negative);
    `mismatch/abs_log_pi_old_mu`: mean |log(pi_old/mu_old)|, the train-infer factor of the
      token IS weight (Eq. 5; `staleness/abs_log_pi_pi_old` is the other).
  """
  mask_BT, count = batch.loss_mask, batch.num_tokens
  old_BT = tokens.sanitize_logp(batch.old_logp, mask_BT)
  mu_BT = tokens.sanitize_logp(batch.mu_logp, mask_BT)
  log_rho_BT = jnp.clip(old_BT - mu_BT, -tokens.LOG_RATIO_LIMIT, tokens.LOG_RATIO_LIMIT)
  return {
      "mismatch/kl_mu_pi_old": masked_mean(mu_BT - old_BT, mask_BT, count),
      "mismatch/kl_k3": masked_mean(jnp.expm1(log_rho_BT) - log_rho_BT, mask_BT, count),
      "mismatch/abs_log_pi_old_mu": masked_mean(jnp.abs(log_rho_BT), mask_BT, count),
  }


# How the metrics below reduce over micro- and mini-batches (`minirl_jax.metrics`).
METRICS = {
    **{name: Reduce.TOKEN_MEAN for name in (
        "policy/ratio_mean", "policy/clip_frac_high", "policy/clip_frac_low",
        "policy/clip_frac", "is/weight_mean", "is/frac_truncated",
        "staleness/abs_log_pi_pi_old")},
    **{name: Reduce.MAX for name in (
        "policy/ratio_max", "is/weight_max", "is/first_order_error_max")},
    "is/first_order_error": Reduce.BATCH_MEAN,
    **{name: Reduce.FULL_BATCH for name in (
        "mismatch/kl_mu_pi_old", "mismatch/kl_k3", "mismatch/abs_log_pi_old_mu")},
}


def token_metrics(logp_BT: jax.Array, batch: batch_lib.TrainBatch, *, ratio_BT, is_weight_BT,
                  is_truncated_BT, clip_high_BT, clip_low_BT) -> dict[str, jax.Array]:
  """The metrics every token objective reports, all over the loss tokens.

  Clip fractions count tokens outside the trust region in the direction the objective's
  clipping acts, whether or not `clip` is on; IS stats describe the objective's
  (truncated) train-infer weight whether or not it is applied.

  Args:
    logp_BT: log pi_theta (treated as a constant).
    batch: the batch the loss was computed on.
    ratio_BT: r_t = pi_theta/pi_old.
    is_weight_BT: the token IS weight after truncation.
    is_truncated_BT: True where the TIS cap binds.
    clip_high_BT: clipped above (r > 1 + eps_high).
    clip_low_BT: clipped below (r < 1 - eps_low).

  Returns:
    A flat dict: `policy/{ratio_mean,ratio_max,clip_frac_high,clip_frac_low,clip_frac}`,
    `is/{weight_mean,weight_max,frac_truncated,first_order_error,first_order_error_max}`,
    `staleness/abs_log_pi_pi_old` and `mismatch_metrics`.
  """
  mask_BT, count = batch.loss_mask, batch.num_tokens
  logp_BT = tokens.sanitize_logp(jax.lax.stop_gradient(logp_BT), mask_BT)
  mean = lambda x_BT: masked_mean(jax.lax.stop_gradient(x_BT), mask_BT, count)
  high, low = mean(clip_high_BT), mean(clip_low_BT)
  old_BT = tokens.sanitize_logp(batch.old_logp, mask_BT)
  error_B = first_order_error(logp_BT, batch)
  return {
      "policy/ratio_mean": mean(ratio_BT),
      "policy/ratio_max": tokens.masked_max(jax.lax.stop_gradient(ratio_BT), mask_BT),
      "policy/clip_frac_high": high,
      "policy/clip_frac_low": low,
      "policy/clip_frac": high + low,
      "is/weight_mean": mean(is_weight_BT),
      "is/weight_max": tokens.masked_max(jax.lax.stop_gradient(is_weight_BT), mask_BT),
      "is/frac_truncated": mean(is_truncated_BT),
      "is/first_order_error": tokens.sequence_mean(error_B, batch),
      "is/first_order_error_max": jnp.max(error_B, initial=0.0),
      "staleness/abs_log_pi_pi_old": mean(jnp.abs(logp_BT - old_BT)),
      **mismatch_metrics(batch),
  }


def grad_cosine(grad_a: Any, grad_b: Any) -> jax.Array:
  """Cosine between two gradient pytrees of the same structure, in float32.

  Used for `is/grad_cosine_token_seq` between the token objective's and J_seq's
  parameter gradients. Returns 0 when either gradient is zero. Gradients whose squared
  norms leave float32's normal range (norms past ~1e19, as J_seq's reaches once a
  sequence's log-weight passes ~44 nats, or below ~1e-19) are first scaled by their
  largest entry.
  """
  if jax.tree.structure(grad_a) != jax.tree.structure(grad_b):
    raise ValueError("grad_cosine needs two pytrees of the same structure")
  leaves_a = [x.astype(jnp.float32) for x in jax.tree.leaves(grad_a)]
  leaves_b = [x.astype(jnp.float32) for x in jax.tree.leaves(grad_b)]
  cosine, in_range = _cosine(leaves_a, leaves_b, jnp.vdot)
  # The cosine is scale-free; an elementwise sum rather than vdot lets XLA fuse the
  # scaling into the reduction instead of copying the gradients.
  scaled, _ = _cosine(_unit_max(leaves_a), _unit_max(leaves_b),
                      lambda x, y: jnp.sum(x.ravel() * y.ravel()))
  return jnp.where(in_range, cosine, scaled)


def _cosine(leaves_a, leaves_b, dot_fn):
  """(cosine, whether every squared norm and their product is a normal float32)."""
  dot = sum(dot_fn(a, b) for a, b in zip(leaves_a, leaves_b))
  sq_a = sum(dot_fn(a, a) for a in leaves_a)
  sq_b = sum(dot_fn(b, b) for b in leaves_b)
  denom = jnp.sqrt(sq_a) * jnp.sqrt(sq_b)
  cosine = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
  normal = lambda x: (x >= jnp.finfo(jnp.float32).tiny) & (x < jnp.inf)
  return cosine, normal(sq_a) & normal(sq_b) & normal(denom)


def _unit_max(leaves):
  """The leaves divided by their largest |entry| (unchanged when all are zero)."""
  top = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), initial=0.0) for x in leaves],
                         jnp.float32(0.0))
  return [x / jnp.where(top > 0, top, 1.0) for x in leaves]
