"""J_seq (Eq. 1) by hand, and token objectives converging to it as the policy step shrinks."""
import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax.objectives import config
from minirl_jax.objectives import diagnostics
from minirl_jax.objectives import minirl
from minirl_jax.objectives import sequence
import objectives_testlib as lib


class SequenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_and_grad(self):
    fn = self.variant(functools.partial(sequence.loss, cfg=config.ObjectiveConfig()))
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(lib.hand_logp(),
                                                                 lib.hand_batch())
    # pi_theta(y)/mu_old(y): s0 1.5 * 1.4 = 2.1, s1 0.5 * 9 = 4.5; A = 1, -0.5.
    np.testing.assert_allclose(loss, -(2.1 * 1 + 4.5 * -0.5) / 2, rtol=lib.RTOL)
    # d/dlogp_t of w(y) A / 2 is w(y) A / 2 for every response token of y.
    np.testing.assert_allclose(lib.response(grad), -np.array([1.05, 1.05, -1.125, -1.125]),
                               rtol=lib.RTOL)
    self.assertEqual(grad[0, 0], 0.0)
    np.testing.assert_allclose(metrics["is/seq_weight_mean"], (2.1 + 4.5) / 2, rtol=lib.RTOL)
    np.testing.assert_allclose(metrics["is/seq_log_weight_abs_max"], np.log(4.5),
                               rtol=lib.RTOL)

  def test_empty_sequence_contributes_nothing(self):
    batch = lib.make_batch(lib.OLD, lib.MU, [[0, 1, 1], [0, 0, 0]], lib.ADV)
    loss, _ = sequence.loss(lib.hand_logp(), batch, config.ObjectiveConfig())
    np.testing.assert_allclose(loss, -2.1 / 2, rtol=lib.RTOL)

  def test_minirl_gradient_approaches_jseq_gradient_as_step_shrinks(self):
    # A context-free categorical policy per position: theta [T, V], y sampled anywhere.
    t, v, b = 4, 5, 6
    rng = np.random.default_rng(0)
    theta0_TV, u_TV = (jnp.asarray(rng.normal(size=(t, v)), jnp.float32) for _ in range(2))
    y_BT = jnp.asarray(rng.integers(0, v, (b, t)))

    def logp_fn(theta_TV):
      logp_BTV = jnp.broadcast_to(jax.nn.log_softmax(theta_TV), (b, t, v))
      return jnp.take_along_axis(logp_BTV, y_BT[..., None], axis=-1)[..., 0]

    mu = np.exp(np.asarray(logp_fn(theta0_TV)))  # sampled on-policy, no train-infer gap
    batch = lib.make_batch(mu, mu, np.ones((b, t)), rng.normal(size=b))
    grad_fns = [jax.jit(jax.grad(lambda th, f=f: f(logp_fn(th), batch,
                                                   config.ObjectiveConfig())[0]))
                for f in (minirl.loss, sequence.loss)]
    errors, cosines = [], []
    for delta in (0.1, 0.03, 0.01):
      grad_tok, grad_seq = (g(theta0_TV + delta * u_TV) for g in grad_fns)
      errors.append(float(jnp.linalg.norm(grad_tok - grad_seq) / jnp.linalg.norm(grad_seq)))
      cosines.append(float(diagnostics.grad_cosine(grad_tok, grad_seq)))
    # First order in delta: each ~3x smaller step shrinks the error at least 2x.
    self.assertLess(errors[1], errors[0] / 2)
    self.assertLess(errors[2], errors[1] / 2)
    self.assertLess(errors[2], 0.05)
    self.assertGreater(cosines[2], cosines[0])
    self.assertGreater(cosines[2], 0.999)


if __name__ == "__main__":
  absltest.main()
