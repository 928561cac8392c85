"""CISPO (paper appendix) and its switches: values and gradients against hand derivations."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from minirl_jax.objectives import cispo
from minirl_jax.objectives import config
import objectives_testlib as lib

LOG_PI = np.log(np.asarray([0.6, 0.7, 0.3, 0.45]))  # s0t1, s0t2, s1t1, s1t2


def value_and_grad(cfg):
  fn = functools.partial(cispo.loss, cfg=cfg)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(lib.hand_logp(),
                                                              lib.hand_batch())
  chex.assert_tree_all_finite((loss, metrics, grad))
  return loss, metrics, lib.response(grad)


# Per token, r = 1.2, 1.4, 0.6, 1.5 and A = 1, 1, -0.5, -0.5:
#   sg[clip(r, 0.8, 1.27)] A = 1.2, 1.27, -0.4, -0.635   (no token is masked)
#   sg[r] A = 1.2, 1.4, -0.3, -0.75                        (no clip)
#   times min(pi_old/mu_old, 5) = 1.25, 1, 5/6, 5          (train-infer IS)
# J = sum_t coef_t log pi_t / num_tokens (4), or / num_sequences (2) without length norm.
class CISPOTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("paper", {}, [1.2, 1.27, -0.4, -0.635], 4),
      ("no_clip", dict(clip=False), [1.2, 1.4, -0.3, -0.75], 4),
      ("train_infer_is", dict(train_infer_is=True), [1.5, 1.27, -0.4 * 5 / 6, -3.175], 4),
      ("no_length_norm", dict(length_norm=False), [1.2, 1.27, -0.4, -0.635], 2),
  )
  def test_value_and_grad(self, overrides, coefs, normaliser):
    loss, _, grad = value_and_grad(config.ObjectiveConfig(name="cispo", **overrides))
    d_objective = np.asarray(coefs) / normaliser
    np.testing.assert_allclose(loss, -d_objective @ LOG_PI, rtol=lib.RTOL)
    np.testing.assert_allclose(grad, -d_objective, rtol=lib.RTOL)

  def test_token_above_trust_region_still_gets_gradient(self):
    _, _, grad = value_and_grad(config.ObjectiveConfig(name="cispo"))
    np.testing.assert_allclose(grad[1], -1.27 / 4, rtol=lib.RTOL)  # s0t2: A > 0, r = 1.4

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_fractions(self):
    fn = self.variant(functools.partial(cispo.loss, cfg=config.ObjectiveConfig(name="cispo")))
    _, metrics = fn(lib.hand_logp(), lib.hand_batch())
    # The weight clip acts whatever the sign of A: r = 1.4, 1.5 above, 0.6 below.
    np.testing.assert_allclose(metrics["policy/clip_frac_high"], 0.5)
    np.testing.assert_allclose(metrics["policy/clip_frac_low"], 0.25)


if __name__ == "__main__":
  absltest.main()
