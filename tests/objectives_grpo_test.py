"""GRPO (paper appendix) and its switches: values and gradients against hand derivations."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from minirl_jax.objectives import config
from minirl_jax.objectives import grpo
import objectives_testlib as lib


def value_and_grad(cfg):
  fn = functools.partial(grpo.loss, cfg=cfg)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(lib.hand_logp(),
                                                               lib.hand_batch())
  chex.assert_tree_all_finite((loss, metrics, grad))
  return loss, metrics, lib.response(grad)


# Per token (s0t1, s0t2, s1t1, s1t2), r = 1.2, 1.4, 0.6, 1.5 and A = 1, 1, -0.5, -0.5:
#   min(r A, clip(r, 0.8, 1.27) A) = 1.2, 1.27, -0.4, -0.75, with d/dlogp = r A where the
#   unclipped term is the min (s0t1, s1t2) and 0 where the clipped one is (s0t2, s1t1).
#   Without clip: r A = 1.2, 1.4, -0.3, -0.75 and d/dlogp = r A everywhere.
#   Train-infer weight min(pi_old/mu_old, 5) = 1.25, 1, 5/6, 5.
# Length norm: both |y| = 2 and G = num_sequences = 2, so 1/(G |y|) = 1/4; without it 1/2.
class GRPOTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("paper", {}, [1.2, 1.27, -0.4, -0.75], [1.2, 0, 0, -0.75], 4),
      ("no_clip", dict(clip=False), [1.2, 1.4, -0.3, -0.75], [1.2, 1.4, -0.3, -0.75], 4),
      ("train_infer_is", dict(train_infer_is=True), [1.5, 1.27, -0.4 * 5 / 6, -3.75],
       [1.5, 0, 0, -3.75], 4),
      ("no_length_norm", dict(length_norm=False), [1.2, 1.27, -0.4, -0.75],
       [1.2, 0, 0, -0.75], 2),
  )
  def test_value_and_grad(self, overrides, terms, d_terms, normaliser):
    loss, _, grad = value_and_grad(config.ObjectiveConfig(name="grpo", **overrides))
    np.testing.assert_allclose(loss, -np.sum(terms) / normaliser, rtol=lib.RTOL)
    np.testing.assert_allclose(grad, -np.asarray(d_terms) / normaliser, rtol=lib.RTOL)

  def test_token_above_trust_region_with_positive_advantage_gets_no_gradient(self):
    _, _, grad = value_and_grad(config.ObjectiveConfig(name="grpo"))
    self.assertEqual(grad[1], 0.0)  # s0t2: A = +1, r = 1.4 > 1.27.

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_fractions(self):
    fn = self.variant(functools.partial(grpo.loss, cfg=config.ObjectiveConfig(name="grpo")))
    _, metrics = fn(lib.hand_logp(), lib.hand_batch())
    np.testing.assert_allclose(metrics["policy/clip_frac_high"], 0.25)  # s0t2
    np.testing.assert_allclose(metrics["policy/clip_frac_low"], 0.25)  # s1t1
    np.testing.assert_allclose(metrics["is/weight_mean"], (1.25 + 1 + 5 / 6 + 5) / 4,
                               rtol=lib.RTOL)


if __name__ == "__main__":
  absltest.main()
