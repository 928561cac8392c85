"""Synthetic verifiable math: multi-step integer arithmetic, worked solutions, a held-out split."""
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from minirl_jax import errors

ANSWER_MARKER = "#"
_OPERATORS = "+-*"
# The held-out split is a property of the problem text alone, so it is the same for every
# training seed; the salt keeps it independent of any other hash of the same strings.
_SPLIT_SALT = b"minirl-heldout-1"  # blake2b salts are at most 16 bytes
_HELDOUT_STREAM_SEED = 20251202


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str    # "12+7-5="
  answer: str    # "14"
  solution: str  # "19-5=14 #14": the completion SFT teaches, ending with the marked answer


class HeldoutSplit:
  """The train / held-out split and the seeded streams every synthetic task shares.

  A task subclass is a frozen dataclass with a `heldout_fraction` field and a
  `draw(rng) -> Problem` method; `chain_task.ChainTask` is the other one.
  """
  heldout_fraction: float

  def draw(self, rng: np.random.Generator) -> Problem:
    raise NotImplementedError

  def is_heldout(self, prompt: str) -> bool:
    """Whether a prompt belongs to the held-out split (a salted hash of its text)."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8, salt=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < self.heldout_fraction

  def train_problem(self, seed: int, index: int) -> Problem:
    """The training problem at `index` of the stream `seed`; never a held-out problem."""
    rng = np.random.default_rng([seed, index])
    while True:
      problem = self.draw(rng)
      if not self.is_heldout(problem.prompt):
        return problem

  def heldout(self, num_problems: int) -> list[Problem]:
    """The first `num_problems` distinct held-out problems, in a fixed order (seed-free)."""
    rng = np.random.default_rng(_HELDOUT_STREAM_SEED)
    problems, seen = [], set()
    max_draws = 1000 + int(100 * num_problems / self.heldout_fraction)
    for _ in range(max_draws):
      if len(problems) == num_problems:
        return problems
      problem = self.draw(rng)
      if problem.prompt not in seen and self.is_heldout(problem.prompt):
        seen.add(problem.prompt)
        problems.append(problem)
    if len(problems) == num_problems:
      return problems
    raise ValueError(
        f"found only {len(problems)} distinct held-out problems after {max_draws} draws, "
        f"asked for {num_problems}: make the task's problem space larger (more operands, "
        "steps or values), raise heldout_fraction or ask for fewer")


@dataclasses.dataclass(frozen=True)
class ArithmeticTask(HeldoutSplit):
  """Expressions of `num_operands` integers in [0, max_value) joined by `operators`.

  The prompt is the expression and "="; the solution rewrites it one operation at a time
  (multiplications first, then left to right) and ends with `#answer`:
  "12+7-5=" -> "19-5=14 #14", "2+3*4=" -> "2+12=14 #14", "12+7=" -> "19 #19".
  """
  num_operands: int = 2
  max_value: int = 100
  operators: str = "+-"
  heldout_fraction: float = 0.05

  def __post_init__(self):
    if self.num_operands < 2:
      raise errors.UserError(f"num_operands must be >= 2, got {self.num_operands}")
    if self.max_value < 2:
      raise errors.UserError(f"max_value must be >= 2, got {self.max_value}")
    if not self.operators or set(self.operators) - set(_OPERATORS):
      raise errors.UserError(f"operators must be a non-empty subset of {_OPERATORS!r}, "
                             f"got {self.operators!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise errors.UserError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

  @property
  def max_prompt_chars(self) -> int:
    """Longest prompt in characters (= CharTokenizer tokens)."""
    digits = len(str(self.max_value - 1))
    return self.num_operands * digits + (self.num_operands - 1) + 1

  @property
  def max_solution_chars(self) -> int:
    """An upper bound on solution length in characters (EOS not included)."""
    top = self.max_value - 1
    largest = top ** self.num_operands if "*" in self.operators else top * self.num_operands
    width = len(str(largest)) + 1  # room for a minus sign
    steps = [k * width + (k - 1) for k in range(self.num_operands - 1, 0, -1)]
    return sum(steps) + len(steps) - 1 + len(" " + ANSWER_MARKER) + width

  def draw(self, rng: np.random.Generator) -> Problem:
    """Draws one problem from either split."""
    values = [int(v) for v in rng.integers(0, self.max_value, size=self.num_operands)]
    ops = [self.operators[int(i)]
           for i in rng.integers(0, len(self.operators), size=self.num_operands - 1)]
    return worked_problem(values, ops)


class TrainSource(Sequence):
  """A random-access source of `size` training records for grain (problem i is fixed by seed, i)."""

  def __init__(self, task: HeldoutSplit, *, seed: int, size: int = 1 << 16):
    self._task, self._seed, self._size = task, seed, size

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._size))]
    if not 0 <= index < self._size:
      raise IndexError(f"index {index} out of range for TrainSource of size {self._size}")
    return dataclasses.asdict(self._task.train_problem(self._seed, index))


def heldout_records(task: HeldoutSplit, num_problems: int) -> list[dict[str, str]]:
  """The held-out split as `{"prompt", "answer", "solution"}` records, in order."""
  return [dataclasses.asdict(p) for p in task.heldout(num_problems)]


def worked_problem(values: Sequence[int], ops: Sequence[str]) -> Problem:
  """Builds the prompt, worked solution and answer of `v0 op0 v1 op1 ...`."""
  values, ops = list(values), list(ops)
  prompt = _render(values, ops) + "="
  steps = []
  while ops:
    j = ops.index("*") if "*" in ops else 0
    values[j:j + 2] = [_apply(values[j], ops[j], values[j + 1])]
    del ops[j]
    steps.append(_render(values, ops))
  answer = str(values[0])
  return Problem(prompt=prompt, answer=answer,
                 solution="=".join(steps) + f" {ANSWER_MARKER}{answer}")


def _apply(a: int, op: str, b: int) -> int:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  return a * b


def _render(values: Sequence[int], ops: Sequence[str]) -> str:
  # Only the first value can be negative (products of non-negative operands come first),
  # so the rendering is unambiguous left to right.
  text = str(values[0])
  for op, value in zip(ops, values[1:]):
    text += f"{op}{value}"
  return text
