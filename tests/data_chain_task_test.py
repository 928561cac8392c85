"""Tests for minirl_jax.data.chain_task and its wiring into a run (`data.task="chain"`)."""
import dataclasses
import importlib.util
import pathlib
import pickle
import re

import numpy as np
import pytest

from minirl_jax.data import chain_task
from minirl_jax.data import rewards
from minirl_jax.data import tasks
from minirl_jax.data import tokenizer
from minirl_jax.rl import data as rl_data
from minirl_jax.rl import settings

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
# What configs/paper_small.py runs (checked against it below).
PAPER_TASK = chain_task.ChainTask(min_steps=3, max_steps=18, max_value=10, modulus=100,
                                  operators="+-")
_STEP = re.compile(r"([0-9]+)([+\-*])([0-9]+)=([0-9]+)")


def _evaluate(expression: str, modulus: int) -> int:
  # Test-only oracle on text the task generated: digits, + - * and parentheses only.
  assert re.fullmatch(r"[()0-9+\-*]+", expression), expression
  return eval(expression) % modulus


def _paper_small():
  spec = importlib.util.spec_from_file_location("paper_small", CONFIGS / "paper_small.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("values, ops, modulus, prompt, solution", [
    ([17, 5, 8], "+-", 100, "17+5-8=", "17+5=22 22-8=14 #14"),
    ([90, 45, 62], "+-", 100, "90+45-62=", "90+45=35 35-62=73 #73"),
    ([17, 5, 3, 2, 8], "+**-", 100, "(17+5)*3*2-8=", "17+5=22 22*3=66 66*2=32 32-8=24 #24"),
    ([3, 4, 5, 6], "*+*", 10, "(3*4+5)*6=", "3*4=2 2+5=7 7*6=2 #2"),
    ([250, 7], "-", 100, "250-7=", "250-7=43 #43"),  # operands may exceed the modulus
    ([4, 9], "-", 10, "4-9=", "4-9=5 #5"),
])
def test_worked_chain_by_hand(values, ops, modulus, prompt, solution):
  problem = chain_task.worked_chain(values, list(ops), modulus)
  assert problem == tasks.Problem(prompt, solution.rpartition("#")[2], solution)
  assert chain_task.parse_prompt(prompt) == (values, list(ops))


@pytest.mark.parametrize("task", [
    PAPER_TASK,
    chain_task.ChainTask(),
    chain_task.ChainTask(min_steps=1, max_steps=9, max_value=1000, modulus=97, operators="+-*"),
    chain_task.ChainTask(min_steps=5, max_steps=5, max_value=13, modulus=10, operators="*-"),
])
def test_every_step_and_answer_is_right_for_many_seeds(task):
  for seed in range(5):
    for index in range(200):
      problem = task.train_problem(seed, index)
      values, ops = chain_task.parse_prompt(problem.prompt)
      assert task.min_steps <= len(ops) <= task.max_steps
      assert set(ops) <= set(task.operators) and max(values) < task.max_value
      assert problem.answer == str(_evaluate(problem.prompt[:-1], task.modulus))
      chain, marked = problem.solution.split(" #")
      assert marked == problem.answer
      steps = [_STEP.fullmatch(step).groups() for step in chain.split(" ")]
      assert len(steps) == len(ops)
      previous = values[0]
      for (a, op, b, c), op_k, value_k in zip(steps, ops, values[1:]):
        assert (int(a), op, int(b)) == (previous, op_k, value_k)  # the chain goes left to right
        assert int(c) == _evaluate(f"{a}{op}{b}", task.modulus)
        previous = int(c)
      assert int(problem.answer) == previous
      assert len(problem.prompt) <= task.max_prompt_chars
      assert len(problem.solution) <= task.max_solution_chars
      assert task.reward(problem.prompt, problem.solution, problem.answer) == 1.0


def test_paper_task_solutions_span_20_to_150_tokens_and_vary_with_steps():
  problems = [PAPER_TASK.train_problem(0, i) for i in range(2000)]
  char_tokens = tokenizer.CharTokenizer()
  lengths = np.array([len(char_tokens.encode(p.solution)) for p in problems])
  steps = np.array([len(chain_task.parse_prompt(p.prompt)[1]) for p in problems])
  assert 20 <= lengths.min() <= 25 and 140 <= lengths.max() <= PAPER_TASK.max_solution_chars <= 150
  assert 70 <= np.median(lengths) <= 90
  assert len(set(lengths.tolist())) > 50  # many distinct lengths (all even here: each result
  # is written twice, as c and as the next a), not a few
  assert np.corrcoef(lengths, steps)[0, 1] > 0.95
  assert set(steps.tolist()) == set(range(3, 19))  # uniform over [min_steps, max_steps]
  counts = np.bincount(steps)[3:]
  assert counts.min() > 0.6 * counts.mean()


def test_length_bounds_are_tight_and_grow_with_operand_size():
  assert (PAPER_TASK.max_prompt_chars, PAPER_TASK.max_solution_chars) == (38, 146)
  assert max(len(PAPER_TASK.train_problem(0, i).solution) for i in range(2000)) == 146
  wide = chain_task.ChainTask(min_steps=3, max_steps=18, max_value=100, modulus=100)
  assert wide.max_solution_chars > PAPER_TASK.max_solution_chars
  mixed = chain_task.ChainTask(max_steps=4, operators="+*")
  longest = chain_task.worked_chain([99] * 5, list("+*+*"), 100).prompt
  assert longest == "((99+99)*99+99)*99=" and mixed.max_prompt_chars == len(longest)


