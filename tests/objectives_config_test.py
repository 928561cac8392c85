"""ObjectiveConfig: paper defaults per objective, validation naming the field."""
from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

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
    self.assertEqual((cfg.is_level, cfg.is_bounds), ("token", None))

  @parameterized.parameters(
      ("std_ddof", 0), ("std_ddof", 1), ("token_norm", "batch"), ("token_norm", "group"),
      ("behaviour_logp", "processed"), ("behaviour_logp", "raw"),
  )
  def test_accepts_every_option(self, field, value):
    self.assertEqual(getattr(config.ObjectiveConfig(**{field: value}), field), value)

  @parameterized.parameters(
      (dict(is_level="sequence"), None),
      (dict(is_level="sequence", is_bounds=(0.5, 2.0)), (0.5, 2.0)),
      (dict(is_level="sequence", is_bounds=[0, 3]), (0.0, 3.0)),  # a list from a config
      (dict(is_level="geometric", is_bounds=(0.999, 1.001)), (0.999, 1.001)),
      (dict(is_level="geometric", is_bounds=(1.0, float("inf"))), (1.0, float("inf"))),
  )
  def test_accepts_rollout_corrections(self, overrides, bounds):
    cfg = config.ObjectiveConfig(**overrides)
    self.assertEqual(cfg.is_bounds, bounds)
    hash(cfg)

  def test_log_is_bounds(self):
    self.assertEqual(config.ObjectiveConfig().log_is_bounds, (-float("inf"), float("inf")))
    cfg = config.ObjectiveConfig(is_level="sequence", is_bounds=(0.0, 2.0))
    self.assertEqual(cfg.log_is_bounds, (-float("inf"), np.log(2.0)))

  @parameterized.parameters(
      ("is_level", dict(is_level="seq")),
      ("is_level", dict(is_level=None)),
      ("is_level", dict(name="grpo", is_level="sequence")),
      ("is_level", dict(name="cispo", is_level="geometric", is_bounds=(0.5, 2.0))),
      ("is_bounds", dict(is_bounds=(0.5, 2.0))),  # is_level "token" rejects nothing
      ("is_bounds", dict(is_level="geometric")),  # Geo-MIS needs explicit bounds
      ("is_bounds", dict(is_level="sequence", is_bounds=(1.5, 2.0))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(0.5, 0.9))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(1.0, 1.0))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(-0.1, 2.0))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(float("nan"), 2.0))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(0.5, float("nan")))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(0.5,))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(0.5, 2.0, 3.0))),
      ("is_bounds", dict(is_level="sequence", is_bounds=(True, 2.0))),
      ("is_bounds", dict(is_level="sequence", is_bounds="0.5,2")),
      ("is_bounds", dict(is_level="sequence", is_bounds=("(0, inf)",))),  # a bad CLI parse
  )
  def test_rejects_bad_rollout_correction_naming_the_field(self, field, overrides):
    with self.assertRaisesRegex(ValueError, f"^objective.{field} "):
      config.ObjectiveConfig(**overrides)

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
