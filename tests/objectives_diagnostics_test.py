"""Entropy, first-order-approximation error and gradient cosine against hand values."""
from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from minirl_jax.objectives import diagnostics
import objectives_testlib as lib

first_order_error = jax.jit(diagnostics.first_order_error)


def one_sequence(ratios):
  """A batch of one sequence whose response tokens have pi_theta/mu_old = `ratios`."""
  mu = np.full((1, len(ratios) + 1), 0.01)
  pi = mu * np.array([[1.0, *ratios]])
  batch = lib.make_batch(mu, mu, [[0.0] + [1.0] * len(ratios)], [1.0])
  return jnp.log(jnp.asarray(pi, jnp.float32)), batch


class TokenEntropyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values(self):
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]]))
    entropy = self.variant(diagnostics.token_entropy)(logits)
    chex.assert_shape(entropy, (1, 2))
    # -sum p log p: 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2; uniform over 4 = log 4.
    np.testing.assert_allclose(entropy, [[1.5 * np.log(2), np.log(4)]], rtol=1e-6)

  def test_bfloat16_logits_give_float32(self):
    entropy = diagnostics.token_entropy(jnp.zeros((2, 3, 8), jnp.bfloat16))
    self.assertEqual(entropy.dtype, jnp.float32)
    np.testing.assert_allclose(entropy, np.full((2, 3), np.log(8)), rtol=1e-6)

  def test_extreme_logits_are_finite_with_finite_gradient(self):
    logits = jnp.array([[[1e4, -1e4, -jnp.inf, 0.0]]])
    entropy, grad = jax.value_and_grad(lambda x: diagnostics.token_entropy(x).sum())(logits)
    np.testing.assert_allclose(entropy, 0.0, atol=1e-6)
    chex.assert_tree_all_finite(grad)

  def test_masked_mean_divides_by_global_count(self):
    x = jnp.array([[1.0, 2.0, jnp.nan], [3.0, 4.0, 5.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(diagnostics.masked_mean(x, mask, 10.0), (1 + 2 + 4) / 10)


class FirstOrderErrorTest(absltest.TestCase):

  def test_hand_values(self):
    # P = prod r, 1 + S = 1 + sum (r - 1); error |P - (1 + S)| / P.
    for ratios, expected in (
        ([1.5, 1.4], 0.2 / 2.1),
        ([0.1, 0.1, 0.1], (1.7 + 0.001) / 0.001),  # 1 + S = -1.7 < 0
        ([1.0, 1.0], 0.0),
    ):
      logp, batch = one_sequence(ratios)
      np.testing.assert_allclose(first_order_error(logp, batch), [expected],
                                 rtol=1e-4, err_msg=str(ratios))

  def test_tiny_error_keeps_its_digits(self):
    # P = 1.001^2 = 1.002001 and 1 + S = 1.002: error 1e-6 / 1.002001, below float32's
    # resolution of P itself.
    logp, batch = one_sequence([1.001, 1.001])
    np.testing.assert_allclose(first_order_error(logp, batch),
                               [1e-6 / 1.002001], rtol=1e-2)

  def test_huge_gap_is_finite(self):
    logp, batch = one_sequence([1.0] * 3)
    for gap in (-1e4, 1e4):
      error = first_order_error(logp.at[0, 1:].add(gap), batch)
      chex.assert_tree_all_finite(error)


class GradCosineTest(absltest.TestCase):

  def test_hand_values(self):
    a = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    b = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
    np.testing.assert_allclose(diagnostics.grad_cosine(a, b), 9 / 25, rtol=1e-6)
    np.testing.assert_allclose(diagnostics.grad_cosine(a, a), 1.0, rtol=1e-6)
    neg_a = jax.tree.map(lambda x: -x.astype(jnp.bfloat16), a)
    np.testing.assert_allclose(diagnostics.grad_cosine(a, neg_a), -1.0, rtol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, a)
    self.assertEqual(diagnostics.grad_cosine(a, zero), 0.0)

  def test_rejects_different_structures(self):
    with self.assertRaises(ValueError):
      diagnostics.grad_cosine({"w": jnp.ones(2)}, {"v": jnp.ones(2)})


if __name__ == "__main__":
  absltest.main()
