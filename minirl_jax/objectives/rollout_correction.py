"""Sequence-level rollout corrections of MiniRL: seq-TIS, MIS and Geo-MIS (`is_level`).

Each uses only the train-infer factor w_t = pi_old(y_t)/mu_old(y_t) of the token IS weight
(Eq. 5); staleness pi_theta/pi_old stays with MiniRL's M_t. Products are sums of logs.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from minirl_jax import batch as batch_lib
from minirl_jax.metrics import Reduce
from minirl_jax.objectives import config as config_lib
from minirl_jax.objectives import tokens


class SequenceCorrection(NamedTuple):
  """Per-sequence train-infer statistics, all stop-gradient."""
  log_w_B: jax.Array      # log prod_t w_t = sum_t log w_t, untruncated
  geo_log_w_B: jax.Array  # log of the geometric mean: mean_t log w_t (0 if |y| = 0)
  weight_B: jax.Array     # seq-TIS weight min(prod_t w_t, C), at most e^20
  truncated_B: jax.Array  # True where the cap C binds
  keep_B: jax.Array       # False where the `is_level` statistic lies outside `is_bounds`


def sequence_correction(old_BT: jax.Array, mu_BT: jax.Array, batch: batch_lib.TrainBatch,
                        cfg: config_lib.ObjectiveConfig) -> SequenceCorrection:
  """seq-TIS weight and the MIS ("sequence") or Geo-MIS ("geometric") keep mask.

  The mask tests the untruncated statistic against [lo, hi] in log space: prod_t w_t for
  "sequence", exp(mean_t log w_t) for "geometric" (so a long sequence with every w_t near
  1 is not rejected for its length). Without `is_bounds` every sequence is kept.

  Args:
    old_BT: sanitized log pi_old (0 off the loss mask).
    mu_BT: sanitized log mu_old.
    batch: supplies `loss_mask`.
    cfg: `tis_cap` (C), `is_level` and `is_bounds`.

  Returns:
    The `SequenceCorrection` of every row.
  """
  log_w_B = jnp.sum(jax.lax.stop_gradient(old_BT - mu_BT) * batch.loss_mask, axis=-1)
  geo_log_w_B = log_w_B / jnp.maximum(tokens.lengths(batch), 1.0)
  # The whole-sequence weight gets the token limit e^20 too: it multiplies r_t (also up to
  # e^20), so a looser limit could overflow float32 in the loss.
  weight_B, truncated_B = tokens.truncate(log_w_B, cfg.tis_cap)
  if cfg.is_bounds is None:
    keep_B = jnp.ones(log_w_B.shape, bool)
  else:
    stat_B = geo_log_w_B if cfg.is_level == "geometric" else log_w_B
    log_lo, log_hi = cfg.log_is_bounds
    keep_B = (stat_B >= log_lo) & (stat_B <= log_hi)
  return SequenceCorrection(log_w_B, geo_log_w_B, weight_B, truncated_B, keep_B)


# How `metrics` reduce over micro- and mini-batches (`minirl_jax.metrics`).
METRICS = {
    **{name: Reduce.BATCH_MEAN for name in (
        "is/seq_log_weight_mean", "is/seq_weight_mean", "is/seq_frac_truncated",
        "is/seq_frac_masked", "is/geo_log_weight_mean")},
    **{name: Reduce.MAX for name in (
        "is/seq_log_weight_abs_max", "is/seq_weight_max", "is/geo_log_weight_abs_max")},
}


def metrics(corr: SequenceCorrection, batch: batch_lib.TrainBatch) -> dict[str, jax.Array]:
  """Sequence-level IS statistics, means over the GLOBAL `num_sequences`.

  Reported for both sequence levels whichever weight and mask the level applies, so runs
  can be compared; an empty response counts with log weight 0 (the empty product).

  Returns:
    `is/seq_log_weight_mean` (mean log prod_t w_t), `is/seq_log_weight_abs_max`,
    `is/seq_weight_mean` and `is/seq_weight_max` (of min(prod_t w_t, C)),
    `is/seq_frac_truncated`, `is/seq_frac_masked` (sequences the mask rejects),
    `is/geo_log_weight_mean` (mean of mean_t log w_t) and `is/geo_log_weight_abs_max`.
  """
  mean = lambda x_B: tokens.sequence_mean(x_B, batch)
  abs_max = lambda x_B: jnp.max(jnp.abs(x_B), initial=0.0)
  return {
      "is/seq_log_weight_mean": mean(corr.log_w_B),
      "is/seq_log_weight_abs_max": abs_max(corr.log_w_B),
      "is/seq_weight_mean": mean(corr.weight_B),
      "is/seq_weight_max": jnp.max(corr.weight_B, initial=0.0),
      "is/seq_frac_truncated": mean(corr.truncated_B),
      "is/seq_frac_masked": mean(~corr.keep_B),
      "is/geo_log_weight_mean": mean(corr.geo_log_w_B),
      "is/geo_log_weight_abs_max": abs_max(corr.geo_log_w_B),
  }
