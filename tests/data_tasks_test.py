"""Tests for minirl_jax.data.tasks."""
import re

import numpy as np
import pytest

from minirl_jax.data import tasks


def _evaluate(expression: str) -> int:
  # Test-only oracle on text this test generated itself: digits and + - * only.
  assert re.fullmatch(r"-?[0-9]+([+\-*][0-9]+)*", expression), expression
  return eval(expression)


@pytest.mark.parametrize("values, ops, prompt, solution, answer", [
    ([12, 7], "+", "12+7=", "19 #19", "19"),
    ([52, 88], "-", "52-88=", "-36 #-36", "-36"),
    ([12, 7, 5], "+-", "12+7-5=", "19-5=14 #14", "14"),
    ([2, 3, 4, 1], "-*+", "2-3*4+1=", "2-12+1=-10+1=-9 #-9", "-9"),
    ([6, 7, 2], "**", "6*7*2=", "42*2=84 #84", "84"),
])
def test_worked_problem_by_hand(values, ops, prompt, solution, answer):
  assert tasks.worked_problem(values, list(ops)) == tasks.Problem(prompt, answer, solution)


def test_default_task_is_the_calibrated_learnable_one():
  task = tasks.ArithmeticTask()
  assert (task.num_operands, task.max_value, task.operators) == (2, 100, "+-")
  assert task.max_prompt_chars == 6  # "99+99="
  assert task.max_solution_chars == 10  # bound; the longest real one is "-99 #-99" / "198 #198"


@pytest.mark.parametrize("task", [
    tasks.ArithmeticTask(),
    tasks.ArithmeticTask(num_operands=4, max_value=20, operators="+-*"),
])
def test_problems_are_correct_and_within_length_bounds(task):
  for index in range(300):
    problem = task.train_problem(seed=0, index=index)
    expression = problem.prompt[:-1]
    numbers = [int(v) for v in re.split(r"[+\-*]", expression)]
    assert len(numbers) == task.num_operands and max(numbers) < task.max_value
    assert str(_evaluate(expression)) == problem.answer
    chain, marked = problem.solution.split(" #")
    assert marked == problem.answer
    assert all(_evaluate(step) == int(problem.answer) for step in chain.split("="))
    assert len(problem.prompt) <= task.max_prompt_chars
    assert len(problem.solution) <= task.max_solution_chars


def test_generation_is_deterministic_in_seed_and_index():
  task = tasks.ArithmeticTask()
  first = [task.train_problem(seed=1, index=i) for i in range(50)]
  assert first == [task.train_problem(seed=1, index=i) for i in range(50)]
  other_seed = [task.train_problem(seed=2, index=i) for i in range(50)]
  assert sum(a != b for a, b in zip(first, other_seed)) > 40


def test_heldout_split_is_fixed_distinct_and_disjoint_from_training():
  task = tasks.ArithmeticTask()
  heldout = task.heldout(256)
  assert heldout == task.heldout(256)
  assert heldout[:10] == task.heldout(10)
  prompts = {p.prompt for p in heldout}
  assert len(prompts) == 256 and all(task.is_heldout(p) for p in prompts)
  training = {task.train_problem(seed, i).prompt for seed in (0, 1) for i in range(3000)}
  assert not training & prompts
  assert not any(task.is_heldout(p) for p in training)


def test_split_and_streams_are_pinned():
  # Results compare across commits: the held-out split and the training stream must not move.
  task = tasks.ArithmeticTask()
  assert isinstance(task, tasks.HeldoutSplit)
  assert [p.prompt for p in task.heldout(3)] == ["84-25=", "57+57=", "9-86="]
  assert task.train_problem(seed=0, index=0) == tasks.Problem("85-63=", "22", "22 #22")


def test_heldout_fraction_is_about_as_asked():
  task = tasks.ArithmeticTask(heldout_fraction=0.05)
  all_prompts = [f"{a}{op}{b}=" for a in range(100) for b in range(100) for op in "+-"]
  fraction = np.mean([task.is_heldout(p) for p in all_prompts])
  assert 0.04 < fraction < 0.06


def test_heldout_asking_for_more_than_exist_raises():
  task = tasks.ArithmeticTask(max_value=3, operators="+", heldout_fraction=0.5)  # 9 problems
  with pytest.raises(ValueError, match="distinct held-out problems"):
    task.heldout(10)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_operands=1), "num_operands"),
    (dict(max_value=1), "max_value"),
    (dict(operators="+/"), "operators"),
    (dict(operators=""), "operators"),
    (dict(heldout_fraction=0.0), "heldout_fraction"),
])
def test_bad_knobs_raise_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    tasks.ArithmeticTask(**kwargs)


def test_train_source_is_a_random_access_sequence_of_records():
  task = tasks.ArithmeticTask()
  source = tasks.TrainSource(task, seed=5, size=10)
  assert len(source) == 10
  problem = task.train_problem(seed=5, index=3)
  assert source[3] == {"prompt": problem.prompt, "answer": problem.answer,
                       "solution": problem.solution}
  assert source[2:4] == [source[2], source[3]]
  with pytest.raises(IndexError):
    source[10]


def test_heldout_records_are_the_heldout_problems_in_order():
  task = tasks.ArithmeticTask()
  records = tasks.heldout_records(task, 5)
  assert [r["prompt"] for r in records] == [p.prompt for p in task.heldout(5)]
  assert set(records[0]) == {"prompt", "answer", "solution"}
