"""Reward functions R(prompt, completion, answer) -> [0, 1]; `scoring` runs them safely.

Model output is only ever parsed as text: nothing here passes it to eval or exec.
"""
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Optional

from minirl_jax.data.tasks import ANSWER_MARKER

RewardFn = Callable[[str, str, str], float]
_MAX_NUMBER_CHARS = 100  # longer "numbers" are compared as text, never converted


# ---------------------------------------------------------------- synthetic task


def extract_marked_answer(completion: str) -> Optional[str]:
  """The text after the first answer marker, stripped; None without a marker."""
  head, marker, tail = completion.partition(ANSWER_MARKER)
  del head
  return tail.strip() if marker else None


def exact_match(prompt: str, completion: str, answer: str) -> float:
  """1.0 iff everything after the first `#` in the completion equals the answer exactly."""
  del prompt
  extracted = extract_marked_answer(completion)
  return float(extracted is not None and extracted == answer.strip())


# ---------------------------------------------------------------- real math


def extract_boxed(text: str) -> Optional[str]:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
  for start in reversed(starts):
    depth = 1
    for i in range(start, len(text)):
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if depth == 0:
        return text[start:i]
  return None


def extract_final_answer(completion: str) -> Optional[str]:
  """The last `\\boxed{}` content, else the rest of the line after the last "Answer:"."""
  boxed = extract_boxed(completion)
  if boxed is not None:
    return boxed
  matches = re.findall(r"answer\s*(?:is)?\s*:\s*([^\n]*)", completion, flags=re.IGNORECASE)
  return matches[-1] if matches else None


_DELETIONS = (r"\!", r"\,", r"\;", r"\:", r"\ ", "$", "~",
              r"^\circ", r"^{\circ}", r"\displaystyle")


def normalize_answer(text: str) -> str:
  """Canonical text form of a final answer: LaTeX noise, spaces and trailing periods removed."""
  text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text.strip())
  for token in _DELETIONS:
    text = text.replace(token, "")
  text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", text)
  text = re.sub(r"\s+", "", text)
  text = re.sub(r"\\[dt]frac", r"\\frac", text)
  text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
  text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
  text = text.rstrip(".")
  text = re.sub(r"^[a-zA-Z]=", "", text)  # "x=5" -> "5"
  if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
    text = text.replace(",", "")
  return text


def parse_number(text: str) -> Optional[Fraction]:
  """Exact value of a normalised integer, decimal, a/b or \\frac{a}{b}; None otherwise."""
  if len(text) > _MAX_NUMBER_CHARS:
    return None
  sign = 1
  if text.startswith("-"):
    sign, text = -1, text[1:]
  frac = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", text)
  slash = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", text)
  pair = frac or slash
  if pair:
    denominator = Fraction(pair.group(2))
    return None if denominator == 0 else sign * Fraction(pair.group(1)) / denominator
  if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text):
    return sign * Fraction(text)
  return None


def answers_equivalent(predicted: str, reference: str) -> bool:
  """Built-in equivalence: equal numbers (exact), else equal normalised text."""
  pred, ref = normalize_answer(predicted), normalize_answer(reference)
  pred_value, ref_value = parse_number(pred), parse_number(ref)
  if pred_value is not None and ref_value is not None:
    return pred_value == ref_value
  return pred == ref


def _math_verify_equivalent(predicted: str, reference: str) -> bool:
  try:
    import math_verify
  except ImportError:
    return False
  # LaTeX extraction only: math-verify's plain-expression extractor hands text to sympy's
  # parse_expr, which calls eval. Timeouts belong to the caller (score_batch kills the
  # worker process); math-verify's own SIGALRM timeouts raise off the main thread.
  latex_only = [math_verify.LatexExtractionConfig()]
  gold = math_verify.parse(f"${reference}$", latex_only, parsing_timeout=None)
  pred = math_verify.parse(f"${predicted}$", latex_only, parsing_timeout=None)
  return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))


def math_reward(prompt: str, completion: str, answer: str) -> float:
  """1.0 iff the completion's final answer is equivalent to the reference answer.

  The final answer is the last `\\boxed{...}` (else the text after "Answer:"). It matches
  if the built-in check says so or, when `math-verify` is installed, math-verify does.
  Run it through `score_batch`/`RewardScorer`, which bound its time.
  """
  del prompt
  predicted = extract_final_answer(completion)
  if predicted is None or not predicted.strip():
    return 0.0
  if answers_equivalent(predicted, answer):
    return 1.0
  return float(_math_verify_equivalent(predicted, answer))
