"""ObjectiveConfig: paper defaults per objective, validation naming the field."""
from absl.testing import absltest
from absl.testing import parameterized

from minirl_jax.objectives import config


class ObjectiveConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ("minirl", True, False, False),
      ("grpo", False, True, True),
      ("cispo", False, True, True),
  )
  def test_paper_defaults(self, name, train_infer_is, length_norm, normalize_std):
    cfg = config.ObjectiveConfig(name=name)
    self.assertEqual(cfg.use_train_infer_is, train_infer_is)
    self.assertEqual(cfg.use_length_norm, length_norm)
    self.assertEqual(cfg.use_normalize_std, normalize_std)
    self.assertEqual((cfg.eps_low, cfg.eps_high, cfg.tis_cap), (0.2, 0.27, 5.0))
    self.assertEqual(cfg.tis_target, "pi_theta_mu")
    self.assertEqual((cfg.std_ddof, cfg.token_norm, cfg.behaviour_logp),
                     (0, "batch", "processed"))

  @parameterized.parameters(
      ("std_ddof", 0), ("std_ddof", 1), ("token_norm", "batch"), ("token_norm", "group"),
      ("behaviour_logp", "processed"), ("behaviour_logp", "raw"),
  )
  def test_accepts_every_option(self, field, value):
    self.assertEqual(getattr(config.ObjectiveConfig(**{field: value}), field), value)

  def test_explicit_switches_override_defaults(self):
    cfg = config.ObjectiveConfig(name="grpo", train_infer_is=True, length_norm=False)
    self.assertTrue(cfg.use_train_infer_is)
    self.assertFalse(cfg.use_length_norm)
    self.assertFalse(config.ObjectiveConfig(train_infer_is=False).use_train_infer_is)

  def test_hashable_and_equal_by_value(self):  # jit takes it as a static argument
    self.assertEqual(hash(config.ObjectiveConfig()), hash(config.ObjectiveConfig()))

  @parameterized.parameters(
      ("name", "ppo"), ("eps_low", 1.5), ("eps_low", -0.1), ("eps_high", -0.1),
      ("tis_cap", 0.0), ("tis_target", "mu"), ("train_infer_is", 1), ("length_norm", "yes"),
      ("clip", None), ("normalize_std", 0), ("grad_cosine_every", -1),
      ("grad_cosine_every", 2.5), ("std_ddof", 2), ("std_ddof", -1), ("std_ddof", True),
      ("std_ddof", 1.0), ("token_norm", "sequence"), ("token_norm", None),
      ("behaviour_logp", "sampled"), ("behaviour_logp", None),
  )
  def test_rejects_bad_value_naming_the_field(self, field, value):
    with self.assertRaisesRegex(ValueError, f"^objective.{field} "):
      config.ObjectiveConfig(**{field: value})


if __name__ == "__main__":
  absltest.main()
