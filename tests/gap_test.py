"""`rl.gap` on hand-built batches (scripts/gap.py on a trained checkpoint: scripts_test)."""

import numpy as np
import pytest

from minirl_jax.rl import gap


def _batch(weights, routing_b=None):
  """2 sequences x 4 positions with the token IS weights pi_old/mu `weights` (nan = no
  loss token); 2 MoE layers of top-2 routing over every position."""
  w = np.asarray(weights, np.float64)
  mask = ~np.isnan(w)
  old = np.where(mask, np.log(0.25), 0.0)
  mu = np.where(mask, old - np.log(np.where(mask, w, 1.0)), 0.0)
  routing_a = np.tile(np.array([0, 1], np.int8), (2, 2, 4, 1))
  return dict(old_logp=old.astype(np.float32), mu_logp=mu.astype(np.float32),
              loss_mask=mask.astype(np.float32), attn_mask=np.ones((2, 4), bool),
              routing_mu=routing_a,
              live_routing=routing_a if routing_b is None else routing_b)


def test_metrics_by_hand():
  nan = np.nan
  live = np.tile(np.array([0, 1], np.int8), (2, 2, 4, 1))
  live[1, 0, 2] = [1, 2]  # layer 1 disagrees on one of its 8 positions
  live[0, 1, 3] = [1, 0]  # the same set in another order is agreement
  m = gap.metrics(**_batch([[nan, 1.0, 2.0, 0.5], [nan, 8.0, 1.0, nan]], live), tis_cap=5.0)
  w = np.array([1.0, 2.0, 0.5, 8.0, 1.0])
  assert m["tokens"] == 5
  np.testing.assert_allclose(m["kl_k1"], np.mean(-np.log(w)), rtol=1e-5)
  np.testing.assert_allclose(m["kl_k3"], np.mean(w - 1 - np.log(w)), rtol=1e-5)
  np.testing.assert_allclose([m["is_max"], m["is_p99"]], [8.0, np.percentile(w, 99)],
                             rtol=1e-5)
  assert m["tis_frac_truncated"] == pytest.approx(1 / 5)  # only 8 > 5
  np.testing.assert_allclose(m["routing_disagreement"], [0.0, 1 / 8])
  # Sequence 1: prod w = 1, 1 + sum(w - 1) = 1.5 -> error 0.5; sequence 2: 8 and 8 -> 0.
  np.testing.assert_allclose([m["first_order_error_mean"], m["first_order_error_max"]],
                             [0.25, 0.5], rtol=1e-5, atol=1e-6)


def test_zero_gap_is_exactly_zero():
  nan = np.nan
  m = gap.metrics(**_batch([[nan, 1.0, 1.0, 1.0], [nan, 1.0, 1.0, nan]]), tis_cap=5.0)
  assert m["kl_k1"] == m["kl_k3"] == m["tis_frac_truncated"] == 0.0
  assert m["is_p99"] == m["is_max"] == 1.0
  assert m["routing_disagreement"] == [0.0, 0.0] and m["first_order_error_max"] == 0.0


def test_levels_parse_like_the_sampler_benchmark():
  assert gap.parse_level("int8") == ("int8", None)
  assert gap.parse_level("int8:bfloat16") == ("int8", "bfloat16")
  with pytest.raises(ValueError, match="level 'fp4'"):
    gap.parse_level("fp4")
