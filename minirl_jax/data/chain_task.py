"""Arithmetic chains: long, variable-length worked solutions (one written step per operation)."""
import dataclasses
import operator
import re

import numpy as np

from minirl_jax import errors
from minirl_jax.data import rewards
from minirl_jax.data import tasks

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_OPERATORS = "".join(_APPLY)


@dataclasses.dataclass(frozen=True)
class ChainTask(tasks.HeldoutSplit):
  """`steps` operations applied left to right to a start value, modulo `modulus`.

  steps ~ uniform [min_steps, max_steps]; the start value and every operand are uniform in
  [0, max_value); each operator is uniform over `operators`. The prompt is the expression
  and "=", parenthesised where ordinary precedence would not go left to right, so it means
  what it says; the solution writes one step `a op b=c` per operation, where `a` is the
  previous result (the start value first) and `c = (a op b) mod modulus` (Python's `%`:
  always in [0, modulus)), then `#` and the last result (modulus 100):

    "17+5-8="        -> "17+5=22 22-8=14 #14"
    "90+45-62="      -> "90+45=35 35-62=73 #73"
    "(17+5)*3*2-8="  -> "17+5=22 22*3=66 66*2=32 32-8=24 #24"

  Reducing after every step keeps every written number below max(max_value, modulus), and
  since mod commutes with + - *, the answer is `eval(prompt[:-1]) % modulus`.
  """
  min_steps: int = 2
  max_steps: int = 16
  max_value: int = 100
  modulus: int = 100
  operators: str = "+-"
  heldout_fraction: float = 0.05

  def __post_init__(self):
    if not 1 <= self.min_steps <= self.max_steps:
      raise errors.UserError(f"min_steps / max_steps must satisfy 1 <= min_steps <= max_steps, got "
                             f"{self.min_steps} / {self.max_steps}")
    if self.max_value < 2:
      raise errors.UserError(f"max_value must be >= 2, got {self.max_value}")
    if self.modulus < 2:
      raise errors.UserError(f"modulus must be >= 2, got {self.modulus}")
    if not self.operators or set(self.operators) - set(_OPERATORS):
      raise errors.UserError(f"operators must be a non-empty subset of {_OPERATORS!r}, "
                             f"got {self.operators!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise errors.UserError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

  @property
  def max_prompt_chars(self) -> int:
    """Longest prompt in characters (= CharTokenizer tokens)."""
    n, d = self.max_steps, len(str(self.max_value - 1))
    # A pair of parentheses at most for every "*" that follows a "+" or "-".
    wraps = n // 2 if "*" in self.operators and set(self.operators) - {"*"} else 0
    return 2 * wraps + (n + 1) * d + n + 1  # parentheses, numbers, operators, "="

  @property
  def max_solution_chars(self) -> int:
    """Longest solution in characters (EOS not included)."""
    n, d, r = self.max_steps, len(str(self.max_value - 1)), len(str(self.modulus - 1))
    steps = d + (n - 1) * r + n * (d + r + 2)  # a, then "op b=c" per step
    return steps + (n - 1) + len(" " + tasks.ANSWER_MARKER) + r

  def draw(self, rng: np.random.Generator) -> tasks.Problem:
    """Draws one problem from either split."""
    steps = int(rng.integers(self.min_steps, self.max_steps + 1))
    values = [int(v) for v in rng.integers(0, self.max_value, size=steps + 1)]
    ops = [self.operators[int(i)] for i in rng.integers(0, len(self.operators), size=steps)]
    return worked_chain(values, ops, self.modulus)

  def reward(self, prompt: str, completion: str, answer: str) -> float:
    """1.0 iff the completion is the whole worked chain: every step, then `#answer`.

    `rewards.exact_match` on the final answer, and the steps before `#` (split on
    whitespace) must be exactly the prompt's chain: a wrong or missing step scores 0 even
    when the final number is right. The prompt is this task's own text, never model output.
    """
    if not rewards.exact_match(prompt, completion, answer):
      return 0.0
    values, ops = parse_prompt(prompt)
    steps = worked_chain(values, ops, self.modulus).solution.partition(tasks.ANSWER_MARKER)[0]
    return float(completion.partition(tasks.ANSWER_MARKER)[0].split() == steps.split())


def worked_chain(values, ops, modulus: int) -> tasks.Problem:
  """The prompt, worked solution and answer of `ops` applied left to right to `values`."""
  if len(values) != len(ops) + 1 or not ops:
    raise ValueError(f"need one more value than operators (>= 1), got {values} and {ops}")
  expression, a, steps = str(values[0]), values[0], []
  for k, (op, b) in enumerate(zip(ops, values[1:])):
    if op == "*" and k and ops[k - 1] != "*":
      expression = f"({expression})"  # a sum or difference so far: multiply all of it
    expression += f"{op}{b}"
    c = _APPLY[op](a, b) % modulus
    steps.append(f"{a}{op}{b}={c}")
    a = c
  return tasks.Problem(prompt=expression + "=", answer=str(a),
                       solution=" ".join(steps) + f" {tasks.ANSWER_MARKER}{a}")


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
  """(values, operators) of a `worked_chain` prompt; raises on any other text."""
  values, ops = re.findall(r"[0-9]+", prompt), re.findall(r"[+\-*]", prompt)
  if not re.fullmatch(r"[()0-9+\-*]+=", prompt) or len(values) != len(ops) + 1:
    raise ValueError(f"not a chain prompt: {prompt[:80]!r}")
  return [int(v) for v in values], ops
