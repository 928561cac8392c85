"""Tests for minirl_jax.data.scoring: rewards in worker processes under a timeout."""
import os
import time

import numpy as np
import pytest

from minirl_jax.data import rewards
from minirl_jax.data import scoring

# Reward functions for the scorer tests: module-level, so spawned workers can import them.


def _raises(prompt, completion, answer):
  raise RuntimeError(f"bad {prompt} {completion} {answer}")


def _returns(prompt, completion, answer):
  """Returns whatever the completion names: an out-of-range, non-finite or non-number reward."""
  del prompt, answer
  return {"two": 2.0, "nan": float("nan"), "text": "1", "true": True, "half": 0.5}[completion]


def _sleeps_on_slow(prompt, completion, answer):
  del prompt, answer
  if completion == "slow":
    time.sleep(60)
  return 1.0


def _dies_on_crash(prompt, completion, answer):
  del prompt, answer
  if completion == "crash":
    os._exit(3)  # pylint: disable=protected-access
  return 1.0


def test_score_batch_scores_in_order():
  scored, metrics = scoring.score_batch(
      rewards.exact_match, ["1+1="] * 3, ["2 #2", "2 #3", "#11"], ["2", "2", "11"], timeout_s=5.0)
  np.testing.assert_array_equal(scored, [1.0, 0.0, 1.0])
  assert scored.dtype == np.float32
  assert metrics == {"reward/errors": 0.0, "reward/timeouts": 0.0}


def test_errors_and_invalid_rewards_score_zero_and_are_counted():
  scored, metrics = scoring.score_batch(_raises, ["p"] * 2, ["a", "b"], ["x", "y"])
  np.testing.assert_array_equal(scored, [0.0, 0.0])
  assert metrics["reward/errors"] == 2.0
  scored, metrics = scoring.score_batch(_returns, ["p"] * 5, ["two", "half", "nan", "text", "true"], ["a"] * 5)
  np.testing.assert_array_equal(scored, [0.0, 0.5, 0.0, 0.0, 1.0])
  assert metrics == {"reward/errors": 3.0, "reward/timeouts": 0.0}


def test_timeouts_score_zero_are_counted_and_the_rest_still_scored():
  completions = ["ok", "slow", "ok", "slow", "ok"]
  with scoring.RewardScorer(_sleeps_on_slow, timeout_s=0.5, num_workers=2) as scorer:
    start = time.monotonic()
    scored, metrics = scorer.score(["p"] * 5, completions, ["a"] * 5)
    assert time.monotonic() - start < 20
    np.testing.assert_array_equal(scored, [1.0, 0.0, 1.0, 0.0, 1.0])
    assert metrics == {"reward/errors": 0.0, "reward/timeouts": 2.0}
    scored, metrics = scorer.score(["p"] * 2, ["ok", "ok"], ["a"] * 2)  # replaced workers work
    np.testing.assert_array_equal(scored, [1.0, 1.0])


def test_a_crashing_call_scores_zero_and_is_counted():
  scored, metrics = scoring.score_batch(_dies_on_crash, ["p"] * 3, ["ok", "crash", "ok"], ["a"] * 3)
  np.testing.assert_array_equal(scored, [1.0, 0.0, 1.0])
  assert metrics == {"reward/errors": 1.0, "reward/timeouts": 0.0}


def test_scorer_rejects_unpicklable_fns_and_mismatched_lengths():
  with pytest.raises(TypeError, match="picklable"):
    scoring.RewardScorer(lambda p, c, a: 1.0)
  with scoring.RewardScorer(rewards.exact_match) as scorer:
    with pytest.raises(ValueError, match="lengths differ"):
      scorer.score(["p"], ["c", "d"], ["a"])
    with pytest.raises(ValueError, match="different reward_fn"):
      scoring.score_batch(rewards.math_reward, ["p"], ["c"], ["a"], scorer=scorer)
    scored, _ = scoring.score_batch(rewards.exact_match, [], [], [], scorer=scorer)
    assert scored.shape == (0,)