def test_generation_is_deterministic_in_seed_and_index():
  first = [PAPER_TASK.train_problem(seed=1, index=i) for i in range(50)]
  assert first == [PAPER_TASK.train_problem(seed=1, index=i) for i in range(50)]
  other_seed = [PAPER_TASK.train_problem(seed=2, index=i) for i in range(50)]
  assert sum(a != b for a, b in zip(first, other_seed)) > 45


def test_heldout_split_is_fixed_distinct_and_disjoint_from_training():
  heldout = PAPER_TASK.heldout(256)
  assert heldout == chain_task.ChainTask(**dataclasses.asdict(PAPER_TASK)).heldout(256)
  assert heldout[:10] == PAPER_TASK.heldout(10)
  # Pinned: the split must not move between commits (results compare across runs).
  assert heldout[0] == tasks.Problem("5+3+2-5+6-9+7-1-6-0-4-4-6-7-6+7=", "82",
                                     heldout[0].solution)
  prompts = {p.prompt for p in heldout}
  assert len(prompts) == 256 and all(PAPER_TASK.is_heldout(p) for p in prompts)
  training = {PAPER_TASK.train_problem(seed, i).prompt for seed in (0, 1) for i in range(3000)}
  assert not training & prompts
  assert not any(PAPER_TASK.is_heldout(p) for p in training)


def test_reward_is_one_only_when_every_step_is_right():
  problem = chain_task.worked_chain([17, 5, 3, 8], list("+--"), 100)
  assert problem.solution == "17+5=22 22-3=19 19-8=11 #11"
  reward = lambda completion: PAPER_TASK.reward(problem.prompt, completion, problem.answer)
  assert reward(problem.solution) == 1.0
  assert reward("17+5=22\n22-3=19  19-8=11 #11 ") == 1.0  # whitespace between steps is free
  wrong_steps = [
      "17+5=23 22-3=19 19-8=11 #11",   # a wrong result, the chain then goes on right
      "17+5=22 22-3=19 19-8=12 #11",   # the last step wrong, the marked answer right
      "17+5=22 22-4=18 18-7=11 #11",   # wrong operands that still land on the answer
      "17+5=22 19-8=11 #11",           # a step left out
      "17+5=22 22-3=19 19-8=11 11+0=11 #11",  # a step added
      "#11",                           # no steps at all
  ]
  for completion in wrong_steps:
    assert reward(completion) == 0.0, completion
    # exact_match alone (data.reward="minirl_jax.data.rewards:exact_match") would pass them.
    assert rewards.exact_match(problem.prompt, completion, problem.answer) == 1.0
  for completion in ("17+5=22 22-3=19 19-8=11 #12", "17+5=22 22-3=19 19-8=11", ""):
    assert reward(completion) == 0.0


def test_reward_is_picklable_and_rejects_foreign_prompts():
  assert pickle.loads(pickle.dumps(PAPER_TASK.reward))("1+2=", "1+2=3 #3", "3") == 1.0
  with pytest.raises(ValueError, match="not a chain prompt"):
    PAPER_TASK.reward("What is 1+2?", "#3", "3")


@pytest.mark.parametrize("kwargs, field", [
    (dict(min_steps=0), "min_steps"),
    (dict(min_steps=5, max_steps=4), "max_steps"),
    (dict(max_value=1), "max_value"),
    (dict(modulus=1), "modulus"),
    (dict(operators="+/"), "operators"),
    (dict(operators=""), "operators"),
    (dict(heldout_fraction=1.0), "heldout_fraction"),
])
def test_bad_knobs_raise_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    chain_task.ChainTask(**kwargs)


def test_paper_small_config_validates_and_builds_the_chain_task():
  config = _paper_small()
  s = settings.from_config(config)
  assert s.data.task == "chain"
  task = s.data.make_task()
  assert task == PAPER_TASK
  data = rl_data.build(s)
  assert data.reward_fn.__func__ is chain_task.ChainTask.reward
  assert data.reward_fn.__self__ == PAPER_TASK
  assert data.max_solution_tokens == PAPER_TASK.max_solution_chars
  assert data.max_solution_tokens + 1 == s.sampler.max_new_tokens  # no wasted decode steps
  assert PAPER_TASK.max_prompt_chars <= s.data.max_prompt_len < PAPER_TASK.max_prompt_chars + 8
  assert data.train_records[3] == dataclasses.asdict(PAPER_TASK.train_problem(s.seed, 3))
  assert data.eval_records == tasks.heldout_records(PAPER_TASK, len(data.eval_records))
  batch = next(data.sft_iterator(s))  # every solution + EOS fits the rollout width
  width = s.data.max_prompt_len + s.sampler.max_new_tokens
  assert batch["tokens"].shape == (s.sft.batch_size, width)


def test_default_config_still_builds_the_arithmetic_task():
  from minirl_jax import config_base
  s = settings.from_config(config_base.get_base_config())
  assert s.data.task == "arithmetic"
  data = rl_data.build(s)
  assert data.reward_fn is rewards.exact_match
  assert data.train_records[0] == dataclasses.asdict(tasks.ArithmeticTask().train_problem(0, 0))


def test_unknown_task_and_short_prompt_width_raise_naming_the_field():
  config = _paper_small()
  config.data.task = "chains"
  with pytest.raises(ValueError, match=r"data\.task"):
    settings.from_config(config)
  config = _paper_small()
  config.data.update(max_steps=30, max_prompt_len=40)
  with pytest.raises(ValueError, match=r"data\.max_prompt_len"):
    rl_data.build(settings.from_config(config))
