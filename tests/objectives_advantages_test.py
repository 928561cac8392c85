"""Group advantages against hand values; all-equal groups give exact zeros."""
from absl.testing import absltest
import chex
import jax.numpy as jnp
import numpy as np

from minirl_jax.objectives import advantages


class GroupAdvantagesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mean_centring_and_z_score(self):
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    for normalize_std, expected in (
        # Group means 0.5 and 2; population stds 0.5 and sqrt((1 + 1 + 0 + 0) / 4).
        (False, [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]),
        (True, [1.0, -1.0, -1.0, 1.0, np.sqrt(2), -np.sqrt(2), 0.0, 0.0])):
      fn = self.variant(lambda r, n=normalize_std: advantages.group_advantages(r, 4, n))
      np.testing.assert_allclose(fn(rewards), expected, rtol=1e-6)

  def test_all_equal_group_gets_exact_zeros(self):
    # 0.1 is not exact in binary, so the group mean need not equal the rewards.
    rewards = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    for normalize_std in (False, True):
      adv = advantages.group_advantages(rewards, 3, normalize_std)
      np.testing.assert_array_equal(adv[:3], 0.0)
      chex.assert_tree_all_finite(adv)

  def test_group_of_one_is_zero(self):
    adv = advantages.group_advantages(jnp.array([1.0, 0.0]), 1, True)
    np.testing.assert_array_equal(adv, 0.0)

  def test_rejects_ragged_groups(self):
    with self.assertRaisesRegex(ValueError, "groups of 4"):
      advantages.group_advantages(jnp.zeros(6), 4, False)


if __name__ == "__main__":
  absltest.main()
