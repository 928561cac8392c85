"""Tests for minirl_jax.rl.rollout.score: rewards of a rollout, and the failing-reward stop."""
import importlib.util
import pathlib
import types

import numpy as np
import pytest

from minirl_jax import errors
from minirl_jax import sharding
from minirl_jax.rl import settings
from minirl_jax.rl import step

_WORDS = {1: "ok", 2: "bad"}
_PROMPTS = {"prompt": np.array(["p0", "p1"]), "answer": np.array(["a", "a"])}  # G = 4


def _fails_on_bad(prompt, completion, answer):
  del prompt, answer
  if completion == "bad":
    raise ValueError("bad completion")
  return 1.0


class _Words:
  """Decodes token 1 as "ok", 2 as "bad"."""

  def decode(self, ids):
    return "".join(_WORDS[int(i)] for i in ids)


def _rollout(words):
  ids = {w: i for i, w in _WORDS.items()}
  tokens = np.array([[0, ids[w]] for w in words], np.int32)  # a prompt token, then the word
  return types.SimpleNamespace(tokens=tokens, completion_mask=np.array([[0, 1]] * len(words)))


def _bound():
  spec = importlib.util.spec_from_file_location(
      "smoke", pathlib.Path(__file__).parents[1] / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  s = settings.from_config(module.get_config())
  assert s.rl.group_size == 4 and s.data.reward_max_error_frac == 0.5
  return step.bind(s, sharding.make_mesh({}), _Words(), _fails_on_bad)


def test_training_steps_stop_a_failing_reward_and_evaluation_never_does():
  fns = _bound()
  eval_score = fns.evaluate.keywords["score_fn"]
  bad = _rollout(["bad", "ok", "bad", "bad"] + ["bad", "bad", "ok", "ok"])  # 5/8 fail
  good = _rollout(["ok"] * 8)
  try:
    rewards, m = fns.score(bad, _PROMPTS)
    np.testing.assert_array_equal(rewards, [0, 1, 0, 0, 0, 0, 1, 1])
    assert (m["reward/errors"], m["reward/timeouts"]) == (5.0, 0.0)
    assert float(m["reward/mean"]) == 3 / 8
    fns.score(bad, _PROMPTS)
    fns.score(good, _PROMPTS)  # a good step resets the count
    for _ in range(5):
      eval_score(bad, _PROMPTS, group_size=4)  # evaluation neither counts nor resets
    fns.score(bad, _PROMPTS)
    eval_score(good, _PROMPTS, group_size=4)
    fns.score(bad, _PROMPTS)
    with pytest.raises(errors.RunStopped) as stopped:
      fns.score(bad, _PROMPTS)
    assert str(stopped.value) == (
        "reward function failed on 5/8 calls (62.5%) for 3 steps in a row "
        "(data.reward_max_error_frac=0.5); first error: ValueError: bad completion (prompt 0)")
  finally:
    fns.close()
