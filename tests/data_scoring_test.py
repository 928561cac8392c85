"""Tests for minirl_jax.data.scoring: rewards in worker processes under a timeout."""
import os
import subprocess
import sys
import textwrap
import time
from unittest import mock

import numpy as np
import pytest

from minirl_jax import errors
from minirl_jax.data import rewards
from minirl_jax.data import scoring

# Reward functions for the scorer tests: module-level, so spawned workers can import them.


def _raises(prompt, completion, answer):
  raise RuntimeError(f"bad {prompt} {completion} {answer}")


def _returns(prompt, completion, answer):
  """Returns whatever the completion names: an out-of-range, non-finite or non-number reward."""
  del prompt, answer
  return {"two": 2.0, "nan": float("nan"), "text": "1", "true": True, "half": 0.5}[completion]


def _bad(prompt, completion, answer):
  """A reward that fails in the way its completion names."""
  del prompt, answer
  if completion == "raise":
    return 1 / 0
  if completion == "slow":
    time.sleep(60)
  return {"two": 2.0, "neg": -1, "none": None, "x": "x", "nan": float("nan"), "ok": 1.0,
          "true": True, "np_false": np.False_}[completion]


def _clean_worker(prompt, completion, answer):
  """1.0 iff this worker's main module is the worker's and it has not imported JAX."""
  del prompt, answer
  if completion == "slow":
    time.sleep(60)
  main = sys.modules["__main__"].__spec__
  return float("jax" not in sys.modules and main.name == "minirl_jax.data.reward_worker")


def _sleeps_on_slow(prompt, completion, answer):
  del prompt, answer
  if completion == "slow":
    time.sleep(60)
  return 1.0


def _dies_on_crash(prompt, completion, answer):
  del prompt, answer
  if completion == "crash":
    os._exit(3)
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
  scored, metrics = scoring.score_batch(_returns, ["p"] * 5,
                                        ["two", "half", "nan", "text", "true"], ["a"] * 5)
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


def _logged(warning):
  """(prompt index, text) of each `reward function failed on prompt` warning."""
  return [c.args[1:3] for c in warning.call_args_list if "failed on prompt" in c.args[0]]


def test_every_bad_kind_is_an_error_and_each_distinct_one_is_logged_once():
  completions = ["ok", "raise", "two", "raise", "neg", "none", "x", "nan", "two", "slow",
                 "true", "np_false", "slow"]
  with mock.patch.object(scoring.logging, "warning") as warning:
    with scoring.RewardScorer(_bad, timeout_s=0.5) as scorer:
      n = len(completions)
      scored = scorer.score_detailed(["p"] * n, completions, ["a"] * n)
      np.testing.assert_array_equal(scored.rewards, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])
      assert scored.metrics == {"reward/errors": 8.0, "reward/timeouts": 2.0}
      bad = lambda v: f"returned {v}, not a number in [0, 1]"
      first = [(1, "ZeroDivisionError: division by zero"), (2, bad("2.0")), (4, bad("-1")),
               (5, bad("None")), (6, bad("'x'")), (7, bad("nan")), (9, "timed out after 0.5 s")]
      assert _logged(warning) == first
      assert scored.failures == {**dict(first), 3: first[0][1], 8: bad("2.0"), 12: first[-1][1]}
      assert scored.first_failure() == "ZeroDivisionError: division by zero (prompt 1)"
      # A later batch: repeats are only counted, a new kind is logged.
      scored = scorer.score_detailed(["p"] * 3, ["raise", "ok", "none"], ["a"] * 3)
      assert scored.metrics == {"reward/errors": 2.0, "reward/timeouts": 0.0}
      assert _logged(warning) == first
      scorer.score_detailed(["p"] * 2, ["ok", "nan"], ["a"] * 2)
      scorer.score_detailed(["p"] * 2, ["ok", "neg"], ["a"] * 2)
      assert _logged(warning) == first


def test_a_crash_is_logged_with_its_exit_status():
  with mock.patch.object(scoring.logging, "warning") as warning:
    scoring.score_batch(_dies_on_crash, ["p"] * 3, ["ok", "crash", "crash"], ["a"] * 3)
  assert _logged(warning) == [(1, "reward worker exited with status 3")]


def test_past_max_logged_distinct_failures_are_only_counted():
  with mock.patch.object(scoring.logging, "warning") as warning:
    n = scoring.MAX_LOGGED + 5
    _, metrics = scoring.score_batch(_raises, ["p"] * n, [str(i) for i in range(n)], ["a"] * n)
  assert metrics["reward/errors"] == n
  assert len(_logged(warning)) == scoring.MAX_LOGGED
  assert warning.call_count == scoring.MAX_LOGGED + 1


def test_first_failure_names_the_lowest_failed_prompt():
  scored = scoring.Scored(np.zeros(4, np.float32), {3: "b", 2: "a"}, timeouts=0)
  assert scored.first_failure() == "a (prompt 2)"
  assert scoring.Scored(np.ones(1, np.float32), {}, timeouts=0).first_failure() is None


def test_three_bad_steps_in_a_row_stop_the_run_naming_the_first_error():
  streak = scoring.ErrorStreak(0.5)
  first = "ZeroDivisionError: division by zero (prompt 0)"
  streak.update(64, 64, first)
  streak.update(40, 64, first)
  with pytest.raises(errors.RunStopped) as stopped:
    streak.update(64, 64, first)
  assert str(stopped.value) == (
      "reward function failed on 64/64 calls (100%) for 3 steps in a row "
      "(data.reward_max_error_frac=0.5); first error: " + first)
  assert stopped.value.status == errors.STOPPED_STATUS


def test_a_good_step_or_exactly_the_threshold_resets_the_streak():
  streak = scoring.ErrorStreak(0.5)
  for failed in (64, 64, 10, 64, 64, 32, 64, 64, 0, 64, 64):  # 32/64 is not more than 0.5
    streak.update(failed, 64, "e")
  never = scoring.ErrorStreak(1.0)
  for _ in range(5):
    never.update(64, 64, "e")
  strict = scoring.ErrorStreak(0.0)
  strict.update(1, 64, "e"), strict.update(1, 64, "e")
  with pytest.raises(errors.RunStopped, match=r"1/64 calls \(1.56%\).*first error: e$"):
    strict.update(1, 64, "e")


def test_a_restarted_worker_does_not_import_the_training_script(tmp_path):
  marker = tmp_path / "imported"
  script = tmp_path / "train_like.py"
  script.write_text(textwrap.dedent(f"""
      import jax  # like scripts/train.py: the parent's __main__ imports JAX
      with open({str(marker)!r}, "a") as f:
        f.write(__name__ + "\\n")  # a side effect of every import of this script
      import data_scoring_test
      from minirl_jax.data import scoring
      if __name__ == "__main__":
        with scoring.RewardScorer(data_scoring_test._clean_worker, timeout_s=0.5) as scorer:
          scored = scorer.score_detailed(["p"] * 3, ["ok", "slow", "ok"], ["a"] * 3)
        print(scored.rewards.tolist(), scored.metrics["reward/timeouts"])
      """))
  path = filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.split("\n")[-2] == "[1.0, 0.0, 1.0] 1.0"  # the replacement scored "ok" clean
  assert marker.read_text() == "__main__\n"


def test_reward_fns_of_the_running_script_are_rejected():
  fn = lambda p, c, a: 1.0
  fn.__module__ = "__main__"
  with pytest.raises(TypeError, match="script being run"):
    scoring.RewardScorer(fn)
