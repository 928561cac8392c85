"""CISPO (paper appendix) and its switches: values and gradients against hand derivations."""
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from minirl_jax import objectives
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


def group_value_and_grad(token_norm, rows=slice(None), num_sequences=None):
  cfg = config.ObjectiveConfig(name="cispo", token_norm=token_norm)
  fn = functools.partial(cispo.loss, cfg=cfg)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(
      lib.group_logp(rows), lib.group_batch(rows, num_sequences))
  chex.assert_tree_all_finite((loss, metrics, grad))
  return loss, metrics, grad


# On `lib.group_batch` every ratio is 1, so each token's term is A_i log pi_t. Per row,
# sum_t A_i log pi_t = -6, +2, -1, +4 (rows 0, 1 in group 0 with 4 tokens; rows 2, 3 in
# group 1 with 2 tokens).
#   batch: J = (-6 + 2 - 1 + 4) / 6 = -1/6, dJ/dlogp_t = A_i / 6.
#   group: J = (1/2) [(-6 + 2) / 4 + (-1 + 4) / 2] = (1/2) (-1 + 1.5) = 0.25,
#          dJ/dlogp_t = A_i / (2 * group tokens) = 1/8, -1/8, 1/4, -1/4 by row.
#   Row-wise, as computed: (1/4) (-6/2 + 2/2 - 1/1 + 4/1) = 0.25 (group means 2, 2, 1, 1).
class CISPOTokenNormTest(chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("batch", "batch", 1 / 6, [1 / 6] * 4),
      ("group", "group", -0.25, [1 / 8, 1 / 8, 1 / 4, 1 / 4]),
  )
  def test_value_and_grad(self, token_norm, expected_loss, d_row):
    loss, _, grad = group_value_and_grad(token_norm)
    np.testing.assert_allclose(loss, expected_loss, rtol=lib.RTOL)
    # d loss / d log pi_t = -A_i * d_row on the loss tokens, 0 elsewhere.
    expected = -np.asarray(lib.GROUP_MASK) * (np.asarray(lib.GROUP_ADV) * d_row)[:, None]
    np.testing.assert_allclose(grad, expected, rtol=lib.RTOL, atol=1e-7)

  def test_group_differs_from_batch_only_in_the_loss(self):
    loss_b, metrics_b, _ = group_value_and_grad("batch")
    loss_g, metrics_g, _ = group_value_and_grad("group")
    self.assertNotAlmostEqual(float(loss_b), float(loss_g), places=3)
    chex.assert_trees_all_equal(metrics_b, metrics_g)  # metrics stay token means over K

  # Mini-batches cut through both groups; each keeps the GLOBAL group means and counts its
  # own rows as num_sequences, and is weighted by its share of the rows:
  #   rows (0, 2): J = (1/2) (-6/2 - 1/1) = -2;      rows (1, 3): J = (1/2) (2/2 + 4/1) = 2.5;
  #     (2/4) (-2) + (2/4) 2.5 = 0.25.
  #   rows (0, 1, 2): J = (1/3) (-3 + 1 - 1) = -1;   rows (3,): J = 4/1 = 4;
  #     (3/4) (-1) + (1/4) 4 = 0.25.
  @parameterized.named_parameters(
      ("halves_across_groups", [0, 2], [1, 3], 2.0, -2.5),
      ("three_and_one", [0, 1, 2], [3], 1.0, -4.0),
  )
  def test_mini_batches_weighted_by_share_give_the_full_batch(self, rows_a, rows_b,
                                                              loss_a, loss_b):
    full_loss, _, full_grad = group_value_and_grad("group")
    total = len(rows_a) + len(rows_b)
    weighted_loss, grad = 0.0, np.zeros_like(full_grad)
    for rows, expected in ((rows_a, loss_a), (rows_b, loss_b)):
      loss, _, mb_grad = group_value_and_grad("group", np.asarray(rows), len(rows))
      np.testing.assert_allclose(loss, expected, rtol=lib.RTOL)
      weighted_loss += len(rows) / total * loss
      grad[np.asarray(rows)] = len(rows) / total * np.asarray(mb_grad)
    np.testing.assert_allclose(weighted_loss, full_loss, rtol=lib.RTOL)
    np.testing.assert_allclose(grad, full_grad, rtol=lib.RTOL, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_without_group_length_mean_raises(self):
    fn = self.variant(functools.partial(
        cispo.loss, cfg=config.ObjectiveConfig(name="cispo", token_norm="group")))
    with self.assertRaisesRegex(ValueError, "objective.token_norm='group' needs "
                                "TrainBatch.group_length_mean"):
      fn(lib.group_logp(), lib.group_batch(with_group_lengths=False))

  @parameterized.named_parameters(
      ("cispo_no_length_norm", "cispo", dict(length_norm=False)),
      ("minirl", "minirl", {}), ("minirl_length_norm", "minirl", dict(length_norm=True)),
      ("grpo", "grpo", {}),
  )
  def test_ignored_outside_the_token_mean(self, name, overrides):
    # These reduce with SEQ_SUM or SEQ_MEAN, so "group" changes nothing and needs no means.
    def run(token_norm):
      cfg = config.ObjectiveConfig(name=name, token_norm=token_norm, **overrides)
      fn = functools.partial(objectives.OBJECTIVES[name], cfg=cfg)
      return jax.value_and_grad(fn, has_aux=True)(
          lib.group_logp(), lib.group_batch(with_group_lengths=False))
    chex.assert_trees_all_equal(run("batch"), run("group"))


if __name__ == "__main__":
  absltest.main()
