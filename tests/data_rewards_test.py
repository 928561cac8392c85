"""Tests for minirl_jax.data.rewards."""
import fractions
import sys

import numpy as np
import pytest

from minirl_jax.data import rewards
from minirl_jax.data import scoring


@pytest.mark.parametrize("completion, answer, reward", [
    ("19 #19", "19", 1.0),
    (" #19\n", "19", 1.0),
    ("-36 #-36", "-36", 1.0),
    ("19 #18", "19", 0.0),
    ("19", "19", 0.0),          # no marker
    ("#19 #20", "19", 0.0),     # two answers are not one
    ("#190", "19", 0.0),
    ("", "19", 0.0),
])
def test_exact_match_by_hand(completion, answer, reward):
  assert rewards.exact_match("12+7=", completion, answer) == reward


@pytest.mark.parametrize("text, boxed", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{{2}+\{3\}}", r"{2}+\{3\}"),
    (r"\boxed{1} and \boxed{2", "1"),
    (r"\fbox{7}", "7"),
    ("no box", None),
])
def test_extract_boxed_takes_the_last_balanced_box(text, boxed):
  assert rewards.extract_boxed(text) == boxed


def test_extract_final_answer_falls_back_to_answer_colon():
  assert rewards.extract_final_answer("work\nAnswer: 42.\nmore") == "42."
  assert rewards.extract_final_answer("The final answer is: 7\nFinal Answer: 8") == "8"
  assert rewards.extract_final_answer(r"Answer: 3 \boxed{4}") == "4"
  assert rewards.extract_final_answer("42") is None


@pytest.mark.parametrize("predicted, reference", [
    ("3/4", r"\frac{3}{4}"),
    (r"\dfrac{3}{4}", "0.75"),
    (r"\tfrac34", "3/4"),
    (r"-\frac{1}{2}", "-0.5"),
    ("1,000", "1000"),
    ("1,234,567.5", "1234567.5"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    ("$5$", "5"),
    ("5.", "5"),
    ("x = 5", "5"),
    ("0.50", ".5"),
    (r"90^\circ", "90"),
    (r"\text{(B)}", "(B)"),
    (r"\sqrt2", r"\sqrt{2}"),
])
def test_builtin_equivalence_accepts(predicted, reference):
  assert rewards.answers_equivalent(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("2", "3"),
    ("3/4", "4/3"),
    ("1/0", "0"),
    ("(1,2)", "(2,1)"),
    ("1,2", "12"),
    (r"\sqrt{4}", "2"),   # needs algebra: math-verify's job
    ("1" * 200, "1" * 200 + "0"),
])
def test_builtin_equivalence_rejects(predicted, reference):
  assert not rewards.answers_equivalent(predicted, reference)


def test_normalize_answer_by_hand():
  assert rewards.normalize_answer(r" \left[ \dfrac{1}{2}, 3 \right]. ") == r"[\frac{1}{2},3]"
  assert rewards.parse_number(r"\frac{6}{8}") == fractions.Fraction(3, 4)
  assert rewards.parse_number("1e5") is None  # never converts exponents (1e999999999 is a bomb)


@pytest.fixture
def without_math_verify(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` fail


@pytest.mark.parametrize("completion, answer, reward", [
    (r"so the answer is \boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{2} wait, \boxed{0.75}", r"\frac34", 1.0),
    ("Answer: 1,000.", "1000", 1.0),
    (r"\boxed{5}", "6", 0.0),
    ("I think it is 3/4", "3/4", 0.0),  # no boxed answer, no "Answer:"
    (r"\boxed{}", "0", 0.0),
])
def test_math_reward_with_builtin_fallback(without_math_verify, completion, answer, reward):
  del without_math_verify
  assert rewards.math_reward("p", completion, answer) == reward


def test_math_reward_without_math_verify_does_no_algebra(without_math_verify):
  del without_math_verify
  assert rewards.math_reward("p", r"\boxed{\sqrt{4}}", "2") == 0.0


def test_math_reward_with_math_verify():
  pytest.importorskip("math_verify")
  assert rewards.math_reward("p", r"\boxed{\sqrt{4}}", "2") == 1.0
  assert rewards.math_reward("p", r"\boxed{x+1}", "1+x") == 1.0
  assert rewards.math_reward("p", r"\boxed{x+2}", "1+x") == 0.0


def test_model_output_is_never_executed(tmp_path):
  marker = tmp_path / "pwned"
  payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
  completions = [payload, f"#{payload}", rf"\boxed{{{payload}}}", f"Answer: {payload}"]
  for completion in completions:
    assert rewards.exact_match("p", completion, "1") == 0.0
    assert rewards.math_reward("p", completion, "1") == 0.0
  scored, metrics = scoring.score_batch(rewards.math_reward, ["p"] * 4, completions, ["1"] * 4)
  np.testing.assert_array_equal(scored, [0, 0, 0, 0])
  assert metrics == {"reward/errors": 0.0, "reward/timeouts": 0.0}
  assert not marker.exists()
