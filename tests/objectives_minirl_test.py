"""MiniRL (Eq. 7) and its ablations: values and gradients against hand derivations."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax.objectives import config
from minirl_jax.objectives import minirl
import objectives_testlib as lib

LOG_PI = np.log(np.asarray([0.6, 0.7, 0.3, 0.45]))  # s0t1, s0t2, s1t1, s1t2


def value_and_grad(fn, logp, batch):
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logp, batch)
  chex.assert_tree_all_finite((loss, metrics, grad))
  return loss, metrics, lib.response(grad)


class MiniRLTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_default_value_and_grad(self):
    fn = self.variant(functools.partial(minirl.loss, cfg=config.ObjectiveConfig()))
    loss, _, grad = value_and_grad(fn, lib.hand_logp(), lib.hand_batch())
    # dJ/dlogp = M w A / num_sequences: s0t1 1 * 1.5 * 1 / 2; s0t2 clipped (M = 0);
    # s1t1 clipped (M = 0); s1t2 1 * min(9, 5) * -0.5 / 2.
    d_objective = np.array([0.75, 0.0, 0.0, -1.25])
    np.testing.assert_allclose(loss, -d_objective @ LOG_PI, rtol=lib.RTOL)
    np.testing.assert_allclose(grad, -d_objective, rtol=lib.RTOL)

  @parameterized.named_parameters(
      # M w A / (num_sequences [* |y|]) per token, as derived in objectives_testlib.
      ("no_train_infer_is", dict(train_infer_is=False), [0.5, 0.0, 0.0, -0.25]),
      ("no_clip", dict(clip=False), [0.75, 0.7, -0.125, -1.25]),
      ("length_norm", dict(length_norm=True), [0.375, 0.0, 0.0, -0.625]),
      ("no_tis_cap", dict(tis_cap=None), [0.75, 0.0, 0.0, -2.25]),
      # weight min(pi_old/mu, 5) * r: s0t1 1.25 * 1.2 = 1.5, s1t2 min(6, 5) * 1.5 = 7.5.
      ("tis_on_pi_old_mu", dict(tis_target="pi_old_mu"), [0.75, 0.0, 0.0, -1.875]),
      ("plain_reinforce", dict(train_infer_is=False, clip=False), [0.5, 0.5, -0.25, -0.25]),
  )
  def test_ablation_value_and_grad(self, overrides, d_objective):
    cfg = config.ObjectiveConfig(**overrides)
    loss, _, grad = value_and_grad(functools.partial(minirl.loss, cfg=cfg), lib.hand_logp(),
                                   lib.hand_batch())
    d_objective = np.asarray(d_objective)
    np.testing.assert_allclose(loss, -d_objective @ LOG_PI, rtol=lib.RTOL)
    np.testing.assert_allclose(grad, -d_objective, rtol=lib.RTOL, atol=1e-7)

  def test_token_above_trust_region_with_positive_advantage_gets_no_gradient(self):
    _, _, grad = value_and_grad(functools.partial(minirl.loss, cfg=config.ObjectiveConfig()),
                                lib.hand_logp(), lib.hand_batch())
    self.assertEqual(grad[1], 0.0)  # s0t2: A = +1, r = 1.4 > 1.27.

  def test_on_policy_gradient_is_train_infer_ratio_times_advantage(self):
    rng = np.random.default_rng(0)
    old = rng.uniform(0.2, 0.9, (3, 4))
    mu = old * rng.uniform(0.5, 2.0, (3, 4))  # pi_old/mu in [0.5, 2]: the cap never binds.
    mask = np.array([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1]], np.float32)
    adv = np.array([0.7, -1.3, 0.2])
    batch = lib.make_batch(old, mu, mask, adv)
    grad = jax.jit(jax.grad(lambda lp: minirl.loss(lp, batch, config.ObjectiveConfig())[0]))(
        batch.old_logp)
    np.testing.assert_allclose(grad, -mask * (old / mu) * adv[:, None] / 3, rtol=1e-5)

  def test_metrics(self):
    _, metrics, _ = value_and_grad(
        functools.partial(minirl.loss, cfg=config.ObjectiveConfig()), lib.hand_logp(),
        lib.hand_batch())
    rho = np.array([1.25, 1.0, 0.5 / 0.6, 6.0])  # pi_old/mu_old
    expected = {
        "policy/ratio_mean": (1.2 + 1.4 + 0.6 + 1.5) / 4,
        "policy/ratio_max": 1.5,
        "policy/clip_frac_high": 0.25,
        "policy/clip_frac_low": 0.25,
        "policy/clip_frac": 0.5,
        "is/weight_mean": (1.5 + 1.4 + 0.5 + 5.0) / 4,
        "is/weight_max": 5.0,
        "is/frac_truncated": 0.25,
        # Per sequence |P - (1 + S)| / P: s0 P = 1.5 * 1.4 = 2.1, 1 + S = 1.9;
        # s1 P = 0.5 * 9 = 4.5, 1 + S = 1 - 0.5 + 8 = 8.5.
        "is/first_order_error": (0.2 / 2.1 + 4.0 / 4.5) / 2,
        "is/first_order_error_max": 4.0 / 4.5,
        "mismatch/kl_mu_pi_old": np.mean(-np.log(rho)),
        "mismatch/kl_k3": np.mean(rho - 1 - np.log(rho)),
        "mismatch/abs_log_pi_old_mu": np.mean(np.abs(np.log(rho))),
        "staleness/abs_log_pi_pi_old": np.mean(np.abs(np.log([1.2, 1.4, 0.6, 1.5]))),
    }
    self.assertSameElements(metrics, expected)
    for name, value in expected.items():
      np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)

  def test_padding_garbage_changes_nothing(self):
    batch, logp = lib.hand_batch(), lib.hand_logp()
    dirty = batch.replace(old_logp=batch.old_logp.at[:, 0].set(-jnp.inf),
                          mu_logp=batch.mu_logp.at[:, 0].set(jnp.nan))
    fn = functools.partial(minirl.loss, cfg=config.ObjectiveConfig())
    clean = value_and_grad(fn, logp, batch)
    loss, metrics, grad = value_and_grad(fn, logp.at[:, 0].set(-jnp.inf), dirty)
    np.testing.assert_allclose(loss, clean[0])
    np.testing.assert_allclose(grad, clean[2])
    chex.assert_trees_all_close(metrics, clean[1])


if __name__ == "__main__":
  absltest.main()


class ShuffledWeightsTest(absltest.TestCase):
  """objective.is_shuffle: the token IS weights permuted among the loss tokens."""

  def test_shuffled_permutes_only_the_masked_entries(self):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9)).astype(np.float32)
    mask = (rng.random((4, 9)) < 0.6).astype(np.float32)
    tokens = rng.integers(0, 50, (4, 9)).astype(np.int32)
    out = np.asarray(jax.jit(minirl.shuffled)(x, mask, tokens))
    on = mask > 0
    np.testing.assert_array_equal(np.sort(out[on]), np.sort(x[on]))  # the same weights
    np.testing.assert_array_equal(out[~on], x[~on])                 # elsewhere unchanged
    self.assertGreater(np.mean(out[on] != x[on]), 0.5)              # at other tokens
    np.testing.assert_array_equal(out, minirl.shuffled(x, mask, tokens))  # a batch: alike
    other = np.asarray(minirl.shuffled(x, mask, tokens + 1))
    self.assertFalse(np.array_equal(other, out))                    # another: differently

  def test_shuffled_minirl_is_minirl_with_the_weights_moved(self):
    batch, logp = lib.hand_batch(), lib.hand_logp()
    cfg = config.ObjectiveConfig(clip=False)
    shuffled_cfg = config.ObjectiveConfig(clip=False, is_shuffle=True)
    weight, _ = minirl.is_weight(logp, batch.old_logp, batch.mu_logp, cfg)
    moved = minirl.shuffled(weight, batch.loss_mask, batch.tokens)
    self.assertFalse(np.allclose(moved, weight))
    grad = jax.grad(lambda lp: minirl.loss(lp, batch, shuffled_cfg)[0])(logp)
    expected = -np.asarray(moved * batch.advantages[:, None] * batch.loss_mask) / 2
    np.testing.assert_allclose(lib.response(grad), lib.response(expected), rtol=lib.RTOL)
    # With no gap every weight is 1: shuffling changes nothing.
    no_gap = batch.replace(mu_logp=logp)
    np.testing.assert_allclose(minirl.loss(logp, no_gap, shuffled_cfg)[0],
                               minirl.loss(logp, no_gap, cfg)[0], rtol=1e-6)

  def test_is_shuffle_needs_token_level_minirl_with_is(self):
    for bad in (dict(name="grpo"), dict(train_infer_is=False),
                dict(is_level="sequence", is_bounds=(0.5, 2.0))):
      with self.assertRaisesRegex(ValueError, "objective.is_shuffle"):
        config.ObjectiveConfig(is_shuffle=True, **bad)
