"""How scripts report bad flags and config overrides: one line naming the nearest field."""
import ml_collections
import pytest

from minirl_jax import errors


def _lookup_error(config, path):
  """The exception ml_collections raises for an override of `path` (what absl wraps)."""
  with pytest.raises((AttributeError, KeyError)) as e:
    node = config
    for key in path.split("."):
      node = getattr(node, key)
  return e.value


@pytest.fixture
def config():
  return ml_collections.ConfigDict({"rl": {"steps": 5, "group_size": 8}, "seed": 0})


def test_a_typo_names_the_field_and_the_nearest_one(config):
  error = _lookup_error(config, "rl.stepz")
  assert errors.unknown_field_message(error, ["--config=x.py", "--config.rl.stepz=5"]) == (
      "--config.rl.stepz: the config has no field rl.stepz; did you mean rl.steps?")


def test_a_typo_in_the_section_keeps_the_rest_of_the_path(config):
  error = _lookup_error(config, "rlx.steps")
  assert errors.unknown_field_message(error, ["--config.rlx.steps", "9"]) == (
      "--config.rlx.steps: the config has no field rlx; did you mean rl.steps?")


def test_a_field_with_no_near_name_is_named_without_a_guess(config):
  error = _lookup_error(config, "rl.zzzzzzzz")
  assert errors.unknown_field_message(error, ["--config.rl.zzzzzzzz=1"]) == (
      "--config.rl.zzzzzzzz: the config has no field rl.zzzzzzzz")


def test_an_error_that_no_override_explains_stays_a_bug(config):
  error = _lookup_error(config, "rl.stepz")
  assert errors.unknown_field_message(error, ["--config.rl.steps=5"]) is None
  assert errors.unknown_field_message(AttributeError("no quote"), ["--config.a=1"]) is None
