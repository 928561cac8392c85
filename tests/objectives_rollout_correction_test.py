"""MiniRL's sequence-level rollout corrections (seq-TIS, MIS, Geo-MIS) against hand values."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax.objectives import config
from minirl_jax.objectives import minirl
from minirl_jax.objectives import sequence
import objectives_testlib as lib

# Three sequences of T = 3 (position 0 the prompt), N = 3:
#   token                 s0t1  s0t2   s1t1  s1t2   s2t1  s2t2
#   pi_theta              0.66  0.54   0.3   0.24   0.8   0.5
#   pi_old                0.6   0.6    0.4   0.2    0.8   0.5
#   mu_old                0.3   0.4    0.8   0.4    0.2   0.2
#   w = pi_old/mu_old     2.0   1.5    0.5   0.5    4.0   2.5
#   r = pi_theta/pi_old   1.1   0.9    0.75  1.2    1.0   1.0
#   pi_theta/mu_old       2.2   1.35   0.375 0.6    4.0   2.5
#   A                     +1    +1     -1    -1     +0.5  +0.5
# prod_t w: s0 3, s1 0.25, s2 10 (over C = 5: truncated); geometric means sqrt(3) = 1.73,
# 0.5, sqrt(10) = 3.16. Only s1t1 leaves the trust region (A < 0, r = 0.75 < 0.8): M = 0.
PI = [[1.0, 0.66, 0.54], [1.0, 0.3, 0.24], [1.0, 0.8, 0.5]]
OLD = [[1.0, 0.6, 0.6], [1.0, 0.4, 0.2], [1.0, 0.8, 0.5]]
MU = [[1.0, 0.3, 0.4], [1.0, 0.8, 0.4], [1.0, 0.2, 0.2]]
MASK = [[0.0, 1.0, 1.0]] * 3
ADV = [1.0, -1.0, 0.5]
LOG_PI = np.log(np.asarray(PI)[:, 1:].reshape(-1))

SEQ_KEYS = ("is/seq_log_weight_mean", "is/seq_log_weight_abs_max", "is/seq_weight_mean",
            "is/seq_weight_max", "is/seq_frac_truncated", "is/seq_frac_masked",
            "is/geo_log_weight_mean", "is/geo_log_weight_abs_max")


def hand_batch():
  return lib.make_batch(OLD, MU, MASK, ADV)


def value_and_grad(cfg, logp=None, batch=None, fn=minirl.loss):
  logp = jnp.log(jnp.asarray(PI, jnp.float32)) if logp is None else logp
  batch = hand_batch() if batch is None else batch
  (loss, metrics), grad = jax.value_and_grad(functools.partial(fn, cfg=cfg), has_aux=True)(
      logp, batch)
  chex.assert_tree_all_finite((loss, metrics, grad))
  return loss, metrics, grad


def response(x_BT):
  return np.asarray(x_BT)[:, 1:].reshape(-1)


def random_batch(seed, b=6, t=6, mu_is_old=False, on_policy=False, lengths=None):
  """Random log-probs with responses of `lengths` (default random, one of them empty)."""
  rng = np.random.default_rng(seed)
  old = rng.uniform(0.1, 1.0, (b, t))
  mu = old if mu_is_old else old * rng.uniform(0.6, 1.6, (b, t))
  pi = old if on_policy else old * rng.uniform(0.85, 1.15, (b, t))
  lengths = rng.integers(0, t, b) if lengths is None else np.asarray(lengths)
  mask = (np.arange(t)[None] >= t - lengths[:, None]).astype(np.float32)
  batch = lib.make_batch(old, mu, mask, rng.normal(size=b))
  return jnp.log(jnp.asarray(pi, jnp.float32)), batch


class SequenceTISTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weight_is_truncated_product_times_staleness(self):
    fn = self.variant(functools.partial(
        minirl.loss, cfg=config.ObjectiveConfig(is_level="sequence")))
    (loss, _), grad = jax.value_and_grad(fn, has_aux=True)(
        jnp.log(jnp.asarray(PI, jnp.float32)), hand_batch())
    # dJ/dlogp_t = M_t min(prod w, 5) r_t A / 3:
    #   s0: 3 * 1.1 / 3 = 1.1, 3 * 0.9 / 3 = 0.9;  s1: M = 0, 0.25 * 1.2 * -1 / 3 = -0.1;
    #   s2: min(10, 5) * 1 * 0.5 / 3 = 5/6 on both tokens.
    d_objective = np.array([1.1, 0.9, 0.0, -0.1, 5 / 6, 5 / 6])
    np.testing.assert_allclose(loss, -d_objective @ LOG_PI, rtol=lib.RTOL)
    np.testing.assert_allclose(response(grad), -d_objective, rtol=lib.RTOL, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grad)[:, 0], 0.0)

  @parameterized.named_parameters(
      # MIS: prod w outside [lo, hi] zeroes the whole sequence, value and gradient.
      ("mis_upper", dict(is_bounds=(0.2, 4.0)), [1.1, 0.9, 0.0, -0.1, 0.0, 0.0]),
      ("mis_lower_and_upper", dict(is_bounds=(0.3, 4.0)), [1.1, 0.9, 0.0, 0.0, 0.0, 0.0]),
      # The mask tests the untruncated product, the cap then bounds what is kept:
      # s2 (10) is inside [0.2, 20] and weighted min(10, 5) = 5, as without bounds.
      ("mis_then_tis", dict(is_bounds=(0.2, 20.0)), [1.1, 0.9, 0.0, -0.1, 5 / 6, 5 / 6]),
      ("uncapped", dict(tis_cap=None), [1.1, 0.9, 0.0, -0.1, 5 / 3, 5 / 3]),
      ("pure_mis", dict(tis_cap=None, is_bounds=(0.2, 4.0)), [1.1, 0.9, 0.0, -0.1, 0.0, 0.0]),
      # Without the IS weight the mask still applies: M_t A / 3 on the kept s0 only.
      ("rejection_only", dict(train_infer_is=False, is_bounds=(0.3, 4.0)),
       [1 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0]),
      ("length_norm", dict(length_norm=True), [0.55, 0.45, 0.0, -0.05, 5 / 12, 5 / 12]),
      # clip=False restores s1t1: 0.25 * 0.75 * -1 / 3.
      ("no_clip", dict(clip=False), [1.1, 0.9, -0.0625, -0.1, 5 / 6, 5 / 6]),
  )
  def test_value_and_grad(self, overrides, d_objective):
    loss, _, grad = value_and_grad(config.ObjectiveConfig(is_level="sequence", **overrides))
    d_objective = np.asarray(d_objective)
    np.testing.assert_allclose(loss, -d_objective @ LOG_PI, rtol=lib.RTOL, atol=1e-7)
    np.testing.assert_allclose(response(grad), -d_objective, rtol=lib.RTOL, atol=1e-7)
    np.testing.assert_array_equal(response(grad)[d_objective == 0], 0.0)

  def test_metrics(self):
    cfg = config.ObjectiveConfig(is_level="sequence", is_bounds=(0.3, 4.0))
    _, metrics, _ = value_and_grad(cfg)
    _, token_metrics, _ = value_and_grad(config.ObjectiveConfig())
    expected = {
        "is/seq_log_weight_mean": np.log(3 * 0.25 * 10) / 3,
        "is/seq_log_weight_abs_max": np.log(10),
        "is/seq_weight_mean": (3 + 0.25 + 5) / 3,
        "is/seq_weight_max": 5.0,
        "is/seq_frac_truncated": 1 / 3,
        "is/seq_frac_masked": 2 / 3,  # s1 below 0.3, s2 above 4
        "is/geo_log_weight_mean": np.log(3 * 0.25 * 10) / 6,
        "is/geo_log_weight_abs_max": np.log(10) / 2,
    }
    self.assertSameElements(metrics, [*token_metrics, *SEQ_KEYS])
    for name, value in expected.items():
      np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    # The token metrics keep their meaning: the token TIS weight, whatever the level.
    for name, value in token_metrics.items():
      np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)

  def test_token_mode_reports_no_sequence_metrics(self):
    _, metrics, _ = value_and_grad(config.ObjectiveConfig())
    self.assertEmpty(set(SEQ_KEYS) & set(metrics))


class GeometricTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      # Geometric means 1.73, 0.5, 3.16: only s0 is inside [0.6, 2]; it keeps the token
      # weight min(pi_theta/mu_old, 5) = 2.2, 1.35 (M = 1, A = 1, N = 3).
      ("token_weight", dict(), [2.2 / 3, 0.45, 0.0, 0.0, 0.0, 0.0]),
      ("rejection_only", dict(train_infer_is=False), [1 / 3, 1 / 3, 0.0, 0.0, 0.0, 0.0]),
      # As at token level, tis_target says what C truncates: min(2.2, 2) or min(2, 2) 1.1.
      ("cap_on_pi_theta_mu", dict(tis_cap=2.0), [2 / 3, 0.45, 0.0, 0.0, 0.0, 0.0]),
      ("cap_on_pi_old_mu", dict(tis_cap=2.0, tis_target="pi_old_mu"),
       [2.2 / 3, 0.45, 0.0, 0.0, 0.0, 0.0]),
  )
  def test_value_and_grad(self, overrides, d_objective):
    cfg = config.ObjectiveConfig(is_level="geometric", is_bounds=(0.6, 2.0), **overrides)
    loss, metrics, grad = value_and_grad(cfg)
    d_objective = np.asarray(d_objective)
    np.testing.assert_allclose(loss, -d_objective @ LOG_PI, rtol=lib.RTOL, atol=1e-7)
    np.testing.assert_allclose(response(grad), -d_objective, rtol=lib.RTOL, atol=1e-7)
    np.testing.assert_allclose(metrics["is/seq_frac_masked"], 2 / 3, rtol=1e-6)

  def test_keeps_a_long_sequence_that_sequence_mis_rejects(self):
    # On-policy, T = 9: row 0 has 8 response tokens, row 1 one, every w_t = 0.55/0.5 = 1.1.
    # prod w = 1.1^8 = 2.14 for row 0, 1.1 for row 1; both geometric means are 1.1.
    old = np.full((2, 9), 0.55)
    mask = np.array([[0.0] + [1.0] * 8, [0.0] * 8 + [1.0]])
    batch = lib.make_batch(old, old / 1.1, mask, [1.0, -1.0])
    logp = jnp.log(jnp.asarray(old, jnp.float32))
    bounds = (0.8, 1.25)
    _, seq_metrics, seq_grad = value_and_grad(
        config.ObjectiveConfig(is_level="sequence", is_bounds=bounds), logp, batch)
    _, geo_metrics, geo_grad = value_and_grad(
        config.ObjectiveConfig(is_level="geometric", is_bounds=bounds), logp, batch)
    # Sequence MIS rejects row 0; row 1 gets 1.1 * r (= 1) * -1 / 2.
    np.testing.assert_array_equal(seq_grad[0], 0.0)
    np.testing.assert_allclose(seq_grad[1, -1], 0.55, rtol=lib.RTOL)
    np.testing.assert_allclose(seq_metrics["is/seq_frac_masked"], 0.5)
    # Geo-MIS keeps both, each token weighted pi_theta/mu_old = 1.1: -(+-1) 1.1 / 2.
    np.testing.assert_allclose(geo_grad[0], -0.55 * mask[0], rtol=lib.RTOL)
    np.testing.assert_allclose(geo_grad[1, -1], 0.55, rtol=lib.RTOL)
    np.testing.assert_allclose(geo_metrics["is/seq_frac_masked"], 0.0)
    np.testing.assert_allclose(geo_metrics["is/geo_log_weight_abs_max"], np.log(1.1),
                               rtol=1e-5)
    np.testing.assert_allclose(geo_metrics["is/seq_log_weight_abs_max"], 8 * np.log(1.1),
                               rtol=1e-5)


class EquivalenceTest(parameterized.TestCase):

  def assert_same(self, a, b, seed):
    (loss_a, _, grad_a), (loss_b, _, grad_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(grad_a, grad_b, rtol=1e-5, atol=1e-7, err_msg=f"seed {seed}")

  def test_on_policy_uncapped_seq_tis_is_the_jseq_gradient(self):
    # pi_theta = pi_old: r_t = 1, M_t = 1 and prod_t pi_old/mu_old = pi_theta(y)/mu_old(y),
    # so every token's gradient is w(y) A / N, the gradient of J_seq (Eq. 1).
    for seed in range(3):
      logp, batch = random_batch(seed, on_policy=True)
      seq_tis = value_and_grad(config.ObjectiveConfig(is_level="sequence", tis_cap=None),
                               logp, batch)
      jseq = value_and_grad(config.ObjectiveConfig(), logp, batch, fn=sequence.loss)
      np.testing.assert_allclose(seq_tis[2], jseq[2], rtol=1e-5, atol=1e-7)

  @parameterized.named_parameters(
      ("sequence", dict(is_level="sequence")),
      ("sequence_mis", dict(is_level="sequence", is_bounds=(0.999, 1.001))),
      ("geometric", dict(is_level="geometric", is_bounds=(0.999, 1.001))),
  )
  def test_without_train_infer_gap_every_level_is_token_level(self, overrides):
    # mu_old = pi_old: every w_t = 1, nothing is masked, and both weights are r_t (< 5).
    for seed in range(3):
      logp, batch = random_batch(seed, mu_is_old=True)
      self.assert_same(value_and_grad(config.ObjectiveConfig(**overrides), logp, batch),
                       value_and_grad(config.ObjectiveConfig(), logp, batch), seed)

  def test_one_token_sequences_are_token_tis_on_pi_old_mu(self):
    # prod_t w_t = w_t, so min(w, C) r is the token weight of tis_target="pi_old_mu".
    for seed in range(3):
      logp, batch = random_batch(seed, lengths=[1] * 6)
      for cap in (5.0, 1.2):
        self.assert_same(
            value_and_grad(config.ObjectiveConfig(is_level="sequence", tis_cap=cap), logp,
                           batch),
            value_and_grad(config.ObjectiveConfig(tis_target="pi_old_mu", tis_cap=cap), logp,
                           batch), seed)

  def test_geometric_that_keeps_everything_is_token_level(self):
    for seed in range(3):
      logp, batch = random_batch(seed)
      self.assert_same(
          value_and_grad(config.ObjectiveConfig(is_level="geometric",
                                                is_bounds=(0.0, float("inf"))), logp, batch),
          value_and_grad(config.ObjectiveConfig(), logp, batch), seed)


if __name__ == "__main__":
  absltest.main()
