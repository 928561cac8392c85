"""Group advantages against hand values; all-equal groups give exact zeros."""
from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax.numpy as jnp
import numpy as np

from minirl_jax.objectives import advantages
import objectives_testlib as lib


class GroupAdvantagesTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mean_centring_and_z_score(self):
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    for normalize_std, expected in (
        # Group means 0.5 and 2; population stds 0.5 and sqrt((1 + 1 + 0 + 0) / 4).
        (False, [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]),
        (True, [1.0, -1.0, -1.0, 1.0, np.sqrt(2), -np.sqrt(2), 0.0, 0.0])):
      fn = self.variant(lambda r, n=normalize_std: advantages.group_advantages(r, 4, n))
      np.testing.assert_allclose(fn(rewards), expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample_std(self):
    fn = self.variant(lambda r: advantages.group_advantages(r, 4, True, std_ddof=1))
    # Same groups; sample stds sqrt(4 * 0.25 / 3) = 1/sqrt(3) and sqrt((1 + 1) / 3).
    a, b = 0.5 * np.sqrt(3), np.sqrt(1.5)
    np.testing.assert_allclose(fn(jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])),
                               [a, -a, -a, a, b, -b, 0.0, 0.0], rtol=1e-6)

  @parameterized.parameters((0, lib.GROUP_ADV), (1, np.divide(lib.GROUP_ADV, np.sqrt(2))))
  def test_two_response_groups(self, std_ddof, expected):
    # Rewards (1, 0) and (0.5, 0): each pair is mean +- d/2. Population std d/2 gives
    # A = +-1; sample std sqrt(2 (d/2)^2 / (2 - 1)) = d/sqrt(2) gives A = +-1/sqrt(2).
    adv = advantages.group_advantages(jnp.array(lib.GROUP_REWARDS), lib.GROUP_SIZE, True,
                                      std_ddof=std_ddof)
    np.testing.assert_allclose(adv, expected, rtol=1e-6)

  @parameterized.parameters(0, 1)
  def test_all_equal_group_gets_exact_zeros(self, std_ddof):
    # 0.1 is not exact in binary, so the group mean need not equal the rewards.
    rewards = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    for normalize_std in (False, True):
      adv = advantages.group_advantages(rewards, 3, normalize_std, std_ddof=std_ddof)
      np.testing.assert_array_equal(adv[:3], 0.0)
      chex.assert_tree_all_finite(adv)

  def test_std_ddof_is_unused_without_std(self):
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    np.testing.assert_array_equal(advantages.group_advantages(rewards, 4, False, std_ddof=1),
                                  advantages.group_advantages(rewards, 4, False))
    np.testing.assert_array_equal(
        advantages.group_advantages(jnp.array([1.0, 0.0]), 1, False, std_ddof=1), 0.0)

  def test_group_of_one_is_zero(self):
    adv = advantages.group_advantages(jnp.array([1.0, 0.0]), 1, True)
    np.testing.assert_array_equal(adv, 0.0)

  def test_rejects_ragged_groups(self):
    with self.assertRaisesRegex(ValueError, "groups of 4"):
      advantages.group_advantages(jnp.zeros(6), 4, False)

  @parameterized.parameters(2, -1, True, 1.0)
  def test_rejects_bad_std_ddof(self, std_ddof):
    with self.assertRaisesRegex(ValueError, "std_ddof must be one of"):
      advantages.group_advantages(jnp.zeros(4), 2, True, std_ddof=std_ddof)

  def test_sample_std_needs_two_responses(self):
    with self.assertRaisesRegex(ValueError, "group_size >= 2, got 1"):
      advantages.group_advantages(jnp.array([1.0, 0.0]), 1, True, std_ddof=1)

  def test_zero_advantage_frac_counts_the_groups_without_signal(self):
    # Groups (1, 1, 1), (0, 1, 0), (0, 0, 0), (0.1, 0.1, 0.1): three of four all equal.
    rewards = jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1])
    np.testing.assert_array_equal(advantages.equal_reward_groups(rewards, 3),
                                  [True, False, True, True])
    self.assertEqual(float(advantages.zero_advantage_frac(rewards, 3)), 0.75)
    adv = advantages.group_advantages(rewards, 3, False).reshape(4, 3)
    np.testing.assert_array_equal(np.all(adv == 0, axis=1), [True, False, True, True])


if __name__ == "__main__":
  absltest.main()
